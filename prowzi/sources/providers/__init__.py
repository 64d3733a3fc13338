"""Online scholarly search providers: Crossref, arXiv, OpenAlex, Semantic Scholar, PubMed.

Off by default; ``--providers crossref,arxiv`` (or ``PROWZI_PROVIDERS``) turns them on for the
search stage, beside the local corpus. Each provider's base URL is a setting
(``PROWZI_<PROVIDER>_URL``). See :mod:`~prowzi.sources.providers.http` for rate limits, retries
and the cache, :mod:`~prowzi.sources.providers.records` for the record and the merge, and
:mod:`~prowzi.sources.providers.stage` for what the search stage does with them.
"""

from prowzi.sources import require_providers

# First, so that a missing 'providers' extra is one line naming it (a ConfigError), not an
# ImportError from deep inside, whichever module of the package is imported.
require_providers()

from prowzi.sources.providers.base import ProviderError  # noqa: E402
from prowzi.sources.providers.records import ProviderRecord, merge_records  # noqa: E402
from prowzi.sources.providers.search import (  # noqa: E402
    PROVIDERS,
    ProviderReport,
    ProvidersFailedError,
    lookup_dois,
    lookup_dois_blocking,
    search_providers,
)

__all__ = [
    "PROVIDERS",
    "ProviderError",
    "ProviderRecord",
    "ProviderReport",
    "ProvidersFailedError",
    "lookup_dois",
    "lookup_dois_blocking",
    "merge_records",
    "search_providers",
]
