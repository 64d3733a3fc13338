"""What Prowzi's HTTP clients share (the LLM client, the scholarly providers, webhook delivery).

Each client is httpx, configured for its own protocol; only reading the answers' common
headers lives here, once.
"""

from __future__ import annotations

import email.utils
import math
import time
from urllib.parse import urlsplit


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait that a ``Retry-After`` header asks for: delay-seconds or an HTTP date
    (RFC 9110 §10.2.3), never negative; None when absent or unreadable. Callers cap it."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def redacted(url: str) -> str:
    """``url`` for a message: without its user info (``redis://:password@host``,
    ``s3://key:secret@bucket``) or query."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        host = f"***@{host}"
    return f"{parts.scheme}://{host}{parts.path}" + ("?…" if parts.query else "")
