"""Validation of identifiers that end up in file names, URLs and metric labels.

Every id is checked *before* any path is built from it: no separators, no ``..``, no NUL,
bounded length. Session ids never contain ``_`` so ``<session>_<stage>`` splits unambiguously.
"""

from __future__ import annotations

import re
import secrets
import time

from prowzi.errors import InvalidIdentifierError

_SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,127}")
_STAGE_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


def validate_session_id(value: object) -> str:
    if not isinstance(value, str) or not _SESSION_RE.fullmatch(value) or ".." in value:
        raise InvalidIdentifierError(
            f"invalid session id {value!r}: use 1-128 letters, digits, '-' or '.', "
            "starting with a letter or digit"
        )
    return value


def validate_stage_name(value: object) -> str:
    if not isinstance(value, str) or not _STAGE_RE.fullmatch(value):
        raise InvalidIdentifierError(
            f"invalid stage name {value!r}: use 1-32 lowercase letters, digits or '-'"
        )
    return value


def split_checkpoint_id(value: object) -> tuple[str, str | None]:
    """``"<session>_<stage>"`` -> (session, stage); a bare session id -> (session, None)."""
    if not isinstance(value, str):
        raise InvalidIdentifierError(f"invalid checkpoint id {value!r}")
    session, sep, stage = value.rpartition("_")
    if not sep:
        return validate_session_id(value), None
    return validate_session_id(session), validate_stage_name(stage)


def new_session_id() -> str:
    """A unique, time-sortable session id such as ``20261126-143501-9f3a1c2b``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
