"""A full sample run's checkpoints: at most a quarter of the bytes that full uncompressed
snapshots of the same states take, and every checkpoint loads to the same state either way."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from shared import PROMPT

from prowzi.config import ProwziConfig
from prowzi.workflows import ProwziOrchestrator
from prowzi.workflows.checkpoint import CheckpointManager, CheckpointMetadata


class _AlsoFull(CheckpointManager):
    """Saves each state as it is saved (incremental, zstd), and as a full, uncompressed
    snapshot in a second store: the two sets hold the very same states."""

    def __init__(self, directory: Path, full: CheckpointManager) -> None:
        super().__init__(directory)
        self.full = full

    def save(self, **kwargs: Any) -> CheckpointMetadata:
        self.full.save(**{**kwargs, "previous_hash": None})
        return super().save(**kwargs)


def test_a_sample_run_stores_at_most_a_quarter_of_full_snapshots(tmp_path: Path) -> None:
    full = CheckpointManager(tmp_path / "full", compression="none", full_every=1)
    incremental = _AlsoFull(tmp_path / "incremental", full)
    config = ProwziConfig(enable_checkpointing=True, enable_telemetry=False)
    orchestrator = ProwziOrchestrator(config=config, checkpoint_manager=incremental)
    asyncio.run(orchestrator.run_research(PROMPT, session_id="sample"))

    stored = sum(p.stat().st_size for p in (tmp_path / "incremental").glob("*.pkl"))
    snapshots = sum(p.stat().st_size for p in (tmp_path / "full").glob("*.pkl"))
    print(f"seven checkpoints: {stored} bytes, against {snapshots} as full snapshots")
    assert len(list((tmp_path / "incremental").glob("*.pkl"))) == 7
    assert stored * 4 <= snapshots
    rows = CheckpointManager(tmp_path / "incremental").list_checkpoints(session_id="sample")
    assert any(row["refs"] for row in rows) and rows[0]["compression"] == "zstd"
    for row in rows:
        mine = CheckpointManager(tmp_path / "incremental").load_checkpoint(row["checkpoint_id"])
        theirs = full.load_checkpoint(row["checkpoint_id"])
        assert not theirs.metadata.refs
        assert mine.to_state() == theirs.to_state(), row["checkpoint_id"]
