"""Service soak (issue 15): memory, file descriptors and threads over many runs.

Starts a real ``prowzi serve`` on loopback with seven no-op stages (``prowzi.testing:noop``)
and checkpoints on, submits runs over HTTP a batch at a time, waits for each batch to finish,
and samples the process's resident memory, open file descriptors and threads from ``/proc``
after every batch. Target: the last 500 runs add under 5 MB of resident memory; descriptors
and threads flat.

Run: python benchmarks/bench_service_soak.py [--runs 2000] [--batch 100] [--retention 0]
(``--retention`` sets ``PROWZI_RETENTION`` for the service, e.g. ``1s``; by default the
service keeps everything, as it does out of the box.)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from prowzi.testing import noop_setting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample(pid: int) -> tuple[float, int, int]:
    """(resident MB, open descriptors, threads) of ``pid``, read from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    rss_mb = int(fields["VmRSS"].split()[0]) / 1024
    threads = int(fields["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss_mb, fds, threads


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit("the service did not start:\n" + log.read_text())
        time.sleep(0.05)


def run_batch(client: httpx.Client, size: int) -> None:
    ids = []
    for _ in range(size):
        response = client.post("/runs", json={"prompt": "Soak the service"})
        response.raise_for_status()
        ids.append(response.json()["session_id"])
    for session_id in ids:
        while True:
            state = client.get(f"/runs/{session_id}").json()["state"]
            if state == "completed":
                break
            if state in ("failed", "cancelled", "interrupted"):
                raise SystemExit(f"run {session_id} ended {state}")
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--retention", default="")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="prowzi-soak-") as tmp:
        cwd = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = cwd / "serve.log"
        env = {
            **os.environ,
            "PROWZI_AGENTS": noop_setting(),
            "PROWZI_CHECKPOINT_DIR": str(cwd / "checkpoints"),
            "PROWZI_TELEMETRY_DIR": str(cwd / "telemetry"),
            "XDG_CACHE_HOME": str(cwd / "cache"),
        }
        if args.retention:
            env["PROWZI_RETENTION"] = args.retention
        command = [sys.executable, "-c", "from prowzi.cli.main import main; main()", "serve"]
        command += ["--port", str(port), "--state-dir", str(cwd / "state")]
        command += ["--max-concurrent", "4", "--log-level", "warning"]
        with log.open("wb") as out:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=out)
        try:
            wait_ready(url, process, log)
            rows: list[tuple[int, float, int, int]] = [(0, *sample(process.pid))]
            print(f"{'runs':>6} {'rss MB':>9} {'fds':>5} {'threads':>8}  {'s/batch':>8}")
            print(f"{0:>6} {rows[0][1]:>9.1f} {rows[0][2]:>5} {rows[0][3]:>8}")
            with httpx.Client(base_url=url, timeout=30) as client:
                done = 0
                while done < args.runs:
                    started = time.perf_counter()
                    size = min(args.batch, args.runs - done)
                    run_batch(client, size)
                    done += size
                    rows.append((done, *sample(process.pid)))
                    _, rss, fds, threads = rows[-1]
                    took = time.perf_counter() - started
                    print(f"{done:>6} {rss:>9.1f} {fds:>5} {threads:>8}  {took:>8.2f}")
        finally:
            process.terminate()
            process.wait(30)

    tail = [r for r in rows if r[0] >= args.runs - 500]
    growth = tail[-1][1] - tail[0][1]
    fds = [r[2] for r in rows[1:]]
    threads = [r[3] for r in rows[1:]]
    print(
        f"last 500 runs: rss {tail[0][1]:.1f} -> {tail[-1][1]:.1f} MB ({growth:+.1f} MB; "
        f"target < 5 MB); fds {min(fds)}..{max(fds)}; threads {min(threads)}..{max(threads)}"
    )


if __name__ == "__main__":
    main()
