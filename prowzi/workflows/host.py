"""This machine's identity, as the files that outlive a process record it."""

from __future__ import annotations

import contextlib


def boot_id() -> str | None:
    """The kernel's id of this boot (Linux), or None where there is none to read."""
    with (
        contextlib.suppress(OSError),
        open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle,
    ):
        return handle.read().strip()
    return None
