"""A cache of model answers, keyed by the request, kept beside the checkpoints.

Each answer is one blob ``llm-cache/<sha256 of the request>.bin`` in the checkpoint store
(local directory, S3 or Azure, whatever ``PROWZI_CHECKPOINT_URL``/``_DIR`` says), sealed in the
checkpoint container (:mod:`prowzi.storage.format`): its header and body are hashed and
verified before use, and HMAC-signed when ``PROWZI_CHECKPOINT_KEY`` is set (then an unsigned or
wrongly signed entry is refused). A refused or unreadable entry is a miss, never an answer.
Only the request's hash and the answer are stored; the API key is no part of either.

Size: when the entries pass ``max_bytes`` the least recently used go first. A hit re-writes
its entry (non-durably, at most once a minute) so that its time is its last use.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from typing import Any

import orjson

from prowzi.errors import CheckpointIntegrityError
from prowzi.storage import format as fmt
from prowzi.storage.blob import BlobNotFoundError, BlobStore

log = logging.getLogger("prowzi.llm.cache")

PREFIX = "llm-cache/"
KIND = "llm_response"
_TOUCH_AFTER = 60.0


def request_key(request: dict[str, Any]) -> str:
    """The sha256 of a request body in canonical JSON (sorted keys): model, messages,
    response format, temperature, token limit."""
    return hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()


class ResponseCache:
    def __init__(self, store: BlobStore, *, key: bytes | None, max_bytes: int) -> None:
        self.store = store
        self._key = key
        self.max_bytes = max_bytes
        self._total: int | None = None
        self._lock = threading.Lock()

    @staticmethod
    def name(digest: str) -> str:
        return f"{PREFIX}{digest}.bin"

    def get(self, digest: str) -> dict[str, Any] | None:
        """The cached answer to the request with this digest, verified; None on a miss."""
        name = self.name(digest)
        try:
            blob = self.store.get(name)
        except BlobNotFoundError:
            return None
        except OSError as exc:
            log.warning("model cache unreadable (%s): %s", self.store.describe(name), exc)
            return None
        try:
            sealed = fmt.unseal(blob.data, self.store.describe(name), self._key)
            if sealed.header.get("kind") != KIND or sealed.header.get("request") != digest:
                raise CheckpointIntegrityError(name, "not the answer to this request")
            answer = orjson.loads(sealed.body)
        except (CheckpointIntegrityError, orjson.JSONDecodeError) as exc:
            log.warning("model cache entry refused: %s", exc)
            return None
        if not isinstance(answer, dict):
            return None
        if time.time() - blob.info.modified > _TOUCH_AFTER:
            # its time is its last use (LRU); losing this write loses nothing
            with contextlib.suppress(OSError):
                self.store.put(name, blob.data, durable=False)
        return answer

    def put(self, digest: str, answer: dict[str, Any]) -> None:
        body = orjson.dumps(answer)
        size, sha = fmt.body_digest(body)
        header = {
            "format_version": fmt.FORMAT_VERSION,
            "kind": KIND,
            "request": digest,
            "payload_size": size,
            "payload_sha256": sha,
            "signed": self._key is not None,
            "compression": "none",
        }
        data = b"".join(fmt.seal(header, body, self._key))
        name = self.name(digest)
        try:
            self.store.put(name, data)
        except OSError as exc:  # a cache that cannot be written costs money, not the run
            log.warning("could not cache a model answer (%s): %s", self.store.describe(name), exc)
            return
        with self._lock:
            if self._total is not None:
                self._total += len(data)
            if self._total is None or self._total > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        """Delete the least recently used entries until the cache is within its limit."""
        entries = sorted(self.store.list(PREFIX), key=lambda b: b.modified)
        total = sum(b.size for b in entries)
        for blob in entries:
            if total <= self.max_bytes:
                break
            if self.store.delete(blob.name):
                total -= blob.size
        self._total = total

    def entries(self) -> int:
        return len(self.store.list(PREFIX))
