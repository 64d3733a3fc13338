"""The checkpoint container: seal and unseal, compression, migrations. Pure: no I/O.

A checkpoint is one blob::

    MAGIC (8) | header length (4, big-endian) | header | sha256 of all before (32)
    | body | HMAC-SHA256 of all before the body (32, only when signed)

The header is a JSON object sealed by its own digest, so a flipped byte anywhere is caught
before the header is parsed. It records the body's size and sha256 (as stored, after
compression), so the HMAC covers the sealed header only and the body is hashed exactly once.
It is not a pickle, and nothing here ever unpickles: a checkpoint may come from anywhere.

:func:`unseal` makes every check that needs no other blob (magic, lengths, header digest,
format version, body size and sha256, HMAC when a key is given) before the body is touched;
:func:`decompress` bounds what a body may inflate to. The header's meaning (which session,
which fields) belongs to the caller, :mod:`prowzi.workflows.checkpoint`.

Format history: 1, the state as JSON; 2, sources shared between search and verification
written once; 3, the state as named fields, some held by earlier checkpoints of the session
(``refs``), and zstd compression. Older formats are migrated on read; newer ones refused.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from prowzi.errors import CheckpointIntegrityError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Compression",
    "Sealed",
    "compress",
    "decompress",
    "migrate_body",
    "migrate_header",
    "seal",
    "unseal",
]

FORMAT_VERSION = 3
MAGIC = b"\x89PROWZI\n"
_LENGTH = struct.Struct(">I")
_PREFIX = len(MAGIC) + _LENGTH.size
_DIGEST = 32
_MAC = 32
_MAX_HEADER = 1 << 20
MAX_BODY = 1 << 30
"""Upper bound on a decompressed body, so a crafted stream cannot exhaust memory."""

Compression = Literal["none", "zlib", "zstd"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "zlib", "zstd")


@dataclass(frozen=True, slots=True)
class Sealed:
    header: dict[str, Any]
    """As written, format version checked (see :func:`migrate_header` for the current form)."""
    body: memoryview
    """As stored: compressed as the header's ``compression`` says."""


# --- migrations -------------------------------------------------------------------------


def _unchanged(doc: dict[str, Any]) -> dict[str, Any]:
    return doc


def _header_2_to_3(header: dict[str, Any]) -> dict[str, Any]:
    return {**header, "fields": None, "refs": {}, "depth": 0, "lease_token": None}


def _body_2_to_3(body: dict[str, Any]) -> dict[str, Any]:
    state = body.pop("state", None)
    return {**body, "fields": state}


_MIGRATIONS: dict[int, tuple[Callable[[dict[str, Any]], dict[str, Any]], ...]] = {
    1: (_unchanged, _unchanged),  # format 1 bodies are format 2 bodies sharing no source
    2: (_header_2_to_3, _body_2_to_3),
}
"""Format ``v`` -> (header migration, body migration) to ``v + 1``. The halves are separate
so that a listing can migrate a header without reading the body."""


def missing_migration(version: int) -> int | None:
    """The first format from which no migration leads on to :data:`FORMAT_VERSION`."""
    return next((v for v in range(version, FORMAT_VERSION) if v not in _MIGRATIONS), None)


def migrate_header(header: dict[str, Any]) -> dict[str, Any]:
    for step in range(header["format_version"], FORMAT_VERSION):
        header = _MIGRATIONS[step][0](dict(header))
        header["format_version"] = step + 1
    return header


def migrate_body(version: int, body: dict[str, Any]) -> dict[str, Any]:
    for step in range(version, FORMAT_VERSION):
        body = _MIGRATIONS[step][1](body)
    return body


# --- sealing ----------------------------------------------------------------------------


def seal(header: dict[str, Any], body: bytes, key: bytes | None) -> list[bytes]:
    """The parts of the container, in order. ``header`` must already record the body's
    ``payload_size`` and ``payload_sha256`` (see :func:`body_digest`) and ``signed``."""
    encoded = orjson.dumps(header)
    sealed = MAGIC + _LENGTH.pack(len(encoded)) + encoded
    prefix = sealed + hashlib.sha256(sealed).digest()
    return [prefix, body, *([hmac.digest(key, prefix, "sha256")] if key is not None else [])]


def body_digest(body: bytes) -> tuple[int, str]:
    return len(body), hashlib.sha256(body).hexdigest()


def read_header(raw: bytes, where: str) -> tuple[dict[str, Any], int]:
    """The header (a JSON object, its format version checked) and where the body starts,
    after the checks that need neither the body nor the key."""
    if raw[: len(MAGIC)] != MAGIC:
        hint = ""
        if raw[:1] == b"\x80" or raw[:1] in (b"(", b"c", b"]", b"}"):
            hint = " (it looks like a pickle; Prowzi never unpickles checkpoint files)"
        raise CheckpointIntegrityError(where, f"not a Prowzi checkpoint container{hint}")
    if len(raw) < _PREFIX:
        raise CheckpointIntegrityError(where, "truncated header")
    (length,) = _LENGTH.unpack_from(raw, len(MAGIC))
    if length > _MAX_HEADER:
        raise CheckpointIntegrityError(where, f"header of {length} bytes is implausible")
    end = _PREFIX + length
    if len(raw) < end + _DIGEST:
        raise CheckpointIntegrityError(where, "truncated header")
    if hashlib.sha256(memoryview(raw)[:end]).digest() != raw[end : end + _DIGEST]:
        raise CheckpointIntegrityError(where, "header digest mismatch: corrupted or altered")
    try:
        header = orjson.loads(memoryview(raw)[_PREFIX:end])
    except orjson.JSONDecodeError as exc:
        raise CheckpointIntegrityError(where, f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointIntegrityError(where, "the header is not an object")
    version = header.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointIntegrityError(where, "the header has no format version")
    if version > FORMAT_VERSION:
        raise CheckpointIntegrityError(
            where,
            f"written in checkpoint format {version} by a newer Prowzi; this Prowzi reads "
            f"formats up to {FORMAT_VERSION}: upgrade Prowzi to load it",
        )
    missing = missing_migration(version)
    if missing is not None:
        raise CheckpointIntegrityError(
            where,
            f"checkpoint format {version} is older than any this Prowzi can migrate "
            f"(no migration from format {missing})",
        )
    return header, end + _DIGEST


def unseal(raw: bytes, where: str, key: bytes | None) -> Sealed:
    """Every check of one container (see the module doc); the body is not decoded."""
    header, start = read_header(raw, where)
    size, sha = header.get("payload_size"), header.get("payload_sha256")
    if type(size) is not int or size < 0 or not isinstance(sha, str):
        raise CheckpointIntegrityError(where, "the header lacks the payload's size or hash")
    signed = header.get("signed") is True
    expected = start + size + (_MAC if signed else 0)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing bytes after the payload"
        raise CheckpointIntegrityError(
            where, f"{problem}: {len(raw)} bytes where the header implies {expected}"
        )
    if key is not None:
        if not signed:
            raise CheckpointIntegrityError(
                where, "unsigned, and a checkpoint key is configured (PROWZI_CHECKPOINT_KEY)"
            )
        mac = hmac.digest(key, memoryview(raw)[:start], "sha256")
        if not hmac.compare_digest(mac, raw[start + size :]):
            raise CheckpointIntegrityError(
                where, "HMAC signature mismatch: a different key, or the file was altered"
            )
    body = memoryview(raw)[start : start + size]
    if hashlib.sha256(body).hexdigest() != sha:
        raise CheckpointIntegrityError(where, "payload sha256 mismatch: corrupted or altered")
    return Sealed(header, body)


# --- compression ------------------------------------------------------------------------


def compress(data: bytes, method: Compression, level: int | None = None) -> bytes:
    if method == "none":
        return data
    if method == "zlib":
        return zlib.compress(data, 1 if level is None else level)
    if method != "zstd":
        raise ValueError(f"unknown compression {method!r}: use none, zlib or zstd")
    import zstandard  # imported when used: a plain load of an uncompressed file needs none

    return zstandard.ZstdCompressor(level=3 if level is None else level).compress(data)


def decompress(data: memoryview, method: object, where: str) -> bytes:
    """``data`` inflated, refusing more than :data:`MAX_BODY` bytes or a cut stream."""
    if method == "none":
        return bytes(data)
    if method == "zlib":
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(data, MAX_BODY)
        except zlib.error as exc:
            raise CheckpointIntegrityError(where, f"undecodable zlib payload: {exc}") from None
        if inflater.unconsumed_tail:
            raise CheckpointIntegrityError(where, "the payload inflates beyond the size limit")
        if not inflater.eof:
            raise CheckpointIntegrityError(where, "truncated zlib payload")
        return out
    if method == "zstd":
        import zstandard

        raw = bytes(data)
        try:
            declared = zstandard.frame_content_size(raw)
        except zstandard.ZstdError:
            declared = -1  # not a frame header: the streaming path says why
        if 0 <= declared <= MAX_BODY:
            # The frame says its size: one call, into a buffer of exactly that size (a frame
            # that lies about it fails instead of growing the buffer).
            try:
                return zstandard.ZstdDecompressor().decompress(raw, max_output_size=declared)
            except zstandard.ZstdError as exc:
                raise CheckpointIntegrityError(
                    where, f"undecodable or truncated zstd payload: {exc}"
                ) from None
        # Size unknown or too large: fed in small pieces, so a crafted stream is refused soon
        # after it passes the limit (one zstd block inflates at most 128 KiB per input byte).
        stream = zstandard.ZstdDecompressor().decompressobj()
        inflated = bytearray()
        try:
            for start in range(0, len(data), 1024):
                inflated += stream.decompress(data[start : start + 1024])
                if len(inflated) > MAX_BODY:
                    raise CheckpointIntegrityError(
                        where, "the payload inflates beyond the size limit"
                    )
        except zstandard.ZstdError as exc:
            raise CheckpointIntegrityError(where, f"undecodable zstd payload: {exc}") from None
        if not stream.eof:
            raise CheckpointIntegrityError(where, "truncated zstd payload")
        return bytes(inflated)
    raise CheckpointIntegrityError(where, f"unknown compression {method!r}")
