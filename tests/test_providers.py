"""The online providers against a real HTTP server on loopback speaking their documented APIs
(tests/provider_servers.py): what each returns, pagination, 429 with Retry-After, a provider
down, the on-disk cache, deduplication with the corpus, metrics, and ``prowzi run
--providers`` end to end."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from emulator_servers import free_port
from prometheus_client import CollectorRegistry
from provider_servers import Fault, ProviderServer, load_works
from shared import write_corpus

from prowzi.agents.models import CorpusInfo, QueryResult, SearchAgentResult, Source
from prowzi.config import ProwziConfig, get_config
from prowzi.errors import ConfigError, TransientError
from prowzi.http import retry_after
from prowzi.sources.providers import ProvidersFailedError, lookup_dois_blocking, search_providers
from prowzi.sources.providers.http import RateLimiter
from prowzi.sources.providers.records import ProviderRecord, merge_records
from prowzi.sources.providers.search import ProviderHit, ProviderSearch
from prowzi.sources.providers.stage import merge_with_corpus
from prowzi.sources.records import normalise_arxiv_id, normalise_doi, normalise_title
from prowzi.workflows.composition import build_metrics

ALL = ["crossref", "arxiv", "openalex", "semanticscholar", "pubmed"]
FAST = "crossref=0,arxiv=0.01,openalex=0,semanticscholar=0,pubmed=0"
QUERY = "coral reef bleaching"
CONTACT = "reader@example.org"
WORKS = {w["key"]: w for w in load_works()}


@pytest.fixture
def server() -> Any:
    with ProviderServer() as running:
        yield running


def settings(server: ProviderServer, tmp_path: Path, **overrides: Any) -> ProwziConfig:
    values: dict[str, Any] = {k.removeprefix("PROWZI_").lower(): v for k, v in server.env().items()}
    values.update(
        provider_intervals=FAST,
        provider_cache_dir=tmp_path / "provider-cache",
        contact_email=CONTACT,
    )
    values.update(overrides)
    return get_config(**values)


def search(config: ProwziConfig, providers: list[str], limit: int = 10, **kw: Any) -> Any:
    return asyncio.run(search_providers(config, providers, [QUERY], limit, **kw))


def closed_port() -> int:
    """A loopback port nothing listens on: a provider that is down."""
    return free_port()


def by_title(result: Any, origin: str) -> dict[str, ProviderRecord]:
    return {h.record.title: h.record for h in result.hits if h.record.origin == origin}


# --- the records -------------------------------------------------------------------------


def test_identifiers_and_titles_are_normalised() -> None:
    assert normalise_doi("https://doi.org/10.5555/ABC.1") == "10.5555/abc.1"
    assert normalise_doi("doi: 10.5555/x") == "10.5555/x"
    assert normalise_doi("not a doi") is None
    assert normalise_arxiv_id("http://arxiv.org/abs/2103.01234v2") == "2103.01234"
    assert normalise_arxiv_id("arXiv:hep-th/9901001v1") == "hep-th/9901001"
    assert normalise_arxiv_id("10.48550/arXiv.2205.06789") == "2205.06789"
    assert normalise_arxiv_id("https://doi.org/10.5555/reef") is None
    assert normalise_title("Symbiont Shuffling in Reef Corals Under Heat-Stress") == (
        normalise_title("symbiont shuffling in reef corals under heat stress")
    )
    assert normalise_title("Café  Société!") == "cafe societe"


def test_merge_dedups_by_doi_arxiv_id_and_title_keeping_the_first_and_completing_it() -> None:
    corpus = ProviderRecord("Reef paper", "corpus", "corpus", source_id="reef.md", year=2019)
    crossref = ProviderRecord(
        "Reef Paper.", "crossref", "crossref", doi="10.5555/r1", authors=("A B",)
    )
    openalex = ProviderRecord(
        "Another title", "openalex", "openalex", doi="https://doi.org/10.5555/R1"
    )
    arxiv = ProviderRecord("Preprint", "arxiv", "arxiv", arxiv_id="2101.00001v3")
    s2 = ProviderRecord("Preprint, revised", "semanticscholar", "s2", arxiv_id="2101.00001")
    other = ProviderRecord("Unrelated", "pubmed", "pubmed", doi="10.5555/r2")
    merged = merge_records([corpus, crossref, openalex, arxiv, s2, other])
    assert [m.title for m in merged] == ["Reef paper", "Preprint", "Unrelated"]
    first = merged[0]
    assert first.origin == "corpus" and first.source_id == "reef.md"
    assert first.doi == "10.5555/r1" and first.authors == ("A B",) and first.year == 2019
    assert first.also_found_by == ("crossref", "openalex")  # openalex through crossref's DOI
    assert merged[1].also_found_by == ("semanticscholar",)
    assert merge_records([]) == []


# --- each API ----------------------------------------------------------------------------


def test_each_provider_gives_the_fields_its_documented_answer_holds(
    server: ProviderServer, tmp_path: Path
) -> None:
    config = settings(
        server,
        tmp_path,
        openalex_api_key="oa-key",
        semanticscholar_api_key="s2-key",
        pubmed_api_key="ncbi-key",
    )
    result = search(config, ALL)
    assert [r.provider for r in result.reports] == ALL
    assert all(r.error is None and r.queries == 1 for r in result.reports)

    w1, w2, w4, w7 = WORKS["w1"], WORKS["w2"], WORKS["w4"], WORKS["w7"]
    crossref = by_title(result, "crossref")[w1["title"]]
    assert crossref.authors == ("Ana Costa", "Ben Ortiz")
    assert (crossref.year, crossref.doi) == (2019, w1["doi"])
    assert crossref.abstract == w1["abstract"]  # the JATS markup is gone
    assert crossref.metadata_source == "crossref"

    arxiv = by_title(result, "arxiv")[w4["title"]]
    assert (arxiv.arxiv_id, arxiv.doi, arxiv.year) == ("2007.04321", None, 2020)
    assert arxiv.authors == ("Gus Ibarra", "Hana Jones")
    assert arxiv.pdf_url == f"{server.root}/arxiv/pdf/2007.04321v1"
    assert arxiv.abstract == w4["abstract"]

    openalex = by_title(result, "openalex")[w2["title"]]
    assert openalex.abstract == w2["abstract"]  # rebuilt from the inverted index
    assert (openalex.arxiv_id, openalex.doi) == ("2103.01234", w2["doi"])

    s2 = by_title(result, "semanticscholar")
    assert s2["Symbiont Shuffling in Reef Corals Under Heat-Stress"].arxiv_id is None
    assert s2[w2["title"]].arxiv_id == "2103.01234"

    pubmed = by_title(result, "pubmed")[w7["title"]]
    assert pubmed.authors == ("Lea Nunes", "Max Olsen")
    assert (pubmed.year, pubmed.doi) == (2015, w7["doi"])
    assert pubmed.url == f"https://pubmed.ncbi.nlm.nih.gov/{w7['pmid']}/"

    # What each service asks a client to send.
    (cr,) = server.seen("crossref")
    assert cr.params["mailto"] == CONTACT and cr.params["query"] == QUERY
    assert CONTACT in cr.headers["user-agent"]
    assert server.seen("openalex")[0].params["api_key"] == "oa-key"
    assert server.seen("semanticscholar")[0].headers["x-api-key"] == "s2-key"
    for request in server.seen("pubmed"):
        assert (request.params["tool"], request.params["email"]) == ("prowzi", CONTACT)
        assert request.params["api_key"] == "ncbi-key"
    assert server.seen("arxiv")[0].params["search_query"] == (
        "all:coral AND all:reef AND all:bleaching"
    )


def test_pages_are_followed_until_the_limit_or_the_last_page(
    server: ProviderServer, tmp_path: Path
) -> None:
    server.page_cap = {p: 2 for p in ALL} | {"arxiv": 1, "pubmed": 1}
    result = search(settings(server, tmp_path, provider_cache_ttl_seconds=0), ALL, limit=5)
    reports = {r.provider: r for r in result.reports}
    # crossref knows 6 matching works: pages at 0, 2, 4 give 5 once cut to the limit
    assert [r.params["offset"] for r in server.seen("crossref")] == ["0", "2", "4"]
    assert reports["crossref"].results == 5
    assert [r.params["page"] for r in server.seen("openalex")] == ["1", "2"]
    assert reports["openalex"].results == 4  # all it has: the second page was the last
    assert [r.params["offset"] for r in server.seen("semanticscholar")] == ["0", "2"]
    assert [r.params["start"] for r in server.seen("arxiv")] == ["0", "1"]
    esearch = [r for r in server.seen("pubmed") if r.path == "/esearch.fcgi"]
    assert [r.params["retstart"] for r in esearch] == ["0", "1"]
    assert reports["pubmed"].results == 2
    for provider in ALL:
        titles = [h.record.title for h in result.hits if h.record.origin == provider]
        assert len(titles) == len(set(titles)) == reports[provider].results


# --- faults ------------------------------------------------------------------------------


def test_a_429_is_retried_after_its_retry_after(server: ProviderServer, tmp_path: Path) -> None:
    server.script("crossref", Fault(429, {"Retry-After": "1"}))
    result = search(settings(server, tmp_path), ["crossref"])
    first, second = server.seen("crossref")
    assert (first.status, second.status) == (429, 200)
    assert second.at - first.at >= 1.0
    assert result.reports[0].requests == {"ok": 1, "rate_limited": 1, "error": 0, "cached": 0}
    assert result.reports[0].error is None and result.reports[0].results == 6


def test_a_503_with_an_http_date_pauses_every_user_of_the_provider(
    server: ProviderServer, tmp_path: Path
) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    server.script("openalex", Fault(503, {"Retry-After": when}))
    config = settings(
        server, tmp_path, provider_cache_ttl_seconds=0, provider_intervals="openalex=0.2"
    )

    async def two_searches() -> list[Any]:
        return list(
            await asyncio.gather(
                search_providers(config, ["openalex"], [QUERY], 5),
                search_providers(config, ["openalex"], ["coral calcification"], 5),
            )
        )

    results = asyncio.run(two_searches())
    refused = next(r for r in server.seen("openalex") if r.status == 503)
    answered = [r for r in server.seen("openalex") if r.status == 200]
    assert len(answered) == 2 and all(r.error is None for x in results for r in x.reports)
    # the second was waiting for its turn when the 503 came, and waited on for the date
    # (which has one-second resolution: at least one second past the 503)
    assert all(r.at - refused.at >= 0.9 for r in answered)


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert retry_after("7") == 7.0
    now = 1_800_000_000.0
    assert retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert retry_after("soon") is None
    assert retry_after(None) is None


def test_a_retry_after_beyond_the_limit_fails_that_provider_and_the_others_answer(
    server: ProviderServer, tmp_path: Path
) -> None:
    server.script("crossref", Fault(429, {"Retry-After": "3600"}))
    started = time.monotonic()
    result = search(settings(server, tmp_path), ["crossref", "arxiv"])
    assert time.monotonic() - started < 30
    crossref, arxiv = result.reports
    assert crossref.error == "HTTP 429 (Retry-After: 3600)" and crossref.failed
    assert arxiv.error is None and arxiv.results == 2
    assert {h.record.origin for h in result.hits} == {"arxiv"}


def test_a_provider_that_is_down_degrades_the_search(
    server: ProviderServer, tmp_path: Path
) -> None:
    config = settings(
        server,
        tmp_path,
        arxiv_url=f"http://127.0.0.1:{closed_port()}/arxiv",
        provider_max_retries=1,
    )
    result = search(config, ["crossref", "arxiv", "pubmed"])
    crossref, arxiv, pubmed = result.reports
    assert arxiv.failed and arxiv.error is not None and "ConnectError" in arxiv.error
    assert arxiv.requests["error"] == 2  # the first try and one retry
    assert crossref.results == 6 and pubmed.results == 2
    assert {h.record.origin for h in result.hits} == {"crossref", "pubmed"}


def test_a_provider_that_answers_too_late_times_out_and_the_others_answer(
    server: ProviderServer, tmp_path: Path
) -> None:
    server.script("openalex", Fault(delay=3.0))
    config = settings(server, tmp_path, provider_timeout_seconds=0.5, provider_max_retries=0)
    started = time.monotonic()
    result = search(config, ["openalex", "crossref"])
    assert time.monotonic() - started < 2.5
    openalex, crossref = result.reports
    assert openalex.error is not None and openalex.error.startswith("no answer: ReadTimeout")
    assert openalex.requests["error"] == 1 and crossref.results == 6


def test_every_provider_down_fails_the_search_naming_each(tmp_path: Path) -> None:
    config = get_config(
        crossref_url=f"http://127.0.0.1:{closed_port()}",
        arxiv_url=f"http://127.0.0.1:{closed_port()}",
        provider_intervals=FAST,
        provider_max_retries=0,
        provider_cache_dir=tmp_path / "cache",
    )
    with pytest.raises(ProvidersFailedError) as caught:
        asyncio.run(search_providers(config, ["crossref", "arxiv"], [QUERY], 5))
    assert isinstance(caught.value, TransientError)  # the stage is retried
    message = str(caught.value)
    assert "crossref: unreachable" in message and "arxiv: unreachable" in message


def test_a_server_error_is_retried_and_a_malformed_answer_is_never_cached(
    server: ProviderServer, tmp_path: Path
) -> None:
    config = settings(server, tmp_path)
    server.script("semanticscholar", Fault(500), Fault(malformed=True))
    first = search(config, ["semanticscholar", "crossref"])
    report = first.reports[0]
    assert report.error is not None and report.error.startswith("malformed answer (not JSON")
    assert report.requests == {"ok": 1, "rate_limited": 0, "error": 1, "cached": 0}
    again = search(config, ["semanticscholar"])  # asks again: the bad answer was dropped
    assert again.reports[0].error is None and again.reports[0].results == 4
    assert len(server.seen("semanticscholar")) == 3


# --- pacing and the cache ----------------------------------------------------------------


def test_requests_to_a_provider_are_spaced_by_its_interval_across_concurrent_runs(
    server: ProviderServer, tmp_path: Path
) -> None:
    config = settings(
        server, tmp_path, provider_intervals="arxiv=0.5", provider_cache_ttl_seconds=0
    )
    errors: list[BaseException] = []

    def run(query: str) -> None:  # a run of its own: its own thread and event loop
        try:
            asyncio.run(search_providers(config, ["arxiv"], [query, f"{query} heat"], 5))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(q,)) for q in (QUERY, "symbiont corals")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    starts = sorted(r.at for r in server.seen("arxiv"))
    assert len(starts) == 4
    # as the server saw them: 0.1 s of the 0.5 s is left for the loopback's jitter on a busy
    # machine (a request leaves on time but a connection's set-up may delay its arrival)
    assert all(b - a >= 0.4 for a, b in itertools.pairwise(starts)), starts


@pytest.mark.parametrize(("contact", "together"), [(None, False), (CONTACT, True)])
def test_crossref_s_public_pool_takes_one_request_at_a_time_and_the_polite_pool_three(
    server: ProviderServer, tmp_path: Path, contact: str | None, together: bool
) -> None:
    server.script("crossref", Fault(delay=0.6))
    config = settings(
        server,
        tmp_path,
        contact_email=contact,
        provider_intervals="crossref=0",
        provider_cache_ttl_seconds=0,
    )

    async def two_searches() -> None:
        await asyncio.gather(
            search_providers(config, ["crossref"], [QUERY], 5),
            search_providers(config, ["crossref"], ["coral calcification"], 5),
        )

    asyncio.run(two_searches())
    first, second = sorted(r.at for r in server.seen("crossref"))
    if together:
        assert second - first < 0.4  # both under way at once
    else:
        assert second - first >= 0.55  # the second waited for the first's (slow) answer


def test_a_stricter_rate_limit_the_service_advertises_is_followed(
    server: ProviderServer, tmp_path: Path
) -> None:
    # Crossref's headers: this many requests per this interval
    server.extra_headers["crossref"] = {"X-Rate-Limit-Limit": "2", "X-Rate-Limit-Interval": "1s"}
    config = settings(server, tmp_path, provider_cache_ttl_seconds=0)
    asyncio.run(
        search_providers(config, ["crossref"], [QUERY, "coral calcification", "reef fish"], 5)
    )
    starts = [r.at for r in server.seen("crossref")]
    assert len(starts) == 3
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(starts)), starts


def test_the_published_intervals_apply_unless_a_setting_overrides_them() -> None:
    from prowzi.sources.providers.http import concurrency_for, interval_for

    config = get_config()
    assert (interval_for("crossref", config), concurrency_for("crossref", config)) == (0.2, 1)
    polite = get_config(contact_email=CONTACT)
    assert (interval_for("crossref", polite), concurrency_for("crossref", polite)) == (0.1, 3)
    assert concurrency_for("arxiv", config) == 1
    assert interval_for("arxiv", config) == 3.0  # one request every three seconds
    assert interval_for("pubmed", config) == pytest.approx(1 / 3)
    assert interval_for("pubmed", get_config(pubmed_api_key="k")) == 0.1
    assert interval_for("semanticscholar", get_config(semanticscholar_api_key="k")) == 1.0
    assert interval_for("arxiv", get_config(provider_intervals="arxiv=0.5")) == 0.5
    clock = [100.0]
    limiter = RateLimiter(3.0, clock=lambda: clock[0])
    assert [limiter.reserve(), limiter.reserve(), limiter.reserve()] == [0.0, 3.0, 6.0]
    limiter.hold(20.0)
    assert limiter.reserve() == 20.0


def test_a_repeated_search_is_answered_by_the_cache_with_zero_requests(
    server: ProviderServer, tmp_path: Path
) -> None:
    config = settings(server, tmp_path)
    first = search(config, ALL)
    sent = len(server.seen())
    assert sent == 6  # pubmed: esearch and efetch
    again = search(config, ALL)
    assert len(server.seen()) == sent  # nothing sent
    assert [h.record for h in again.hits] == [h.record for h in first.hits]
    assert all(r.requests["cached"] >= 1 and r.requests["ok"] == 0 for r in again.reports)


def test_past_its_ttl_a_cached_answer_is_asked_for_again(
    server: ProviderServer, tmp_path: Path
) -> None:
    config = settings(server, tmp_path, provider_cache_ttl_seconds=0.5)
    search(config, ["crossref"])
    time.sleep(1.0)
    search(config, ["crossref"])
    assert len(server.seen("crossref")) == 2


def test_a_no_cache_answer_is_revalidated_with_its_etag(
    server: ProviderServer, tmp_path: Path
) -> None:
    server.cache_control["crossref"] = "no-cache"
    config = settings(server, tmp_path)
    first = search(config, ["crossref"])
    again = search(config, ["crossref"])
    original, revalidation = server.seen("crossref")
    assert revalidation.headers.get("if-none-match", "").startswith('"')
    assert (original.status, revalidation.status) == (200, 304)
    assert [h.record for h in again.hits] == [h.record for h in first.hits]


# --- DOI lookup and full text ------------------------------------------------------------


def test_a_doi_is_looked_up_at_crossref(server: ProviderServer, tmp_path: Path) -> None:
    config = settings(server, tmp_path)
    found = lookup_dois_blocking(config, ["https://doi.org/10.5555/REEF.2018.003", "10.5555/none"])
    record = found["10.5555/reef.2018.003"]
    assert record is not None and record.title == WORKS["w3"]["title"]
    assert record.authors == ("Fay Hart",) and record.year == 2018
    assert found["10.5555/none"] is None
    assert server.seen("crossref")[0].params["mailto"] == CONTACT


def test_full_text_is_fetched_only_when_asked(server: ProviderServer, tmp_path: Path) -> None:
    server.make_pdfs(tmp_path / "pdfs")
    config = settings(server, tmp_path, provider_cache_ttl_seconds=0)
    plain = search(config, ["arxiv"])
    assert all(not h.record.full_text for h in plain.hits)
    assert not [r for r in server.seen("arxiv") if r.path.startswith("/pdf/")]
    full = search(config, ["arxiv"], fetch_full_text=True)
    w4 = by_title(full, "arxiv")[WORKS["w4"]["title"]]
    assert "reef corals exchange their algal symbionts for heat tolerant clades" in w4.full_text
    assert full.reports[0].full_texts == 2


def test_a_pdf_over_the_size_limit_is_not_read(
    server: ProviderServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full text is streamed and given up past the limit: the abstract stays the source."""
    import prowzi.sources.providers.search as provider_search

    server.make_pdfs(tmp_path / "pdfs")
    monkeypatch.setattr(provider_search, "MAX_PDF_BYTES", 200)
    config = settings(server, tmp_path, provider_cache_ttl_seconds=0)
    full = search(config, ["arxiv"], fetch_full_text=True)
    assert full.reports[0].full_texts == 0
    assert all(not h.record.full_text for h in full.hits)
    assert [r for r in server.seen("arxiv") if r.path.startswith("/pdf/")]  # it was asked


# --- the search stage's merge ------------------------------------------------------------


def test_provider_results_merge_with_the_corpus_without_duplicates() -> None:
    w1, w4 = WORKS["w1"], WORKS["w4"]
    corpus_source = Source(
        source_id="notes/thermal.md",
        title="Thermal stress and coral reef bleaching events",
        doi=w1["doi"],
        text="Our own notes on heatwaves and coral reef bleaching.",
        score=8.0,
        queries=[QUERY],
    )
    corpus = SearchAgentResult(
        queries=[QueryResult(query=QUERY, source_ids=["notes/thermal.md"])],
        sources=[corpus_source],
        corpus=CorpusInfo(path="notes", documents=1, fingerprint="f"),
    )

    def hit(origin: str, rank: int, **fields: Any) -> ProviderHit:
        return ProviderHit(
            QUERY, rank, ProviderRecord(origin=origin, metadata_source=origin, **fields)
        )

    hits = [
        hit(
            "crossref",
            0,
            title=w1["title"],
            doi=f"https://doi.org/{w1['doi']}",
            authors=("Ana Costa",),
        ),
        hit("arxiv", 0, title=w4["title"], arxiv_id="2007.04321v1", abstract=w4["abstract"]),
        hit(
            "semanticscholar",
            1,
            title="Symbiont Shuffling in Reef Corals Under Heat-Stress",
            abstract=w4["abstract"],
            year=2020,
        ),
        hit("pubmed", 0, title="Kelp forests", abstract="Kelp grows in cold water."),
    ]
    sources, queries = merge_with_corpus(corpus, ProviderSearch(hits, []), ["coral", "reef"])
    assert {s.source_id for s in sources} == {"notes/thermal.md", "arxiv:arxiv:2007.04321"}
    kept, symbionts = sorted(sources, key=lambda s: s.origin != "corpus")
    assert kept.origin == "corpus" and kept.text == corpus_source.text and kept.score == 1.0
    assert symbionts.origin == "arxiv" and symbionts.year == 2020  # completed from S2
    assert symbionts.metadata_source == {  # each field from the first that had it
        "title": "arxiv",
        "arxiv_id": "arxiv",
        "abstract": "arxiv",
        "year": "semanticscholar",
    }
    assert symbionts.abstract == w4["abstract"]
    # the corpus copy keeps its own title and text, and gains the authors it lacked
    assert kept.authors == ["Ana Costa"] and kept.metadata_source["authors"] == "crossref"
    assert 0 < symbionts.score <= 1
    assert queries == [
        QueryResult(query=QUERY, source_ids=["notes/thermal.md", "arxiv:arxiv:2007.04321"])
    ]


# --- metrics -----------------------------------------------------------------------------


def test_metrics_count_requests_by_provider_and_outcome(
    server: ProviderServer, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    metrics = build_metrics(registry)
    server.script("crossref", Fault(429, {"Retry-After": "0"}))
    config = settings(
        server, tmp_path, arxiv_url=f"http://127.0.0.1:{closed_port()}", provider_max_retries=1
    )
    search(config, ["crossref", "arxiv"])
    search(config, ["crossref"])

    def count(provider: str, outcome: str) -> float:
        value = registry.get_sample_value(
            "prowzi_provider_requests_total", {"provider": provider, "outcome": outcome}
        )
        return value or 0.0

    assert (count("crossref", "rate_limited"), count("crossref", "ok")) == (1, 1)
    assert count("crossref", "cached") == 1 and count("arxiv", "error") == 2
    assert (
        registry.get_sample_value(
            "prowzi_provider_request_duration_seconds_count", {"provider": "crossref"}
        )
        == 3
    )
    assert count("pubmed", "ok") == 0  # every series exists from the start
    del metrics


# --- end to end --------------------------------------------------------------------------


def prowzi_run(server: ProviderServer, tmp_path: Path, *args: str, **env: str) -> Any:
    environment = {
        **os.environ,
        **server.env(),
        "PROWZI_PROVIDER_INTERVALS": FAST,
        "PROWZI_CONTACT_EMAIL": CONTACT,
        "PROWZI_TELEMETRY_DIR": str(tmp_path / "telemetry"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "prowzi.cli.main", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        cwd=tmp_path,
    )


def reef_run(
    server: ProviderServer, tmp_path: Path, providers: str, session: str, *args: str, **env: str
) -> Any:
    """``prowzi run`` of the coral reef report with ``--providers`` and ``--session-id``."""
    return prowzi_run(
        server,
        tmp_path,
        "Write a report on coral reef bleaching",
        "--providers",
        providers,
        "--session-id",
        session,
        *args,
        **env,
    )


def arxiv_down(path: str = "") -> dict[str, str]:
    """The environment of a run whose arXiv is unreachable (a closed port) and whose
    providers do not retry."""
    return {
        "PROWZI_ARXIV_URL": f"http://127.0.0.1:{closed_port()}{path}",
        "PROWZI_PROVIDER_MAX_RETRIES": "0",
    }


def search_details(tmp_path: Path, session: str) -> dict[str, Any]:
    record = json.loads((tmp_path / "telemetry" / f"{session}.json").read_text())
    (stage,) = [
        s for s in record["stages"] if s["stage"] == "search" and s["status"] == "completed"
    ]
    return dict(stage["details"])


def test_prowzi_run_with_providers_cites_their_results_beside_the_corpus(
    server: ProviderServer, tmp_path: Path
) -> None:
    corpus = write_corpus(
        tmp_path / "corpus",
        {
            "thermal.md": (
                "---\ntitle: Thermal stress and coral reef bleaching events\nauthors: [Ana Costa]\n"
                f"year: 2019\ndoi: {WORKS['w1']['doi']}\n---\n\n"
                "Marine heatwaves bleach coral reefs; our field notes on coral reef bleaching.\n"
            ),
        },
    )
    every = "crossref,arxiv,openalex,semanticscholar,pubmed"
    done = reef_run(
        server, tmp_path, every, "reef-1", "--corpus", str(corpus), "--output", "reef.md"
    )
    assert done.returncode == 0, done.stderr
    document = (tmp_path / "reef.md").read_text()
    references = document.split("## References")[1]
    assert "Corpus: `thermal.md`" in references  # the corpus copy of w1, not Crossref's
    assert "10.5555/reef.2019.001" in references and references.count("reef.2019.001") == 1
    assert (
        "*Coral reef bleaching: a review of thermal thresholds*. "
        "https://doi.org/10.5555/reef.2015.007. Found by crossref." in references
    )
    assert "Found by arxiv." in references and "Found by openalex." in references
    details = search_details(tmp_path, "reef-1")
    providers = details["providers"]
    assert set(providers) == set(ALL)
    assert all("error" not in p and p["results"] > 0 for p in providers.values())
    assert details["sources_by_origin"]["corpus"] == 1
    assert sum(details["sources_by_origin"].values()) == details["sources_count"]
    # w1 to w8 once each, and the corpus copy instead of w1
    assert details["sources_count"] == 8

    again = reef_run(
        server, tmp_path, every, "reef-2", "--corpus", str(corpus), "--output", "reef2.md"
    )
    assert again.returncode == 0, again.stderr
    sent = len(server.seen())
    assert all(
        p["requests"]["ok"] == 0 for p in search_details(tmp_path, "reef-2")["providers"].values()
    )
    assert len(server.seen()) == sent
    assert (tmp_path / "reef2.md").read_text().split("## References")[1] == references


def test_prowzi_run_goes_on_when_a_provider_is_down_and_fails_when_all_are(
    server: ProviderServer, tmp_path: Path
) -> None:
    down = arxiv_down()
    done = reef_run(server, tmp_path, "crossref,arxiv", "reef-down", **down)
    assert done.returncode == 0, done.stderr
    assert "arxiv failed" in done.stdout
    details = search_details(tmp_path, "reef-down")
    assert "unreachable" in details["providers"]["arxiv"]["error"]
    assert details["warnings"] == [f"arxiv failed: {details['providers']['arxiv']['error']}"]
    assert details["providers"]["crossref"]["results"] > 0

    failed = reef_run(server, tmp_path, "arxiv", "reef-all-down", **down, PROWZI_MAX_RETRIES="0")
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("error:")
    assert "every online provider failed: arxiv: unreachable" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_prowzi_run_refuses_an_unknown_provider_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prowzi.cli.main",
            "run",
            "Write about reefs",
            "--providers",
            "crossref,scholar",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: invalid --providers 'crossref,scholar': unknown provider(s) scholar: use "
        "crossref, arxiv, openalex, semanticscholar, pubmed"
    )


def test_without_the_providers_extra_prowzi_run_says_what_to_install(tmp_path: Path) -> None:
    # hishel made unimportable in this process, as on an install without the extra
    code = (
        "import sys; sys.modules['hishel'] = None; from prowzi.cli.main import main; "
        "sys.argv = ['prowzi', 'run', 'Write about reefs', '--providers', 'crossref']; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: the online providers need hishel: pip install 'prowzi[providers]'"
    )


def test_a_provider_url_that_is_not_http_is_refused_naming_its_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        get_config(arxiv_url="ftp://mirror.example/arxiv")
    assert str(caught.value) == (
        "invalid setting arxiv_url (PROWZI_ARXIV_URL='ftp://mirror.example/arxiv'): must be "
        "an http:// or https:// URL with a host"
    )
    assert get_config(crossref_url="http://127.0.0.1:8/crossref/").crossref_url == (
        "http://127.0.0.1:8/crossref"
    )


def test_a_resume_searches_the_providers_its_run_was_given(
    server: ProviderServer, tmp_path: Path
) -> None:
    down = arxiv_down("/arxiv")
    failed = reef_run(
        server,
        tmp_path,
        "arxiv",
        "reef-resume",
        "--enable-checkpoints",
        **down,
        PROWZI_MAX_RETRIES="0",
    )
    assert failed.returncode == 1 and "prowzi resume reef-resume" in failed.stderr
    assert server.seen() == []
    # arXiv is back; nothing in the environment names a provider: the checkpoint does
    resumed = subprocess.run(
        [sys.executable, "-m", "prowzi.cli.main", "resume", "reef-resume"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            **server.env(),
            "PROWZI_PROVIDER_INTERVALS": FAST,
            "PROWZI_TELEMETRY_DIR": str(tmp_path / "telemetry"),
        },
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert server.seen("arxiv")
    assert search_details(tmp_path, "reef-resume")["providers"]["arxiv"]["results"] == 2


def test_prowzi_run_fetches_full_text_only_with_the_flag(
    server: ProviderServer, tmp_path: Path
) -> None:
    server.make_pdfs(tmp_path / "pdfs")
    for session, flag in (("reef-abstracts", ()), ("reef-full", ("--fetch-full-text",))):
        done = reef_run(
            server, tmp_path, "arxiv", session, *flag, PROWZI_PROVIDER_CACHE_TTL_SECONDS="0"
        )
        assert done.returncode == 0, done.stderr
    assert "full_texts" not in search_details(tmp_path, "reef-abstracts")["providers"]["arxiv"]
    assert search_details(tmp_path, "reef-full")["providers"]["arxiv"]["full_texts"] == 2
    pdfs = [r for r in server.seen("arxiv") if r.path.startswith("/pdf/")]
    assert sorted(r.path for r in pdfs) == ["/pdf/2007.04321v1", "/pdf/2205.06789v1"]


def test_a_doi_found_in_the_corpus_is_completed_from_crossref_when_providers_are_on(
    server: ProviderServer, tmp_path: Path
) -> None:
    corpus = write_corpus(
        tmp_path / "corpus",
        {
            "recovery.md": (
                f"---\ntitle: Reef recovery notes\ndoi: {WORKS['w3']['doi']}\n---\n\n"
                "How coral reefs recover after coral reef bleaching, from our own field notes.\n"
            ),
        },
    )
    # not Crossref: the lookup goes to Crossref all the same
    done = reef_run(
        server, tmp_path, "arxiv", "reef-doi", "--corpus", str(corpus), "--output", "reef.md"
    )
    assert done.returncode == 0, done.stderr
    references = (tmp_path / "reef.md").read_text().split("## References")[1]
    assert "Fay Hart (2018). *Reef recovery notes*." in references  # its own title kept
    crossref = search_details(tmp_path, "reef-doi")["providers"]["crossref"]
    assert (crossref["doi_lookups"], crossref["doi_completed"]) == (1, 1)
    (lookup,) = server.seen("crossref")
    assert lookup.path == f"/works/{WORKS['w3']['doi']}"


def test_the_monitor_shows_each_provider_s_details_in_one_line() -> None:
    from datetime import UTC, datetime

    from prowzi.cli.monitor import _details
    from prowzi.workflows.telemetry import StageMetrics

    details = {
        "sources_count": 3,
        "providers": {
            "crossref": {"results": 2, "requests": {"ok": 1, "cached": 0}},
            "arxiv": {"results": 0, "error": "HTTP 503"},
        },
    }
    search = StageMetrics("search", "completed", 1, 0.1, datetime.now(UTC), details)
    assert _details(search) == (
        "Sources: 3, Providers: crossref (results 2, requests (ok 1, cached 0)), "
        "arxiv (results 0, error HTTP 503)"
    )
