"""Reading a corpus file into :class:`~prowzi.sources.records.Document`\\ s: one reader per format.

Formats: ``.pdf`` (pypdf), ``.md``/``.markdown``, ``.txt``, ``.rst``, ``.html``/``.htm``
(text, not markup), ``.docx`` (python-docx, the ``docx`` extra), ``.json``/``.jsonl`` records
and BibTeX ``.bib`` entries. Text is split into passages that carry their page (PDF) or their
heading, so a citation can point at ``p. 12`` or a section.

Metadata is found, never invented, and every field says where it came from
(``Document.metadata_source``), from the weakest guess to the strongest word:

``file-name`` (title, the last resort) < ``pdf-layout`` (the first page's largest line and
the author line under it) < ``markdown-heading`` / ``rst-title`` / ``html-title`` /
``docx-title`` < ``pdf-info`` / ``pdf-xmp`` / ``docx-properties`` / ``rst-docinfo`` <
``front-matter`` / ``record`` < ``text-doi`` / ``text-arxiv`` (a DOI or arXiv id printed in the
document) < ``bibtex`` (a ``.bib`` entry naming the file in ``file`` or keyed by its stem)
< ``manifest`` (``prowzi-corpus.json`` ``"documents"`` or ``prowzi-corpus.csv``).

A PDF's creation date is when the file was made, not when the work appeared, so it is never
taken for the year.

Why these libraries: pypdf is pure Python (no native wheel, so ``pip install`` stays simple),
BSD-licensed, actively maintained, and reads text with its font sizes (the layout title) and
the info dictionary and XMP; pdfminer.six extracts slightly better text but is slower and
heavier, and PyMuPDF is AGPL. python-docx (MIT) is the standard reader for ``.docx``; it needs
lxml, so it is an extra and a ``.docx`` without it is skipped with a reason. bibtexparser 1.x
(BSD) parses BibTeX with its braces, quotes and month macros. HTML uses the standard library's
``html.parser``.
"""

from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from prowzi.sources.records import Document, Passage, without_doi_prefix, year_of

logging.getLogger("pypdf").setLevel(logging.ERROR)  # font warnings are not the user's concern

MANIFEST_NAME = "prowzi-corpus.json"
CSV_MANIFEST_NAME = "prowzi-corpus.csv"
TEXT_SUFFIXES = (".md", ".markdown", ".txt", ".rst")
DOCUMENT_SUFFIXES = (*TEXT_SUFFIXES, ".html", ".htm", ".pdf", ".docx")
RECORD_SUFFIXES = (".json", ".jsonl", ".bib")
SUPPORTED_SUFFIXES = DOCUMENT_SUFFIXES + RECORD_SUFFIXES
MAX_FILE_BYTES = 20 * 1024 * 1024
"""Largest text, HTML or record file read."""
MAX_BINARY_FILE_BYTES = 100 * 1024 * 1024
"""Largest PDF or DOCX read."""

PASSAGE_WORDS = 120
"""Target passage length in words: a paragraph or a few, never across a page or a heading."""


@dataclass(frozen=True, slots=True)
class CorpusFile:
    relative: str
    path: Path
    size: int
    mtime_ns: int


def max_bytes(relative: str) -> int:
    return MAX_BINARY_FILE_BYTES if relative.lower().endswith((".pdf", ".docx")) else MAX_FILE_BYTES


# --- metadata -----------------------------------------------------------------------------


@dataclass(slots=True)
class Meta:
    """Metadata fields with where each came from; a later ``put`` of a value wins."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def put(self, name: str, value: Any, source: str) -> None:
        if value in (None, "", (), []):
            return
        self.values[name] = value
        self.sources[name] = source

    def merge(self, raw: Mapping[str, Any], source: str) -> None:
        """Fields of a front-matter block, a record, a .bib entry or a manifest row."""
        title = raw.get("title")
        if isinstance(title, str):
            self.put("title", " ".join(strip_braces(title).split()), source)
        self.put("authors", authors_of(raw.get("authors", raw.get("author"))), source)
        self.put("year", year_of(raw.get("year", raw.get("date"))), source)
        self.put("url", url_of(raw.get("url")), source)
        self.put("doi", normalise_doi(raw.get("doi")), source)
        eprint = raw.get("eprint") if str(raw.get("archiveprefix", "")).lower() == "arxiv" else None
        self.put("arxiv_id", arxiv_id_of(raw.get("arxiv_id") or raw.get("arxiv") or eprint), source)


def strip_braces(value: str) -> str:
    return value.replace("{", "").replace("}", "")


def authors_of(value: Any) -> tuple[str, ...]:
    if isinstance(value, list):
        items = [str(v).strip() for v in value]
    elif isinstance(value, str):
        value = strip_braces(value)
        sep = ";" if ";" in value else (" and " if " and " in value else ",")
        items = [v.strip() for v in value.split(sep)]
    else:
        items = []
    return tuple(a for a in items if a)


def normalise_doi(value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return without_doi_prefix(value) or None


def url_of(value: Any) -> str | None:
    if isinstance(value, str) and re.match(r"^https?://\S+$", value.strip()):
        return value.strip()
    return None


def arxiv_id_of(value: Any) -> str | None:
    """``arXiv:2103.01234v2`` or ``2103.01234`` -> ``2103.01234`` (no version)."""
    if not isinstance(value, str):
        return None
    m = re.search(r"(\d{4}\.\d{4,5})(?:v\d+)?\b", value)
    return m.group(1) if m else None


def truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in {"true", "yes"})


_DOI_IN_TEXT = re.compile(
    r"\b(?:doi:\s*|https?://(?:dx\.)?doi\.org/)?(10\.\d{4,9}/[^\s\"<>]+)", re.I
)
_ARXIV_IN_TEXT = re.compile(r"\barXiv:\s*(\d{2})(\d{2})\.\d{4,5}(?:v\d+)?\b", re.I)


def identifiers_in(text: str, meta: Meta) -> None:
    """A DOI or an arXiv id printed near the start of a document (its own, not a reference's:
    only the first 3,000 characters are read)."""
    head = text[:3000]
    doi = _DOI_IN_TEXT.search(head)
    if doi and "doi" not in meta.values:
        meta.put("doi", doi.group(1).rstrip(".,;)]"), "text-doi")
    arxiv = _ARXIV_IN_TEXT.search(head)
    if arxiv and "arxiv_id" not in meta.values:
        meta.put("arxiv_id", arxiv_id_of(arxiv.group(0)), "text-arxiv")
        if "year" not in meta.values and 1 <= int(arxiv.group(2)) <= 12:
            meta.put("year", 2000 + int(arxiv.group(1)), "text-arxiv")
        if "url" not in meta.values:
            meta.put("url", f"https://arxiv.org/abs/{meta.values['arxiv_id']}", "text-arxiv")


def file_key(relative: str) -> str:
    """The stem a ``.bib`` entry's key may name: ``papers/shor94.pdf`` -> ``shor94``."""
    return Path(relative).stem.removesuffix(".rst")


def pretty_stem(path: Path) -> str:
    return " ".join(re.split(r"[_\-\s]+", path.stem.removesuffix(".rst"))).strip() or path.name


@dataclass(slots=True)
class Overrides:
    """Metadata a user wrote down beside the documents: ``.bib`` entries and the manifest.

    ``bibtex`` maps a corpus-relative path, a bare file name or a stem (an entry's key) to the
    entry's fields; ``manifest`` maps a relative path or a file name to its fields (the
    manifest is applied last, so it wins); ``bib_claimed`` holds the ``.bib`` entries that
    describe a file and so are not also records of their own."""

    bibtex: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, dict[str, Any]] = field(default_factory=dict)
    bib_claimed: set[str] = field(default_factory=set)

    def apply(self, relative: str, meta: Meta) -> None:
        name = Path(relative).name
        for key in (file_key(relative), name, relative):
            if key in self.bibtex:
                meta.merge(self.bibtex[key], "bibtex")
        for key in (name, relative):
            if key in self.manifest:
                meta.merge(self.manifest[key], "manifest")


def _bib_file_field(value: Any) -> str | None:
    """The file a ``file`` field names: ``paper.pdf``, or JabRef's ``:paper.pdf:PDF``."""
    parts = [p.strip() for p in str(value or "").split(":")]
    return next((p for p in parts if p.lower().endswith(DOCUMENT_SUFFIXES)), None)


def load_overrides(
    root: Path,
    manifest: Mapping[str, Any],
    bib_files: Iterable[CorpusFile],
    stems: Iterable[str] = (),
) -> Overrides:
    """The overrides of a corpus; ``stems`` are its documents' file stems, which a ``.bib``
    entry's key may name instead of a ``file`` field."""
    overrides = Overrides()
    known_stems = set(stems)
    for f in bib_files:
        for entry in _bib_entries(f):
            target = _bib_file_field(entry.get("file"))
            key = str(entry.get("ID", ""))
            if target:
                overrides.bibtex[target] = entry
                overrides.bib_claimed.add(f"{f.relative}#{key}")
            elif key:
                overrides.bibtex.setdefault(key, entry)
                if key in known_stems:
                    overrides.bib_claimed.add(f"{f.relative}#{key}")
    documents = manifest.get("documents")
    if isinstance(documents, dict):
        for rel, fields in documents.items():
            if isinstance(fields, dict):
                overrides.manifest[str(rel)] = fields
    csv_path = root / CSV_MANIFEST_NAME
    if csv_path.is_file():
        try:
            with open(csv_path, encoding="utf-8-sig", newline="") as fh:
                for row in csv.DictReader(fh):
                    rel = (row.get("path") or row.get("file") or "").strip()
                    if rel:
                        overrides.manifest[rel] = {k: v for k, v in row.items() if v}
        except (OSError, UnicodeDecodeError, csv.Error):
            pass  # an unreadable CSV manifest overrides nothing; the documents still load
    return overrides


def _bib_entries(f: CorpusFile) -> list[dict[str, Any]]:
    import bibtexparser  # type: ignore[import-untyped]
    from bibtexparser.bparser import BibTexParser  # type: ignore[import-untyped]

    if f.size > MAX_FILE_BYTES:
        return []
    try:
        raw = f.path.read_text(encoding="utf-8-sig")
        database = bibtexparser.loads(raw, parser=BibTexParser(common_strings=True))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    except Exception:  # bibtexparser raises pyparsing errors of its own on malformed input
        return []
    return [dict(e) for e in database.entries]


# --- passages -----------------------------------------------------------------------------


def _split_long(paragraph: str) -> list[str]:
    words = paragraph.split()
    if len(words) <= PASSAGE_WORDS * 2:
        return [paragraph]
    from prowzi.agents._text import sentences

    out: list[str] = []
    current: list[str] = []
    count = 0
    for sentence in sentences(paragraph):
        n = len(sentence.split())
        if current and count + n > PASSAGE_WORDS:
            out.append(" ".join(current))
            current, count = [], 0
        current.append(sentence)
        count += n
    if current:
        out.append(" ".join(current))
    return out


def make_passages(blocks: Iterable[tuple[str, int | None, str | None]]) -> tuple[Passage, ...]:
    """Passages from (paragraph, page, section) blocks: consecutive paragraphs of one page and
    one section are joined up to about :data:`PASSAGE_WORDS` words."""
    passages: list[Passage] = []
    current: list[str] = []
    count = 0
    where: tuple[int | None, str | None] = (None, None)

    def flush() -> None:
        nonlocal current, count
        if current:
            passages.append(Passage("\n\n".join(current), where[0], where[1]))
        current, count = [], 0

    for paragraph, page, section in blocks:
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if (page, section) != where:
            flush()
            where = (page, section)
        for piece in _split_long(paragraph):
            n = len(piece.split())
            if current and count + n > PASSAGE_WORDS:
                flush()
            current.append(piece)
            count += n
    flush()
    return tuple(passages)


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# --- Markdown -----------------------------------------------------------------------------


_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.S)
_MD_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def parse_front_matter(block: str) -> dict[str, Any]:
    """``key: value`` lines, ``[a, b]`` inline lists and ``- item`` block lists."""
    data: dict[str, Any] = {}
    current: str | None = None
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = re.match(r"^\s+-\s+(.*)$", line) or re.match(r"^-\s+(.*)$", line)
        if item and current is not None:
            existing = data.get(current)
            values = existing if isinstance(existing, list) else []
            values.append(_unquote(item.group(1)))
            data[current] = values
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        current = key.strip().lower()
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            data[current] = [_unquote(v) for v in value[1:-1].split(",") if v.strip()]
        elif value:
            data[current] = _unquote(value)
        else:
            data[current] = []
    return data


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def plain_markdown(markdown: str) -> str:
    """Markdown reduced to prose: headings, emphasis markers and link targets removed."""
    lines = []
    for line in markdown.splitlines():
        if _MD_HEADING.match(line):
            lines.append("")
            continue
        line = _LINK.sub(r"\1", line)
        line = re.sub(r"(\*\*|__|\*|`)", "", line)
        line = re.sub(r"^\s*(?:[-+*]|\d+\.)\s+", "", line)
        line = re.sub(r"^\s*>\s?", "", line)
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _sectioned(
    body: str, headings: list[tuple[int, int, str]], clean: Any
) -> list[tuple[str, int | None, str | None]]:
    """(paragraph, None, section) blocks of a text whose headings are at (start, end, title)."""
    blocks: list[tuple[str, int | None, str | None]] = []
    bounds = [(0, 0, None), *headings]
    for i, (_, end, title) in enumerate(bounds):
        stop = headings[i][0] if i < len(headings) else len(body)
        blocks.extend((p, None, title) for p in paragraphs(clean(body[end:stop])))
    return blocks


def read_markdown(relative: str, path: Path, raw: str, meta: Meta) -> Document:
    body = raw
    fm = _FRONT_MATTER.match(raw)
    front: dict[str, Any] = {}
    if fm:
        front = parse_front_matter(fm.group(1))
        body = raw[fm.end() :]
    heading = _MD_HEADING.search(body)
    if heading and (
        heading.group(2).strip().lower() in {"abstract", "summary"}
        or (len(heading.group(1)) > 1 and body[: heading.start()].strip())
    ):
        heading = None  # a section heading after some prose, not the document's title
    if heading:
        meta.put("title", plain_markdown(heading.group(2)) or None, "markdown-heading")
        # The title heading is the document's name, not part of its prose.
        body = body[: heading.start()] + body[heading.end() :]
    meta.merge(front, "front-matter")
    abstract = ""
    abstract_heading = re.search(r"^#{1,6}[ \t]+(?:abstract|summary)[ \t]*$", body, re.M | re.I)
    if abstract_heading:
        rest = body[abstract_heading.end() :]
        nxt = _MD_HEADING.search(rest)
        abstract = plain_markdown(rest[: nxt.start()] if nxt else rest)
    text = plain_markdown(body)
    if not abstract:
        abstract = text.split("\n\n", 1)[0].strip()
    headings = [
        (m.start(), m.end(), plain_markdown(m.group(2))) for m in _MD_HEADING.finditer(body)
    ]
    blocks = _sectioned(body, headings, plain_markdown)
    return _finish(relative, path, meta, abstract, text, blocks, truthy(front.get("sample")))


# --- reStructuredText (and plain text) ------------------------------------------------------


_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+<>:._])\1{2,}\s*$")
_RST_ROLE = re.compile(r":[\w:+-]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")
_RST_FIELD = re.compile(r"^:(author|authors|date|year|doi|url):\s*(.+)$", re.I | re.M)
_RST_AUTHOR_DIRECTIVE = re.compile(r"^\.\.\s+sectionauthor::\s*(.+)$", re.M)


def _rst_headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(first line, line after, title) of each underlined (optionally overlined) heading."""
    found: list[tuple[int, int, str]] = []
    i = 0
    while i < len(lines) - 1:
        line, nxt = lines[i], lines[i + 1]
        if (
            _RST_ADORNMENT.match(line)
            and i + 2 < len(lines)
            and lines[i + 1].strip()
            and _RST_ADORNMENT.match(lines[i + 2])
        ):
            found.append((i, i + 3, lines[i + 1].strip()))
            i += 3
            continue
        if (
            line.strip()
            and not line.startswith((" ", "\t", ".."))
            and _RST_ADORNMENT.match(nxt)
            and len(nxt.rstrip()) >= len(line.rstrip())
            and (i == 0 or not lines[i - 1].strip())
        ):
            found.append((i, i + 2, line.strip()))
            i += 2
            continue
        i += 1
    return found


def plain_rst(text: str) -> str:
    """reStructuredText reduced to prose: directives, comments, field lists, tables and
    literal blocks dropped; roles, links and inline markup unwrapped."""
    out: list[str] = []
    skipping_indent: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skipping_indent is not None:
            if not stripped or indent > skipping_indent:
                continue
            skipping_indent = None
        if stripped.startswith(".. ") or stripped == "..":
            skipping_indent = indent
            out.append("")
            continue
        if re.match(r"^[+|]", stripped) or re.match(r"^:\w[\w ]*:\s", stripped):
            out.append("")
            continue
        if stripped.startswith((">>>", "...", "$ ")):
            out.append("")
            continue
        if stripped.endswith("::"):
            # "Like this::" introduces a literal block: keep "Like this." and drop the block.
            line = line.rstrip()[:-1] if stripped != "::" else ""
            skipping_indent = indent
            ends = line.strip()[-1:]
            out.append(line.rstrip(":") + ("." if ends and ends not in ".:" else ""))
            continue
        out.append(line)
    prose = "\n".join(out)
    prose = _RST_LINK.sub(r"\1", prose)
    prose = _RST_ROLE.sub(lambda m: m.group(1).lstrip("~!"), prose)
    prose = re.sub(r"``([^`]+)``", r"\1", prose)
    prose = re.sub(r"(\*\*|\*|`)", "", prose)
    prose = re.sub(r"\|(\w+)\|", r"\1", prose)
    prose = re.sub(r"^\s*(?:[-+*]|\d+\.|#\.)\s+", "", prose, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", prose).strip()


def _strip_email(name: str) -> str:
    return re.sub(r"\s*[<(][^>)]*[>)]", "", name).strip()


def read_text(relative: str, path: Path, raw: str, meta: Meta) -> Document:
    """A ``.txt`` or ``.rst`` file; reStructuredText titles, sections and docinfo are used
    when present (Python's own documentation ships its sources as ``.rst.txt``)."""
    fm = _FRONT_MATTER.match(raw)
    lines = raw[fm.end() :].splitlines() if fm else raw.splitlines()
    headings = _rst_headings(lines)
    if not headings:
        # Plain text (or Markdown in a .txt file), read as it always was.
        return read_markdown(relative, path, raw, meta)
    body_lines = list(lines)
    first_text = next(
        (i for i, line in enumerate(lines) if line.strip() and not line.startswith("..")), None
    )
    title_heading = (
        headings[0]
        if headings and first_text is not None and headings[0][0] <= first_text
        else None
    )
    if title_heading is not None:
        # Sphinx writes an em dash as "---": ":mod:`logging` --- Logging facility for Python".
        title = plain_rst(title_heading[2]).replace("\n", " ").replace(" --- ", " — ")
        meta.put("title", title or None, "rst-title")
    for m in _RST_FIELD.finditer(raw[:5000]):
        name, value = m.group(1).lower(), m.group(2).strip()
        if name.startswith("author"):
            meta.put(
                "authors",
                tuple(_strip_email(a) for a in re.split(r",|;| and ", value) if _strip_email(a)),
                "rst-docinfo",
            )
        elif name in {"date", "year"}:
            meta.put("year", year_of(value), "rst-docinfo")
        elif name == "doi":
            meta.put("doi", normalise_doi(value), "rst-docinfo")
        elif name == "url":
            meta.put("url", url_of(value), "rst-docinfo")
    if "authors" not in meta.values:
        authors = _text_unique(_strip_email(a) for a in _RST_AUTHOR_DIRECTIVE.findall(raw[:5000]))
        meta.put("authors", tuple(a for a in authors if a), "rst-docinfo")
    front = parse_front_matter(fm.group(1)) if fm else {}
    meta.merge(front, "front-matter")
    sections: list[tuple[int, int, str]] = []
    offsets = [0]
    for line in body_lines:
        offsets.append(offsets[-1] + len(line) + 1)
    joined = "\n".join(body_lines)
    for start, end, title in headings:
        if title_heading is not None and start == title_heading[0]:
            sections.append((offsets[start], offsets[min(end, len(lines))], ""))
            continue
        sections.append((offsets[start], offsets[min(end, len(lines))], plain_rst(title)))
    blocks = [
        (p, page, section or None) for p, page, section in _sectioned(joined, sections, plain_rst)
    ]
    text = "\n\n".join(p for p, _, _ in blocks)
    abstract = blocks[0][0] if blocks else ""
    return _finish(relative, path, meta, abstract, text, blocks, truthy(front.get("sample")))


def _text_unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# --- HTML ---------------------------------------------------------------------------------


class _HTMLText(HTMLParser):
    _SKIP = frozenset({"script", "style", "nav", "header", "footer", "noscript", "template"})
    _BLOCK = frozenset(
        {
            "p",
            "div",
            "li",
            "br",
            "tr",
            "section",
            "article",
            "dd",
            "dt",
            "pre",
            "blockquote",
            "table",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.meta: dict[str, str] = {}
        self.blocks: list[tuple[str, str | None]] = []
        self.h1 = ""
        self._skip_tag: str | None = None
        """The element being skipped (script, navigation...) and how deep inside it we are."""
        self._skip_depth = 0
        self._in_title = False
        self._heading: str | None = None
        self._heading_text: list[str] = []
        self._section: str | None = None
        self._buffer: list[str] = []

    def _boilerplate(self, attrs: list[tuple[str, str | None]]) -> bool:
        """An element a site wraps around its content: navigation, sidebars, footers."""
        a = {k.lower(): (v or "").lower() for k, v in attrs}
        if a.get("role") in {"navigation", "banner", "contentinfo", "search"}:
            return True
        classes = set(re.split(r"[\s_-]+", a.get("class", "")))
        return bool(classes & {"sidebar", "sphinxsidebar", "related", "footer", "nav", "navbar"})

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip_tag is not None:
            self._skip_depth += tag == self._skip_tag
            return
        if tag in self._SKIP or (tag in {"div", "aside", "ul"} and self._boilerplate(attrs)):
            self._flush()
            self._skip_tag, self._skip_depth = tag, 1
        elif tag == "title":
            self._in_title = True
        elif tag == "meta":
            a = {k.lower(): v or "" for k, v in attrs}
            name = (a.get("name") or a.get("property") or "").lower()
            if name and a.get("content"):
                self.meta.setdefault(name, a["content"])
        elif tag in {"h1", "h2", "h3", "h4"}:
            self._flush()
            self._heading, self._heading_text = tag, []
        elif tag in self._BLOCK:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag == "title":
            self._in_title = False
        elif tag == self._heading:
            text = " ".join("".join(self._heading_text).split()).rstrip("¶").strip()
            if tag == "h1" and not self.h1:
                self.h1 = text
            else:
                self._section = text or self._section
            self._heading = None
        elif tag in self._BLOCK:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._skip_tag is not None:
            return
        if self._in_title:
            self.title += data
        elif self._heading is not None:
            self._heading_text.append(data)
        else:
            self._buffer.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        if text:
            self.blocks.append((text, self._section))
        self._buffer = []

    def close(self) -> None:
        super().close()
        self._flush()


def read_html(relative: str, path: Path, raw: str, meta: Meta) -> Document:
    parser = _HTMLText()
    parser.feed(raw)
    parser.close()
    title = " ".join((parser.h1 or parser.title).split())
    meta.put("title", title or None, "html-title")
    for key in ("citation_title", "dc.title"):
        if parser.meta.get(key):
            meta.put("title", parser.meta[key].strip(), "html-meta")
    author = parser.meta.get("citation_author") or parser.meta.get("author")
    if author:
        meta.put("authors", authors_of(author), "html-meta")
    for key in ("citation_publication_date", "citation_date", "dc.date"):
        if parser.meta.get(key):
            meta.put("year", year_of(parser.meta[key]), "html-meta")
    meta.put("doi", normalise_doi(parser.meta.get("citation_doi")), "html-meta")
    blocks = [(html.unescape(t), None, s) for t, s in parser.blocks]
    text = "\n\n".join(t for t, _, _ in blocks)
    return _finish(relative, path, meta, blocks[0][0] if blocks else "", text, blocks)


# --- PDF ----------------------------------------------------------------------------------


_PAGE_NUMBER_LINE = re.compile(r"^\s*[-–—]?\s*\d{1,4}\s*[-–—]?\s*$")
# Placeholders producers write when a document has no title ("Untitled", enscript's
# "Enscript Output", a word processor's file name): no title at all is more honest.
_JUNK_TITLE = re.compile(
    r"^(?:untitled|microsoft word|enscript output|document\d*$|slide \d+)"
    r"|\.(?:docx?|tex|dvi|pdf|ps|txt|odt)$",
    re.I,
)


class Unreadable(Exception):
    """A file that cannot be read; its message is the skip reason."""


def pdf_page_text(page: Any) -> str:
    """A page's text in paragraphs: pypdf's layout mode keeps each line's indentation, so a
    blank line or a line indented past the page's left margin (a first-line indent, a
    centred heading) starts a new paragraph."""
    raw = [line.rstrip() for line in page.extract_text(extraction_mode="layout").splitlines()]
    raw = [line for line in raw if not _PAGE_NUMBER_LINE.match(line)]
    indents = [len(line) - len(line.lstrip()) for line in raw if line.strip()]
    margin = min(indents, default=0)
    out: list[str] = []
    for line in raw:
        if not line.strip():
            out.append("")
            continue
        if len(line) - len(line.lstrip()) > margin + 2 and out and out[-1]:
            out.append("")
        out.append(" ".join(line.split()))
    return unicodedata.normalize("NFKC", re.sub(r"\n{3,}", "\n\n", "\n".join(out))).strip()


def _respace(fragment: str, page_text: str) -> str:
    """``fragment`` as the page's text spells it: text runs drop the spaces a typesetter made
    by positioning ("LarvalSeeding"), the page's laid-out lines keep them."""
    key = re.sub(r"\s+", "", fragment)
    if not key:
        return fragment
    lines = [line for line in page_text.splitlines() if line.strip()][:30]
    for i in range(len(lines)):
        for j in range(i + 1, min(i + 4, len(lines) + 1)):
            candidate = " ".join(lines[i:j])
            if re.sub(r"\s+", "", candidate) == key:
                return candidate
    return fragment


def _first_page_layout(page: Any) -> tuple[str, str]:
    """The first page's title (its largest text, near the top) and the line under it."""
    runs: list[tuple[float, float, str]] = []

    def visit(text: str, cm: Any, tm: Any, font: Any, size: float) -> None:
        if text.strip():
            scale = abs(float(tm[3]) * float(cm[3])) or 1.0
            y = float(tm[5]) * float(cm[3]) + float(cm[5])
            runs.append((round(size * scale, 1), y, " ".join(text.split())))

    page.extract_text(visitor_text=visit)
    if not runs:
        return "", ""
    top = runs[:40]
    largest = max(s for s, _, _ in top)
    body = sorted(s for s, _, _ in runs)[len(runs) // 2]
    if largest <= body:
        return "", ""  # one size throughout: no title by layout
    first = next(i for i, r in enumerate(top) if r[0] == largest)
    title_parts = []
    i = first
    while i < len(top) and top[i][0] == largest:
        title_parts.append(top[i][2])
        i += 1
    author = top[i][2] if i < len(top) else ""
    if (
        len(author.split()) > 12
        or re.search(r"\d|abstract|introduction", author, re.I)
        or not re.match(r"^[A-Z]", author)
    ):
        author = ""
    return " ".join(" ".join(title_parts).split()), author


def read_pdf(relative: str, path: Path, meta: Meta) -> Document:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PdfReadError

    aes = "encrypted PDF (AES, with no password): reading it needs the cryptography package"
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted:
            try:
                opened = bool(reader.decrypt(""))
            except DependencyError:
                raise Unreadable(aes) from None
            except Exception:
                opened = False
            if not opened:
                raise Unreadable("encrypted PDF (needs a password)")
        pages = [pdf_page_text(page) for page in reader.pages]
        layout_title, layout_author = (
            _first_page_layout(reader.pages[0]) if reader.pages else ("", "")
        )
        layout_title = _respace(layout_title, pages[0] if pages else "")
        layout_author = _respace(layout_author, pages[0] if pages else "")
        info: Mapping[str, Any] = reader.metadata or {}
        xmp = _xmp(reader)
    except Unreadable:
        raise
    except FileNotDecryptedError:
        raise Unreadable("encrypted PDF (needs a password)") from None
    except DependencyError:
        raise Unreadable(aes) from None
    except (
        PdfReadError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        OSError,
        RecursionError,
    ) as exc:
        raise Unreadable(
            f"unreadable PDF: {' '.join(str(exc).split())[:120] or type(exc).__name__}"
        ) from None
    except Exception as exc:  # pypdf raises a wide range of errors on broken files
        raise Unreadable(f"unreadable PDF: {type(exc).__name__}") from None
    if not any(len(p.split()) >= 3 for p in pages):
        raise Unreadable(
            f"no text layer in {len(pages)} page(s) (a scanned PDF? run OCR on it first)"
        )
    meta.put("title", layout_title or None, "pdf-layout")
    if layout_author and layout_title:
        meta.put("authors", authors_of(layout_author), "pdf-layout")
    info_title = str(info.get("/Title") or "").strip()
    if info_title and not _JUNK_TITLE.search(info_title):
        meta.put("title", info_title, "pdf-info")
    meta.put("authors", authors_of(str(info.get("/Author") or "").strip()), "pdf-info")
    xmp_title = xmp.get("title")
    if xmp_title and not _JUNK_TITLE.search(xmp_title):
        meta.put("title", xmp_title, "pdf-xmp")
    xmp_authors = [a for name in xmp.get("authors", ()) for a in authors_of(name)]
    meta.put("authors", tuple(xmp_authors), "pdf-xmp")
    meta.put("year", xmp.get("year"), "pdf-xmp")
    meta.put("doi", normalise_doi(xmp.get("doi")), "pdf-xmp")
    blocks = [
        (paragraph, number, None)
        for number, page_text in enumerate(pages, start=1)
        for paragraph in paragraphs(page_text)
    ]
    text = "\n\n".join(p for p, _, _ in blocks)
    return _finish(relative, path, meta, blocks[0][0] if blocks else "", text, blocks)


def _xmp(reader: Any) -> dict[str, Any]:
    try:
        xmp = reader.xmp_metadata
    except Exception:
        return {}
    if xmp is None:
        return {}
    out: dict[str, Any] = {}
    try:
        title = xmp.dc_title
        if isinstance(title, dict) and title:
            out["title"] = str(title.get("x-default") or next(iter(title.values()))).strip()
        creators = xmp.dc_creator
        if creators:
            out["authors"] = tuple(str(c).strip() for c in creators if str(c).strip())
        dates = xmp.dc_date
        if dates:
            out["year"] = dates[0].year
        identifier = xmp.dc_identifier
        if isinstance(identifier, str) and identifier.lower().startswith(("doi:", "10.")):
            out["doi"] = identifier
    except Exception:
        return out
    return out


# --- DOCX ---------------------------------------------------------------------------------


def read_docx(relative: str, path: Path, meta: Meta) -> Document:
    try:
        import docx
    except ImportError:
        raise Unreadable("a .docx file needs the docx extra: pip install 'prowzi[docx]'") from None
    try:
        document = docx.Document(str(path))
    except Exception as exc:  # python-docx raises zipfile, lxml and KeyError on broken files
        raise Unreadable(f"unreadable DOCX: {type(exc).__name__}") from None
    props = document.core_properties
    blocks: list[tuple[str, int | None, str | None]] = []
    section: str | None = None
    for paragraph in document.paragraphs:
        text = " ".join(paragraph.text.split())
        if not text:
            continue
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        if style == "Title":
            meta.put("title", text, "docx-title")
        elif style.startswith("Heading"):
            section = text
        else:
            blocks.append((text, None, section))
    meta.put("title", (props.title or "").strip() or None, "docx-properties")
    meta.put("authors", authors_of(props.author or ""), "docx-properties")
    text = "\n\n".join(p for p, _, _ in blocks)
    return _finish(relative, path, meta, blocks[0][0] if blocks else "", text, blocks)


# --- records (JSON, JSON Lines, BibTeX) -----------------------------------------------------


def _first_string(record: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    return next((record[k] for k in keys if isinstance(record.get(k), str)), "")


def parse_record(source_id: str, record: Any, source: str = "record") -> Document:
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    title = record.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("record has no title")
    abstract = strip_braces(_first_string(record, ("abstract", "summary")))
    text = _first_string(record, ("text", "content", "body"))
    if not abstract.strip() and not text.strip():
        raise ValueError("record has no abstract or text")
    body = text.strip() if text.strip() else " ".join(abstract.split())
    meta = Meta()
    meta.merge(record, source)
    return Document(
        source_id=source_id,
        title=meta.values["title"],
        authors=meta.values.get("authors", ()),
        year=meta.values.get("year"),
        url=meta.values.get("url"),
        doi=meta.values.get("doi"),
        abstract=" ".join(abstract.split()),
        text=body,
        sample=truthy(record.get("sample")),
        metadata_source=meta.sources,
        location=source_id.split("#", 1)[0],
        arxiv_id=meta.values.get("arxiv_id"),
    )


def _record_id(record: Any, fallback: int) -> str:
    if isinstance(record, dict):
        rid = record.get("id", record.get("ID"))
        if isinstance(rid, str | int) and not isinstance(rid, bool) and str(rid).strip():
            return re.sub(r"\s+", "_", str(rid).strip())
    return str(fallback)


def read_records(
    f: CorpusFile, raw: str, overrides: Overrides
) -> tuple[list[Document], list[tuple[str, str]]]:
    suffix = f.path.suffix.lower()
    records: list[tuple[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    source = "record"
    if suffix == ".bib":
        source = "bibtex"
        entries = _bib_entries(f)
        if not entries:
            return [], [(f.relative, "no BibTeX entry could be read")]
        records = [
            (str(i), e)
            for i, e in enumerate(entries, start=1)
            if f"{f.relative}#{e.get('ID', '')}" not in overrides.bib_claimed
        ]
    elif suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((str(lineno), json.loads(line)))
            except ValueError:
                skipped.append((f"{f.relative}#{lineno}", "invalid JSON"))
    else:
        try:
            data = json.loads(raw)
        except ValueError:
            return [], [(f.relative, "invalid JSON")]
        if isinstance(data, dict) and isinstance(data.get("records"), list):
            data = data["records"]
        items = data if isinstance(data, list) else [data]
        records = [(str(i), item) for i, item in enumerate(items, start=1)]
    documents: list[Document] = []
    seen: set[str] = set()
    for fallback, record in records:
        source_id = f"{f.relative}#{_record_id(record, int(fallback))}"
        if source_id in seen:
            source_id = f"{f.relative}#{fallback}"
        try:
            documents.append(parse_record(source_id, record, source))
            seen.add(source_id)
        except ValueError as exc:
            skipped.append((f"{f.relative}#{fallback}", str(exc)))
    return documents, skipped


# --- one file -----------------------------------------------------------------------------


def _finish(
    relative: str,
    path: Path,
    meta: Meta,
    abstract: str,
    text: str,
    blocks: Sequence[tuple[str, int | None, str | None]],
    sample: bool = False,
) -> Document:
    identifiers_in(text, meta)
    values = meta.values
    title = values.get("title") or pretty_stem(path)
    sources = dict(meta.sources)
    if "title" not in values:
        sources["title"] = "file-name"
    return Document(
        source_id=relative,
        title=" ".join(str(title).split()),
        authors=tuple(values.get("authors", ())),
        year=values.get("year"),
        url=values.get("url"),
        doi=values.get("doi"),
        abstract=" ".join(abstract.split()),
        text=text,
        sample=sample,
        metadata_source=sources,
        passages=make_passages(blocks),
        location=relative,
        arxiv_id=values.get("arxiv_id"),
    )


def _read_text_file(f: CorpusFile) -> str:
    try:
        data = f.path.read_bytes()
    except OSError as exc:
        raise Unreadable(f"unreadable: {exc.strerror}") from None
    if b"\x00" in data[:8192]:
        raise Unreadable("binary data, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Unreadable("not UTF-8 text") from None


def read_file(
    f: CorpusFile, overrides: Overrides | None = None
) -> tuple[list[Document], list[tuple[str, str]]]:
    """The documents of one corpus file, and (path, reason) for what could not be used.

    Never raises for a bad file: an unreadable, encrypted, empty, binary or oversized file is
    a skip with its reason."""
    overrides = overrides or Overrides()
    limit = max_bytes(f.relative)
    if f.size > limit:
        return [], [(f.relative, f"larger than {limit // (1024 * 1024)} MiB")]
    if f.size == 0:
        return [], [(f.relative, "empty (0 bytes)")]
    suffix = f.path.suffix.lower()
    meta = Meta()
    try:
        if suffix == ".pdf":
            doc = read_pdf(f.relative, f.path, meta)
        elif suffix == ".docx":
            doc = read_docx(f.relative, f.path, meta)
        else:
            raw = _read_text_file(f)
            if not raw.strip():
                return [], [(f.relative, "empty")]
            if suffix in RECORD_SUFFIXES:
                return read_records(f, raw, overrides)
            if suffix in (".md", ".markdown"):
                doc = read_markdown(f.relative, f.path, raw, meta)
            elif suffix in (".html", ".htm"):
                doc = read_html(f.relative, f.path, raw, meta)
            else:
                doc = read_text(f.relative, f.path, raw, meta)
    except Unreadable as exc:
        return [], [(f.relative, str(exc))]
    before = dict(meta.sources)
    overrides.apply(f.relative, meta)
    if meta.sources != before:
        doc = _with_meta(doc, meta)
    if not doc.passages:
        return [], [(f.relative, "no text")]
    return [doc], []


def _with_meta(doc: Document, meta: Meta) -> Document:
    from dataclasses import replace

    sources = dict(doc.metadata_source)
    sources.update({k: v for k, v in meta.sources.items() if v in {"bibtex", "manifest"}})
    values = meta.values
    return replace(
        doc,
        title=" ".join(str(values.get("title") or doc.title).split()),
        authors=tuple(values.get("authors", doc.authors)),
        year=values.get("year", doc.year),
        url=values.get("url", doc.url),
        doi=values.get("doi", doc.doi),
        arxiv_id=values.get("arxiv_id", doc.arxiv_id),
        metadata_source=sources,
    )


def read_manifest_bytes(root: Path) -> bytes:
    """The raw bytes of the manifests (JSON and CSV), for the corpus fingerprint."""
    out = io.BytesIO()
    for name in (MANIFEST_NAME, CSV_MANIFEST_NAME):
        with contextlib.suppress(OSError):
            out.write((root / name).read_bytes())
        out.write(b"\0")
    return out.getvalue()


__all__ = [
    "CSV_MANIFEST_NAME",
    "DOCUMENT_SUFFIXES",
    "MANIFEST_NAME",
    "RECORD_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "CorpusFile",
    "Overrides",
    "load_overrides",
    "make_passages",
    "read_file",
]
