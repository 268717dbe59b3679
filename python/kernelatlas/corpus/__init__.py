"""The corpus: kernels of many models on disk, and everything that reads checkpoints into it.

* ``store``: the on-disk format (manifest, .npy shards, Parquet tables): :class:`Corpus` (reader) and
  :class:`CorpusWriter` (the one writer, append-only, crash-safe).
* ``rundir``: the run-directory model shared by every job that writes under ``CORPUS/runs/``.
* ``loaders``: one module per checkpoint format, all read without running code.
"""

from __future__ import annotations

from kernelatlas.corpus.store import LAYER_COLUMNS, MODEL_COLUMNS, Chunk, Corpus, CorpusError, CorpusWriter

__all__ = ["LAYER_COLUMNS", "MODEL_COLUMNS", "Chunk", "Corpus", "CorpusError", "CorpusWriter"]
