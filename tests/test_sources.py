"""Real sources (issue 16, the local half): documents a user owns, read honestly, searched by
passage, cited by page or section, and only where the cited passage supports the sentence.

The PDFs are made here by real producers (groff and enscript, then Ghostscript: see
``pdf_maker``); the plain-documentation corpus is Python's own documentation sources from
Debian's python3.11-doc, text nobody here wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pypdf
import pytest
from pdf_maker import encrypted_pdf, enscript_pdf, ms_pdf, scanned_pdf
from shared import run_cli, write_corpus
from test_agents_pipeline import QUANTUM, Recorder, make_config, run_all

from prowzi.agents import _draft, _support
from prowzi.agents.corpus import CorpusIndex, load_corpus
from prowzi.agents.evaluation import evaluate, run_evaluation
from prowzi.agents.models import DraftSection, WorkflowState
from prowzi.agents.writing import assemble

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")
REEFS = "Write a report on coral reef restoration"

NURSERY_PAGES = [
    [
        "Coral gardening grows fragments of living coral in underwater nurseries before they "
        "are planted back onto degraded reefs.",
        "Nursery trees made of plastic pipe keep coral fragments off the sea floor, away from "
        "sediment and predators.",
    ],
    [
        "Outplanted fragments of staghorn coral survived at rates above seventy percent when "
        "they were attached to stable dead reef rock.",
        "Restoration crews fixed each fragment with marine epoxy or cable ties during calm "
        "weather.",
    ],
    [
        "Coral reef restoration projects cost far more per hectare than protecting healthy "
        "reefs from pollution and overfishing.",
        "Long term monitoring is rare, so the success of most reef restoration remains unknown.",
    ],
]
LARVAE_PAGES = [
    [
        "Larval seeding collects coral spawn during mass spawning nights and rears the larvae "
        "in floating pools.",
    ],
    [
        "Settled coral larvae released over damaged reef patches increased recruitment tenfold "
        "compared with untreated control plots.",
        "Seeding works at larger scales than gardening because millions of larvae come from a "
        "single spawning event.",
    ],
]
NOTES = (
    "Reef monitoring notes\n\n"
    "Divers counted coral colonies along fixed transects on the restored reef every six "
    "months.\n"
    "Bleaching during the marine heatwave killed many restored colonies on the shallow reef "
    "flat.\n"
)


def normalised(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).split())


@pytest.fixture(scope="module")
def pdf_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pdfs")
    ms_pdf(
        root / "reef-nursery.pdf",
        "Coral Gardening and Reef Nurseries",
        ["Mara Tide", "Leo Current"],
        NURSERY_PAGES,
        info={"Title": "Coral Gardening and Reef Nurseries", "Author": "Mara Tide; Leo Current"},
    )
    ms_pdf(
        root / "papers" / "larvae.pdf",
        "Larval Seeding of Coral Reefs",
        ["Iris Polyp"],
        LARVAE_PAGES,
        columns=2,
    )
    enscript_pdf(root / "reef-monitoring-notes.pdf", NOTES)
    scanned_pdf(root / "scanned-memo.pdf", "Coral reef memo", [["A scanned memo on coral reefs."]])
    return root


def page_texts(path: Path) -> list[str]:
    return [normalised(p.extract_text()) for p in pypdf.PdfReader(path).pages]


# --- ingestion and metadata ---------------------------------------------------------------


def test_pdfs_are_read_with_honest_metadata_and_pages(pdf_corpus: Path) -> None:
    loaded = load_corpus(pdf_corpus)
    docs = {d.source_id: d for d in loaded.documents}
    assert sorted(docs) == ["papers/larvae.pdf", "reef-monitoring-notes.pdf", "reef-nursery.pdf"]

    nursery = docs["reef-nursery.pdf"]  # the info dictionary (and its XMP copy) name it
    assert nursery.title == "Coral Gardening and Reef Nurseries"
    assert nursery.authors == ("Mara Tide", "Leo Current")
    assert nursery.metadata_source["title"] in {"pdf-info", "pdf-xmp"}
    assert nursery.year is None  # the file's creation date is not the work's year

    larvae = docs["papers/larvae.pdf"]  # no info: the first page's layout names it
    assert larvae.title == "Larval Seeding of Coral Reefs"
    assert larvae.authors == ("Iris Polyp",)
    assert dict(larvae.metadata_source) == {"title": "pdf-layout", "authors": "pdf-layout"}

    notes = docs["reef-monitoring-notes.pdf"]  # one font, no info: the file name, said so
    assert notes.title == "reef monitoring notes"
    assert notes.authors == ()
    assert dict(notes.metadata_source) == {"title": "file-name"}

    # Passages carry their page: page 3's words are in a page-3 passage and nowhere else.
    pages = {p.page for p in nursery.passages}
    assert pages == {1, 2, 3}
    located = [p for p in nursery.passages if "per hectare" in p.text]
    assert [p.page for p in located] == [3]

    skipped = dict(loaded.skipped)
    assert skipped["scanned-memo.pdf"].startswith("no text layer")


def test_reading_formats_markdown_rst_html_docx_and_identifiers(tmp_path: Path) -> None:
    import docx

    root = write_corpus(
        tmp_path / "mixed",
        {
            "guide.rst": (
                "=================\nKelp Forest Guide\n=================\n\n"
                ":Author: Sam Holdfast\n\n"
                "Overview\n--------\n\nKelp forests grow along cold rocky coasts.\n\n"
                "Urchins\n-------\n\nSea urchins graze kelp holdfasts when otters are absent.\n"
            ),
            "page.html": (
                "<html><head><title>Seagrass Meadows</title>"
                '<meta name="citation_author" content="Eel Grass">'
                '<meta name="citation_publication_date" content="2011/05/02">'
                "<style>p { color: red }</style></head><body><nav>Home | About</nav>"
                "<h2>Carbon</h2><p>Seagrass meadows store carbon in their sediments.</p>"
                "<script>var x = 'not prose';</script></body></html>"
            ),
            "preprint.md": (
                "# Mangrove Roots\n\narXiv:2103.01234 [q-bio]\n\nMangrove roots trap sediment. "
                "See doi:10.5555/mangrove.42 for the data.\n"
            ),
        },
    )
    document = docx.Document()
    document.add_paragraph("Salt Marsh Survey", style="Title")
    document.add_heading("Methods", level=1)
    document.add_paragraph("Salt marsh plots were surveyed at low tide.")
    document.core_properties.author = "Marsh Walker"
    document.save(str(root / "survey.docx"))

    docs = {d.source_id: d for d in load_corpus(root).documents}
    guide = docs["guide.rst"]
    assert (guide.title, guide.authors) == ("Kelp Forest Guide", ("Sam Holdfast",))
    assert dict(guide.metadata_source) == {"title": "rst-title", "authors": "rst-docinfo"}
    assert [p.section for p in guide.passages] == ["Overview", "Urchins"]

    page = docs["page.html"]
    assert (page.title, page.authors, page.year) == ("Seagrass Meadows", ("Eel Grass",), 2011)
    assert "not prose" not in page.text and "color" not in page.text and "Home" not in page.text
    assert [p.section for p in page.passages] == ["Carbon"]

    preprint = docs["preprint.md"]
    assert preprint.doi == "10.5555/mangrove.42"
    assert preprint.year == 2021
    assert preprint.metadata_source["doi"] == "text-doi"
    assert preprint.metadata_source["year"] == "text-arxiv"
    assert preprint.arxiv_id == "2103.01234"
    with CorpusIndex.open(root, tmp_path / "index") as index:  # the index keeps it too
        (hit,) = index.search("mangrove", 1)
    source = hit.document.to_source()
    assert (source.arxiv_id, source.metadata_source["arxiv_id"]) == ("2103.01234", "text-arxiv")

    survey = docs["survey.docx"]
    assert (survey.title, survey.authors) == ("Salt Marsh Survey", ("Marsh Walker",))
    assert [p.section for p in survey.passages] == ["Methods"]


def test_bib_and_manifest_override_what_was_guessed(pdf_corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "with-bib"
    shutil.copytree(pdf_corpus, root)
    (root / "refs.bib").write_text(
        "@article{tide2019,\n  title = {Coral {Gardening}: A Field Guide},\n"
        "  author = {Tide, Mara and Current, Leo},\n  year = 2019,\n"
        "  doi = {10.5555/reef.1},\n  file = {reef-nursery.pdf}\n}\n"
        "@book{standalone,\n  title = {Reefs of the World},\n  author = {Atoll, Ann},\n"
        "  year = {1999},\n  abstract = {A survey of coral reefs of every ocean.}\n}\n"
        "@article{larvae,\n  title = {Seeding Coral Larvae},\n  year = {2020},\n"
        "  abstract = {Keyed by the file's stem, this entry describes papers/larvae.pdf.}\n}\n",
        encoding="utf-8",
    )
    (root / "prowzi-corpus.json").write_text(
        json.dumps(
            {
                "documents": {
                    "reef-monitoring-notes.pdf": {"title": "Reef Notes", "year": 2022},
                    "reef-nursery.pdf": {"year": 2018},  # the manifest beats the .bib
                }
            }
        ),
        encoding="utf-8",
    )
    (root / "prowzi-corpus.csv").write_text(
        "path,url,authors\npapers/larvae.pdf,https://example.org/larvae,Iris Polyp; Ray Reef\n",
        encoding="utf-8",
    )
    docs = {d.source_id: d for d in load_corpus(root).documents}
    nursery = docs["reef-nursery.pdf"]
    assert (nursery.title, nursery.year, nursery.doi) == (
        "Coral Gardening: A Field Guide",
        2018,
        "10.5555/reef.1",
    )
    assert nursery.authors == ("Tide, Mara", "Current, Leo")
    assert dict(nursery.metadata_source) == {
        "title": "bibtex",
        "authors": "bibtex",
        "doi": "bibtex",
        "year": "manifest",
    }
    assert "refs.bib#tide2019" not in docs  # it describes a file, so it is no record of its own
    assert docs["refs.bib#standalone"].title == "Reefs of the World"
    larvae = docs["papers/larvae.pdf"]  # the .bib entry by its key, and the CSV manifest
    assert (larvae.title, larvae.year, larvae.authors, larvae.url) == (
        "Seeding Coral Larvae",
        2020,
        ("Iris Polyp", "Ray Reef"),
        "https://example.org/larvae",
    )
    assert dict(larvae.metadata_source) == {
        "title": "bibtex",
        "year": "bibtex",
        "authors": "manifest",
        "url": "manifest",
    }
    assert "refs.bib#larvae" not in docs
    notes = docs["reef-monitoring-notes.pdf"]
    assert (notes.title, notes.year) == ("Reef Notes", 2022)
    assert dict(notes.metadata_source) == {"title": "manifest", "year": "manifest"}


# --- retrieval ----------------------------------------------------------------------------


def test_passage_bm25_lets_a_short_note_compete_with_a_long_document(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    filler = "\n\n".join(
        f"## Chapter {i}\n\nGardening advice about tomatoes, soil and watering number {i}."
        for i in range(200)
    )
    (root / "long.md").write_text(
        f"# Garden Almanac\n\n{filler}\n\n## Chapter volcano\n\nA volcano once erupted near "
        "the garden and buried the tomatoes.\n",
        encoding="utf-8",
    )
    (root / "note.md").write_text(
        "# Volcano Note\n\nA volcano vents magma; volcano ash is fertile.\n", encoding="utf-8"
    )
    with CorpusIndex.open(root, tmp_path / "index") as index:
        assert index.passage_count() > 150
        hits = index.search("volcano eruption", 5)
    # The almanac's one passage on an eruption beats the note that never mentions one: scored
    # as a whole file, 200 chapters of tomatoes would have buried it under length
    # normalisation.
    assert [h.document.source_id for h in hits] == ["long.md", "note.md"]
    long_hit = hits[0]
    assert long_hit.passages[0][0].section == "Chapter volcano"
    assert "erupted" in long_hit.passages[0][0].text


def test_adding_one_file_reindexes_that_file_only(pdf_corpus: Path, tmp_path: Path) -> None:
    root = tmp_path / "grow"
    shutil.copytree(pdf_corpus, root)
    for i in range(20):
        (root / f"note{i:02d}.md").write_text(f"# Note {i}\n\nCoral note number {i}.\n")
    index_dir = tmp_path / "index"
    with CorpusIndex.open(root, index_dir) as first:
        assert first.reindexed == 24  # 23 readable files and the scanned PDF
    ms_pdf(
        root / "new.pdf",
        "Giant Clams on Restored Reefs",
        ["Tri Dacna"],
        [["Giant clams filter reef water."]],
    )
    with CorpusIndex.open(root, index_dir) as second:
        assert second.reindexed == 1
        assert second.info.documents == 24
        assert second.search("giant clams", 3)[0].document.title == "Giant Clams on Restored Reefs"
        # What an earlier build skipped is still reported by an index that did not re-read it.
        assert ("scanned-memo.pdf", second.skipped[0][1]) in second.skipped
    (root / "note03.md").write_text("# Note 3\n\nNow about sea turtles.\n")
    (root / "note04.md").unlink()
    with CorpusIndex.open(root, index_dir) as third:
        assert third.reindexed == 1
        assert third.info.documents == 23
        assert [h.document.source_id for h in third.search("turtles", 3)] == ["note03.md"]
        assert third.search("number 4", 30) and "note04.md" not in {
            h.document.source_id for h in third.search("coral note", 30)
        }
    assert len(list(index_dir.iterdir())) == 1
    (root / "refs.bib").write_text("@misc{x, title={Anything}, file={note05.md}}\n")
    with CorpusIndex.open(root, index_dir) as fourth:  # metadata that may touch any file
        assert fourth.reindexed == 25  # every file, the .bib among them
        titles = {d.source_id: d.title for d in fourth.documents()}
        assert titles["note05.md"] == "Anything"


# --- runs ---------------------------------------------------------------------------------


def test_a_run_over_pdfs_cites_titles_and_pages(pdf_corpus: Path, tmp_path: Path) -> None:
    observers: dict[str, Recorder] = {}
    state = run_all(REEFS, make_config(tmp_path), observers, corpus_dir=str(pdf_corpus))
    assert state.draft is not None and state.search is not None
    titles = {r.source_id: r.title for r in state.draft.references}
    assert titles == {
        "reef-nursery.pdf": "Coral Gardening and Reef Nurseries",
        "papers/larvae.pdf": "Larval Seeding of Coral Reefs",
        "reef-monitoring-notes.pdf": "reef monitoring notes",
    }
    markdown = state.draft.markdown
    body = markdown.split("\n## References\n")[0]
    refs = {r.number: r for r in state.draft.references}
    located = 0
    for match in re.finditer(r'"([^"]+)" \[(\d+), p\. (\d+)\]', body):
        quote, number, page = match.group(1), int(match.group(2)), int(match.group(3))
        pages = page_texts(pdf_corpus / refs[number].source_id)
        assert normalised(quote) in pages[page - 1], (quote, page)
        assert all(normalised(quote) not in p for i, p in enumerate(pages) if i != page - 1)
        located += 1
    assert located >= 5
    assert set(_draft.cited_numbers(body)) == set(refs)
    assert "(n.d.)" in markdown  # none of these PDFs has a year
    skipped = [e[1] for e in observers["search"].events if e[0] == "corpus.skipped"]
    assert {"path": "scanned-memo.pdf", "reason": skipped[0]["reason"]} in skipped
    assert str(skipped[0]["reason"]).startswith("no text layer")
    assert state.search.telemetry_details()["sources_by_origin"] == {
        "corpus": len(state.search.sources)
    }


def test_bad_input_is_skipped_with_a_reason_and_the_run_goes_on(
    pdf_corpus: Path, tmp_path: Path
) -> None:
    root = tmp_path / "bad"
    root.mkdir()
    shutil.copy(pdf_corpus / "reef-nursery.pdf", root / "good.pdf")
    (root / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage\n")
    encrypted_pdf(root / "locked.pdf", "Locked Reef Data", [["Coral reef data behind a password."]])
    encrypted_pdf(
        root / "restricted.pdf",
        "Restricted Reef Data",
        [["Coral reef restoration data anyone may open and read."]],
        user_password="",
    )
    (root / "empty.md").write_bytes(b"")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 64)
    with open(root / "huge.txt", "wb") as fh:  # 200 MB (sparse: no disk is spent on it)
        fh.truncate(200 * 1024 * 1024)
    os.symlink("loop-b.md", root / "loop-a.md")
    os.symlink("loop-a.md", root / "loop-b.md")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")
    observers: dict[str, Recorder] = {}
    state = run_all(REEFS, make_config(tmp_path), observers, corpus_dir=str(root))
    reasons = {
        str(e[1]["path"]): str(e[1]["reason"])
        for e in observers["search"].events
        if e[0] == "corpus.skipped"
    }
    assert reasons["broken.pdf"].startswith("unreadable PDF")
    assert reasons["locked.pdf"] == "encrypted PDF (needs a password)"
    assert reasons["empty.md"] == "empty (0 bytes)"
    assert reasons["binary.txt"] == "binary data, not text"
    assert reasons["huge.txt"] == "larger than 20 MiB"
    assert reasons["loop-a.md"] == reasons["loop-b.md"] == "symbolic link loop"
    assert reasons["sub/up"] == "symbolic link loop"
    assert state.search is not None and state.search.skipped
    assert state.draft is not None
    assert "restricted.pdf" not in reasons  # encrypted, but opens without a password
    assert {s.source_id for s in state.search.sources} == {"good.pdf", "restricted.pdf"}
    assert state.draft.references


def test_python_docs_report_cites_corpus_files_and_says_nd(tmp_path: Path) -> None:
    """The acceptance run, as a user types it: ``prowzi run ... --corpus DIR``."""
    corpus = tmp_path / "pydocs"
    shutil.copytree(PYTHON_DOCS, corpus)
    out = tmp_path / "report.md"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "prowzi"),
            "run",
            "Write a report on logging in Python applications",
            "--corpus",
            str(corpus),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = out.read_text(encoding="utf-8")
    body, references = text.split("\n## References\n")
    listed = dict(re.findall(r"^\[(\d+)\] .*?Corpus: `([^`]+)`", references, flags=re.M))
    assert len(listed) >= 5
    for path in listed.values():
        assert (corpus / path).is_file()
    assert {str(n) for n in _draft.cited_numbers(body)} == set(listed)
    assert "(n.d.)" in references
    assert "logging.rst.txt" in listed.values()


@pytest.mark.parametrize(
    ("prompt", "corpus"),
    [
        (QUANTUM, None),
        ("Write a literature review about AI safety", None),
        ("Write a report on logging in Python applications", PYTHON_DOCS),
    ],
)
def test_at_most_a_tenth_of_cited_sentences_are_unsupported(
    prompt: str, corpus: Path | None, tmp_path: Path
) -> None:
    params = {"corpus_dir": str(corpus)} if corpus else {}
    state = run_all(prompt, make_config(tmp_path), **params)
    assert state.draft is not None and state.verification is not None
    assert state.evaluation is not None
    refs = {r.number: r for r in state.draft.references}
    sources = {s.source_id: s for s in state.verification.verified}
    checked = _support.cited_sentences([s.text for s in state.draft.sections], refs, sources)
    assert len(checked) >= 10
    unsupported = [c for c in checked if not c.supported]
    assert len(unsupported) / len(checked) <= 0.10
    assert state.evaluation.unsupported_share == len(unsupported) / len(checked)


def _with_sentence(state: WorkflowState, sentence: str) -> WorkflowState:
    draft = state.draft
    assert draft is not None
    sections = [
        DraftSection(title=s.title, text=s.text + (f" {sentence}" if i == 2 else ""))
        for i, s in enumerate(draft.sections)
    ]
    return state.model_copy(
        update={"draft": assemble(draft.title, sections, list(draft.references), [])}
    )


def test_a_planted_unsupported_citation_lowers_the_score(tmp_path: Path) -> None:
    state = run_all(QUANTUM, make_config(tmp_path))
    assert state.plan and state.verification and state.intent and state.draft
    verified = list(state.verification.verified)
    ids = {s.source_id for s in verified}

    def score(s: WorkflowState) -> tuple[float, float | None]:
        assert s.draft is not None and s.plan is not None
        result = evaluate(s.draft, s.plan, ids, "research_paper", 0.75, verified)
        return result.score, result.unsupported_share

    clean, clean_share = score(_with_sentence(state, ""))
    planted, planted_share = score(
        _with_sentence(state, "Bananas grow best on frozen tundra under permanent darkness [1].")
    )
    assert clean_share == 0.0
    assert planted_share is not None and planted_share > 0
    assert planted < clean
    # Below the threshold, the revision removes the unsupported sentence.
    planted_state = _with_sentence(
        state, "Bananas grow best on frozen tundra under permanent darkness [1]."
    )
    assert planted_state.draft is not None
    revised = run_evaluation(planted_state.draft, state.plan, state.intent, verified, 1.0)
    assert revised.initial_evaluation.unsupported_share == planted_share
    assert "Bananas" not in revised.draft.markdown
    assert revised.evaluation.unsupported_share == 0.0

    # A document of connective filler that cites sources for words they do not hold fails.
    filler = [
        DraftSection(
            title=s.title,
            text=" ".join(
                f"These sources share a concern with progress and many other themes [{n}]."
                for n in range(1, 4)
            ),
        )
        for s in state.draft.sections
    ]
    draft = assemble(state.draft.title, filler, list(state.draft.references)[:3], [])
    result = evaluate(draft, state.plan, ids, "research_paper", 0.75, verified)
    assert result.unsupported_share == 1.0
    assert not result.passed


def test_show_lists_references_with_their_metadata_source(pdf_corpus: Path, tmp_path: Path) -> None:
    wide = {"COLUMNS": "200"}
    run = run_cli(
        "run", REEFS, "--corpus", str(pdf_corpus), "--output", "reefs.md", env=wide, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    session = re.search(r"Session: (\S+)", run.stdout + run.stderr)
    assert session is not None, run.stdout
    show = run_cli("show", session.group(1), env=wide, cwd=tmp_path, timeout=60)
    assert show.returncode == 0, show.stderr
    out = show.stdout
    references = out.split("References", 1)[1].split("Checkpoints", 1)[0]
    assert "Larval Seeding of Coral Reefs (n.d.); corpus papers/larvae.pdf" in references
    assert "authors from pdf-layout, title from pdf-layout" in references
    assert (
        "reef monitoring notes (n.d.); corpus reef-monitoring-notes.pdf; title from file-name"
        in (references)
    )
    assert "sources_by_origin: corpus 3" in out


def test_real_html_gives_its_text_and_sections_without_site_furniture(tmp_path: Path) -> None:
    """Python's own HTML documentation (Sphinx), as a user might drop a saved page in."""
    root = tmp_path / "html"
    root.mkdir()
    shutil.copy(PYTHON_DOCS.parents[1] / "library" / "logging.handlers.html", root)
    (document,) = load_corpus(root).documents
    assert document.title == "logging.handlers — Logging handlers"
    assert dict(document.metadata_source) == {"title": "html-title"}
    sections = {p.section for p in document.passages}
    assert {"StreamHandler", "RotatingFileHandler", "SysLogHandler"} <= sections
    assert "sends logging output to streams" in document.text
    for furniture in ("Previous topic", "Quick search", "Navigation", "var "):
        assert furniture not in document.text


def test_the_monitor_shows_sources_by_origin_and_leaves_the_reference_list_to_show() -> None:
    from datetime import UTC, datetime

    from prowzi.cli.monitor import _details
    from prowzi.workflows.telemetry import StageMetrics

    search = StageMetrics(
        "search",
        "completed",
        1,
        0.1,
        datetime.now(UTC),
        {"sources_count": 15, "sources_by_origin": {"corpus": 12, "crossref": 3}},
    )
    assert _details(search) == "Sources: 15, From: corpus 12, crossref 3"
    evaluation = StageMetrics(
        "evaluation",
        "completed",
        1,
        0.1,
        datetime.now(UTC),
        {"score": 0.97, "unsupported_share": 0.05, "reference_sources": ["[1] A (n.d.); corpus a"]},
    )
    assert _details(evaluation) == "Score: 0.97, Unsupported share: 0.05"
