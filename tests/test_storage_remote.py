"""The S3 and Azure Blob backends beyond the conformance suite: open_store's locations and
settings, errors (one line, the URL, never a credential), fast failure when unreachable, the
size limit, key prefixes and objects the store did not write."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest
from emulator_servers import LOOPBACK, AzureEmulator, S3Emulator, free_port

from prowzi.errors import ConfigError, InvalidIdentifierError
from prowzi.storage import remote
from prowzi.storage.blob import (
    BlobNotFoundError,
    InMemoryBlobStore,
    StoreUnavailableError,
    UnsafeBlobError,
)
from prowzi.storage.local import LocalBlobStore
from prowzi.storage.remote import ObjectBlobStore, open_store, parse_connection_string

SECRET = "do-not-print-this-secret-0123456789"
# A valid base64 key that is not Azurite's: the signature fails, the request is refused.
WRONG_AZURE_KEY = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmcta2V5LXdyb25nLWtleQ=="

# -- open_store without I/O --------------------------------------------------------------------


def test_open_store_local_and_memory(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "a"))
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "a"
    store = open_store(tmp_path / "b", durable=False)
    assert isinstance(store, LocalBlobStore) and store.durable is False
    store = open_store(f"file://{tmp_path}/c%20d")
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "c d"
    store = open_store(f"file://localhost{tmp_path}/e")
    assert isinstance(store, LocalBlobStore) and store.root == tmp_path / "e"
    first, second = open_store("memory://"), open_store("memory://")
    assert isinstance(first, InMemoryBlobStore) and first is not second


def test_open_store_remote_urls() -> None:
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "eu-west-1"}
    store = open_store("s3://my-bucket/some/prefix/", env=env)
    assert isinstance(store, ObjectBlobStore)
    assert store.url == "s3://my-bucket/some/prefix"
    assert store.describe("a/b") == "s3://my-bucket/some/prefix/a/b"
    assert SECRET not in repr(store)
    assert open_store("s3://my-bucket", env=env).url == "s3://my-bucket"
    azure_env = {"AZURE_STORAGE_ACCOUNT_NAME": "acct", "AZURE_STORAGE_ACCOUNT_KEY": WRONG_AZURE_KEY}
    store = open_store("az://my-container/x", env=azure_env)
    assert isinstance(store, ObjectBlobStore) and store.url == "az://my-container/x"


@pytest.mark.parametrize(
    "location",
    [
        "",
        "ftp://host/x",
        "S4://bucket",
        "s3://",
        "s3://Bad_Bucket/x",
        "s3://ab",
        "s3://bucket/../x",
        "s3://bucket/a//b",
        "s3://bucket/.hidden",
        "s3://bucket/x?versionId=1",
        "s3://bucket:9000/x",
        f"s3://key:{SECRET}@bucket/x",
        "az://",
        "az://Container",
        "az://a--b",
        "az://container/a/../b",
        "file://otherhost/x",
        "file://",
        "memory\n://",
    ],
)
def test_open_store_refuses_malformed_locations(location: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store(location, env={})
    message = str(caught.value)
    assert "\n" not in message and message
    assert SECRET not in message


def test_parse_connection_string() -> None:
    assert parse_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5==;"
        "EndpointSuffix=core.chinacloudapi.cn"
    ) == {
        "account_name": "acct",
        "account_key": "a2V5==",
        "endpoint": "https://acct.blob.core.chinacloudapi.cn",
    }
    assert parse_connection_string(
        "accountname=acct;accountkey=a2V5;BlobEndpoint=http://127.0.0.1:10000/acct/"
    ) == {"account_name": "acct", "account_key": "a2V5", "endpoint": "http://127.0.0.1:10000/acct"}
    assert parse_connection_string("UseDevelopmentStorage=true") == {"use_emulator": True}
    assert parse_connection_string(
        "BlobEndpoint=https://acct.blob.core.windows.net;SharedAccessSignature=sv=2024&sig=abc"
    ) == {
        "account_name": "acct",
        "sas_key": "sv=2024&sig=abc",
        "endpoint": "https://acct.blob.core.windows.net",
    }
    with pytest.raises(ConfigError, match="AccountName"):
        parse_connection_string("BlobEndpoint=https://blobs.example.com;SharedAccessSignature=x")


@pytest.mark.parametrize("value", [f"AccountName=acct;{SECRET}", f"AccountKey={SECRET}"])
def test_a_bad_connection_string_is_refused_without_echoing_it(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        open_store("az://container", env={"AZURE_STORAGE_CONNECTION_STRING": value})
    assert "AZURE_STORAGE_CONNECTION_STRING" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_without_obstore_a_remote_location_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)  # import obstore -> ImportError
    for location in ("s3://bucket/x", "az://container/x"):
        with pytest.raises(ConfigError, match=r"pip install 'prowzi\[remote\]'"):
            open_store(location, env={})
    assert isinstance(open_store("memory://"), InMemoryBlobStore)


def test_importing_prowzi_does_not_import_obstore() -> None:
    code = (
        "import sys, prowzi, prowzi.storage.remote, prowzi.storage.conformance\n"
        "assert 'obstore' not in sys.modules, 'obstore imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- errors against an endpoint nobody listens on ----------------------------------------------


def _unreachable(kind: str) -> ObjectBlobStore:
    endpoint = f"http://{LOOPBACK}:{free_port()}"
    if kind == "s3":
        env = {
            "AWS_ACCESS_KEY_ID": "key-id",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": "us-east-1",
        }
        store = open_store("s3://bucket/prefix", env=env)
    else:
        env = {
            "AZURE_STORAGE_CONNECTION_STRING": (
                f"AccountName=acct;AccountKey={WRONG_AZURE_KEY};BlobEndpoint={endpoint}/acct"
            )
        }
        store = open_store("az://container/prefix", env=env)
    assert isinstance(store, ObjectBlobStore)
    return store


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_an_unreachable_store_fails_fast_with_one_line(kind: str) -> None:
    store = _unreachable(kind)
    started = time.monotonic()
    for call in (
        lambda: store.get("a/b"),
        lambda: store.head("a/b"),
        lambda: store.put("a/b", b"x"),
        lambda: store.put("a/b", b"x", create_only=True),
        lambda: store.list("a/"),
        lambda: store.delete("a/b"),
    ):
        with pytest.raises(StoreUnavailableError) as caught:
            call()
        message = str(caught.value)
        assert isinstance(caught.value, OSError)
        assert "\n" not in message
        assert store.url in message
        assert SECRET not in message and WRONG_AZURE_KEY not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert time.monotonic() - started < 20  # 6 calls, each 3 refused connections


@pytest.mark.parametrize("kind", ["s3", "azure"])
def test_names_are_checked_before_any_io(kind: str) -> None:
    store = _unreachable(kind)  # any I/O would raise StoreUnavailableError
    for bad in ("../x", "a//b", ".hidden", "", "a/../b", "a\x00b"):
        for call in (store.get, store.head, store.delete, lambda n: store.put(n, b"x")):
            with pytest.raises(InvalidIdentifierError):
                call(bad)
    assert store.list("../") == []  # no blob name starts with it: nothing to ask


# -- against the emulators ---------------------------------------------------------------------


@pytest.fixture(params=["s3", "azure"])
def store(request: pytest.FixtureRequest) -> ObjectBlobStore:
    fixture = {"s3": "s3_store", "azure": "azure_store"}[request.param]
    value = request.getfixturevalue(fixture)
    assert isinstance(value, ObjectBlobStore)
    return value


def _bucket(store: ObjectBlobStore) -> str:
    return store.url.split("://", 1)[1].split("/", 1)[0]


def _scheme(store: ObjectBlobStore) -> str:
    return store.url.split("://", 1)[0]


def test_a_blob_over_the_size_limit_is_refused_before_reading_it(
    store: ObjectBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "MAX_BLOB_BYTES", 16)
    store.put("small", b"x" * 16)
    store.put("large", b"x" * 17)
    assert store.get("small").data == b"x" * 16
    with pytest.raises(UnsafeBlobError) as caught:
        store.get("large")
    assert caught.value.errno == errno.EFBIG
    assert caught.value.filename == store.describe("large")
    info = store.head("large")
    assert info is not None and info.size == 17


def test_prefixes_keep_stores_apart(store: ObjectBlobStore) -> None:
    scheme, bucket = _scheme(store), _bucket(store)
    one = open_store(f"{scheme}://{bucket}/one")
    two = open_store(f"{scheme}://{bucket}/one-two")  # a string prefix of the other's keys
    root = open_store(f"{scheme}://{bucket}")
    one.put("blob", b"1")
    two.put("blob", b"2")
    assert [b.name for b in one.list()] == ["blob"]
    assert [b.name for b in two.list()] == ["blob"]
    assert one.get("blob").data == b"1" and two.get("blob").data == b"2"
    assert [b.name for b in root.list("one")] == ["one-two/blob", "one/blob"]
    assert root.get("one/blob").data == b"1"
    assert one.delete("blob") and two.head("blob") is not None


def test_objects_the_store_did_not_write_are_left_out(
    store: ObjectBlobStore, request: pytest.FixtureRequest
) -> None:
    store.put("dir/mine", b"mine")
    prefix = store.url.split("://", 1)[1].split("/", 1)[1]
    foreign = [f"{prefix}/dir/with space", f"{prefix}/dir/.hidden", f"{prefix}/dir/a..b"]
    if _scheme(store) == "s3":
        client = request.getfixturevalue("moto_s3").client()
        for key in foreign:
            client.put_object(Bucket=_bucket(store), Key=key, Body=b"foreign")
    else:
        from azure.storage.blob import BlobServiceClient

        emulator: AzureEmulator = request.getfixturevalue("azurite")
        service = BlobServiceClient.from_connection_string(emulator.connection_string)
        for key in foreign:
            service.get_blob_client(_bucket(store), key).upload_blob(b"foreign")
    assert [b.name for b in store.list()] == ["dir/mine"]
    assert [b.name for b in store.list("dir/")] == ["dir/mine"]


def test_durable_false_is_accepted_and_ignored(store: ObjectBlobStore) -> None:
    etag = store.put("blob", b"x", durable=False)
    assert store.get("blob").info.etag == etag


def test_a_missing_bucket_is_the_store_unavailable(store: ObjectBlobStore) -> None:
    missing = open_store(f"{_scheme(store)}://no-such-bucket-{free_port()}/p")
    with pytest.raises(StoreUnavailableError, match=r"no-such-bucket-\d+/p/blob"):
        missing.put("blob", b"x")
    with pytest.raises(StoreUnavailableError, match="no-such-bucket"):
        missing.list()
    # A read cannot tell a missing bucket from a missing blob (both are 404).
    with pytest.raises((BlobNotFoundError, StoreUnavailableError)):
        missing.get("blob")


def test_wrong_azure_credentials_are_refused_without_echoing_them(
    azure_store: ObjectBlobStore, azurite: AzureEmulator
) -> None:
    value = (
        f"AccountName={azurite.account};AccountKey={WRONG_AZURE_KEY};"
        f"BlobEndpoint={azurite.blob_endpoint}"
    )
    store = open_store(azure_store.url, env={"AZURE_STORAGE_CONNECTION_STRING": value})
    with pytest.raises(StoreUnavailableError) as caught:
        store.put("blob", b"x")
    assert "\n" not in str(caught.value) and WRONG_AZURE_KEY not in str(caught.value)
    assert azure_store.url in str(caught.value)


def test_azure_emulator_from_the_environment(
    azure_store: ObjectBlobStore, azurite: AzureEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AZURE_STORAGE_USE_EMULATOR, with Azurite's address in AZURITE_BLOB_STORAGE_URL (which
    obstore reads itself) and its well-known account."""
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", azurite.blob_endpoint.rsplit("/", 1)[0])
    azure_store.put("blob", b"via the connection string")
    store = open_store(azure_store.url)
    assert store.get("blob").data == b"via the connection string"


def test_s3_credentials_from_the_environment(
    s3_store: ObjectBlobStore, moto_s3: S3Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_DEFAULT_REGION stands in for AWS_REGION; AWS_ENDPOINT_URL_S3 wins over
    AWS_ENDPOINT_URL; a session token is passed on."""
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{LOOPBACK}:{free_port()}")  # nobody
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_s3.endpoint)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    store = open_store(s3_store.url)
    store.put("blob", b"x")
    assert s3_store.get("blob").data == b"x"
