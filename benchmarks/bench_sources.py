"""Local sources (issue 16): indexing PDFs, re-indexing after one new file, querying passages.

    python benchmarks/bench_sources.py [--pdfs 50] [--pages 20] [--passages 100000]

1. Indexing throughput: a corpus of ``--pdfs`` PDFs of ``--pages`` pages each (1,000 pages by
   default), made by groff and Ghostscript as the tests make them, indexed from scratch
   (pypdf text extraction, layout title, passages, FTS5); pages per second, several builds.
2. Incremental re-index: one more 20-page PDF added to that corpus, then ``CorpusIndex.open``
   (scan, copy of the previous index, that one file read and indexed, rename). Target: under
   1 s.
3. Query latency: ``CorpusIndex.search`` (limit 15, one anchor word, as the search stage
   calls it) over an index of ``--passages`` passages (100,000 by default; Markdown files of
   100 sections each). Target: median under 20 ms.

Text is drawn word by word from the word frequencies of Python's own documentation (Debian's
python3.11-doc), so posting lists have a natural, Zipf-like spread; queries are three words
of middling frequency. Needs groff and Ghostscript (``scripts/test`` installs both).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _stats import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pdf_maker import ms_pdf

from prowzi.agents import _text
from prowzi.agents.corpus import CorpusIndex

DOCS = Path("/usr/share/doc/python3.11/html/_sources/library")


class Words:
    """A unigram model of real English technical prose."""

    def __init__(self, seed: int = 16) -> None:
        counts: Counter[str] = Counter()
        for path in sorted(DOCS.glob("*.txt"))[:120]:
            counts.update(
                w
                for w in _text.words(path.read_text(encoding="utf-8"))
                if w.isascii() and w.isalpha()
            )
        self.vocabulary = [w for w, _ in counts.most_common(20000)]
        self.weights = [counts[w] for w in self.vocabulary]
        self.random = random.Random(seed)
        middling = [w for w in self.vocabulary[300:3000] if w not in _text.STOPWORDS]
        self.query_words = middling

    def sentence(self) -> str:
        n = self.random.randint(8, 20)
        words = self.random.choices(self.vocabulary, self.weights, k=n)
        return words[0].capitalize() + " " + " ".join(words[1:]) + "."

    def paragraph(self, sentences: int = 4) -> str:
        return " ".join(self.sentence() for _ in range(sentences))

    def query(self) -> tuple[str, str]:
        words = self.random.sample(self.query_words, 3)
        return " ".join(words), words[0]


def make_pdf_corpus(root: Path, words: Words, pdfs: int, pages: int) -> None:
    for i in range(pdfs):
        title = " ".join(words.random.sample(words.query_words, 4)).title()
        ms_pdf(
            root / f"paper{i:04d}.pdf",
            title,
            ["A. Author"],
            [[words.paragraph(), words.paragraph(), words.paragraph()] for _ in range(pages)],
            info={"Title": title} if i % 2 else None,
        )


def bench_indexing(corpus: Path, work: Path, pages: int, builds: int) -> None:
    seconds = []
    for b in range(builds):
        start = time.perf_counter()
        with CorpusIndex.open(corpus, work / f"index-full-{b}") as index:
            elapsed = time.perf_counter() - start
            passages = index.passage_count()
            skipped = index.skipped
        seconds.append(elapsed)
    assert not skipped, skipped
    per_page = [s / pages for s in seconds]
    report(f"index {pages} PDF pages from scratch (per page)", per_page, "ms")
    rates = sorted(pages / s for s in seconds)
    print(
        f"{'  throughput':<58} median {rates[len(rates) // 2]:9.1f} pages/s ({passages} passages)"
    )


def bench_incremental(corpus: Path, work: Path, words: Words, runs: int) -> None:
    index_dir = work / "index-incremental"
    with CorpusIndex.open(corpus, index_dir):
        pass
    extra = work / "extra"
    extra.mkdir()
    seconds = []
    for r in range(runs):
        made = ms_pdf(
            extra / f"added{r}.pdf",
            f"Added Paper {r}",
            ["B. Author"],
            [[words.paragraph(), words.paragraph()] for _ in range(20)],
        )
        target = corpus / made.name
        shutil.copy(made, target)
        start = time.perf_counter()
        with CorpusIndex.open(corpus, index_dir) as index:
            seconds.append(time.perf_counter() - start)
            assert index.reindexed == 1, index.reindexed
        target.unlink()
        with CorpusIndex.open(corpus, index_dir):  # back to the base state (not timed)
            pass
    report("re-index after adding one 20-page PDF", seconds, "ms", target="< 1000 ms")


def bench_queries(work: Path, words: Words, passages: int, queries: int) -> None:
    corpus = work / "passages"
    corpus.mkdir()
    per_file = 100
    for f in range(passages // per_file):
        sections = [f"## Section {s}\n\n{words.paragraph(3)}\n" for s in range(per_file)]
        (corpus / f"doc{f:05d}.md").write_text(
            f"# Document {f}\n\n" + "\n".join(sections), encoding="utf-8"
        )
    start = time.perf_counter()
    with CorpusIndex.open(corpus, work / "index-queries") as index:
        built = time.perf_counter() - start
        count = index.passage_count()
        print(f"{'  (built the passage index once in':<58} {built:9.1f} s: {count} passages)")
        for _ in range(20):  # warm the page cache
            q, anchor = words.query()
            index.search(q, 15, [anchor])
        seconds = []
        results = 0
        for _ in range(queries):
            q, anchor = words.query()
            start = time.perf_counter()
            hits = index.search(q, 15, [anchor])
            seconds.append(time.perf_counter() - start)
            results += len(hits)
    report(f"query over {count} passages (limit 15)", seconds, "ms", target="median < 20 ms")
    print(f"{'  mean documents per query':<58} {results / queries:9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pdfs", type=int, default=50)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--builds", type=int, default=3)
    parser.add_argument("--incremental-runs", type=int, default=7)
    parser.add_argument("--passages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    words = Words()
    with tempfile.TemporaryDirectory(prefix="prowzi-bench-sources-") as tmp:
        work = Path(tmp)
        corpus = work / "pdfs"
        corpus.mkdir()
        start = time.perf_counter()
        make_pdf_corpus(corpus, words, args.pdfs, args.pages)
        pages = args.pdfs * args.pages
        print(f"made {args.pdfs} PDFs, {pages} pages, in {time.perf_counter() - start:.1f} s")
        bench_indexing(corpus, work, pages, args.builds)
        bench_incremental(corpus, work, words, args.incremental_runs)
        bench_queries(work, words, args.passages, args.queries)


if __name__ == "__main__":
    main()
