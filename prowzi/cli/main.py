"""The ``prowzi`` command line: small commands on one typer app.

Command modules import only typer and the standard library at module level, so that
``prowzi --help`` starts fast; heavy imports happen inside the commands.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from prowzi.cli import checkpoint_cmds, run_cmd, serve_cmd, telemetry_cmds

app = typer.Typer(
    name="prowzi",
    help="Prowzi: turn a research prompt into a cited document, durably and observably.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (run_cmd, checkpoint_cmds, telemetry_cmds, serve_cmd):
    _module.register(app)


def _show_flags_bare() -> None:
    """Recent typer versions label a flag with its type in rich help (``--dry-run <bool>``),
    as if it took a value, though ``--dry-run true`` is a usage error. Flags are shown bare,
    as click's plain help and git do; options that take a value keep their type."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "prowzi_flags_bare", False):
        return  # a typer without the label, or already adjusted

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        if self.is_flag and not self.count:
            return None
        return shown(self, ctx)  # type: ignore[no-any-return]

    display_type_rich.prowzi_flags_bare = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_show_flags_bare()


# click's usage errors (bad option values, missing arguments, unknown commands) derive from
# this; it is found through a public typer name because typer vendors click.
_CLICK_ERROR: type[Exception] = next(
    cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException"
)


def main() -> None:
    """Run the app; a usage error is one ``error:`` line and exit 2, never a panel."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except _CLICK_ERROR as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.exit(0)  # the help was printed
        message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
        context = getattr(exc, "ctx", None)
        hint = f" (see: {context.command_path} --help)" if context is not None else ""
        typer.echo(f"error: {message}{hint}", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
