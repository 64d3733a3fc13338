"""Checkpoint storage benchmark (issue 13): save and load on local files beside the plain
protocol's floor and LangGraph's SqliteSaver, save and load on S3 (moto) and Azure Blob
(Azurite), the bytes a sample run's checkpoints take, and listing.

Run: ``python benchmarks/bench_checkpoint.py [--rounds N] [--remote-rounds N] [--no-remote]
[--sessions N] [--dir PATH] [--profile]`` (needs ``pip install -e ".[bench]"``; the remote
part needs moto's server and ``azurite-blob``)

The state is real: a sample run of the seven offline agents (``ProwziOrchestrator`` with
checkpointing on, the sample corpus) is made first, through a manager that also writes every
checkpoint of the run, from the very same states, to a second store with
``compression="none", full_every=1`` (full, uncompressed snapshots: the closest to the old
design). That gives:

1. **Bytes on disk**: the seven ``.pkl`` files (and the ``.json`` sidecars, separately) with
   the defaults (zstd, ``full_every=4``: two full snapshots, five incremental checkpoints)
   and with full uncompressed snapshots, and their ratio (target: at most a quarter). Each of
   the seven checkpoints is loaded from both stores and must give the state the run saved.
2. **Local save and load** (fsync on), for the run's final state (~110 KiB of JSON). Each
   save starts a new session, so it is a full snapshot, zstd (the largest write a run makes);
   it names its predecessor's hash, as a resume's first save does, so no earlier header is
   looked up. In the same alternation (order rotated each round, so host noise weighs on all
   alike):

   - the plain protocol's floor: the SAME bytes a save writes for its ``.pkl`` (captured from
     a save), to a temporary file, write, fdatasync, rename, directory fsync; no Prowzi code.
     A save does that plus the encoding, zstd, sha256, header, and its ``.json`` sidecar
     (written without fsync). Target: save median within 1.3x of the floor's;
   - LangGraph's ``SqliteSaver.put`` of the same state (as plain dicts in ``channel_values``,
     what its serializer handles natively; WAL, ``synchronous=FULL``).

   Loads: the run's last checkpoint as the defaults store it (incremental: it and the two
   checkpoints holding its fields, verified, plus the sidecar check), the same final state
   as a full snapshot (``full_every=1``), and ``SqliteSaver.get_tuple``.
   A save holding the session's lease (what the orchestrator does: one more read, the
   fencing check), and saves with zstd level 1 and without compression, are timed beside a
   plain save. For context, the same alternation times the
   floor followed by the save's sidecar (written as a save writes it) and a save to an
   in-memory store (a save's CPU alone), so the save's time can be taken apart.
3. **Remote save and load**: the same operations through
   ``CheckpointManager(store=open_store("s3://..."))`` on moto's S3 server and
   ``open_store("az://...")`` on Azurite, both started on 127.0.0.1 (latency only: these are
   emulators on loopback, not the services).
4. **Listing**: ``list_checkpoints`` over ``--sessions`` sessions through the catalog (issue
   3's target: 50 ms for 10,000 sessions).

The seven-stage run beside LangGraph's graph is ``bench_run_vs_langgraph.py``.

File creation costs vary between directories and machines, so run with ``--dir`` on the
filesystem you care about. The default is the current directory, where a user's
``./prowzi_checkpoints`` lives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stats import percentile, report

from prowzi.agents import models as m
from prowzi.agents.base import RunParameters
from prowzi.config import ProwziConfig
from prowzi.storage.blob import InMemoryBlobStore
from prowzi.testing import STAGES
from prowzi.tracing import NullTracer
from prowzi.workflows.checkpoint import CheckpointManager, CheckpointMetadata
from prowzi.workflows.orchestrator import ProwziOrchestrator

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Write a research paper on quantum computing"
OLD_DESIGN_BYTES = 333_000
"""What the old design (full, uncompressed snapshots) stored for a sample run's seven
checkpoints, as issue 13 reports it."""

Side = Callable[[int], float]
"""One operation of an alternation: given the round (negative in warm-up), it does its work
and returns the seconds of the part that is timed."""


def alternate(sides: dict[str, Side], rounds: int, warmup: int = 5) -> dict[str, list[float]]:
    """Run the sides in alternation, rotating their order each round, so that a noisy machine
    (other processes, fsync latency spikes) weighs on all of them alike."""
    names = list(sides)
    for k in range(warmup):
        for name in names:
            sides[name](-1 - k)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for k in range(len(names)):
            name = names[(i + k) % len(names)]
            samples[name].append(sides[name](i))
    return samples


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratio_line(
    label: str, top: Sequence[float], bottom: Sequence[float], target: str = ""
) -> float:
    """``label  median ratio  (p95 ratio)``; returns the ratio of the medians."""
    med = statistics.median(top) / statistics.median(bottom)
    p95 = percentile(top, 95) / percentile(bottom, 95)
    suffix = f"   (target: {target})" if target else ""
    print(f"  {label:<56} median {med:5.2f}   p95 {p95:5.2f}{suffix}")
    return med


# --- the sample run -----------------------------------------------------------------------


class TeeManager(CheckpointManager):
    """The run's manager (the defaults), which also saves every checkpoint of the run to
    ``mirror`` and keeps a copy of each state it was given."""

    def __init__(self, directory: Path, mirror: CheckpointManager) -> None:
        super().__init__(directory)
        self.mirror = mirror
        self.states: dict[str, m.WorkflowState] = {}

    def save(self, **kwargs: Any) -> CheckpointMetadata:
        meta = super().save(**kwargs)
        self.states[kwargs["stage"]] = kwargs["state"].model_copy(deep=True)
        self.mirror.save(**kwargs)
        return meta

    def session_lock(self, session_id: str, timeout: float = 0) -> Any:
        return self._both(session_id, timeout)

    @contextlib.contextmanager
    def _both(self, session_id: str, timeout: float) -> Iterator[None]:
        with (
            super().session_lock(session_id, timeout),
            self.mirror.session_lock(session_id, timeout),
        ):
            yield


class SampleRun:
    """One offline run, its checkpoints with the defaults (``defaults``) and as full
    uncompressed snapshots (``full``), and the states it saved."""

    session = "sample"

    def __init__(self, root: Path) -> None:
        self.defaults_dir = root / "run-defaults"
        self.full_dir = root / "run-full"
        full = CheckpointManager(self.full_dir, compression="none", full_every=1)
        tee = TeeManager(self.defaults_dir, full)
        config = ProwziConfig(
            enable_checkpointing=True,
            checkpoint_dir=self.defaults_dir,
            enable_telemetry=False,
            index_dir=root / "index",
        )
        orchestrator = ProwziOrchestrator(
            config=config, checkpoint_manager=tee, tracer=NullTracer()
        )
        asyncio.run(orchestrator.run_research(PROMPT, session_id=self.session))
        if list(tee.states) != list(STAGES):
            raise SystemExit(f"the sample run saved {list(tee.states)}, not the seven stages")
        self.states = tee.states
        self.defaults: CheckpointManager = tee
        self.full = full
        last = tee.load_checkpoint(f"{self.session}_turnitin").metadata
        self.parameters = RunParameters.model_validate(last.parameters)
        self.final = self.states["turnitin"]

    def checkpoints(self, stage: str) -> tuple[str, ...]:
        """The checkpoints a load of ``stage`` in the defaults store reads."""
        meta = self.defaults.load_checkpoint(f"{self.session}_{stage}").metadata
        return (meta.checkpoint_id, *sorted({r.checkpoint for r in meta.refs.values()}))


def save_run(
    manager: CheckpointManager,
    session: str,
    states: Mapping[str, m.WorkflowState],
    parameters: RunParameters,
) -> None:
    """The seven checkpoints of a run, as the orchestrator saves them (holding the lease)."""
    with manager.session_lock(session):
        for k, stage in enumerate(STAGES):
            manager.save(
                session_id=session,
                stage=stage,
                state=states[stage],
                completed_stages=STAGES[: k + 1],
                parameters=parameters,
            )


def bench_bytes(run: SampleRun) -> float:
    def total(directory: Path, suffix: str) -> int:
        return sum(p.stat().st_size for p in directory.glob(f"{run.session}_*{suffix}"))

    new_pkl, new_json = total(run.defaults_dir, ".pkl"), total(run.defaults_dir, ".json")
    old_pkl, old_json = total(run.full_dir, ".pkl"), total(run.full_dir, ".json")
    print("Bytes on disk, the sample run's seven checkpoints (same run, same states)")
    print(f"  {'':<44} {'.pkl':>10} {'.json':>10} {'both':>10}")
    print(
        f"  {'defaults (zstd, full_every=4)':<44} {new_pkl:>10,} {new_json:>10,} "
        f"{new_pkl + new_json:>10,}"
    )
    print(
        f"  {'compression=none, full_every=1':<44} {old_pkl:>10,} {old_json:>10,} "
        f"{old_pkl + old_json:>10,}"
    )
    ratio = new_pkl / old_pkl
    print(f"  .pkl ratio defaults / full uncompressed     {ratio:6.3f}   (target: <= 0.25)")
    print(
        f"  .pkl defaults / the old design's ~{OLD_DESIGN_BYTES // 1000} KB      "
        f"{new_pkl / OLD_DESIGN_BYTES:6.3f}"
    )
    print(
        f"  (with the sidecars: {(new_pkl + new_json) / (old_pkl + old_json):.3f} of full "
        "uncompressed; each store also holds one lease record)"
    )
    for stage in STAGES:
        want = run.states[stage]
        got = run.defaults.load_checkpoint(f"{run.session}_{stage}").to_state()
        reference = run.full.load_checkpoint(f"{run.session}_{stage}").to_state()
        if not got == reference == want:
            raise SystemExit(f"loading the {stage} checkpoint gave another state")
    reads = ", ".join(f"{s} {len(run.checkpoints(s))}" for s in STAGES)
    print("  each of the seven loads gives the state the run saved, with either setting")
    print(f"  (checkpoints a load reads with the defaults: {reads})")
    return ratio


# --- the sides ----------------------------------------------------------------------------


class SaveSide:
    """Saves of ``state``, each in a new session (so a full snapshot), optionally holding
    the session's lease (taken and released outside the timed part)."""

    def __init__(
        self,
        manager: CheckpointManager,
        run: SampleRun,
        *,
        lease: bool = False,
        tag: str = "b",
    ) -> None:
        self.manager = manager
        self.state = run.final
        self.parameters = run.parameters
        # The hash of the run's evaluation checkpoint: the save names its predecessor, as a
        # resume's first save does, and looks up no earlier header.
        previous = run.defaults.load_checkpoint(f"{run.session}_evaluation").metadata
        self.previous_hash = previous.payload_sha256
        self.lease = lease
        self.prefix = f"{tag}{uuid.uuid4().hex[:8]}-"
        self.last = ""

    def __call__(self, i: int) -> float:
        session = f"{self.prefix}{i + 100_000}"
        lock = self.manager.session_lock(session) if self.lease else contextlib.nullcontext()
        with lock:
            start = time.perf_counter()
            meta = self.manager.save(
                session_id=session,
                stage="turnitin",
                state=self.state,
                completed_stages=STAGES,
                parameters=self.parameters,
                previous_hash=self.previous_hash,
            )
            elapsed = time.perf_counter() - start
        self.last = meta.checkpoint_id
        return elapsed


class LoadSide:
    def __init__(self, manager: CheckpointManager, checkpoint_id: str, want: m.WorkflowState):
        self.manager = manager
        self.checkpoint_id = checkpoint_id
        if manager.load_checkpoint(checkpoint_id).to_state() != want:
            raise SystemExit(f"{checkpoint_id} in {manager.location} loads another state")

    def __call__(self, i: int) -> float:
        return timed(lambda: self.manager.load_checkpoint(self.checkpoint_id))


class ProtocolFloor:
    """The plain protocol for the same bytes, with no Prowzi code: a temporary file, write,
    fdatasync, rename to a new name, fsync of the directory. With ``sidecar``, the save's
    ``.json`` follows as a save writes it (a temporary file, write, rename; no fsync)."""

    def __init__(self, directory: Path, data: bytes, sidecar: bytes | None = None) -> None:
        directory.mkdir(mode=0o700, parents=True)
        self.dir = str(directory)
        self.data = data
        self.sidecar = sidecar

    def _write(self, name: str, data: bytes, durable: bool) -> None:
        tmp = f"{self.dir}/.tmp.{name}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fdatasync(fd)
        os.close(fd)
        os.rename(tmp, f"{self.dir}/{name}")
        if durable:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)

    def __call__(self, i: int) -> float:
        start = time.perf_counter()
        self._write(f"floor-{i + 100_000}.pkl", self.data, True)
        if self.sidecar is not None:
            self._write(f"floor-{i + 100_000}.json", self.sidecar, False)
        return time.perf_counter() - start


class LangGraphSide:
    """``SqliteSaver`` in its durable setup (WAL, synchronous=FULL), given the state as plain
    dicts in ``channel_values`` (what its serializer handles natively)."""

    def __init__(self, path: Path, state: m.WorkflowState) -> None:
        from langgraph.checkpoint.sqlite import SqliteSaver

        self.values = state.model_dump()
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.saver = SqliteSaver(self.conn)
        self.saver.setup()
        self.conn.execute("PRAGMA synchronous=FULL")
        self.config: Any = {"configurable": {"thread_id": "bench", "checkpoint_ns": ""}}
        self.versions = iter(range(10**9))

    def put(self, i: int) -> float:
        from langgraph.checkpoint.base import empty_checkpoint

        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = self.values
        checkpoint["channel_versions"] = {name: next(self.versions) for name in self.values}
        return timed(
            lambda: self.saver.put(self.config, checkpoint, {"source": "loop", "step": i}, {})
        )

    def get(self, i: int) -> float:
        return timed(lambda: self.saver.get_tuple(self.config))

    def check(self) -> None:
        stored = self.saver.get_tuple(self.config)
        if stored is None or stored.checkpoint["channel_values"] != self.values:
            raise SystemExit("LangGraph round trip changed the state")

    def describe(self) -> str:
        synchronous = self.conn.execute("PRAGMA synchronous").fetchone()[0]
        journal = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
        return f"journal_mode={journal}, synchronous={synchronous} (2 = FULL)"


# --- local ----------------------------------------------------------------------------------


def bench_local(root: Path, run: SampleRun, rounds: int, profile: bool) -> dict[str, float]:
    manager = CheckpointManager(root / "local")
    save = SaveSide(manager, run)
    save(-100)
    data = (root / "local" / f"{save.last}.pkl").read_bytes()
    sidecar = (root / "local" / f"{save.last}.json").read_bytes()
    floor = ProtocolFloor(root / "floor", data)
    floor_sidecar = ProtocolFloor(root / "floor-sidecar", data, sidecar)
    in_memory = SaveSide(CheckpointManager(store=InMemoryBlobStore()), run)
    langgraph = LangGraphSide(root / "langgraph.sqlite", run.final)
    saves = alternate(
        {
            "save": save,
            "floor": floor,
            "put": langgraph.put,
            "floor+sidecar": floor_sidecar,
            "cpu": in_memory,
        },
        rounds,
    )
    langgraph.check()
    if manager.load_checkpoint(save.last).to_state() != run.final:
        raise SystemExit("a local save did not load back as the state saved")

    save_run(manager, "run-defaults", run.states, run.parameters)
    full = CheckpointManager(root / "local-full", full_every=1)
    save_run(full, "run-full", run.states, run.parameters)
    loads = alternate(
        {
            "incremental": LoadSide(manager, "run-defaults_turnitin", run.final),
            "full": LoadSide(full, "run-full_turnitin", run.final),
            "get": langgraph.get,
        },
        rounds,
    )
    leased = alternate(
        {
            "save": SaveSide(manager, run, tag="p"),
            "lease": SaveSide(manager, run, lease=True),
            "zstd1": SaveSide(CheckpointManager(root / "local-zstd1", compression_level=1), run),
            "none": SaveSide(CheckpointManager(root / "local-none", compression="none"), run),
        },
        max(rounds // 2, 20),
    )

    body = len(run.final.model_dump_json())
    print(
        f"Local save and load, fsync on (the final state: {body / 1024:.1f} KiB of JSON; "
        f"its .pkl {len(data) / 1024:.1f} KiB, .json {len(sidecar) / 1024:.1f} KiB); "
        f"{rounds} rounds, alternated"
    )
    report("  save (full snapshot, zstd, + its .json sidecar)", saves["save"])
    report("  floor: tmp, write, fdatasync, rename, dir fsync", saves["floor"])
    report("  SqliteSaver.put (same state, plain dicts)", saves["put"])
    print("  for context, in the same alternation:")
    report("  floor, then the sidecar (tmp, write, rename)", saves["floor+sidecar"])
    report("  save to an in-memory store (its CPU alone)", saves["cpu"])
    report("  load, the run's last checkpoint (incremental)", loads["incremental"])
    report("  load, the final state as a full snapshot", loads["full"])
    report("  SqliteSaver.get_tuple", loads["get"])
    print(f"  other settings, {len(leased['save'])} rounds, alternated")
    report("  save", leased["save"])
    report("  save holding the lease (+ the fencing check)", leased["lease"])
    report("  save, zstd level 1", leased["zstd1"])
    report("  save, compression none (a ~5x larger .pkl)", leased["none"])
    print(f"  (LangGraph SqliteSaver: {langgraph.describe()})")
    langgraph.conn.close()
    print("Local ratios (below 1 is faster)")
    out = {
        "save/floor": ratio_line("save / floor", saves["save"], saves["floor"], "median <= 1.3"),
        "save/put": ratio_line("save / SqliteSaver.put", saves["save"], saves["put"]),
    }
    ratio_line("floor / SqliteSaver.put", saves["floor"], saves["put"])
    ratio_line("save / (floor, then the sidecar)", saves["save"], saves["floor+sidecar"])
    ratio_line("load (incremental) / SqliteSaver.get_tuple", loads["incremental"], loads["get"])
    ratio_line("load (full snapshot) / SqliteSaver.get_tuple", loads["full"], loads["get"])
    ratio_line("save holding the lease / save", leased["lease"], leased["save"])
    if profile:
        profile_saves(manager, run, rounds)
    return out


def profile_saves(manager: CheckpointManager, run: SampleRun, rounds: int) -> None:
    side = SaveSide(manager, run, tag="c")
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(rounds):
        side(i)
    profiler.disable()
    print(f"cProfile of {rounds} local saves (top 25 by own time)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def bench_list(root: Path, run: SampleRun, sessions: int) -> float:
    """``list_checkpoints`` over ``sessions`` sessions (one checkpoint each), through the
    catalog: the first listing reads every header; later ones read none."""
    directory = root / "listing"
    small = m.WorkflowState(intent=run.final.intent, plan=run.final.plan)
    writer = CheckpointManager(directory, fsync=False)  # setup speed only
    start = time.perf_counter()
    for k in range(sessions):
        writer.save(
            session_id=f"s{k:06d}",
            stage=STAGES[k % 7],
            state=small,
            completed_stages=STAGES[: k % 7 + 1],
            parameters=run.parameters,
        )
    setup = time.perf_counter() - start
    print(f"list_checkpoints over {sessions:,} sessions ({setup:.1f} s setup, fsync off)")
    first = CheckpointManager(directory)
    rows: list[dict[str, Any]] = []
    report(
        "  first listing (every header read)",
        [timed(lambda: rows.extend(first.list_checkpoints()))],
    )
    if len(rows) != sessions:
        raise SystemExit(f"listed {len(rows)} of {sessions}")
    warm = CheckpointManager(directory)
    warm.list_checkpoints()
    samples = [timed(warm.list_checkpoints) for _ in range(10)]
    median = report("  list_checkpoints (same manager)", samples, target="median <= 50 ms")
    report(
        "  list_checkpoints (new manager each time)",
        [timed(lambda: CheckpointManager(directory).list_checkpoints()) for _ in range(10)],
    )
    report(
        "  list_checkpoints(session_id=...)",
        [timed(lambda: warm.list_checkpoints(session_id="s000042")) for _ in range(10)],
    )
    return median


# --- remote ---------------------------------------------------------------------------------


def _servers() -> Any:
    """The emulator starters the tests use (tests/emulator_servers.py: no pytest needed)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import emulator_servers  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "tests"))
    return emulator_servers


def bench_remote(root: Path, run: SampleRun, rounds: int) -> None:
    from prowzi.storage.remote import open_store

    servers = _servers()
    if shutil.which("azurite-blob") is None:
        print("Remote: azurite-blob is not on PATH (npm install -g azurite): skipped")
        return
    for name in ("moto", "azurite"):
        (root / name).mkdir()
    with (
        servers.start_moto(root / "moto") as moto,
        servers.start_azurite(root / "azurite") as azurite,
    ):
        s3 = open_store(f"s3://{servers.new_bucket(moto)}/checkpoints", env=moto.env())
        azure = open_store(f"az://{servers.new_container(azurite)}/checkpoints", env=azurite.env())
        managers = {
            "S3 (moto)": CheckpointManager(store=s3),
            "Azure (Azurite)": CheckpointManager(store=azure),
        }
        sides: dict[str, Side] = {}
        for label, manager in managers.items():
            save_run(manager, "run-defaults", run.states, run.parameters)
            full = CheckpointManager(store=manager.store, full_every=1)
            save_run(full, "run-full", run.states, run.parameters)
            sides[f"{label}|save (full snapshot, zstd, + its .json sidecar)"] = SaveSide(
                manager, run
            )
            sides[f"{label}|save holding the lease (+ the fencing check)"] = SaveSide(
                manager, run, lease=True
            )
            sides[f"{label}|load, the run's last checkpoint (incremental)"] = LoadSide(
                manager, "run-defaults_turnitin", run.final
            )
            sides[f"{label}|load, the final state as a full snapshot"] = LoadSide(
                full, "run-full_turnitin", run.final
            )
        samples = alternate(sides, rounds, warmup=3)
        reads = len(run.checkpoints("turnitin"))
        print(
            f"Remote save and load on loopback emulators, {rounds} rounds, alternated "
            f"(an incremental load reads {reads} checkpoints and the sidecar)"
        )
        current = ""
        for key, values in samples.items():
            label, op = key.split("|")
            if label != current:
                print(f" {label}")
                current = label
            report(f"  {op}", values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300, help="local rounds (default 300)")
    parser.add_argument(
        "--remote-rounds", type=int, default=100, help="rounds on each emulator (default 100)"
    )
    parser.add_argument("--no-remote", action="store_true", help="skip moto and Azurite")
    parser.add_argument(
        "--sessions", type=int, default=10_000, help="sessions to list (default 10,000; 0 skips)"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the local saves")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path.cwd(),
        help="where the scratch directory goes (default: the current directory)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix=".bench-checkpoint-", dir=args.dir))
    # The catalogs (and anything else cached) go to the scratch directory, not ~/.cache.
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    try:
        started = time.perf_counter()
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; scratch {root}")
        run = SampleRun(root)
        bytes_ratio = bench_bytes(run)
        local = bench_local(root, run, args.rounds, args.profile)
        if not args.no_remote:
            bench_remote(root, run, args.remote_rounds)
        list_median = bench_list(root, run, args.sessions) if args.sessions else None
        print("Targets")
        targets = [
            ("local save within 1.3x of the floor (median)", local["save/floor"] <= 1.3),
            ("bytes at most a quarter of full snapshots", bytes_ratio <= 0.25),
        ]
        if list_median is not None:
            targets.append((f"listing {args.sessions:,} sessions <= 50 ms", list_median <= 50))
        for label, ok in targets:
            print(f"  {label:<48} {'met' if ok else 'MISSED'}")
        print(f"({time.perf_counter() - started:.1f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
