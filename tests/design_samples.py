"""Run the design document's code samples verbatim.

Samples are taken from ``docs/design.md`` (a copy of the original design document) by the
heading above them, so a test can never drift from the text users read. They run with
top-level ``await`` allowed, in a namespace shared across the samples of one test, as a reader
would paste them into one async session.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"


def sample(heading: str, index: int = 0, language: str = "python") -> str:
    """The ``index``-th code block in ``language`` under the markdown heading ``heading``."""
    lines = DESIGN.read_text(encoding="utf-8").splitlines()
    in_fence = False
    section: list[str] | None = None
    for line in lines:
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"#+ ", line):
            if section is not None:
                break
            if line.lstrip("#").strip() == heading:
                section = []
                continue
        if section is not None:
            section.append(line)
    if section is None:
        raise LookupError(f"no heading {heading!r} in {DESIGN}")
    pattern = rf"```{re.escape(language)}\n(.*?)```"
    blocks = re.findall(pattern, "\n".join(section) + "\n", flags=re.DOTALL)
    return str(blocks[index])


async def run_sample(source: str, namespace: dict[str, Any]) -> None:
    """Execute ``source`` in ``namespace``, awaiting it if it uses top-level ``await``."""
    code = compile(source, "<design sample>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)
    if inspect.isawaitable(result):
        await result


def reader_namespace() -> dict[str, Any]:
    """What the document's snippets take for granted: ``Path`` and the typing names."""
    import typing
    from pathlib import Path as _Path

    names = ("Any", "Dict", "List", "Optional")
    return {"__name__": "design_sample", "Path": _Path} | {n: getattr(typing, n) for n in names}
