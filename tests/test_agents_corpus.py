"""The local corpus: loading documents and records, the BM25 index, its persistence."""

from __future__ import annotations

import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prowzi.agents import check_corpus
from prowzi.agents.corpus import (
    CorpusIndex,
    default_index_dir,
    load_corpus,
    sample_corpus_dir,
)
from prowzi.errors import CorpusError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    write(
        root / "notes" / "lattices.md",
        "---\ntitle: Lattice Cryptography\nauthors:\n  - Ada Lovelace\n  - Alan Turing\n"
        "year: 2001\ndoi: https://doi.org/10.1000/lattice\n---\n\n"
        "Lattice problems resist quantum attacks. Lattice schemes are efficient.\n",
    )
    write(
        root / "heading.md",
        "# Photosynthesis in Algae\n\nAlgae convert light into chemical energy.\n",
    )
    write(root / "plain_notes.txt", "Tidal energy uses the motion of the oceans.\n")
    write(
        root / "records.json",
        json.dumps(
            [
                {
                    "title": "Wind Turbines",
                    "abstract": "Wind turbines convert kinetic energy of wind.",
                    "authors": "Smith, J.; Jones, K.",
                    "year": "2010-05-01",
                    "url": "https://example.org/wind",
                },
                {"title": "No text at all"},
            ]
        ),
    )
    write(
        root / "more.jsonl",
        json.dumps(
            {
                "id": "q1",
                "title": "Quantum Lattice Sieving",
                "text": "Sieving lattices with quantum search.",
                "authors": ["B. Author"],
                "year": 2020,
            }
        )
        + "\n{not json\n",
    )
    write(root / ".hidden.md", "# Hidden\n\nNever indexed.\n")
    write(root / "image.png", "not a document")
    return root


def test_documents_and_records_are_loaded_with_their_metadata(corpus: Path) -> None:
    loaded = load_corpus(corpus)
    by_id = {d.source_id: d for d in loaded.documents}
    assert sorted(by_id) == [
        "heading.md",
        "more.jsonl#q1",
        "notes/lattices.md",
        "plain_notes.txt",
        "records.json#1",
    ]
    lattice = by_id["notes/lattices.md"]
    assert lattice.title == "Lattice Cryptography"
    assert lattice.authors == ("Ada Lovelace", "Alan Turing")
    assert lattice.year == 2001
    assert lattice.doi == "10.1000/lattice"
    assert by_id["heading.md"].title == "Photosynthesis in Algae"
    assert "Photosynthesis" not in by_id["heading.md"].text
    assert by_id["plain_notes.txt"].title == "plain notes"
    wind = by_id["records.json#1"]
    assert (wind.authors, wind.year, wind.url) == (
        ("Smith, J.", "Jones, K."),
        2010,
        "https://example.org/wind",
    )
    assert by_id["more.jsonl#q1"].year == 2020
    skipped = dict(loaded.skipped)
    assert skipped["records.json#2"] == "record has no abstract or text"
    assert skipped["more.jsonl#2"] == "invalid JSON"


def test_check_corpus_describes_a_usable_corpus(corpus: Path) -> None:
    info = check_corpus(corpus)
    assert info.documents == 5
    assert info.path == str(corpus)
    assert not info.sample
    assert len(info.fingerprint) == 64


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "unreadable_only"])
def test_check_corpus_refuses_unusable_paths_with_one_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "c"
    if kind == "file":
        write(path, "just a file")
    elif kind == "empty":
        path.mkdir()
        write(path / "picture.jpg", "x")
    elif kind == "unreadable_only":
        path.mkdir()
        (path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage\x81")
        write(path / "bad.json", "{oops")
        write(path / "blank.md", "   \n")
    with pytest.raises(CorpusError) as info:
        check_corpus(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    expected = {
        "missing": "not found",
        "file": "not a directory",
        "empty": "no readable",
        "unreadable_only": "no readable",
    }[kind]
    assert expected in message


def test_sample_corpus_is_labelled_and_its_readme_not_indexed() -> None:
    root = sample_corpus_dir()
    assert (root / "README.md").read_text(encoding="utf-8").count("sample") >= 3
    loaded = load_corpus(root)
    info = check_corpus(root)
    assert info.sample
    assert 40 <= info.documents <= 80
    assert all(d.sample for d in loaded.documents)
    assert not any(d.source_id.lower().startswith("readme") for d in loaded.documents)
    assert not loaded.skipped
    assert all(d.title and d.year and d.authors for d in loaded.documents)
    topics = " ".join(d.source_id for d in loaded.documents)
    assert topics.count("quantum_computing/") >= 20
    assert topics.count("ai_safety.jsonl") >= 15


def test_bm25_ranks_the_most_relevant_document_first(corpus: Path, tmp_path: Path) -> None:
    with CorpusIndex.open(corpus, tmp_path / "index") as index:
        hits = index.search("lattice cryptography", limit=10)
        assert [h.document.source_id for h in hits] == ["notes/lattices.md", "more.jsonl#q1"]
        assert hits[0].score > hits[1].score > 0
        assert index.search("energy", limit=10)[0].document.source_id in {
            "heading.md",
            "plain_notes.txt",
            "records.json#1",
        }
        assert index.search("volcano eruptions", limit=10) == []
        # Porter stemming: "turbine" finds "Turbines".
        assert [h.document.source_id for h in index.search("turbine", 10)] == ["records.json#1"]


def test_anchors_require_a_topic_word(corpus: Path, tmp_path: Path) -> None:
    with CorpusIndex.open(corpus, tmp_path / "index") as index:
        anyone = {h.document.source_id for h in index.search("energy lattice", 10)}
        anchored = {h.document.source_id for h in index.search("energy lattice", 10, ["tidal"])}
    assert "notes/lattices.md" in anyone
    assert anchored == {"plain_notes.txt"}


def test_search_honours_the_limit_and_breaks_ties_by_id(tmp_path: Path) -> None:
    root = tmp_path / "same"
    for i in range(12):
        write(root / f"doc{i:02d}.md", "# Same\n\nIdentical words about graphene sheets.\n")
    with CorpusIndex.open(root, tmp_path / "index") as index:
        hits = index.search("graphene", limit=5)
    assert [h.document.source_id for h in hits] == [f"doc{i:02d}.md" for i in range(5)]


def test_index_persists_and_is_reused_until_the_corpus_changes(
    corpus: Path, tmp_path: Path
) -> None:
    index_dir = tmp_path / "index"
    with CorpusIndex.open(corpus, index_dir) as first:
        assert first.built
        assert first.path is not None and first.path.parent == index_dir
        path = first.path
    stamp = path.stat().st_mtime_ns
    with CorpusIndex.open(corpus, index_dir) as second:
        assert not second.built
        assert second.info == first.info
    assert path.stat().st_mtime_ns == stamp

    write(corpus / "new.md", "# Volcanoes\n\nVolcano eruptions and magma.\n")
    with CorpusIndex.open(corpus, index_dir) as third:
        assert third.built
        assert third.info.documents == 6
        assert third.search("volcano", 5)[0].document.source_id == "new.md"

    lattice = corpus / "notes" / "lattices.md"
    lattice.write_text(
        lattice.read_text(encoding="utf-8") + "\nNow about volcanoes too.\n", encoding="utf-8"
    )
    with CorpusIndex.open(corpus, index_dir) as fourth:
        assert fourth.built
        assert {h.document.source_id for h in fourth.search("volcanoes", 5)} == {
            "new.md",
            "notes/lattices.md",
        }

    (corpus / "new.md").unlink()
    with CorpusIndex.open(corpus, index_dir) as fifth:
        assert fifth.built and fifth.info.documents == 5
        assert fifth.path is not None and fifth.path != path
        assert fifth.info.fingerprint[:16] in fifth.path.name
        # The latest index only: old ones pruned, no temporary files left behind.
        assert [p.name for p in index_dir.iterdir()] == [fifth.path.name]


def test_a_corrupt_index_is_rebuilt(corpus: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    with CorpusIndex.open(corpus, index_dir) as index:
        assert index.path is not None
        path = index.path
    path.write_bytes(b"this is not a database")
    with CorpusIndex.open(corpus, index_dir) as index:
        assert index.built
        assert index.search("lattice", 1)


def test_index_build_replaces_the_file_atomically(corpus: Path, tmp_path: Path) -> None:
    """A reader holding the old index keeps a consistent view while a rebuild replaces it."""
    index_dir = tmp_path / "index"
    old = CorpusIndex.open(corpus, index_dir)
    write(corpus / "new.md", "# Volcanoes\n\nVolcano eruptions.\n")
    with CorpusIndex.open(corpus, index_dir) as new:
        assert new.built and new.info.documents == 6
    assert old.info.documents == 5
    assert old.search("volcano", 5) == []
    assert sum(1 for _ in old.documents()) == 5
    old.close()
    with sqlite3.connect(index_dir / next(index_dir.iterdir()).name) as conn:
        assert conn.execute("SELECT count(*) FROM docs").fetchone()[0] == 6


def test_unwritable_index_dir_falls_back_to_memory(corpus: Path, tmp_path: Path) -> None:
    blocker = write(tmp_path / "blocker", "a file where the index directory should be")
    with CorpusIndex.open(corpus, blocker / "index") as index:
        assert index.built
        assert index.path is None
        assert index.search("lattice", 1)


def test_default_index_dir_follows_xdg_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_index_dir() == tmp_path / "xdg" / "prowzi" / "index"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_index_dir() == tmp_path / "home" / ".cache" / "prowzi" / "index"


def test_fingerprint_changes_with_content_size_and_names(corpus: Path) -> None:
    first = check_corpus(corpus).fingerprint
    assert check_corpus(corpus).fingerprint == first
    target = corpus / "heading.md"
    target.write_text(target.read_text(encoding="utf-8") + "More.\n", encoding="utf-8")
    second = check_corpus(corpus).fingerprint
    assert second != first
    os.rename(target, corpus / "renamed.md")
    assert check_corpus(corpus).fingerprint not in {first, second}


def test_concurrent_opens_all_see_a_complete_index(corpus: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"

    def open_and_search(_: int) -> tuple[int, list[str]]:
        with CorpusIndex.open(corpus, index_dir) as index:
            return index.info.documents, [h.document.source_id for h in index.search("lattice", 5)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(open_and_search, range(16)))
    assert results == [(5, ["more.jsonl#q1", "notes/lattices.md"])] * 16
    assert len(list(index_dir.iterdir())) == 1


def test_a_documents_abstract_is_indexed_once(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write(
        root / "wrapped.md", "# Wrapped\n\nThe first paragraph is\nwrapped over lines.\n\nMore.\n"
    )
    write(root / "abstract.md", "# Headed\n\n## Abstract\n\nShort abstract.\n\n## Body\n\nBody.\n")
    docs = {d.source_id: d for d in load_corpus(root).documents}
    wrapped = docs["wrapped.md"]
    assert wrapped.abstract == "The first paragraph is wrapped over lines."
    assert wrapped.body.count("first paragraph") == 1
    headed = docs["abstract.md"]
    assert headed.abstract == "Short abstract."
    assert headed.body.count("Short abstract.") == 1
    assert "Body." in headed.body


def test_a_section_heading_is_not_taken_for_the_title(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write(root / "notes_on_tides.md", "Some prose first.\n\n### Methods\n\nWe measured tides.\n")
    write(root / "abstract_first.md", "## Abstract\n\nTides rise and fall twice a day.\n")
    write(root / "level_two_title.md", "## Ocean Tides\n\nTides follow the moon.\n")
    titles = {d.source_id: d.title for d in load_corpus(root).documents}
    assert titles == {
        "abstract_first.md": "abstract first",
        "level_two_title.md": "Ocean Tides",
        "notes_on_tides.md": "notes on tides",
    }


def test_corpus_errors_stay_on_one_line_for_odd_names(tmp_path: Path) -> None:
    odd = tmp_path / "line\nbreak"
    odd.mkdir()
    write(odd / "bad\nname.json", "{oops")
    with pytest.raises(CorpusError) as info:
        check_corpus(odd)
    assert "\n" not in str(info.value)
    write(odd / "prowzi-corpus.json", "[1, 2]")
    with pytest.raises(CorpusError, match="must be a JSON object"):
        check_corpus(odd)


def test_a_crashed_builds_leftovers_are_removed_once_old(corpus: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    with CorpusIndex.open(corpus, index_dir) as index:
        assert index.path is not None
        prefix = index.path.name.rsplit("-", 1)[0]
    old = write(index_dir / f".{prefix}-0000.sqlite.abc.tmp", "half an index")
    old_journal = write(index_dir / f".{prefix}-0000.sqlite.abc.tmp-journal", "journal")
    fresh = write(index_dir / f".{prefix}-0000.sqlite.def.tmp", "a build in progress")
    for path in (old, old_journal):
        os.utime(path, (0, 0))
    write(corpus / "new.md", "# New\n\nA new document.\n")
    with CorpusIndex.open(corpus, index_dir) as index:
        assert index.built
    assert not old.exists() and not old_journal.exists()
    assert fresh.exists()
