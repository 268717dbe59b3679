"""Corpora for the training and clustering tests: planted kernels made from known patterns, written as a corpus.
Shared by tests/test_train_clusters.py and tests/test_training.py."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from kernelatlas.corpus import Corpus, CorpusWriter
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
from kernelatlas.templates import templates

# The 8 "master key" 7x7 depthwise filters: (c) 2026 Tony Lindeberg, CC BY 4.0
# (https://creativecommons.org/licenses/by/4.0/), from tonylindeberg/masterfiltmodel (model-fitting/8Filters.txt,
# commit e170f53); credit T. Lindeberg, Z. Babaiee, P. Kiasari, "Modelling and analysis of the 8 filters from the
# 'master key filters hypothesis' ...", JMIV 2026 (arXiv 2509.12746).  Read from the shared reference folder,
# never copied into this repository.
MASTER_KEY_FILTERS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "master_key_filters_7x7.txt"


def centred_unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1)
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def read_master_key_filters() -> np.ndarray:
    """[8, 7, 7] from the reference file ("Filter N:" then 7 rows of 7 numbers); skips the test when absent."""
    if not MASTER_KEY_FILTERS.is_file():
        pytest.skip(f"{MASTER_KEY_FILTERS} is absent (the shared reference data): the master-key checks need it")
    blocks = re.split(r"Filter\s+\d+\s*:", MASTER_KEY_FILTERS.read_text())[1:]
    filters = np.array([np.array(b.split(), dtype=np.float64).reshape(7, 7) for b in blocks])
    assert filters.shape == (8, 7, 7)
    return filters


def write_corpus(root: Path, kernels: np.ndarray, k: int, *, layer_rows: int = 1000,
                 regular: np.ndarray | None = None, dtype: str = "float32") -> Corpus:
    """A corpus of one model whose depthwise layers hold ``kernels`` in order (``layer_rows`` per layer), plus
    one regular layer of ``regular`` kernels when given (stored: the corpus stores what it is handed)."""
    layers = [
        ConvLayer(f"dw{i}", kernels[a:a + layer_rows].reshape(-1, 1, k, k), groups=len(kernels[a:a + layer_rows]),
                  kind="depthwise", kind_inferred=False, order=float(i))
        for i, a in enumerate(range(0, len(kernels), layer_rows))
    ]
    sizes = (k,)
    if regular is not None:
        layers.insert(1, ConvLayer("regular", regular.reshape(len(regular), 1, k, k), groups=1, kind="regular",
                                   kind_inferred=False, order=0.5))
    with CorpusWriter(root, dtype=dtype) as writer:
        writer.add_model(LoadedModel(f"/planted/{root.name}.pth", "torch", layers),
                         sha256=hashlib.sha256(kernels.tobytes()).hexdigest(), sizes=sizes, all_convs=True)
    return Corpus.open(root)


def planted_kernels(sources: np.ndarray, n_per: int, n_noise: int, noise_max: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Kernels a*f + b + e for every source f (centred, unit norm): gain a ~ U(0.05, 2) (> 0: signs kept),
    offset b ~ a*N(0, 1) (removed by the centring), noise e with norm about rho*a, rho ~ U(0, noise_max), so the
    cosine of a planted kernel with its source is about 1/sqrt(1 + rho^2) or more; plus ``n_noise`` pure-noise
    kernels (i.i.d. normal entries, random scale and offset).  Returns float32 kernels [n, k*k] in random order
    and their source index (-1 for noise)."""
    rng = np.random.default_rng(seed)
    src = centred_unit(sources)
    d = src.shape[1]
    kernels, labels = [], []
    for i, f in enumerate(src):
        a = rng.uniform(0.05, 2.0, (n_per, 1))
        b = rng.normal(0.0, 1.0, (n_per, 1)) * a
        rho = rng.uniform(0.0, noise_max, (n_per, 1))
        kernels.append(a * f + b + rng.standard_normal((n_per, d)) * rho * a / np.sqrt(d))
        labels.append(np.full(n_per, i))
    scale = rng.uniform(0.05, 2.0, (n_noise, 1))
    kernels.append(rng.standard_normal((n_noise, d)) * scale + rng.normal(0.0, 1.0, (n_noise, 1)) * scale)
    labels.append(np.full(n_noise, -1))
    order = rng.permutation(n_per * len(src) + n_noise)
    return np.concatenate(kernels).astype(np.float32)[order], np.concatenate(labels)[order]


def make_small_corpus(root: Path) -> tuple[Corpus, np.ndarray, np.ndarray]:
    """3x3: 3,000 planted kernels from four templates, plus 200 dead, 50 NaN, 50 flat kernels and a regular
    layer of 500 kernels of all 7s (which depthwise sampling must never return)."""
    bank = templates(3)
    kernels, labels = planted_kernels(np.array([bank[n] for n in ("dog_on", "dx+", "dy-", "dxy+")]), 700, 200,
                                      0.3, seed=5)
    rng = np.random.default_rng(6)
    dead = rng.uniform(-0.9e-4, 0.9e-4, (200, 9)).astype(np.float32)
    nan = rng.standard_normal((50, 9)).astype(np.float32)
    nan[:, 4] = np.nan
    flat = np.repeat(rng.uniform(0.5, 1.0, (50, 1)), 9, axis=1).astype(np.float32)
    kernels = np.concatenate([kernels, dead, nan, flat])
    regular = np.full((500, 9), 7.0, dtype=np.float32)
    return write_corpus(root, kernels, 3, layer_rows=600, regular=regular), kernels, labels
