"""The ``prowzi`` command line: small commands on one typer app.

Command modules import only typer and the standard library at module level, so that
``prowzi --help`` starts fast; heavy imports happen inside the commands.
"""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
