"""The synthetic corpus and model of ``kernelatlas bench``.

The corpus is synthetic: kernels that look like trained kernels (a random mixture of a few smooth patterns --
blob, difference of Gaussians, first and second derivatives, ring -- with one dominant, plus an offset and
noise, at a log-normal scale) with about 1% all-zero rows.  The model is a random-init
(``torch.manual_seed``) autoencoder d -> 64 -> 32 -> 1 -> 32 -> 64 -> d (ReLU, sigmoid code); its code
intervals and the thresholds are placed at quantiles of a sample so that every label occurs and about half of
the kernels pass the threshold (random-init codes crowd into a narrow band, so evenly spaced intervals would
give one label).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import kernelatlas
from kernelatlas.autoencoder import Autoencoder
from kernelatlas.bench.harness import log

HIDDEN = (64, 32)
N_INTERVALS = 5


def synthetic_patterns(k: int) -> np.ndarray:
    """Eight smooth k x k patterns, float32 [8, k*k]: blob, DoG, d/dx, d/dy, d2/dx2, d2/dy2, d2/dxdy, ring."""
    c = np.linspace(-1.0, 1.0, k)
    u, v = np.meshgrid(c, c, indexing="xy")  # u varies along a row (x), v down the rows (y)
    r2 = u * u + v * v

    def gauss(sigma: float) -> np.ndarray:
        return np.exp(-r2 / (2 * sigma * sigma))

    s = 0.6
    g = gauss(s)
    patterns = [
        g,
        gauss(0.45) - 0.6 * gauss(1.0),
        -u * g,
        -v * g,
        (u * u / (s * s) - 1) * g,
        (v * v / (s * s) - 1) * g,
        u * v * g,
        np.exp(-((np.sqrt(r2) - 0.75) ** 2) / 0.08),
    ]
    return np.stack([p.ravel() for p in patterns]).astype(np.float32)


def synth_kernels(rng: np.random.Generator, rows: int, k: int, patterns: np.ndarray) -> np.ndarray:
    """``rows`` synthetic kernels float32 [rows, k*k]; about 1% are all-zero (dead) rows."""
    n_pat, d = patterns.shape
    coeffs = rng.standard_normal((rows, n_pat), dtype=np.float32) * np.float32(0.3)
    dominant = rng.integers(0, n_pat, rows)
    coeffs[np.arange(rows), dominant] += rng.choice(np.array([-1.0, 1.0], np.float32), rows) * (
        np.float32(1.0) + np.abs(rng.standard_normal(rows, dtype=np.float32))
    )
    kernels = coeffs @ patterns
    kernels += rng.standard_normal((rows, d), dtype=np.float32) * np.float32(0.15)
    kernels += rng.standard_normal((rows, 1), dtype=np.float32) * np.float32(0.3)
    kernels *= np.exp(rng.normal(-2.5, 0.6, (rows, 1))).astype(np.float32)
    kernels[rng.random(rows) < 0.01] = 0.0
    return kernels


def corpus_path(workdir: str | os.PathLike[str], n: int, k: int, dtype: str, seed: int) -> Path:
    return Path(workdir) / f"corpus-k{k}-n{n}-{dtype}-seed{seed}.npy"


def make_corpus(
    workdir: str | os.PathLike[str],
    n: int,
    k: int,
    *,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    chunk_rows: int = 1 << 20,
) -> np.memmap:
    """The synthetic corpus [n, k*k] as a read-only memmap of a .npy file in ``workdir``; reused when a file
    of that shape and dtype is there.  Written chunk by chunk to a temporary name, then renamed, so a crash
    never leaves a half-written file that a later run would take for a complete one."""
    from tqdm import tqdm

    path = corpus_path(workdir, n, k, dtype, seed)
    d = k * k
    if path.is_file():
        try:
            corpus = np.load(path, mmap_mode="r")
            if corpus.shape == (n, d) and corpus.dtype == np.dtype(dtype):
                log(f"k={k}: reusing {path}", progress)
                return corpus
        except (ValueError, OSError):
            pass
        log(f"k={k}: {path} has the wrong shape or is damaged: writing it again", progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    rng = np.random.default_rng([seed, k])
    patterns = synthetic_patterns(k)
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
    with tqdm(total=n, desc=f"corpus k={k}", unit="kernel", unit_scale=True, file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            out[start:stop] = synth_kernels(rng, stop - start, k, patterns)
            bar.update(stop - start)
    out.flush()
    del out
    os.replace(partial, path)
    log(f"k={k}: wrote {path} ({path.stat().st_size / 1e9:.2f} GB)", progress)
    return np.load(path, mmap_mode="r")


def page_cache(corpus: np.ndarray, k: int, progress: bool, chunk_rows: int = 1 << 20) -> None:
    """Read the corpus once, so that both contenders read it from memory, never from disk."""
    from tqdm import tqdm

    n = len(corpus)
    with tqdm(total=n, desc=f"page-cache k={k}", unit="kernel", unit_scale=True, file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            np.max(corpus[start:stop])
            bar.update(stop - start)


def make_autoencoder(k: int, seed: int = 0) -> tuple[Any, Any]:
    """The benchmark's default autoencoder, random-init: encoder d -> 64 -> 32 -> 1 (ReLU, ReLU, sigmoid code)
    and decoder 1 -> 32 -> 64 -> d (ReLU, ReLU, linear), as two ``nn.Sequential``."""
    import torch
    from torch import nn

    d = k * k
    torch.manual_seed(seed)
    h1, h2 = HIDDEN
    encoder = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1),
                            nn.Sigmoid())
    decoder = nn.Sequential(nn.Linear(1, h2), nn.ReLU(), nn.Linear(h2, h1), nn.ReLU(), nn.Linear(h1, d))
    return encoder.eval(), decoder.eval()


def calibrate(
    encoder: Any, decoder: Any, prototypes: np.ndarray, sample: np.ndarray, threads: int | None
) -> tuple[Autoencoder, float, float]:
    """Code intervals at quantiles of the sample's codes, and the thresholds (autoencoder, prototypes) at the
    median score, so that every label occurs and about half of the kernels pass."""
    plain = Autoencoder.from_torch(encoder, decoder)
    codes = plain.encode(sample, threads=threads)
    edges = np.nanquantile(codes, np.linspace(0, 1, N_INTERVALS + 1)[1:-1]).astype(np.float64)
    bounds = [0.0, *edges.tolist(), 1.0]
    clusters = [(bounds[i], bounds[i + 1]) for i in range(N_INTERVALS)]
    model = Autoencoder.from_torch(encoder, decoder, clusters=clusters)
    _, scores, _ = kernelatlas.assign(sample, model, threshold=0.0, threads=threads)
    live = np.isfinite(codes)
    tau = round(float(np.median(scores[live])), 4)
    _, pscores = kernelatlas.assign_prototypes(sample, prototypes, threshold=0.0, threads=threads)
    ptau = round(float(np.median(pscores[live])), 4)
    return model, tau, ptau


def flops_per_kernel(model: Autoencoder, stage: str, n_proto: int) -> tuple[int, int]:
    """(engine, peer) floating-point operations per kernel, an FMA counted as 2, activations and biases not
    counted, padding not counted.

    * normalise: 5d (sum, subtract, square-accumulate, scale) for both;
    * encode: + 2 x encoder MACs for both;
    * assign, engine with the segment table: + 6d (reconstruction r = c + u b, x.r and r.r, one FMA each);
      engine with the decoder MLP: + 2 x decoder MACs + 4d (x.r, r.r); the peer: + 2 x decoder MACs + 6d
      (``F.cosine_similarity`` takes x.r, x.x and r.r);
    * prototypes: + 2 P d for both.
    """
    d = model.d
    enc = sum(int(layer.weight.size) for layer in model.encoder)
    dec = sum(int(layer.weight.size) for layer in model.decoder)
    norm = 5 * d
    if stage == "normalize":
        return norm, norm
    if stage == "encode":
        return norm + 2 * enc, norm + 2 * enc
    if stage == "assign":
        engine_cos = 6 * d if model.piecewise_linear else 2 * dec + 4 * d
        return norm + 2 * enc + engine_cos, norm + 2 * enc + 2 * dec + 6 * d
    if stage == "prototypes":
        return norm + 2 * n_proto * d, norm + 2 * n_proto * d
    raise ValueError(f"unknown stage {stage!r}")
