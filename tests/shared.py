"""Constants the tests share: the stages (Prowzi's own table, via prowzi.testing) and the
design document's prompt. This module holds no tests."""

from __future__ import annotations

from prowzi.testing import STAGES

PROMPT = "Write a research paper on quantum computing"

__all__ = ["PROMPT", "STAGES"]
