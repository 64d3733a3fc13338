"""The README documents every setting and shows exactly the two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from prowzi.config import ProwziConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_setting_is_documented() -> None:
    for name in ProwziConfig.model_fields:
        assert f"`PROWZI_{name.upper()}`" in README, f"PROWZI_{name.upper()} is not in the README"


def test_two_setup_commands_and_ci_runs_the_second() -> None:
    section = README.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None
    commands = [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2
    assert "pip install ." in commands[0] and "prowzi run" in commands[0]
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert commands[1].strip() in ci
