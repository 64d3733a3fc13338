"""This machine's and this process's identity, as records that outlive a process keep it."""

from __future__ import annotations

import contextlib
import os
import socket


def boot_id() -> str | None:
    """The kernel's id of this boot (Linux), or None where there is none to read."""
    with (
        contextlib.suppress(OSError),
        open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle,
    ):
        return handle.read().strip()
    return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), or None when there is
    no such process (or no ``/proc``): with :func:`boot_id`, it tells a live process from a
    later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rpartition(")")[2].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def process_alive(host: str | None, boot: str | None, pid: int, started: str | None) -> bool:
    """Whether a process recorded as (host, boot, pid, started) may still be running: True
    unless it was recorded on this very boot of this machine and is gone (or its pid now
    belongs to a later process). Another machine's process cannot be judged from here."""
    if host != socket.gethostname() or boot is None or boot != boot_id():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return started is None or process_start(pid) in (None, started)
