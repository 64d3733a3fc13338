"""The blob store contract, its errors, and the in-memory reference implementation.

A blob store keeps named byte strings and nothing else: no format, no sessions. Five
operations, the ones every object store (S3, Azure Blob, GCS) and a directory of files can do
atomically:

- ``get(name)``: the bytes and their :class:`BlobInfo` (one consistent version);
- ``put(name, data, create_only=False, if_match=None, durable=True)``: replace the whole blob
  atomically; with ``create_only`` only if no blob has the name, with ``if_match`` only if
  the blob's etag is still that one (else :class:`PreconditionFailedError`); returns the new
  etag. ``durable=False`` says a power loss may take the write back (derived data); a store
  whose every write is durable ignores it;
- ``list(prefix)``: every blob whose name starts with ``prefix``, recursively;
- ``delete(name)``: whether a blob was there;
- ``head(name)``: the blob's :class:`BlobInfo`, or None.

Names are ``/``-separated segments of ``[A-Za-z0-9_][A-Za-z0-9._-]*`` (no ``..``): they map onto
file paths and object keys alike without escaping. The calls are synchronous: async code calls
them through ``asyncio.to_thread`` (Prowzi never calls them on an event loop).

Errors: :class:`BlobNotFoundError` (a ``LookupError``), :class:`PreconditionFailedError`, and
``OSError`` for everything that is the store's trouble rather than the caller's: a full disk,
a refused permission, an unreachable bucket (:class:`StoreUnavailableError`), a symlink planted
where a blob should be (:class:`UnsafeBlobError`).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from prowzi.errors import InvalidIdentifierError

__all__ = [
    "Blob",
    "BlobInfo",
    "BlobNotFoundError",
    "BlobStore",
    "InMemoryBlobStore",
    "PreconditionFailedError",
    "StoreUnavailableError",
    "UnsafeBlobError",
    "validate_blob_name",
]

_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def validate_blob_name(name: object) -> str:
    """``name`` if it is a valid blob name, else :class:`InvalidIdentifierError`."""
    if (
        not isinstance(name, str)
        or len(name) > 1024
        or not all(_SEGMENT_RE.fullmatch(part) and ".." not in part for part in name.split("/"))
    ):
        raise InvalidIdentifierError(f"invalid blob name {name!r}")
    return name


class BlobNotFoundError(LookupError):
    """No blob has this name."""


class PreconditionFailedError(Exception):
    """A conditional put lost: the blob exists (``create_only``) or has changed (``if_match``)."""


class UnsafeBlobError(OSError):
    """Something that is not a blob sits under a blob's name (a symlink, a directory)."""


class StoreUnavailableError(OSError):
    """The store could not be reached or answered with an error (network, service, auth)."""


@dataclass(frozen=True, slots=True)
class BlobInfo:
    name: str
    size: int
    modified: float
    """Seconds since the epoch of the last write."""
    etag: str
    """Changes whenever the blob is replaced."""


@dataclass(frozen=True, slots=True)
class Blob:
    data: bytes
    info: BlobInfo


@runtime_checkable
class BlobStore(Protocol):
    """Named blobs with atomic, optionally conditional, replacement (see the module doc)."""

    url: str
    """Where the blobs live, for messages (``/path/to/dir``, ``s3://bucket/prefix``)."""

    def get(self, name: str) -> Blob: ...

    def head(self, name: str) -> BlobInfo | None: ...

    def put(
        self,
        name: str,
        data: bytes,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        durable: bool = True,
    ) -> str: ...

    def list(self, prefix: str = "") -> list[BlobInfo]: ...

    def delete(self, name: str) -> bool: ...

    def describe(self, name: str) -> str:
        """Where ``name`` lives, for messages."""
        ...


class InMemoryBlobStore:
    """The reference implementation: a dict under a lock. For tests and for code that needs a
    store that is gone with the process."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._blobs: dict[str, Blob] = {}
        self._lock = threading.Lock()
        self._version = 0

    def get(self, name: str) -> Blob:
        validate_blob_name(name)
        with self._lock:
            blob = self._blobs.get(name)
        if blob is None:
            raise BlobNotFoundError(name)
        return blob

    def head(self, name: str) -> BlobInfo | None:
        validate_blob_name(name)
        with self._lock:
            blob = self._blobs.get(name)
        return blob.info if blob is not None else None

    def put(
        self,
        name: str,
        data: bytes,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        durable: bool = True,
    ) -> str:
        validate_blob_name(name)
        with self._lock:
            current = self._blobs.get(name)
            if create_only and current is not None:
                raise PreconditionFailedError(f"{self.describe(name)} exists")
            if if_match is not None and (current is None or current.info.etag != if_match):
                raise PreconditionFailedError(f"{self.describe(name)} has changed")
            self._version += 1
            etag = f"m{self._version}"
            info = BlobInfo(name, len(data), time.time(), etag)
            self._blobs[name] = Blob(bytes(data), info)
            return etag

    def list(self, prefix: str = "") -> list[BlobInfo]:
        with self._lock:
            return [b.info for n, b in sorted(self._blobs.items()) if n.startswith(prefix)]

    def delete(self, name: str) -> bool:
        validate_blob_name(name)
        with self._lock:
            return self._blobs.pop(name, None) is not None

    def describe(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"
