"""Prowzi: a durable, observable orchestrator for a staged AI-research workflow."""

__version__ = "0.1.0"

__all__ = ["__version__"]
