"""Real PDFs from text, made by real producers (no pytest here, so benchmarks use it too).

- :func:`ms_pdf`: groff's ``ms`` macros -> PostScript -> Ghostscript's ``pdfwrite``: a paper
  layout with a larger title and an author line under it; info-dictionary metadata (title,
  author) is added with a ``pdfmark``, or left out.
- :func:`enscript_pdf`: GNU enscript (monospace, no title by layout) -> Ghostscript.
- :func:`scanned_pdf`: the same PostScript rasterised by Ghostscript's ``pdfimage8`` device: an
  image-only PDF with no text layer, as a scanner makes.
- :func:`encrypted_pdf`: Ghostscript's ``pdfwrite`` with a user password.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


def _ps_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def ms_source(
    title: str, authors: Sequence[str], pages: Sequence[Sequence[str]], columns: int = 1
) -> str:
    """groff ms input: a title, authors, then one ``.bp`` page per item of paragraphs, in one
    or two columns.

    Pair kerning is off: with it, groff writes the space between a kerned pair as a letter
    spacing inside one string ("(lS)" for "l S"), and text extractors (pypdf, and
    Ghostscript's own txtwrite) then read "LarvalSeeding". That is a real limit of reading
    such PDFs, noted in the issue's report; these tests are about metadata and pages."""
    lines = [".kern 0", ".TL", title]
    for author in authors:
        lines += [".AU", author]
    if columns == 2:
        lines.append(".2C")
    for number, paragraphs in enumerate(pages):
        if number:
            lines.append(".bp")
        for paragraph in paragraphs:
            lines += [".PP", paragraph]
    return "\n".join(lines) + "\n"


def _run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    done = subprocess.run(cmd, input=stdin, capture_output=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {done.stderr.decode(errors='replace')[:500]}")
    return done.stdout


def groff_ps(ms: str) -> bytes:
    return _run(["groff", "-ms", "-Tps"], ms.encode("latin-1"))


def _pdfwrite(
    ps: bytes, out: Path, info: dict[str, str] | None = None, extra: Sequence[str] = ()
) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_suffix(".ps")
    source.write_bytes(ps)
    args = ["gs", "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=pdfwrite", *extra]
    args += [f"-sOutputFile={out}", str(source)]
    if info:
        marks = out.with_suffix(".marks.ps")
        fields = " ".join(f"/{k} {_ps_string(v)}" for k, v in info.items())
        marks.write_text(f"[ {fields} /DOCINFO pdfmark\n", encoding="latin-1")
        args.append(str(marks))
    try:
        _run(args)
    finally:
        source.unlink()
        if info:
            out.with_suffix(".marks.ps").unlink()
    return out


def ms_pdf(
    out: Path,
    title: str,
    authors: Sequence[str],
    pages: Sequence[Sequence[str]],
    info: dict[str, str] | None = None,
    columns: int = 1,
) -> Path:
    return _pdfwrite(groff_ps(ms_source(title, authors, pages, columns)), out, info)


def enscript_pdf(out: Path, text: str, info: dict[str, str] | None = None) -> Path:
    ps = _run(["enscript", "-q", "-B", "-p", "-", "--encoding=latin1"], text.encode("latin-1"))
    return _pdfwrite(ps, out, info)


def scanned_pdf(out: Path, title: str, pages: Sequence[Sequence[str]]) -> Path:
    ps = groff_ps(ms_source(title, [], pages))
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_suffix(".ps")
    source.write_bytes(ps)
    try:
        _run(
            [
                "gs", "-q", "-dNOPAUSE", "-dBATCH", "-dSAFER", "-sDEVICE=pdfimage8", "-r72",
                f"-sOutputFile={out}", str(source),
            ]
        )  # fmt: skip
    finally:
        source.unlink()
    return out


def encrypted_pdf(
    out: Path, title: str, pages: Sequence[Sequence[str]], user_password: str = "user-secret"
) -> Path:
    """Encrypted with an owner password and, unless ``user_password`` is empty, a password
    needed to open it (without one, any reader opens it: only permissions are restricted)."""
    extra = ["-sOwnerPassword=owner-secret"]
    if user_password:
        extra.append(f"-sUserPassword={user_password}")
    return _pdfwrite(groff_ps(ms_source(title, [], pages)), out, extra=extra)
