"""Prowzi: a durable, observable orchestrator for a staged AI-research workflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("prowzi")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
