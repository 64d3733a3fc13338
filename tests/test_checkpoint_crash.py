"""A writer killed with SIGKILL at random instants, many of them inside checkpoint writes:
every checkpoint file left behind loads and verifies, and every session's chain is intact."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from test_checkpoint_support import in_flight_writes

from prowzi.workflows.checkpoint import CheckpointManager

KILLS = 25

WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint_support import STAGES, params, state_after
    from prowzi.workflows.checkpoint import CheckpointManager

    manager = CheckpointManager({directory!r})
    states = {{stage: state_after(stage) for stage in STAGES}}
    print("ready", flush=True)
    run = 0
    while True:
        run += 1
        for i, stage in enumerate(STAGES):
            manager.save(
                session_id=f"{{sys.argv[1]}}-{{run}}",
                stage=stage,
                state=states[stage],
                completed_stages=list(STAGES[: i + 1]),
                parameters=params(),
            )
    """
)


def test_checkpoints_survive_sigkill_at_random_instants(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    script = WRITER.format(tests=str(Path(__file__).parent), directory=str(directory))
    rng = random.Random(20261126)
    interrupted_writes = 0
    for kill in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", script, f"k{kill}"], stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)

        manager = CheckpointManager(directory)
        if in_flight_writes(directory):
            interrupted_writes += 1  # killed inside a write: ignored, then cleaned up
        rows = manager.list_checkpoints()
        assert not [p for p in in_flight_writes(directory) if p.parent.name == ".spare"]
        on_disk = {p.stem for p in directory.glob("*.pkl")}
        assert {r["checkpoint_id"] for r in rows} == on_disk
        for checkpoint_id in sorted(on_disk):
            manager.load_checkpoint(checkpoint_id)
        for session in {r["session_id"] for r in rows}:
            manager.verify_chain(session)
    assert len(on_disk) > KILLS  # the writer got somewhere between kills
    assert interrupted_writes > 0
    manager.store.sweep_temporaries(max_age=0)
    assert not in_flight_writes(directory)
