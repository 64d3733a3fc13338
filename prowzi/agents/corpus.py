"""The local corpus: scanning a directory, indexing its passages and searching them with BM25.

A corpus is a directory (searched recursively) of documents: PDF, Markdown, plain text,
reStructuredText, HTML and DOCX files, ``.json``/``.jsonl`` records and BibTeX ``.bib``
entries; :mod:`prowzi.sources.ingest` reads each format and says where each metadata field came
from. Hidden files are ignored, and so is the ``prowzi-corpus.json`` manifest, which may name
more files to ignore (``"exclude"``), mark the corpus as a sample (``"sample": true``) and give
metadata per file (``"documents": {"paper.pdf": {"title": ..., "year": ...}}``), as may a
``prowzi-corpus.csv`` (columns ``path,title,authors,year,doi,url``). A file that cannot be used
(unreadable, encrypted, empty, binary, too large, a symbolic link loop) is skipped with a
reason, never an error: only a corpus with no usable document at all is one.

Retrieval is passage-level: each document is split into passages of about a paragraph or
three, with their page (PDF) or heading, and BM25 ranks passages, so a 300-page PDF competes
with a one-page note on equal terms. A document scores as its best passage and comes back with
the passages that matched, which the writer quotes and cites by page or section.

Why SQLite FTS5 for the index: it ships with Python (``sqlite3``), so the offline default needs
no extra dependency and no native wheel; its ``bm25()`` ranking function is the standard Okapi
BM25 with per-column weights; the index is a single file on disk that persists between runs; a
build is written to a temporary file and renamed into place, so a concurrent run sees the old
index or the new one, never half of one. tantivy or bm25s would rank equally well but add a
compiled dependency (and, for bm25s, numpy) for no gain at this size.

The index lives in ``config.index_dir``, else ``$XDG_CACHE_HOME/prowzi/index`` (or
``~/.cache/prowzi/index``), in a file named for the corpus directory and keyed by the corpus
fingerprint: a hash of every document's relative path, size and modification time, plus the
manifests and the index format. A run whose corpus has the fingerprint of an existing index
reuses it. A changed corpus is indexed incrementally: the previous index is copied to the
temporary file, the files that were added, changed or removed are re-read or dropped there
(and only they: adding one PDF to a thousand re-reads one PDF), and the copy is renamed into
place. A changed manifest or ``.bib`` file (metadata that may touch any document) rebuilds the
whole index.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prowzi.agents import _text
from prowzi.agents.models import CorpusInfo
from prowzi.errors import CorpusError
from prowzi.sources.ingest import (
    CSV_MANIFEST_NAME,
    DOCUMENT_SUFFIXES,
    MANIFEST_NAME,
    SUPPORTED_SUFFIXES,
    CorpusFile,
    Overrides,
    file_key,
    load_overrides,
    make_passages,
    read_file,
    read_manifest_bytes,
)
from prowzi.sources.records import Document, Passage, source_body
from prowzi.storage.files import fsync_directory

__all__ = [
    "MANIFEST_NAME",
    "SUPPORTED_SUFFIXES",
    "CorpusFile",
    "CorpusIndex",
    "CorpusScan",
    "Document",
    "Hit",
    "LoadedCorpus",
    "Passage",
    "check_corpus",
    "default_index_dir",
    "load_corpus",
    "query_terms",
    "resolve_corpus_dir",
    "sample_corpus_dir",
    "scan_corpus",
    "source_body",
]

INDEX_FORMAT = 5
"""Bumped whenever the index schema or the document parsing changes."""

# bm25() column weights for (title, authors, section, body): a query word in the title says
# more about what a document is about than the same word deep in its body.
_BM25_WEIGHTS = (3.0, 0.5, 1.5, 1.0)
_TOKENIZER = "porter unicode61 remove_diacritics 2"
_MAX_PASSAGES_PER_HIT = 3


def sample_corpus_dir() -> Path:
    """The sample corpus shipped with Prowzi (used when no corpus is configured)."""
    return Path(__file__).resolve().parent / "sample_corpus"


def resolve_corpus_dir(corpus_dir: str | os.PathLike[str] | None) -> Path:
    """The directory to search: the given one, or the sample corpus when none is given."""
    if corpus_dir is None or str(corpus_dir) == "":
        return sample_corpus_dir()
    return Path(corpus_dir).expanduser()


def default_index_dir() -> Path:
    """``$XDG_CACHE_HOME/prowzi/index``, else ``~/.cache/prowzi/index``."""
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache else Path.home() / ".cache"
    return base / "prowzi" / "index"


# --- scanning -----------------------------------------------------------------------------


@dataclass(slots=True)
class CorpusScan:
    """The files of a corpus directory and its fingerprint (no file is read but the manifests)."""

    root: Path
    files: list[CorpusFile]
    fingerprint: str
    sample: bool
    manifest: dict[str, Any] = field(default_factory=dict)
    overrides_key: str = ""
    """A hash of what overrides metadata (the manifests and every ``.bib`` file)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Entries of the directory that could not even be listed (links, special files)."""


@dataclass(slots=True)
class LoadedCorpus:
    scan: CorpusScan
    documents: list[Document]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(relative path, reason) for every file or record that could not be used."""


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise _error(f"cannot read corpus manifest {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise _error(f"corpus manifest {path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise _error(f"corpus manifest {path} must be a JSON object")
    return data


def _error(message: str) -> CorpusError:
    """A CorpusError whose message is one line, whatever the paths it names contain."""
    return CorpusError(" ".join(message.split()))


def _check_directory(root: Path) -> None:
    if not root.exists():
        raise _error(f"corpus directory not found: {root}")
    if not root.is_dir():
        raise _error(f"corpus path is not a directory: {root}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise _error(f"corpus directory is not readable: {root}")


def _link_reason(path: Path, exc: OSError | None = None) -> str:
    if exc is not None and exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc is not None and exc.errno == errno.ENOENT:
        return "broken symbolic link"
    if exc is not None:
        return f"unreadable: {exc.strerror}"
    return "symbolic link to a directory (not followed)"


def scan_corpus(path: str | os.PathLike[str]) -> CorpusScan:
    """List a corpus directory's candidate files and fingerprint them.

    Raises :class:`CorpusError` when the directory is missing, not a directory or unreadable.
    """
    root = Path(path).expanduser()
    _check_directory(root)
    manifest = _read_manifest(root)
    exclude = {str(p) for p in manifest.get("exclude", []) if isinstance(p, str)}
    files: list[CorpusFile] = []
    skipped: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        kept_dirs = []
        for d in sorted(dirnames):
            if d.startswith((".", "__")):
                continue
            full = Path(dirpath) / d
            if full.is_symlink():
                relative = full.relative_to(root).as_posix()
                try:
                    target = full.resolve(strict=True)
                except (OSError, RuntimeError) as exc:
                    skipped.append((relative, _link_reason(full, _as_oserror(exc))))
                    continue
                loop = target == root.resolve() or target in full.parent.resolve().parents
                reason = "symbolic link loop" if loop else _link_reason(full)
                skipped.append((relative, reason))
                continue
            kept_dirs.append(d)
        dirnames[:] = kept_dirs
        for name in sorted(filenames):
            if name.startswith(".") or not name.lower().endswith(SUPPORTED_SUFFIXES):
                continue
            full = Path(dirpath) / name
            relative = full.relative_to(root).as_posix()
            if relative in (MANIFEST_NAME, CSV_MANIFEST_NAME) or relative in exclude:
                continue
            try:
                st = full.stat()
            except OSError as exc:
                skipped.append((relative, _link_reason(full, exc)))
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped.append((relative, "not a regular file"))
                continue
            files.append(CorpusFile(relative, full, st.st_size, st.st_mtime_ns))
    files.sort(key=lambda f: f.relative)
    manifest_raw = read_manifest_bytes(root)
    overrides = hashlib.sha256(manifest_raw)
    for f in files:
        if f.relative.lower().endswith(".bib"):
            overrides.update(f"{f.relative}\t{f.size}\t{f.mtime_ns}\n".encode())
    digest = hashlib.sha256(f"prowzi-corpus-v{INDEX_FORMAT}\n".encode())
    digest.update(hashlib.sha256(manifest_raw).digest())
    for f in files:
        digest.update(f"{f.relative}\t{f.size}\t{f.mtime_ns}\n".encode())
    return CorpusScan(
        root,
        files,
        digest.hexdigest(),
        bool(manifest.get("sample", False)),
        manifest,
        overrides.hexdigest(),
        skipped,
    )


def _as_oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, RuntimeError):  # pathlib's "Symlink loop" on older Pythons
        return OSError(errno.ELOOP, "symbolic link loop")
    return None


def _overrides(scan: CorpusScan) -> Overrides:
    bibs = [f for f in scan.files if f.relative.lower().endswith(".bib")]
    stems = [
        file_key(f.relative) for f in scan.files if f.relative.lower().endswith(DOCUMENT_SUFFIXES)
    ]
    return load_overrides(scan.root, scan.manifest, bibs, stems)


def load_corpus(path: str | os.PathLike[str]) -> LoadedCorpus:
    """Read every document of a corpus directory (no index involved)."""
    scan = scan_corpus(path)
    overrides = _overrides(scan)
    documents: list[Document] = []
    skipped: list[tuple[str, str]] = list(scan.skipped)
    for f in scan.files:
        docs, bad = read_file(f, overrides)
        documents.extend(docs)
        skipped.extend(bad)
    if not scan.sample and documents and all(d.sample for d in documents):
        scan.sample = True
    return LoadedCorpus(scan, documents, skipped)


def _no_document_error(root: Path, any_files: bool, skipped: list[tuple[str, str]]) -> CorpusError:
    if not any_files:
        return _error(
            f"corpus directory {root} holds no readable document ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    first = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
    return _error(f"corpus directory {root} holds no readable document ({first})")


def check_corpus(
    path: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None = None
) -> CorpusInfo:
    """Check that ``path`` is a usable corpus and describe it.

    It opens (building or updating) the corpus's index in ``index_dir`` (else the default), so
    a run that checks its corpus up front reads each file once, not twice.

    Raises :class:`CorpusError` with a one-line message when the directory is missing, is a
    file, or holds no readable document.
    """
    with CorpusIndex.open(path, index_dir) as index:
        return index.info


# --- the index ----------------------------------------------------------------------------


_QUERY_TERM = re.compile(r"[^\W_]+", re.UNICODE)


def query_terms(text: str) -> list[str]:
    """The searchable words of a query: no stopwords, no repeats, in order."""
    return _text.unique(t for t in _QUERY_TERM.findall(text.lower()) if t not in _text.STOPWORDS)


def _match_expression(terms: Sequence[str], anchors: Sequence[str]) -> str:
    """An FTS5 query: any of ``terms``, and, when anchors are given, at least one anchor."""

    def any_of(ts: Sequence[str]) -> str:
        return "(" + " OR ".join('"' + t.replace('"', '""') + '"' for t in ts) + ")"

    expression = any_of(terms)
    if anchors:
        expression = f"{any_of(anchors)} AND {expression}"
    return expression


@dataclass(frozen=True, slots=True)
class Hit:
    document: Document
    score: float
    passages: tuple[tuple[Passage, float], ...] = ()
    """The document's best passages for the query, best first, with their scores."""


_DOC_COLUMNS = (
    "d.source_id, d.title, d.authors, d.year, d.url, d.doi, d.abstract, d.text, d.sample,"
    " d.origin, d.metadata_source, d.location, d.arxiv_id"
)


@dataclass(eq=False, repr=False)
class CorpusIndex:
    """A passage-level BM25 index of one corpus directory, kept in a SQLite FTS5 database."""

    _conn: sqlite3.Connection
    info: CorpusInfo
    path: Path | None
    """The index file, or None when the index had to be kept in memory."""
    built: bool
    """Whether this open (re)indexed any file rather than reusing the index as it was."""
    skipped: list[tuple[str, str]]
    """Files and records skipped (those the index remembers, and links found by the scan)."""
    reindexed: int = 0
    """How many files this open read (0 when the index was reused as it was)."""

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(
        cls, corpus_dir: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None = None
    ) -> CorpusIndex:
        """Open the index of ``corpus_dir``, updating it first if the corpus changed.

        Raises :class:`CorpusError` when the corpus is missing or holds no readable document.
        """
        scan = scan_corpus(corpus_dir)
        root_key = hashlib.sha256(str(scan.root.resolve()).encode()).hexdigest()[:16]
        directory = Path(index_dir).expanduser() if index_dir else default_index_dir()
        prefix = f"corpus-{root_key}-"
        path = directory / f"{prefix}{scan.fingerprint[:16]}.sqlite"
        existing = cls._open_existing(path, scan)
        if existing is not None:
            return existing
        try:
            directory.mkdir(parents=True, exist_ok=True)
            reindexed = _build_atomically(path, scan, _previous_index(directory, prefix, path))
        except OSError:
            # An unwritable cache must not stop a run: keep this run's index in memory.
            return cls._in_memory(scan)
        _prune(directory, prefix, keep=path)
        reopened = cls._open_existing(path, scan)
        if reopened is None:  # pruned by a concurrent build of another corpus state
            return cls._in_memory(scan)
        reopened.built = True
        reopened.reindexed = reindexed
        return reopened

    @classmethod
    def _in_memory(cls, scan: CorpusScan) -> CorpusIndex:
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        _create_schema(conn)
        reindexed = _update(conn, scan)
        index = cls._from_connection(conn, scan, None)
        index.built, index.reindexed = True, reindexed
        return index

    @classmethod
    def _open_existing(cls, path: Path, scan: CorpusScan) -> CorpusIndex | None:
        if not path.is_file():
            return None
        try:
            conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error:
            return None
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            current = meta.get("fingerprint") == scan.fingerprint
            if meta.get("format") != str(INDEX_FORMAT) or not current:
                conn.close()
                return None
            return cls._from_connection(conn, scan, path)
        except (sqlite3.Error, KeyError, ValueError):
            conn.close()
            return None
        except CorpusError:  # a current index of a corpus with no usable document
            conn.close()
            raise

    @classmethod
    def _from_connection(
        cls, conn: sqlite3.Connection, scan: CorpusScan, path: Path | None
    ) -> CorpusIndex:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        skipped = [
            (str(p), str(r))
            for p, r in conn.execute("SELECT path, reason FROM skipped ORDER BY path")
        ]
        documents = int(meta["documents"])
        if documents == 0:
            raise _no_document_error(scan.root, bool(scan.files), scan.skipped + skipped)
        info = CorpusInfo(
            path=str(scan.root),
            documents=documents,
            fingerprint=scan.fingerprint,
            sample=meta.get("sample") == "1",
        )
        return cls(conn, info, path, False, sorted(scan.skipped + skipped))

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CorpusIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -------------------------------------------------------------------------

    def search(self, query: str, limit: int, anchors: Sequence[str] = ()) -> list[Hit]:
        """The ``limit`` best documents for ``query``, best first, each scored by its best
        passage (BM25) and carrying its best passages.

        With ``anchors``, only passages containing at least one anchor word (in the passage
        or its document's title) qualify: a query for "quantum computing challenges" should not
        return a climate paper for "challenges". Ties are broken by source id, so results are
        deterministic.
        """
        terms = query_terms(query)
        if not terms or limit < 1:
            return []
        expression = _match_expression(terms, [a for a in anchors if a])
        weights = ", ".join(str(w) for w in _BM25_WEIGHTS)
        fetch = max(limit * 10, 50)
        while True:
            rows = self._conn.execute(
                f"SELECT p.doc, -bm25(fts, {weights}) AS score, fts.body, p.page, p.section"
                " FROM fts JOIN passages AS p ON p.rowid = fts.rowid"
                " JOIN docs AS d ON d.rowid = p.doc WHERE fts MATCH ?"
                " ORDER BY score DESC, d.source_id, p.seq LIMIT ?",
                (expression, fetch),
            ).fetchall()
            grouped: dict[int, list[tuple[Passage, float]]] = {}
            for doc, score, body, page, section in rows:
                found = grouped.setdefault(doc, [])
                if len(found) < _MAX_PASSAGES_PER_HIT:
                    found.append((Passage(body, page, section), round(float(score), 6)))
            if len(grouped) >= limit or len(rows) < fetch:
                break
            fetch *= 4
        chosen = list(grouped.items())[:limit]
        documents = self._documents([doc for doc, _ in chosen])
        return [Hit(documents[doc], passages[0][1], tuple(passages)) for doc, passages in chosen]

    def _documents(self, rowids: Sequence[int]) -> dict[int, Document]:
        if not rowids:
            return {}
        marks = ",".join("?" * len(rowids))
        rows = self._conn.execute(
            f"SELECT d.rowid, {_DOC_COLUMNS} FROM docs AS d WHERE d.rowid IN ({marks})",
            list(rowids),
        ).fetchall()
        return {row[0]: _row_document(row[1:]) for row in rows}

    def document_frequency(self, word: str) -> int:
        """How many documents contain ``word`` (after stemming)."""
        terms = query_terms(word)
        if not terms:
            return 0
        row = self._conn.execute(
            "SELECT count(DISTINCT p.doc) FROM fts JOIN passages AS p ON p.rowid = fts.rowid"
            " WHERE fts MATCH ?",
            (_match_expression(terms[:1], ()),),
        ).fetchone()
        return int(row[0])

    def passage_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM passages").fetchone()[0])

    def documents(self) -> Iterator[Document]:
        rows = self._conn.execute(
            f"SELECT d.rowid, {_DOC_COLUMNS} FROM docs AS d ORDER BY d.source_id"
        ).fetchall()
        for row in rows:
            passages = tuple(
                Passage(body, page, section)
                for body, page, section in self._conn.execute(
                    "SELECT fts.body, p.page, p.section FROM passages AS p"
                    " JOIN fts ON fts.rowid = p.rowid WHERE p.doc = ? ORDER BY p.seq",
                    (row[0],),
                )
            )
            document = _row_document(row[1:])
            yield Document(**{**_fields(document), "passages": passages})


def _fields(document: Document) -> dict[str, Any]:
    return {name: getattr(document, name) for name in Document.__dataclass_fields__}


def _row_document(row: Sequence[Any]) -> Document:
    return Document(
        source_id=row[0],
        title=row[1],
        authors=tuple(json.loads(row[2])),
        year=row[3],
        url=row[4],
        doi=row[5],
        abstract=row[6],
        text=row[7],
        sample=bool(row[8]),
        origin=row[9],
        metadata_source=json.loads(row[10]),
        location=row[11],
        arxiv_id=row[12],
    )


def _create_schema(conn: sqlite3.Connection) -> None:
    with conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "CREATE TABLE files (relative TEXT PRIMARY KEY, size INTEGER NOT NULL,"
            " mtime_ns INTEGER NOT NULL)"
        )
        conn.execute(
            "CREATE TABLE docs (rowid INTEGER PRIMARY KEY, source_id TEXT UNIQUE NOT NULL,"
            " file TEXT NOT NULL, title TEXT NOT NULL, authors TEXT NOT NULL, year INTEGER,"
            " url TEXT, doi TEXT, abstract TEXT NOT NULL, text TEXT NOT NULL,"
            " sample INTEGER NOT NULL, origin TEXT NOT NULL, metadata_source TEXT NOT NULL,"
            " location TEXT, arxiv_id TEXT)"
        )
        conn.execute("CREATE INDEX docs_file ON docs (file)")
        conn.execute(
            "CREATE TABLE passages (rowid INTEGER PRIMARY KEY, doc INTEGER NOT NULL,"
            " seq INTEGER NOT NULL, page INTEGER, section TEXT)"
        )
        conn.execute("CREATE INDEX passages_doc ON passages (doc)")
        conn.execute("CREATE TABLE skipped (file TEXT NOT NULL, path TEXT NOT NULL, reason TEXT)")
        conn.execute(
            "CREATE VIRTUAL TABLE fts USING fts5(title, authors, section, body,"
            f" tokenize='{_TOKENIZER}')"
        )


def _remove_file(conn: sqlite3.Connection, relative: str) -> None:
    docs = [r[0] for r in conn.execute("SELECT rowid FROM docs WHERE file = ?", (relative,))]
    for doc in docs:
        conn.execute(
            "DELETE FROM fts WHERE rowid IN (SELECT rowid FROM passages WHERE doc = ?)", (doc,)
        )
        conn.execute("DELETE FROM passages WHERE doc = ?", (doc,))
    conn.execute("DELETE FROM docs WHERE file = ?", (relative,))
    conn.execute("DELETE FROM skipped WHERE file = ?", (relative,))
    conn.execute("DELETE FROM files WHERE relative = ?", (relative,))


def _insert_document(conn: sqlite3.Connection, relative: str, doc: Document) -> None:
    cursor = conn.execute(
        "INSERT INTO docs (source_id, file, title, authors, year, url, doi, abstract, text,"
        " sample, origin, metadata_source, location, arxiv_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?,"
        " ?, ?, ?, ?, ?, ?)",
        (
            doc.source_id,
            relative,
            doc.title,
            json.dumps(list(doc.authors)),
            doc.year,
            doc.url,
            doc.doi,
            doc.abstract,
            doc.text,
            int(doc.sample),
            doc.origin,
            json.dumps(dict(doc.metadata_source), sort_keys=True),
            doc.location,
            doc.arxiv_id,
        ),
    )
    rowid = cursor.lastrowid
    passages = doc.passages or make_passages([(doc.body, None, None)])
    authors = " ".join(doc.authors)
    for seq, passage in enumerate(passages):
        pid = conn.execute(
            "INSERT INTO passages (doc, seq, page, section) VALUES (?, ?, ?, ?)",
            (rowid, seq, passage.page, passage.section),
        ).lastrowid
        conn.execute(
            "INSERT INTO fts (rowid, title, authors, section, body) VALUES (?, ?, ?, ?, ?)",
            (pid, doc.title, authors, passage.section or "", passage.text),
        )


def _update(conn: sqlite3.Connection, scan: CorpusScan) -> int:
    """Bring an index (empty, or a copy of an earlier state) up to ``scan``: files added or
    changed are read, files removed are dropped. Returns how many files were read."""
    with conn:
        known = {
            r: (s, m) for r, s, m in conn.execute("SELECT relative, size, mtime_ns FROM files")
        }
        current = {f.relative: f for f in scan.files}
        for relative in known:
            if relative not in current:
                _remove_file(conn, relative)
        changed = [f for f in scan.files if known.get(f.relative) != (f.size, f.mtime_ns)]
        overrides = _overrides(scan) if changed else Overrides()
        for f in changed:
            if f.relative in known:
                _remove_file(conn, f.relative)
            docs, bad = read_file(f, overrides)
            for doc in docs:
                _insert_document(conn, f.relative, doc)
            conn.executemany(
                "INSERT INTO skipped (file, path, reason) VALUES (?, ?, ?)",
                [(f.relative, p, r) for p, r in bad],
            )
            conn.execute("INSERT INTO files VALUES (?, ?, ?)", (f.relative, f.size, f.mtime_ns))
        documents = int(conn.execute("SELECT count(*) FROM docs").fetchone()[0])
        not_sample = int(conn.execute("SELECT count(*) FROM docs WHERE sample = 0").fetchone()[0])
        sample = scan.sample or (documents > 0 and not_sample == 0)
        conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [
                ("format", str(INDEX_FORMAT)),
                ("fingerprint", scan.fingerprint),
                ("overrides", scan.overrides_key),
                ("documents", str(documents)),
                ("sample", "1" if sample else "0"),
                ("corpus", str(scan.root)),
            ],
        )
    return len(changed)


_ABANDONED_BUILD_SECONDS = 600


def _previous_index(directory: Path, prefix: str, path: Path) -> Path | None:
    """The newest index of an earlier state of the same corpus, if any."""
    candidates = []
    for other in directory.glob(f"{prefix}*.sqlite"):
        if other == path:
            continue
        with contextlib.suppress(OSError):
            candidates.append((other.stat().st_mtime_ns, other))
    return max(candidates)[1] if candidates else None


def _prune(directory: Path, prefix: str, keep: Path) -> None:
    """Remove the indexes of earlier states of the same corpus, and temporary files that a
    crashed build left behind. A run still reading an old index keeps its open file (POSIX
    unlink semantics); a run about to open one rebuilds. A temporary file is only removed once
    it is old enough that no build can still be writing it."""
    for stale in directory.glob(f"{prefix}*.sqlite"):
        if stale != keep:
            with contextlib.suppress(OSError):
                stale.unlink()
    now = time.time()
    for temporary in directory.glob(f".{prefix}*.tmp*"):
        with contextlib.suppress(OSError):
            if now - temporary.stat().st_mtime > _ABANDONED_BUILD_SECONDS:
                temporary.unlink()


def _reusable(conn: sqlite3.Connection, scan: CorpusScan) -> bool:
    """Whether an earlier state's index can be updated in place of a full build."""
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error:
        return False
    return meta.get("format") == str(INDEX_FORMAT) and meta.get("overrides") == scan.overrides_key


def _build_atomically(path: Path, scan: CorpusScan, previous: Path | None) -> int:
    """Write the index to a temporary file beside ``path`` (starting from a copy of
    ``previous`` when it is usable), then rename it into place. Returns the files read."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = _start_from(tmp, previous, scan)
        try:
            reindexed = _update(conn, scan)
        finally:
            conn.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(path.parent)
    return reindexed


def _start_from(tmp: Path, previous: Path | None, scan: CorpusScan) -> sqlite3.Connection:
    if previous is not None:
        with contextlib.suppress(OSError, sqlite3.Error):
            shutil.copyfile(previous, tmp)
            conn = sqlite3.connect(tmp)
            if _reusable(conn, scan):
                return conn
            conn.close()
    tmp.write_bytes(b"")
    conn = sqlite3.connect(tmp)
    _create_schema(conn)
    return conn
