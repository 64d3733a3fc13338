"""A real HTTP server on loopback that speaks the five scholarly APIs Prowzi can query.

No hosted service is reachable here, so this stands in for them: one ``ThreadingHTTPServer``
on 127.0.0.1 (a free port) serving, under one path prefix per provider, each API's documented
request parameters and response format, from the invented works in
``tests/fixtures/providers/works.json``:

- ``/crossref/works`` (``query``, ``rows``, ``offset``) and ``/crossref/works/{doi}``: the REST
  API's ``work-list`` and ``work`` messages; an unknown DOI is a 404 "Resource not found.";
- ``/arxiv/query`` (``search_query`` of ``all:`` terms joined by ``AND``, ``start``,
  ``max_results``): an Atom feed with OpenSearch totals; ``/arxiv/pdf/{id}``: the e-print's PDF
  (made from its abstract by groff and Ghostscript, with :meth:`ProviderServer.make_pdfs`);
- ``/openalex/works`` (``search``, ``per-page``, ``page``): ``meta`` and ``results`` with
  abstracts as inverted indexes;
- ``/s2/paper/search`` (``query``, ``offset``, ``limit``, ``fields``): ``total``, ``offset``,
  ``next`` (absent on the last page) and ``data``;
- ``/pubmed/esearch.fcgi`` (JSON ``esearchresult``) and ``/pubmed/efetch.fcgi`` (a
  ``PubmedArticleSet`` with its DOCTYPE).

Real faults on demand: a queue of scripted answers per provider (a status with headers, such
as 429 with ``Retry-After``; a malformed body; an answer too late), a cap on page size (as
every real service has), and ``Cache-Control`` to send. Every answer carries an ``ETag``;
``If-None-Match`` with it gets a 304. Every request is recorded (provider, path, parameters,
headers, time). No pytest here, so a benchmark can start it too.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape, quoteattr

from shared import LoopbackServer

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "providers"
PREFIXES = {
    "crossref": "crossref",
    "arxiv": "arxiv",
    "openalex": "openalex",
    "semanticscholar": "s2",
    "pubmed": "pubmed",
}
STOP = frozenset(re.findall(r"\w+", "a an and the of on in for to with from by at or is are as"))
_ATOM_NS = (
    'xmlns="http://www.w3.org/2005/Atom" '
    'xmlns:opensearch="http://a9.com/-/spec/opensearch/1.1/" '
    'xmlns:arxiv="http://arxiv.org/schemas/atom"'
)


def load_works() -> list[dict[str, Any]]:
    return list(json.loads((FIXTURES / "works.json").read_text(encoding="utf-8"))["works"])


def _number(key: str) -> int:
    """A stable number for a work (the services' own ids are numbers too)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:7], 16)


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOP]


@dataclass(slots=True)
class Seen:
    """One request the server received."""

    provider: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    at: float
    status: int = 0


@dataclass(slots=True)
class Fault:
    """A scripted answer: ``status`` with ``headers``, a malformed body (``malformed``), or the
    usual answer ``delay`` seconds late."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    malformed: bool = False
    delay: float = 0.0


class ProviderServer(LoopbackServer):
    """The server; ``url(provider)`` is the base URL to give ``PROWZI_<PROVIDER>_URL``."""

    def __init__(self, works: list[dict[str, Any]] | None = None) -> None:
        self.works = works if works is not None else load_works()
        self.requests: list[Seen] = []
        self.faults: dict[str, deque[Fault]] = {p: deque() for p in PREFIXES}
        self.page_cap: dict[str, int] = {}
        self.cache_control: dict[str, str] = {}
        self.extra_headers: dict[str, dict[str, str]] = {}
        self.pdfs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        super().__init__(_handler(self))

    # --- control ----------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, provider: str) -> str:
        return f"{self.root}/{PREFIXES[provider]}"

    def env(self) -> dict[str, str]:
        """``PROWZI_<PROVIDER>_URL`` for every provider, pointing here."""
        return {f"PROWZI_{p.upper()}_URL": self.url(p) for p in PREFIXES}

    def script(self, provider: str, *faults: Fault) -> None:
        """Answer the next requests to ``provider`` with these, in order."""
        with self._lock:
            self.faults[provider].extend(faults)

    def seen(self, provider: str | None = None) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if provider is None or r.provider == provider]

    def make_pdfs(self, directory: Path) -> None:
        """A PDF per arXiv work (its title, authors and abstract), made in ``directory`` by
        groff and Ghostscript (tests/pdf_maker.py)."""
        from pdf_maker import ms_pdf

        for work in self.works:
            if not work.get("arxiv"):
                continue
            authors = [f"{given} {family}" for given, family in work["authors"]]
            path = ms_pdf(
                directory / f"{work['key']}.pdf", work["title"], authors, [[work["abstract"]]]
            )
            self.pdfs[work["arxiv"]] = path.read_bytes()

    # --- the APIs ---------------------------------------------------------------------------

    def known_to(self, provider: str) -> list[dict[str, Any]]:
        out = []
        for work in self.works:
            if provider in work["providers"]:
                out.append({**work, **work.get("as", {}).get(provider, {})})
        return out

    def search(self, provider: str, query_words: list[str], every: bool) -> list[dict[str, Any]]:
        """Works matching the words, best first: any word counts (relevance), or with
        ``every`` all words must occur (arXiv's AND, PubMed's default)."""
        scored = []
        for work in self.known_to(provider):
            text = set(words(f"{work['title']} {work['abstract']}"))
            hits = sum(1 for w in query_words if w in text)
            if hits and (not every or all(w in text for w in query_words)):
                scored.append((-hits, work["key"], work))
        return [w for _, _, w in sorted(scored, key=lambda t: (t[0], t[1]))]

    def cap(self, provider: str, wanted: int, maximum: int) -> int:
        return max(0, min(wanted, maximum, self.page_cap.get(provider, maximum)))

    def offset_page(
        self, provider: str, params: dict[str, str], size_param: str, default: int, most: int
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, int]:
        """A relevance search by ``query`` paged by ``offset`` and ``size_param`` (Crossref's,
        Semantic Scholar's): the works found, the page asked for, its offset and size."""
        found = self.search(provider, words(params.get("query", "")), every=False)
        offset = int(params.get("offset", "0"))
        size = self.cap(provider, int(params.get(size_param, str(default))), most)
        return found, found[offset : offset + size], offset, size

    def crossref_item(self, work: dict[str, Any]) -> dict[str, Any]:
        y, m, d = (int(x) for x in work["date"].split("-"))
        return {
            "DOI": work["doi"],
            "URL": f"https://doi.org/{work['doi']}",
            "type": "journal-article",
            "title": [work["title"]],
            "author": [
                {"given": g, "family": f, "sequence": "first" if i == 0 else "additional"}
                for i, (g, f) in enumerate(work["authors"])
            ],
            "issued": {"date-parts": [[y, m, d]]},
            "published": {"date-parts": [[y, m]]},
            "abstract": f"<jats:p>{escape(work['abstract'])}</jats:p>",
            "publisher": "Invented Reef Press",
        }

    def crossref(self, path: str, params: dict[str, str]) -> tuple[int, str, bytes]:
        if path.startswith("/works/"):
            doi = unquote(path.removeprefix("/works/")).lower()
            for work in self.known_to("crossref"):
                if work["doi"].lower() == doi:
                    body = {
                        "status": "ok",
                        "message-type": "work",
                        "message-version": "1.0.0",
                        "message": self.crossref_item(work),
                    }
                    return 200, "application/json", json.dumps(body).encode()
            return 404, "text/plain", b"Resource not found."
        if path != "/works":
            return 404, "text/plain", b"Resource not found."
        found, page, offset, rows = self.offset_page("crossref", params, "rows", 20, 1000)
        body = {
            "status": "ok",
            "message-type": "work-list",
            "message-version": "1.0.0",
            "message": {
                "facets": {},
                "total-results": len(found),
                "items": [self.crossref_item(w) for w in page],
                "items-per-page": rows,
                "query": {"start-index": offset, "search-terms": params.get("query")},
            },
        }
        return 200, "application/json", json.dumps(body).encode()

    def arxiv(self, path: str, params: dict[str, str]) -> tuple[int, str, bytes]:
        if path.startswith("/pdf/"):
            ident = re.sub(r"v\d+$", "", path.removeprefix("/pdf/"))
            pdf = self.pdfs.get(ident)
            if pdf is None:
                return 404, "text/plain", b"not found"
            return 200, "application/pdf", pdf
        if path != "/query":
            return 404, "text/plain", b"not found"
        try:
            start = int(params.get("start", "0"))
            rows = self.cap("arxiv", int(params.get("max_results", "10")), 2000)
        except ValueError:
            return 400, "application/atom+xml", self.arxiv_error("start and max_results")
        terms = re.findall(r"all:([^\s]+)", params.get("search_query", ""))
        found = self.search("arxiv", [w for t in terms for w in words(t)], every=True)
        entries = []
        for work in found[start : start + rows]:
            ident = f"{work['arxiv']}v1"
            authors = "".join(
                f"<author><name>{escape(g)} {escape(f)}</name></author>" for g, f in work["authors"]
            )
            doi = f"<arxiv:doi>{escape(work['doi'])}</arxiv:doi>" if work.get("doi") else ""
            entries.append(
                "<entry>"
                f"<id>http://arxiv.org/abs/{ident}</id>"
                f"<updated>{work['date']}T00:00:00Z</updated>"
                f"<published>{work['date']}T00:00:00Z</published>"
                f"<title>{escape(work['title'])}</title>"
                f"<summary>  {escape(work['abstract'])}\n</summary>"
                f"{authors}{doi}"
                f'<link href="http://arxiv.org/abs/{ident}" rel="alternate" type="text/html"/>'
                f'<link title="pdf" href={quoteattr(f"{self.root}/arxiv/pdf/{ident}")} '
                'rel="related" type="application/pdf"/>'
                '<arxiv:primary_category term="q-bio.PE" scheme="http://arxiv.org/schemas/atom"/>'
                '<category term="q-bio.PE" scheme="http://arxiv.org/schemas/atom"/>'
                "</entry>"
            )
        feed = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<feed {_ATOM_NS}>'
            f'<link href="http://arxiv.org/api/query" rel="self" type="application/atom+xml"/>'
            f'<title type="html">ArXiv Query: {escape(params.get("search_query", ""))}</title>'
            "<id>http://arxiv.org/api/fixture</id><updated>2026-01-01T00:00:00-05:00</updated>"
            f"<opensearch:totalResults>{len(found)}</opensearch:totalResults>"
            f"<opensearch:startIndex>{start}</opensearch:startIndex>"
            f"<opensearch:itemsPerPage>{rows}</opensearch:itemsPerPage>"
            f"{''.join(entries)}</feed>"
        )
        return 200, "application/atom+xml; charset=utf-8", feed.encode()

    def arxiv_error(self, what: str) -> bytes:
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<feed {_ATOM_NS}>'
            "<entry><id>http://arxiv.org/api/errors#bad_parameters</id><title>Error</title>"
            f"<summary>{escape(what)} must be integers</summary></entry></feed>"
        ).encode()

    def openalex(self, path: str, params: dict[str, str]) -> tuple[int, str, bytes]:
        if path != "/works":
            return 404, "application/json", b'{"error": "not found"}'
        found = self.search("openalex", words(params.get("search", "")), every=False)
        per_page = self.cap("openalex", int(params.get("per-page", "25")), 200)
        number = int(params.get("page", "1"))
        page = found[(number - 1) * per_page : number * per_page]
        results = []
        for work in page:
            index: dict[str, list[int]] = {}
            for position, word in enumerate(work["abstract"].split()):
                index.setdefault(word, []).append(position)
            landing = (
                f"https://arxiv.org/abs/{work['arxiv']}"
                if work.get("arxiv")
                else f"https://doi.org/{work['doi']}"
            )
            results.append(
                {
                    "id": f"https://openalex.org/W{_number(work['key'])}",
                    "doi": f"https://doi.org/{work['doi']}" if work.get("doi") else None,
                    "title": work["title"],
                    "display_name": work["title"],
                    "publication_year": work["year"],
                    "publication_date": work["date"],
                    "authorships": [
                        {
                            "author_position": "first" if i == 0 else "middle",
                            "author": {
                                "id": f"https://openalex.org/A{i}",
                                "display_name": f"{g} {f}",
                            },
                        }
                        for i, (g, f) in enumerate(work["authors"])
                    ],
                    "abstract_inverted_index": index,
                    "primary_location": {"landing_page_url": landing, "pdf_url": None},
                    "locations": [{"landing_page_url": landing, "pdf_url": None}],
                }
            )
        body = {
            "meta": {
                "count": len(found),
                "db_response_time_ms": 3,
                "page": number,
                "per_page": per_page,
                "groups_count": None,
            },
            "results": results,
            "group_by": [],
        }
        return 200, "application/json", json.dumps(body).encode()

    def semanticscholar(self, path: str, params: dict[str, str]) -> tuple[int, str, bytes]:
        if path != "/paper/search":
            return 404, "application/json", b'{"error": "Not found"}'
        found, page, offset, _ = self.offset_page("semanticscholar", params, "limit", 10, 100)
        data = []
        for work in page:
            ids: dict[str, Any] = {"CorpusId": _number(work["key"])}
            if work.get("doi"):
                ids["DOI"] = work["doi"]
            if work.get("arxiv"):
                ids["ArXiv"] = work["arxiv"]
            paper_id = hashlib.sha1(work["key"].encode()).hexdigest()
            data.append(
                {
                    "paperId": paper_id,
                    "externalIds": ids,
                    "url": f"https://www.semanticscholar.org/paper/{paper_id}",
                    "title": work["title"],
                    "abstract": work["abstract"],
                    "year": work["year"],
                    "authors": [
                        {"authorId": str(i), "name": f"{g} {f}"}
                        for i, (g, f) in enumerate(work["authors"])
                    ],
                    "openAccessPdf": None,
                }
            )
        body: dict[str, Any] = {"total": len(found), "offset": offset, "data": data}
        if offset + len(page) < len(found):
            body["next"] = offset + len(page)
        return 200, "application/json", json.dumps(body).encode()

    def pubmed(self, path: str, params: dict[str, str]) -> tuple[int, str, bytes]:
        known = {w["pmid"]: w for w in self.known_to("pubmed")}
        if path == "/esearch.fcgi":
            found = self.search("pubmed", words(params.get("term", "")), every=True)
            start = int(params.get("retstart", "0"))
            size = self.cap("pubmed", int(params.get("retmax", "20")), 10000)
            ids = [w["pmid"] for w in found[start : start + size]]
            body = {
                "header": {"type": "esearch", "version": "0.3"},
                "esearchresult": {
                    "count": str(len(found)),
                    "retmax": str(len(ids)),
                    "retstart": str(start),
                    "idlist": ids,
                    "translationset": [],
                    "querytranslation": params.get("term", ""),
                },
            }
            return 200, "application/json; charset=UTF-8", json.dumps(body).encode()
        if path == "/efetch.fcgi":
            articles = []
            for pmid in params.get("id", "").split(","):
                work = known.get(pmid)
                if work is None:
                    continue
                authors = "".join(
                    f'<Author ValidYN="Y"><LastName>{escape(f)}</LastName>'
                    f"<ForeName>{escape(g)}</ForeName><Initials>{g[0]}</Initials></Author>"
                    for g, f in work["authors"]
                )
                articles.append(
                    '<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM">'
                    f'<PMID Version="1">{pmid}</PMID><Article PubModel="Print"><Journal>'
                    f'<JournalIssue CitedMedium="Internet"><PubDate><Year>{work["year"]}</Year>'
                    "<Month>Jan</Month></PubDate></JournalIssue><Title>Invented Reef Journal"
                    f"</Title></Journal><ArticleTitle>{escape(work['title'])}</ArticleTitle>"
                    f"<Abstract><AbstractText>{escape(work['abstract'])}</AbstractText></Abstract>"
                    f'<AuthorList CompleteYN="Y">{authors}</AuthorList></Article>'
                    "</MedlineCitation><PubmedData><ArticleIdList>"
                    f'<ArticleId IdType="pubmed">{pmid}</ArticleId>'
                    f'<ArticleId IdType="doi">{escape(work["doi"])}</ArticleId>'
                    "</ArticleIdList></PubmedData></PubmedArticle>"
                )
            xml = (
                '<?xml version="1.0" ?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD '
                'PubMedArticle, 1st January 2024//EN" '
                '"https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_240101.dtd">\n'
                f"<PubmedArticleSet>{''.join(articles)}</PubmedArticleSet>"
            )
            return 200, "text/xml; charset=UTF-8", xml.encode()
        return 404, "text/plain", b"not found"


def _handler(server: ProviderServer) -> type[BaseHTTPRequestHandler]:
    by_prefix = {prefix: name for name, prefix in PREFIXES.items()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return None

        def do_GET(self) -> None:
            split = urlsplit(self.path)
            prefix, _, rest = split.path.lstrip("/").partition("/")
            provider = by_prefix.get(prefix)
            params = {k: v[-1] for k, v in parse_qs(split.query).items()}
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen = Seen(provider or "?", "/" + rest, params, headers, time.monotonic())
            with server._lock:
                server.requests.append(seen)
                queue = server.faults.get(provider or "")
                fault = queue.popleft() if queue else None
            if provider is None:
                self.answer(seen, 404, "text/plain", b"no such service", {})
                return
            if fault is not None and fault.delay:
                time.sleep(fault.delay)
            if fault is not None and fault.status != 200:
                self.answer(seen, fault.status, "text/plain", b"slow down", fault.headers)
                return
            status, kind, body = getattr(server, provider)("/" + rest, params)
            if fault is not None and fault.malformed:
                body = body[: len(body) // 2]
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            headers = {"ETag": etag, "Last-Modified": "Thu, 01 Jan 2026 00:00:00 GMT"}
            if provider in server.cache_control:
                headers["Cache-Control"] = server.cache_control[provider]
            headers.update(server.extra_headers.get(provider, {}))
            if status == 200 and self.headers.get("if-none-match") == etag:
                self.answer(seen, 304, kind, b"", headers)
                return
            self.answer(seen, status, kind, body, headers)

        def answer(
            self, seen: Seen, status: int, kind: str, body: bytes, headers: dict[str, str]
        ) -> None:
            seen.status = status
            self.send_response(status)
            self.send_header("Content-Type", kind)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

    return Handler
