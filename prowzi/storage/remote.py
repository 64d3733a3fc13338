"""S3 and Azure Blob backends, and :func:`open_store`, which turns a location into a store.

Both object stores are reached through `obstore <https://developmentseed.org/obstore/>`_, the
Python binding of the Rust ``object_store`` crate (the one Apache Arrow, Delta-rs and
DataFusion use). Why it rather than boto3 plus the Azure SDK:

- **One small client.** One Rust-backed wheel, with no dependencies of its own, speaks S3,
  Azure Blob and GCS through the same calls and the same errors; boto3 and azure-storage-blob
  are two large SDKs with two error models and two retry policies to configure.
- **Native conditional writes.** ``put(..., mode="create")`` is ``If-None-Match: *`` and
  ``mode={"e_tag": ...}`` is ``If-Match``: exactly the two conditional puts the blob store
  contract (:mod:`prowzi.storage.blob`) asks for, and the two session leases are built from.
- **Tested against emulators.** Both backends pass the conformance suite
  (:mod:`prowzi.storage.conformance`) against moto's S3 server and Azurite, real HTTP servers
  on loopback, in the ordinary test run.

obstore is an optional dependency (``pip install 'prowzi[remote]'``), imported only when an
``s3://`` or ``az://`` store is opened: ``import prowzi`` never needs it.

How :class:`ObjectBlobStore` keeps the contract:

- A put is one PUT request (never a multipart upload), atomic on both services.
- Etags are the service's, without their quotes (Azure quotes them in HEAD and GET answers
  but not in listings). On S3 a plain upload's etag is the MD5 of its bytes, so putting the
  same bytes again keeps the etag; a compare-and-swap against it is still right, since the
  blob holds what the caller read.
- ``list(prefix)`` is a string prefix, as everywhere else; object stores list by whole path
  segments, so the listing asks for the prefix's directory and filters. Objects whose keys
  are not blob names (written by something else) are left out.
- ``delete`` asks whether the blob is there first (S3's DELETE does not say): two deleters
  racing may both report True.
- Errors: a lost condition is :class:`PreconditionFailedError`, a missing blob
  :class:`BlobNotFoundError`, and everything else (network, auth, a missing bucket)
  :class:`StoreUnavailableError`, an ``OSError`` whose one-line message names the blob's URL
  and never a credential.
- Timeouts: 10 s to connect, 60 s per request, at most 2 retries within 15 s, so an
  unreachable endpoint fails in seconds. A retried conditional put whose first attempt went
  through but whose answer was lost reports :class:`PreconditionFailedError`: the caller
  reads again (leases do), and nothing is written twice.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote, urlsplit

from prowzi.errors import ConfigError, InvalidIdentifierError
from prowzi.http import redacted
from prowzi.storage.blob import (
    Blob,
    BlobInfo,
    BlobNotFoundError,
    BlobStore,
    InMemoryBlobStore,
    PreconditionFailedError,
    StoreUnavailableError,
    UnsafeBlobError,
    validate_blob_name,
)
from prowzi.storage.local import MAX_BLOB_BYTES, LocalBlobStore

if TYPE_CHECKING:
    from obstore import ObjectMeta, PutMode
    from obstore.store import AzureConfig, ClientConfig, ObjectStore, RetryConfig, S3Config

__all__ = [
    "CONNECT_TIMEOUT",
    "REQUEST_TIMEOUT",
    "ObjectBlobStore",
    "open_store",
]

CONNECT_TIMEOUT = timedelta(seconds=10)
REQUEST_TIMEOUT = timedelta(seconds=60)
_MAX_RETRIES = 2
_RETRY_WINDOW = timedelta(seconds=15)

_S3_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_AZURE_CONTAINER_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_URL_QUERY_RE = re.compile(r"(\w+://[^\s?#]*)[?#][^\s]*")
_INSTALL_HINT = "pip install 'prowzi[remote]'"


def _one_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of ``exc``'s message, query strings cut off (a SAS token travels in
    one), at most ``limit`` characters."""
    lines = str(exc).strip().splitlines()
    text = _URL_QUERY_RE.sub(r"\1?…", lines[0].strip() if lines else "")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _client_options(allow_http: bool) -> ClientConfig:
    options: ClientConfig = {"connect_timeout": CONNECT_TIMEOUT, "timeout": REQUEST_TIMEOUT}
    if allow_http:
        options["allow_http"] = True
    return options


def _retry_config() -> RetryConfig:
    return {
        "max_retries": _MAX_RETRIES,
        "retry_timeout": _RETRY_WINDOW,
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=2),
            "base": 2,
        },
    }


class ObjectBlobStore:
    """Blobs as objects in an obstore store (an S3 bucket, an Azure container), under
    ``prefix``: the blob ``a/b`` is the object ``<prefix>/a/b``."""

    def __init__(self, store: ObjectStore, *, url: str, prefix: str = "") -> None:
        prefix = prefix.strip("/")
        if prefix:
            validate_blob_name(prefix)
        self._store = store
        self._prefix = prefix
        self.url = f"{url.rstrip('/')}/{prefix}" if prefix else url.rstrip("/")

    def __repr__(self) -> str:
        return f"ObjectBlobStore({self.url!r})"

    def describe(self, name: str) -> str:
        return f"{self.url}/{name}" if name else self.url

    def _key(self, name: str) -> str:
        validate_blob_name(name)
        return f"{self._prefix}/{name}" if self._prefix else name

    @contextlib.contextmanager
    def _errors(self, name: str, doing: str) -> Iterator[None]:
        """Every obstore or network error as :class:`StoreUnavailableError`."""
        from obstore.exceptions import BaseError

        try:
            yield
        except (StoreUnavailableError, UnsafeBlobError):
            raise
        except (BaseError, OSError) as exc:
            raise StoreUnavailableError(
                f"could not {doing} {self.describe(name)}: {_one_line(exc)}"
            ) from None

    def _etag(self, etag: str | None, name: str) -> str:
        # Azure quotes etags in HEAD and GET answers but not in listings; S3 quotes them all.
        if etag:
            etag = etag.removeprefix("W/").strip('"')
        if not etag:
            raise StoreUnavailableError(f"{self.describe(name)}: the store gave no etag")
        return etag

    def _info(self, name: str, meta: ObjectMeta) -> BlobInfo:
        return BlobInfo(
            name, meta["size"], meta["last_modified"].timestamp(), self._etag(meta["e_tag"], name)
        )

    def get(self, name: str) -> Blob:
        import obstore

        key = self._key(name)
        with self._errors(name, "read"):
            try:
                result = obstore.get(self._store, key)
            except FileNotFoundError:
                raise BlobNotFoundError(name) from None
            info = self._info(name, result.meta)
            if info.size > MAX_BLOB_BYTES:
                # Refused on the size the answer's headers give, before reading the body.
                raise UnsafeBlobError(
                    errno.EFBIG, f"larger than {MAX_BLOB_BYTES >> 20} MiB", self.describe(name)
                )
            data = bytes(result.bytes())
        if len(data) != info.size:
            raise StoreUnavailableError(
                f"could not read {self.describe(name)}: {len(data)} bytes of {info.size}"
            )
        return Blob(data, info)

    def head(self, name: str) -> BlobInfo | None:
        import obstore

        key = self._key(name)
        with self._errors(name, "look up"):
            try:
                meta = obstore.head(self._store, key)
            except FileNotFoundError:
                return None
            return self._info(name, meta)

    def put(
        self,
        name: str,
        data: bytes,
        *,
        create_only: bool = False,
        if_match: str | None = None,
        durable: bool = True,
    ) -> str:
        """``durable`` is ignored: an object store's every acknowledged write is durable."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        key = self._key(name)
        mode: PutMode
        if if_match is not None:
            if create_only:  # exists and does not: never both
                raise PreconditionFailedError(f"{self.describe(name)}: create_only and if_match")
            mode = {"e_tag": f'"{if_match}"'}
        else:
            mode = "create" if create_only else "overwrite"
        with self._errors(name, "write"):
            try:
                result = obstore.put(self._store, key, bytes(data), mode=mode, use_multipart=False)
            except AlreadyExistsError:
                raise PreconditionFailedError(f"{self.describe(name)} exists") from None
            except PreconditionError:
                raise PreconditionFailedError(f"{self.describe(name)} has changed") from None
        return self._etag(result["e_tag"], name)

    def list(self, prefix: str = "") -> builtins.list[BlobInfo]:
        import obstore

        directory = prefix.rpartition("/")[0]
        if directory:
            try:
                validate_blob_name(directory)
            except InvalidIdentifierError:
                return []  # no blob name starts with it
        listed = "/".join(part for part in (self._prefix, directory) if part)
        strip = len(self._prefix) + 1 if self._prefix else 0
        found: builtins.list[BlobInfo] = []
        with self._errors(prefix, "list"):
            for chunk in obstore.list(self._store, listed or None):
                for meta in chunk:
                    name = meta["path"][strip:]
                    if not name.startswith(prefix):
                        continue
                    try:
                        validate_blob_name(name)
                    except InvalidIdentifierError:
                        continue  # not a blob this store wrote
                    found.append(self._info(name, meta))
        found.sort(key=lambda b: b.name)
        return found

    def delete(self, name: str) -> bool:
        import obstore

        key = self._key(name)
        with self._errors(name, "delete"):
            try:
                # S3's DELETE succeeds whether or not the key was there: ask first.
                obstore.head(self._store, key)
                obstore.delete(self._store, key)
            except FileNotFoundError:
                return False
        return True


def _bucket_and_prefix(location: str, pattern: re.Pattern[str], what: str) -> tuple[str, str]:
    parts = urlsplit(location)
    shown = redacted(location)
    if "@" in parts.netloc or ":" in parts.netloc:
        raise ConfigError(f"invalid store location {shown}: credentials or a port in the URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"invalid store location {shown}: a query or fragment in the URL")
    if not pattern.fullmatch(parts.netloc):
        raise ConfigError(f"invalid store location {shown}: {parts.netloc!r} is not a {what} name")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            validate_blob_name(prefix)
        except InvalidIdentifierError:
            raise ConfigError(
                f"invalid store location {shown}: the prefix {prefix!r} is not a blob name"
            ) from None
    return parts.netloc, prefix


def _require_obstore(location: str) -> None:
    try:
        import obstore  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"store location {redacted(location)} needs obstore: {_INSTALL_HINT}"
        ) from None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _picked(values: Mapping[str, str], **names: str) -> dict[str, str]:
    """``{setting: values[name]}`` for each ``setting=name`` whose value is set (not empty)."""
    return {setting: values[name] for setting, name in names.items() if values.get(name)}


def _open_s3(location: str, env: Mapping[str, str]) -> ObjectBlobStore:
    bucket, prefix = _bucket_and_prefix(location, _S3_BUCKET_RE, "bucket")
    _require_obstore(location)
    from obstore.store import S3Store

    config = cast(
        "S3Config",
        {
            "conditional_put": "etag",
            **_picked(
                env,
                access_key_id="AWS_ACCESS_KEY_ID",
                secret_access_key="AWS_SECRET_ACCESS_KEY",
                session_token="AWS_SESSION_TOKEN",
            ),
        },
    )
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        config["region"] = region
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        config["endpoint"] = endpoint.rstrip("/")
    try:
        store = S3Store(
            bucket,
            config=config,
            client_options=_client_options(bool(endpoint and endpoint.startswith("http://"))),
            retry_config=_retry_config(),
        )
    except Exception as exc:  # obstore checks its configuration here
        raise ConfigError(f"cannot open {redacted(location)}: {_one_line(exc)}") from None
    return ObjectBlobStore(store, url=f"s3://{bucket}", prefix=prefix)


def _account_of(endpoint: str) -> str | None:
    """The account a blob endpoint names: ``https://<account>.blob.<suffix>``, or the first
    path segment of a path-style one (``http://127.0.0.1:10000/<account>``)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if ".blob." in host:
        return host.split(".", 1)[0]
    return parts.path.strip("/").split("/", 1)[0] or None


def parse_connection_string(value: str) -> AzureConfig:
    """An Azure storage connection string (``Key=value;...``) as obstore's Azure settings
    (account name and key, endpoint, SAS token, emulator)."""
    fields: dict[str, str] = {}
    for part in value.split(";"):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            # The message never repeats the string: it holds the account key.
            raise ConfigError("AZURE_STORAGE_CONNECTION_STRING is not of the form Key=value;...")
        fields[key.strip().lower()] = val.strip()
    config = cast(
        "AzureConfig",
        _picked(
            fields,
            account_name="accountname",
            account_key="accountkey",
            sas_key="sharedaccesssignature",
        ),
    )
    if _truthy(fields.get("usedevelopmentstorage")):
        config["use_emulator"] = True
    if fields.get("blobendpoint"):
        config["endpoint"] = fields["blobendpoint"].rstrip("/")
        if "account_name" not in config and (account := _account_of(config["endpoint"])):
            config["account_name"] = account  # a SAS string need not name the account
    elif "account_name" in config and "use_emulator" not in config:
        protocol = fields.get("defaultendpointsprotocol") or "https"
        suffix = fields.get("endpointsuffix") or "core.windows.net"
        config["endpoint"] = f"{protocol}://{config['account_name']}.blob.{suffix}"
    if "use_emulator" not in config and "account_name" not in config:
        raise ConfigError("AZURE_STORAGE_CONNECTION_STRING names no AccountName")
    return config


def _open_azure(location: str, env: Mapping[str, str]) -> ObjectBlobStore:
    container, prefix = _bucket_and_prefix(location, _AZURE_CONTAINER_RE, "container")
    if "--" in container:
        raise ConfigError(f"invalid store location {redacted(location)}: '--' in the container")
    _require_obstore(location)
    from obstore.store import AzureStore

    config: AzureConfig
    if env.get("AZURE_STORAGE_CONNECTION_STRING"):
        config = parse_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"])
    else:
        config = cast(
            "AzureConfig",
            _picked(
                env,
                account_name="AZURE_STORAGE_ACCOUNT_NAME",
                account_key="AZURE_STORAGE_ACCOUNT_KEY",
            ),
        )
        if _truthy(env.get("AZURE_STORAGE_USE_EMULATOR")):
            config["use_emulator"] = True
    # The emulator speaks plain HTTP, as may an endpoint given as http://.
    plain_http = config.get("endpoint", "").startswith("http://") or "use_emulator" in config
    try:
        store = AzureStore(
            container,
            config=config,
            client_options=_client_options(plain_http),
            retry_config=_retry_config(),
        )
    except Exception as exc:  # obstore checks its configuration here
        raise ConfigError(f"cannot open {redacted(location)}: {_one_line(exc)}") from None
    return ObjectBlobStore(store, url=f"az://{container}", prefix=prefix)


def _open_file(location: str, durable: bool) -> LocalBlobStore:
    parts = urlsplit(location)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise ConfigError(f"invalid store location {redacted(location)}: use file:///absolute/path")
    path = unquote(parts.path)
    if not path.startswith("/") or "\x00" in path:
        raise ConfigError(f"invalid store location {redacted(location)}: use file:///absolute/path")
    return LocalBlobStore(Path(path), durable=durable)


def open_store(
    location: str | Path, *, durable: bool = True, env: Mapping[str, str] | None = None
) -> BlobStore:
    """The blob store at ``location``:

    - a path or ``file:///path``: :class:`~prowzi.storage.local.LocalBlobStore` (``durable``
      as there: False skips the fsyncs);
    - ``s3://bucket/prefix``: S3, with credentials, region and endpoint from the standard
      variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
      ``AWS_REGION`` or ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3`` or
      ``AWS_ENDPOINT_URL``; an ``http://`` endpoint is allowed plain HTTP), else what obstore
      finds itself (instance and container credentials);
    - ``az://container/prefix``: Azure Blob, from ``AZURE_STORAGE_CONNECTION_STRING``, else
      ``AZURE_STORAGE_ACCOUNT_NAME`` and ``AZURE_STORAGE_ACCOUNT_KEY``, or
      ``AZURE_STORAGE_USE_EMULATOR`` (Azurite on ``AZURITE_BLOB_STORAGE_URL``, by default
      ``http://127.0.0.1:10000``);
    - ``memory://``: a new, empty :class:`~prowzi.storage.blob.InMemoryBlobStore`.

    ``env`` replaces ``os.environ`` for the variables. An unknown scheme, a malformed URL or
    an unusable setting is :class:`~prowzi.errors.ConfigError` (one line, no credentials).
    Opening does no I/O: an unreachable store fails on its first call.
    """
    if isinstance(location, Path):
        return LocalBlobStore(location, durable=durable)
    if not isinstance(location, str) or not location.strip():
        raise ConfigError("a store location must be a path or a URL, not empty")
    if "\n" in location or "\x00" in location:
        raise ConfigError("invalid store location: a control character in it")
    scheme, sep, _rest = location.partition("://")
    if not sep:
        return LocalBlobStore(Path(location), durable=durable)
    scheme = scheme.lower()
    environ = os.environ if env is None else env
    if scheme == "file":
        return _open_file(location, durable)
    if scheme == "memory":
        return InMemoryBlobStore(url="memory://")
    if scheme == "s3":
        return _open_s3(location, environ)
    if scheme == "az":
        return _open_azure(location, environ)
    raise ConfigError(
        f"unknown store location scheme {scheme!r}: use a path, file://, s3://, az:// or memory://"
    )
