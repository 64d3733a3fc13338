"""The ``prowzi`` command line: small commands on one typer app.

Command modules import only typer and the standard library at module level, so that
``prowzi --help`` starts fast; heavy imports happen inside the commands.
"""

from __future__ import annotations

import sys

import typer

from prowzi.cli import checkpoint_cmds, run_cmd, serve_cmd, telemetry_cmds, worker_cmd

app = typer.Typer(
    name="prowzi",
    help="Prowzi: turn a research prompt into a cited document, durably and observably.",
    add_completion=False,
    # Errors are one line (main() below), never a traceback or a panel.
    pretty_exceptions_enable=False,
    # Plain help, as git's: flags are shown bare (rich help labels every flag ``<bool>`` as if
    # it took a value, though ``--dry-run true`` is a usage error), and --help imports no rich.
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},  # as wide as the terminal, up to 120 columns
)

for _module in (run_cmd, checkpoint_cmds, telemetry_cmds, serve_cmd, worker_cmd):
    _module.register(app)


@app.callback(invoke_without_command=True)
def _no_command(ctx: typer.Context) -> None:
    """``prowzi`` alone prints the help and exits 0."""
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def main() -> None:
    """Run the app; a usage error is one ``error:`` line and exit 2, never a panel.

    ``standalone_mode=False`` makes typer raise its errors instead of printing them (as
    several lines, or a panel); they are all :class:`typer.TyperException` (click's
    ``ClickException``, which typer vendors, derives from it: hence the pin in pyproject.toml).
    """
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:
        message = " ".join(exc.format_message().split())
        context: typer.Context | None = getattr(exc, "ctx", None)
        hint = f" (see: {context.command_path} --help)" if context is not None else ""
        typer.echo(f"error: {message}{hint}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
