"""Whether a session's writer is alive: the one rule, from the session's lease.

A run or resume that checkpoints holds its session's lease (:mod:`prowzi.storage.lease`) for
as long as it runs; the lease is live while its holder renews it and, on this machine, while
its process exists. The telemetry collector asks this module (through the probe it is given)
before calling a session whose log stops short "interrupted", so the CLI's ``sessions`` and
``show``, the monitor and the service agree on which sessions are running.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

__all__ = ["lease_probe"]

log = logging.getLogger("prowzi.liveness")


def lease_probe(location: Path | str) -> Callable[[str], bool]:
    """``session_id -> whether a live writer holds its lease`` in the checkpoint store at
    ``location`` (a directory or a store URL). The store is opened on the first question,
    creates nothing, and a store that cannot be opened or read answers "not held"."""
    probe: list[Callable[[str], bool]] = []

    def held(session_id: str) -> bool:
        if not probe:
            try:
                from prowzi.storage.lease import SessionLeases
                from prowzi.storage.remote import open_store

                leases = SessionLeases(open_store(location))
                probe.append(lambda sid: leases.holder(sid) is not None)
            except Exception as exc:  # an unusable setting: telemetry readers never fail on it
                log.debug("no lease probe for %s: %s", location, exc)
                probe.append(lambda _sid: False)
        try:
            return probe[0](session_id)
        except Exception as exc:
            log.debug("could not probe the lease of %s: %s", session_id, exc)
            return False

    return held
