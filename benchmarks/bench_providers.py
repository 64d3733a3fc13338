"""Online-provider benchmarks, against the loopback server the tests use (no internet).

    python benchmarks/bench_providers.py [--runs 30] [--records 20000]

- one query to all five providers, sent (no cache) and answered by the on-disk cache: what the
  HTTP layers (pacing, retries, hishel's cache) cost per search, rate limits set to zero;
- ``merge_records`` over N records (a fifth of them duplicates by DOI, arXiv id or title).

Figures are the median and p95 of separate measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

from _stats import report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from provider_servers import ProviderServer

from prowzi.config import get_config
from prowzi.sources.providers import search_providers
from prowzi.sources.providers.records import ProviderRecord, merge_records

ALL = ["crossref", "arxiv", "openalex", "semanticscholar", "pubmed"]
ZERO = ",".join(f"{p}=0" for p in ALL)


def bench_search(runs: int) -> None:
    with ProviderServer() as server, tempfile.TemporaryDirectory() as cache:
        base = {k.removeprefix("PROWZI_").lower(): v for k, v in server.env().items()}
        uncached = get_config(**base, provider_intervals=ZERO, provider_cache_ttl_seconds=0)
        cached = get_config(**base, provider_intervals=ZERO, provider_cache_dir=cache)
        query = ["coral reef bleaching"]
        asyncio.run(search_providers(cached, ALL, query, 10))  # fill the cache
        for name, config in (("sent", uncached), ("from the cache", cached)):
            seconds = []
            for _ in range(runs):
                started = time.perf_counter()
                asyncio.run(search_providers(config, ALL, query, 10))
                seconds.append(time.perf_counter() - started)
            report(f"one query, five providers ({name})", seconds)


def bench_merge(records: int, runs: int) -> None:
    rng = random.Random(16)
    items = []
    for i in range(records):
        n = rng.randrange(int(records * 0.8))  # about a fifth repeat an earlier work
        kind = n % 3
        items.append(
            ProviderRecord(
                title=f"Work number {n} on coral reefs",
                origin=ALL[i % 5],
                metadata_source=ALL[i % 5],
                doi=f"10.5555/w{n}" if kind == 0 else None,
                arxiv_id=f"2101.{n:05d}" if kind == 1 else None,
            )
        )
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        merge_records(items)
        seconds.append(time.perf_counter() - started)
    report(f"merge_records, {records} records", seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--records", type=int, default=20_000)
    args = parser.parse_args()
    bench_search(args.runs)
    bench_merge(args.records, max(3, args.runs // 3))


if __name__ == "__main__":
    main()
