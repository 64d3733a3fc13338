"""``prowzi run`` as a user runs it: a real process, real files, one-line errors.

A real process where the entry point (``main()``: usage errors, exit codes) is the point;
typer's ``CliRunner`` where only a command's own behaviour is.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from shared import PROMPT, write_corpus
from typer.testing import CliRunner, Result

import prowzi as prowzi_pkg
from prowzi.cli.main import app


def prowzi(
    *args: str, env: dict[str, str] | None = None, module: bool = False
) -> subprocess.CompletedProcess[str]:
    command = (
        [sys.executable, "-m", "prowzi.cli.main"]
        if module
        else [str(Path(sys.executable).parent / "prowzi")]
    )
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


SAMPLE = Path(prowzi_pkg.__file__).parent / "agents" / "sample_corpus"


def _record_ids(path: Path) -> set[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(ln) for ln in lines if ln.strip()] if path.suffix == ".jsonl" else None
    if records is None:
        loaded = json.loads(path.read_text(encoding="utf-8"))
        records = loaded if isinstance(loaded, list) else [loaded]
    return {str(r.get("id")) for r in records}


def assert_citations_resolve_into_the_corpus(text: str) -> None:
    body, references = text.split("## References")
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", body)}
    listed = dict(re.findall(r"^\[(\d+)\] .*?Corpus: `([^`]+)`", references, flags=re.MULTILINE))
    assert cited, "the document cites nothing"
    assert cited <= {int(n) for n in listed}, "a citation does not resolve to a reference"
    for source in listed.values():
        path, _, record = source.partition("#")
        assert (SAMPLE / path).is_file(), f"reference {source} is not in the corpus"
        if record:
            assert record in _record_ids(SAMPLE / path), f"no record {source} in the corpus"


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """A command run in this process; an exception it lets out fails the test."""
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_one_line_error(proc: subprocess.CompletedProcess[str] | Result, *needles: str) -> None:
    code = proc.returncode if isinstance(proc, subprocess.CompletedProcess) else proc.exit_code
    assert code != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("module", [False, True])
def test_run_writes_a_cited_document_offline(module: bool, tmp_path: Path) -> None:
    proc = prowzi("run", PROMPT, module=module)
    assert proc.returncode == 0, proc.stderr
    session = re.search(r"Session: (\S+)", proc.stdout)
    assert session is not None
    # the main job says nothing else on stderr (no warning about checkpoints it never took)
    assert proc.stderr.splitlines() == [f"session: {session.group(1)}"]
    document = tmp_path / f"{session.group(1)}.md"
    text = document.read_text(encoding="utf-8")
    assert "quantum" in text.lower()
    assert_citations_resolve_into_the_corpus(text)
    assert f"Document: {document.name}" in proc.stdout or str(document.name) in proc.stdout


def test_ai_safety_document_cites_corpus_records(tmp_path: Path) -> None:
    out = tmp_path / "ai.md"
    proc = prowzi("run", "Write a research paper on AI safety", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    assert ".jsonl#" in text
    assert_citations_resolve_into_the_corpus(text)


def test_run_with_output_and_own_corpus(tmp_path: Path) -> None:
    corpus = write_corpus(
        tmp_path / "corpus",
        {
            "a.md": (
                "# Photosynthesis in algae\n\nAlgae convert light into chemical energy through "
                "photosynthesis, producing oxygen and sugars in their chloroplasts.\n"
            ),
            "b.jsonl": (
                '{"title": "Algae biofuels", "abstract": "Algae can be grown for biofuel because '
                'photosynthesis stores energy in lipids.", "authors": ["A. Writer"], "year": 2020, '
                '"url": "https://example.org/algae"}\n'
            ),
        },
    )
    out = tmp_path / "out" / "paper.md"
    proc = prowzi(
        "run",
        "Write a report on photosynthesis in algae",
        "--corpus",
        str(corpus),
        "--output",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    assert "Algae" in text or "algae" in text
    assert "## References" in text


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("run", ""), ("prompt is empty",)),
        (("run", "   "), ("prompt is empty",)),
        (("run", PROMPT, "--max-results", "0"), ("--max-results 0",)),
        (("run", PROMPT, "--max-results", "-5"), ("--max-results -5",)),
        (("run", PROMPT, "--corpus", "does-not-exist"), ("does-not-exist",)),
        (("run", PROMPT, "--max-results", "abc"), ("--max-results",)),
        (("run",), ("Missing argument",)),
        (("run", PROMPT, "--bogus"), ("--bogus",)),
        (("bogus",), ("No such command",)),
        (("run", PROMPT, "--output", "."), ("is a directory",)),
        (("sessions", "--limit", "-1"), ("--limit",)),
        (("run", PROMPT, "--session-id", ""), ("invalid session id ''",)),
    ],
)
def test_bad_input_gets_a_one_line_error(args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    proc = prowzi(*args)
    assert_one_line_error(proc, *needles)
    assert proc.returncode == 2
    assert not list(Path.cwd().glob("*.md"))


def test_corpus_without_readable_documents_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG")
    proc = prowzi("run", PROMPT, "--corpus", str(empty))
    assert_one_line_error(proc, str(empty))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PROWZI_MAX_RETRIES", "abc"),
        ("PROWZI_MAX_RETRIES", "-1"),
        ("PROWZI_ENABLE_CHECKPOINTING", "perhaps"),
        ("PROWZI_CHECKPOINT_INTERVAL", "0"),
        ("PROWZI_STAGE_TIMEOUT_SECONDS", "0"),
    ],
)
def test_invalid_environment_variable_is_named(variable: str, value: str) -> None:
    result = invoke("run", PROMPT, env={variable: value})
    assert_one_line_error(result, variable)
    assert result.exit_code == 2 and result.stdout == ""


@pytest.mark.parametrize("command", ["run", "resume", "cleanup", "checkpoints", "serve"])
def test_help_shows_flags_without_a_value_placeholder(command: str) -> None:
    """A flag takes no value (``--dry-run true`` is a usage error), so its help row must not
    suggest one; options that take a value keep their type."""
    out = invoke(command, "--help", env={"COLUMNS": "120"})
    assert out.exit_code == 0, out.stderr
    assert "<bool>" not in out.stdout
    rows = {
        found[1]: found[2]
        for line in out.stdout.splitlines()
        if (found := re.match(r"\s+(--[a-z-]+)\s+(.*)", line))
    }
    assert rows["--help"].startswith("Show")  # the description follows the flag directly
    if command == "resume":
        assert rows["--dry-run"].startswith("Print")
        assert rows["--set"].startswith("<key=value>") and rows["--from-stage"].startswith("<str>")


def test_prowzi_alone_prints_the_help() -> None:
    result = invoke()
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: prowzi [OPTIONS] COMMAND [ARGS]...")
    for command in ("run", "resume", "sessions", "show", "serve"):
        assert f"\n  {command} " in result.stdout
    assert result.stderr == ""


def test_a_session_with_checkpoints_is_not_reused_by_a_run_without_them(tmp_path: Path) -> None:
    """Checkpointing off does not make a session id free: the second run would overwrite the
    first's document and mix two runs in its telemetry. It is refused (exit 2), as with
    checkpointing on, and the first session's document and telemetry are left as they were."""
    dirs = {
        "PROWZI_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "PROWZI_TELEMETRY_DIR": str(tmp_path / "telemetry"),
    }
    first = prowzi("run", PROMPT, "--enable-checkpoints", "--session-id", "t1", env=dirs)
    assert first.returncode == 0, first.stderr
    document = (tmp_path / "t1.md").read_bytes()
    telemetry = sorted(
        (p.name, p.read_bytes()) for p in (tmp_path / "telemetry").rglob("*") if p.is_file()
    )
    for extra in ((), ("--enable-checkpoints",)):
        again = prowzi("run", "something else entirely", "--session-id", "t1", *extra, env=dirs)
        assert again.returncode == 2, again.stderr
        assert "Traceback" not in again.stderr
        error = again.stderr.splitlines()[-1]
        assert error.startswith("error: session t1 already exists (it has checkpoints)")
        assert again.stdout == ""
    assert (tmp_path / "t1.md").read_bytes() == document
    assert (
        sorted((p.name, p.read_bytes()) for p in (tmp_path / "telemetry").rglob("*") if p.is_file())
        == telemetry
    )
    # a fresh id still runs without checkpoints
    fresh = prowzi("run", PROMPT, "--session-id", "t2", env=dirs)
    assert fresh.returncode == 0, fresh.stderr
    assert (tmp_path / "t2.md").is_file()
