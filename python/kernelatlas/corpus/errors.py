"""The corpus layer's one exception, apart from the modules that raise it (store and rundir import it)."""

from __future__ import annotations

__all__ = ["CorpusError"]


class CorpusError(RuntimeError):
    """A corpus that cannot be opened or written; the message names the path and the fix."""
