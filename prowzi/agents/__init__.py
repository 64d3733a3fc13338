"""Stage agents and their result models."""
