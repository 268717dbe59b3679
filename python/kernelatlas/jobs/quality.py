"""`kernelatlas quality`: per-layer kernel quality and the global PCA basis of CNN Filter DB (Gavrikov &
Keuper, CVPR 2022, and its CVPRW 2022 companion; reference/README.md section B), streamed over a corpus.

Per stored layer (its n x d matrix W of k x k kernels, d = k*k):

* n: finite kernels (all-zero ones included); non-finite ones are counted and left out of everything.
* sparsity S: share of kernels whose every |w| < 0.01 * max|W| (an all-zero layer is all sparse).
* variance entropy H: centre W by its mean kernel, take the eigenvalues of the centred scatter (the squared
  singular values), p_i = lambda_i / sum(lambda), H = -sum p_i log10 p_i; no variance -> H = 0.
* TH(n): the randomness threshold, a logistic in log2 n fitted to the minimum entropy of random layers; the
  layer is "random" when H > TH(n).  d = 9: the paper's constants; d = 25, 49: ours, fitted the same way
  (:func:`fit_threshold`, docs/quality.md).
* degenerate: H >= TH(n) - 0.02 or (H < 0.5 and S >= 0.14) -- rule and constants attributed to the paper's
  supplement by a third party; the 0.5 is for 3x3 and is scaled by log10(d) / log10(9) for other sizes (ours).
* entropy_clean: H of the non-sparse kernels only; orthogonality (CVPRW): filters of the layer as rows
  (c_out, c_in/groups * d), L2-normalised, G their Gram matrix, 1 - sum|G - I| / (c_out (c_out - 1)).

How it streams: the native ``_core.layer_stats`` reads each group of whole layers once (memmap slices, never
copied) and returns per layer the counts, max|w|, and the first and second moments (sum and sum of outer
products, in float64) of the raw kernels and of the kernels scaled by their own max|w|.  Everything else is
small linear algebra afterwards: H from the d x d centred scatter gram - sum sum^T / n, the global PCA from
the moments summed over layers.  A layer is always one segment of one call (its sparsity threshold needs the
whole layer's max), so results do not depend on the chunk size.  It also returns the moments of each layer's
sparse kernels (read once more natively, right after their piece), subtracted from the layer's moments to give
entropy_clean.  Only orthogonality (a c_out x c_out Gram of whole filters: native fp32 tiles for corpus
dtypes, float64 numpy blocks otherwise) reads the kernels once more, layer by layer, while the layer is still
in the page cache.

Output: ``CORPUS/runs/RUN_ID/`` with quality.parquet (one row per stored layer), pca-kK.npz / pca-kK.csv
(mean, basis, eigenvalues, explained-variance ratios) and figures (pca-kK.png, quality-kK.png); run.json is
written last and marks the run complete.  RUN_ID is a short hash of the options and the corpus generation, so
the same command on the same corpus returns the finished run at once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas._files import atomic_write, atomic_write_bytes
from kernelatlas.corpus import Corpus, CorpusError, rundir
from kernelatlas.corpus.store import map_shard
from kernelatlas.figures import new_figure, save_figure

__all__ = [
    "DEGENERATE_LOW_ENTROPY",
    "DEGENERATE_MARGIN",
    "DEGENERATE_SPARSITY",
    "PCA",
    "SPARSITY_EPS",
    "TH_PARAMS",
    "QualityRun",
    "entropy_from_moments",
    "fit_threshold",
    "latest_quality_run",
    "layer_stats",
    "load_quality_run",
    "low_entropy_cut",
    "orthogonality",
    "pca_from_moments",
    "quality",
    "random_layer_entropies",
    "threshold_entropy",
]

QUALITY_FORMAT = rundir.QUALITY_FORMAT
KINDS = ("all", "depthwise", "regular", "grouped")
SCALES = ("maxabs", "none")

SPARSITY_EPS = 0.01  # a kernel is sparse when every |w| < SPARSITY_EPS * max|W| of its layer (the paper's 1%)

# TH(n) = L / (1 + exp(-k (log2 n - x0))) + b, per kernel dimension d = k*k: (L, k, x0, b).
#  d = 9: the paper's constants (as published in paulgavrikov/torchconvquality).
#  d = 25, 49: ours, from fit_threshold(d) with its defaults (seed 0): for n = 2, 4, ..., 2^14 the minimum
#  variance entropy over 1000 random layers with iid U(-1, 1) entries (PyTorch's default conv init, up to a
#  scale the entropy ignores), averaged over up to 64 repetitions of the 1000 draws where n is small (the
#  minimum of 1000 draws is noisy there); a least-squares logistic in log2 n with its limit L + b tied to the
#  minimum at n = 2^14 (a free fit puts the limit above log10(d), out of reach of any layer).  The same
#  procedure at d = 9 gives (1.28686, 0.88496, 2.21989, -0.33284), within 0.015 of the paper's curve over
#  n = 2..2^14 (0.016 with a free fit), which is how we know it is the paper's method (docs/quality.md); rms
#  residuals of the fits: 0.0085 (d = 9), 0.0033 (25), 0.0139 (49).
TH_PARAMS: dict[int, tuple[float, float, float, float]] = {
    9: (1.2618047, 0.88767525, 2.30436435, -0.31050834),
    25: (2.1280681447793914, 0.7086107218134016, 1.9083183891424649, -0.7305596270416097),
    49: (2.5434498784609487, 0.6248290953319839, 2.054499494369777, -0.8539880870916905),
}

# The degenerate-layer rule (the paper's supplement, as quoted by a third party): a layer is degenerate when
# it looks random, H >= TH(n) - DEGENERATE_MARGIN, or when it is replicated and sparse, H <
# DEGENERATE_LOW_ENTROPY and S >= DEGENERATE_SPARSITY.  DEGENERATE_LOW_ENTROPY is for 3x3 kernels; see
# low_entropy_cut.
DEGENERATE_MARGIN = 0.02
DEGENERATE_LOW_ENTROPY = 0.5
DEGENERATE_SPARSITY = 0.14

# A layer whose total centred variance is at most this share of its sum of squares has no variance (H = 0):
# the native moments are fp32 FMA partial sums over blocks of 64 rows per lane combined in float64 (worst-case
# relative error ~3.8e-6 of sum |w_i w_j|, ~1e-7 typical), so identical kernels leave rounding noise of that
# size in gram - sum sum^T / n, which must not be read as variance.
ZERO_VARIANCE_REL = 1e-5
# Absolute error allowed to the native orthogonality against the float64 computation (fp32 unit rows and
# sums: ~1e-7 per Gram entry, the value is a mean of them; kernelatlas/quality.h bounds it)
ORTHOGONALITY_TOL = 1e-6
CHUNK_ROWS = 1 << 22


# ---------------------------------------------------------------------------------------------- formulas


def threshold_entropy(n: Any, d: int = 9) -> Any:
    """TH(n) for layers of n kernels of dimension d (9, 25 or 49; NaN for others and for n < 1)."""
    params = TH_PARAMS.get(int(d))
    n = np.asarray(n, dtype=np.float64)
    if params is None:
        return np.full(n.shape, np.nan)[()] if n.shape else float("nan")
    big_l, k, x0, b = params
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        th = big_l / (1.0 + np.exp(-k * (np.log2(n) - x0))) + b
    th = np.where(n >= 1, th, np.nan)
    return th[()] if th.shape == () else th


def low_entropy_cut(d: int, base: float = DEGENERATE_LOW_ENTROPY) -> float:
    """The low-entropy bound of the degenerate rule for kernels of dimension d: ``base`` (0.5, the paper's,
    for 3x3) times log10(d) / log10(9), so that it stays the same share of the maximum entropy log10(d)
    (ours)."""
    return base * math.log10(d) / math.log10(9) if d > 1 else base


def _entropy_of_eigenvalues(lam: np.ndarray, scale: np.ndarray) -> np.ndarray:
    lam = np.clip(lam, 0.0, None)
    total = lam.sum(axis=-1)
    none = total <= ZERO_VARIANCE_REL * scale
    p = lam / np.where(none, 1.0, total)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log10(np.where(p > 0, p, 1.0)), 0.0)
    return np.where(none, 0.0, -terms.sum(axis=-1))


def entropy_from_moments(n: Any, sums: Any, grams: Any) -> np.ndarray:
    """Variance entropy (base 10) of layers given by their moments: ``n`` [L] kernels, ``sums`` [L, d] (sum of
    the kernels), ``grams`` [L, d, d] (sum of their outer products).  The centred scatter is
    gram - sum sum^T / n; its eigenvalues are the squared singular values of the centred n x d matrix.  A
    layer whose total centred variance is at most ZERO_VARIANCE_REL of its sum of squares (identical kernels,
    up to the rounding of the moments) gets H = 0; a layer without kernels NaN."""
    n = np.atleast_1d(np.asarray(n, dtype=np.float64))
    sums = np.asarray(sums, dtype=np.float64).reshape(len(n), -1)
    d = sums.shape[1]
    grams = np.asarray(grams, dtype=np.float64).reshape(len(n), d, d)
    safe_n = np.where(n > 0, n, 1.0)
    scatter = grams - sums[:, :, None] * sums[:, None, :] / safe_n[:, None, None]
    scatter = 0.5 * (scatter + scatter.transpose(0, 2, 1))
    scatter[n <= 0] = 0.0
    lam = np.linalg.eigvalsh(scatter) if len(n) else np.zeros((0, d))
    h = _entropy_of_eigenvalues(lam, np.trace(grams, axis1=1, axis2=2))
    return np.where(n > 0, h, np.nan)


def orthogonality(filters: Any, *, block_bytes: int = 1 << 26, threads: int | None = None) -> float:
    """Orthogonality of a layer (CVPRW 2022) from its filters [c_out, m] (m = c_in/groups * k * k; a memmap is
    read block by block): rows L2-normalised (an all-zero filter stays zero, as in torchconvquality),
    G = F F^T, c = sum|G - I| / (c_out (c_out - 1)), result 1 - c.  Filters with a non-finite entry are left
    out (c_out counts the others); NaN below two filters.  For a depthwise layer each filter is one k x k
    kernel.

    float16 / float32 filters (corpus layers) go to the native kernel (``_core.orthogonality``) when their unit
    rows as float32 (c_out x m rounded up to 16) fit in ``block_bytes``: Gram entries are fp32 sums of
    fp32-rounded unit rows, within ORTHOGONALITY_TOL of the float64 computation (about 1e-7 per entry; tested
    against it).  Other dtypes and larger layers take the float64 numpy path below, in blocks of block_bytes.
    A non-contiguous float16 / float32 array is copied (once, explicitly) for the native kernel."""
    c_out = len(filters)
    m = int(np.prod(filters.shape[1:])) if c_out else 0
    dtype = np.dtype(getattr(filters, "dtype", np.float64))
    if dtype in (np.float16, np.float32) and c_out * (-(-m // 16) * 16) * 4 <= block_bytes:
        from kernelatlas import _core

        contiguous = np.ascontiguousarray(np.asarray(filters).reshape(c_out, m))
        return float(_core.orthogonality(contiguous, threads=threads or 0))
    # a block's rows in float64 and the Gram of two blocks (rows x rows) each stay within block_bytes: sizing by
    # the input alone made a 9-wide depthwise layer of 80k filters ask for a 47 GiB Gram block
    rows = max(1, min(block_bytes // max(1, 8 * m), math.isqrt(block_bytes // 8)))
    blocks: list[tuple[int, int, np.ndarray]] = []  # (start, stop, finite mask)
    inv_norms: list[np.ndarray] = []
    for a in range(0, c_out, rows):
        b = min(a + rows, c_out)
        blk = np.asarray(filters[a:b], dtype=np.float64).reshape(b - a, m)
        finite = np.asarray(np.isfinite(blk).all(axis=1))
        norms = np.sqrt((np.where(finite[:, None], blk, 0.0) ** 2).sum(axis=1))
        blocks.append((a, b, finite))
        inv_norms.append(1.0 / np.where(norms > 0, norms, 1.0))
    count = int(sum(int(f.sum()) for _, _, f in blocks))
    if count < 2:
        return float("nan")

    def unit(i: int) -> np.ndarray:
        a, b, finite = blocks[i]
        blk = np.asarray(filters[a:b], dtype=np.float64).reshape(b - a, m)
        return (blk * inv_norms[i][:, None])[finite]

    total = 0.0
    for i in range(len(blocks)):
        fi = unit(i)
        g = fi @ fi.T
        g[np.diag_indices_from(g)] -= 1.0
        total += float(np.abs(g).sum())
        for j in range(i + 1, len(blocks)):
            total += 2.0 * float(np.abs(fi @ unit(j).T).sum())
    return 1.0 - total / (count * (count - 1))


@dataclass(frozen=True)
class PCA:
    """A PCA of kernels from their moments: ``mean`` [d], ``basis`` [d, d] (rows = components, by decreasing
    variance; each signed so that its entry of largest magnitude is positive), ``eigenvalues`` [d] (of the
    covariance, divided by n), ``evr`` [d] explained-variance ratios, ``n`` kernels, ``scaled`` whether each
    kernel was divided by its max|w| first."""

    mean: np.ndarray
    basis: np.ndarray
    eigenvalues: np.ndarray
    evr: np.ndarray
    n: int
    scaled: bool

    @property
    def d(self) -> int:
        return len(self.mean)

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, mean=self.mean, basis=self.basis, eigenvalues=self.eigenvalues, evr=self.evr,
                         n=np.int64(self.n), scaled=np.bool_(self.scaled))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> PCA:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["mean"], z["basis"], z["eigenvalues"], z["evr"], int(z["n"]), bool(z["scaled"]))

    def table(self) -> Any:
        """One row per component (component, eigenvalue, evr, cumulative evr, w0..w{d-1}) and a last row
        'mean'."""
        import pandas as pd

        d = self.d
        rows = [{"component": str(i), "eigenvalue": self.eigenvalues[i], "evr": self.evr[i],
                 "evr_cumulative": float(self.evr[:i + 1].sum()),
                 **{f"w{j}": self.basis[i, j] for j in range(d)}}
                for i in range(d)]
        rows.append({"component": "mean", "eigenvalue": np.nan, "evr": np.nan, "evr_cumulative": np.nan,
                     **{f"w{j}": self.mean[j] for j in range(d)}})
        return pd.DataFrame(rows)


def pca_from_moments(n: int, total: Any, gram: Any, *, scaled: bool = True) -> PCA:
    """The PCA of n kernels from their sum [d] and sum of outer products [d, d]: covariance gram/n - mean
    mean^T (the 1/n vs 1/(n-1) choice does not change the ratios or the basis)."""
    total = np.asarray(total, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    d = len(total)
    if n <= 0:
        nan = np.full(d, np.nan)
        return PCA(nan, np.full((d, d), np.nan), nan, nan, 0, scaled)
    mean = total / n
    cov = gram / n - np.outer(mean, mean)
    cov = 0.5 * (cov + cov.T)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(-lam, kind="stable")
    lam = np.clip(lam[order], 0.0, None)
    basis = vec[:, order].T.copy()
    for row in basis:
        if row[int(np.argmax(np.abs(row)))] < 0:
            row *= -1.0
    s = lam.sum()
    evr = lam / s if s > 0 else np.zeros(d)
    return PCA(mean, basis, lam, evr, int(n), scaled)


# ---------------------------------------------------------------------------------------------- TH(n) fit


def random_layer_entropies(n: int, d: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Variance entropies of ``draws`` random layers of n kernels of dimension d with iid U(-1, 1) entries
    (PyTorch's default conv init is U(-b, b); the entropy does not depend on b)."""
    out = np.empty(draws)
    batch = max(1, min(draws, int(4_000_000 // max(1, n * d))))
    for a in range(0, draws, batch):
        m = min(batch, draws - a)
        x = rng.random((m, n, d)) * 2.0 - 1.0
        x -= x.mean(axis=1, keepdims=True)
        scatter = np.matmul(x.transpose(0, 2, 1), x)
        lam = np.linalg.eigvalsh(scatter)
        out[a:a + m] = _entropy_of_eigenvalues(lam, np.trace(scatter, axis1=1, axis2=2))
    return out


def _logistic(params: np.ndarray, x: np.ndarray) -> np.ndarray:
    big_l, k, x0, b = params
    return big_l / (1.0 + np.exp(-k * (x - x0))) + b


def _fit_logistic(x: np.ndarray, y: np.ndarray, start: Sequence[float],
                  asymptote: float | None = None) -> np.ndarray:
    """Least-squares fit of L / (1 + exp(-k (x - x0))) + b (Levenberg-Marquardt, numeric Jacobian); with
    ``asymptote``, b = asymptote - L (three free parameters).  Returns (L, k, x0, b)."""
    def full(q: np.ndarray) -> np.ndarray:
        return q if asymptote is None else np.array([q[0], q[1], q[2], asymptote - q[0]])

    p = np.asarray(start, dtype=np.float64)[:4 if asymptote is None else 3]
    m = len(p)
    lam = 1e-3
    r = _logistic(full(p), x) - y
    cost = float(r @ r)
    for _ in range(2000):
        jac = np.empty((len(x), m))
        for i in range(m):
            q = p.copy()
            h = 1e-7 * max(1.0, abs(q[i]))
            q[i] += h
            jac[:, i] = (_logistic(full(q), x) - y - r) / h
        a = jac.T @ jac
        g = jac.T @ r
        while True:
            step = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), -g)
            q = p + step
            rq = _logistic(full(q), x) - y
            cq = float(rq @ rq)
            if cq < cost:
                p, r, cost = q, rq, cq
                lam = max(lam / 10, 1e-12)
                break
            lam *= 10
            if lam > 1e12:
                return full(p)
        if np.abs(step).max() < 1e-12 * (1 + np.abs(p).max()):
            break
    return full(p)


def fit_threshold(d: int, *, draws: int = 1000, max_log2n: int = 14, max_replicates: int = 64, seed: int = 0,
                  tie_asymptote: bool = True) -> tuple[tuple[float, float, float, float], Any]:
    """Fit TH(n) for kernels of dimension d the way the CVPR paper's curve was made: for n = 2, 4, ...,
    2^max_log2n the minimum variance entropy over ``draws`` random layers (iid U(-1, 1)), and a logistic in
    log2 n through those minima.  The minimum of 1000 draws is noisy for small n, so it is averaged over
    ``min(max_replicates, 2^(13 - log2 n))`` independent sets of ``draws`` (at least 1).  ``tie_asymptote``:
    the curve's limit L + b is set to the minimum at the largest n, so that TH stays below the entropy that
    random layers reach there (a free fit overshoots log10(d) for d = 25 and 49: the logistic approaches its
    limit more slowly than the minima do).  Returns ((L, k, x0, b), table of log2_n, n, min_entropy, fit).
    With the defaults: ~10 s for d = 9, ~80 s for d = 49 on 2 cores."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    e = np.arange(1, max_log2n + 1, dtype=np.float64)
    minima = []
    for ei in e.astype(int):
        reps = int(min(max(2.0 ** (13 - int(ei)), 1), max_replicates))
        h = random_layer_entropies(2 ** int(ei), d, draws * reps, rng).reshape(reps, draws)
        minima.append(float(h.min(axis=1).mean()))
    y = np.asarray(minima)
    params = _fit_logistic(e, y, [math.log10(d) + 0.3, 0.9, 2.3, -0.3],
                           asymptote=float(y[-1]) if tie_asymptote else None)
    table = pd.DataFrame({"log2_n": e.astype(int), "n": (2 ** e).astype(np.int64), "min_entropy": y,
                          "fit": _logistic(params, e)})
    return (float(params[0]), float(params[1]), float(params[2]), float(params[3])), table


# ---------------------------------------------------------------------------------------------- layer moments


def layer_stats(x: np.ndarray, starts: Any, stops: Any, *, threads: int | None = None) -> dict:
    """Per-segment (layer) statistics of the rows x[starts[i]:stops[i]] of a C-contiguous float32/float16 [n,
    d] array, by the native engine (``_core.layer_stats``): n (finite rows), nonfinite, zeros (all-zero rows),
    max_abs, sparse (rows with every |w| < 0.01 max_abs; all of them when max_abs is 0), sum [L, d], gram [L,
    d, d] (sum of outer products) and the same two for rows divided by their own max|w| (sum_scaled,
    gram_scaled)."""
    from kernelatlas import _core

    return _core.layer_stats(x, np.ascontiguousarray(starts, dtype=np.int64),
                             np.ascontiguousarray(stops, dtype=np.int64), threads=threads or 0)


# ---------------------------------------------------------------------------------------------- the corpus
# pass


@dataclass
class LayerSpan:
    layer_id: int
    start: int
    rows: int
    c_out: int
    c_in_per_group: int


def layer_batches(layers: list[LayerSpan], chunk_rows: int) -> Iterator[list[LayerSpan]]:
    """Consecutive layers (sorted by row) in groups spanning at most ``chunk_rows`` rows (a larger layer
    alone)."""
    group: list[LayerSpan] = []
    for lay in layers:
        if group and lay.start + lay.rows - group[0].start > chunk_rows:
            yield group
            group = []
        group.append(lay)
    if group:
        yield group


def _stored_layers(corpus: Corpus, kind: str) -> Any:
    lay = corpus.layers
    sel = lay[(lay["rows"] > 0) & (lay["kh"] == lay["kw"])]
    if kind != "all":
        sel = sel[sel["kind"] == kind]
    return sel


def _scan(corpus: Corpus, *, kind: str, scale: str, threads: int | None, chunk_rows: int, progress: bool,
          with_orthogonality: bool = True, cluster: Any = None) -> tuple[Any, dict[int, PCA]]:
    """One pass over every stored layer of ``kind``: the per-layer statistics and the PCA per kernel size.  The
    work is a list of layer groups (whole layers of one shard, :func:`layer_batches`), done in order here or as
    tasks on a cluster; either way the groups' moments are summed in that order, so the results are the same to
    the last bit."""
    import pandas as pd
    from tqdm import tqdm

    sel = _stored_layers(corpus, kind)
    rows_out: list[dict[str, Any]] = []
    pcas: dict[int, PCA] = {}
    if cluster is not None:
        cluster.check_shared(corpus.root)
        cluster.announce("quality")
    for k in corpus.kernel_sizes:
        d = k * k
        lay_k = sel[sel["kh"] == k]
        total = int(lay_k["rows"].sum())
        if total == 0:
            continue
        plan: list[tuple[str, list[LayerSpan]]] = []
        for shard in corpus.shards(k):
            sl = lay_k[lay_k["shard"] == shard].sort_values("row_start", kind="stable")
            if not len(sl):
                continue
            layers = [LayerSpan(int(r.layer_id), int(r.row_start), int(r.rows), int(r.c_out),
                                int(r.c_in_per_group)) for r in sl.itertuples(index=False)]
            plan.extend((shard, group) for group in layer_batches(layers, chunk_rows))
        bar = tqdm(total=total, desc=f"quality k={k}", unit="kernel", unit_scale=True, disable=not progress,
                   file=sys.stderr)
        weights = [sum(g.rows for g in group) for _, group in plan]
        results: list[Any] = [None] * len(plan)
        if cluster is None:
            arrays: dict[str, np.ndarray] = {}
            for i, (shard, group) in enumerate(plan):
                arr = arrays.setdefault(shard, corpus.shard_array(shard))
                results[i] = _group_quality(arr, group, k, scale, threads, with_orthogonality)
                bar.update(weights[i])
        else:
            for shard in {s for s, _ in plan}:
                corpus.shard_array(shard)  # checks shape and dtype against the manifest before any task
            tasks = [(str(corpus.root / shard), corpus.shard_array(shard).shape, group, k, scale, with_orthogonality)
                     for shard, group in plan]
            for i, result in cluster.map(_quality_task, tasks, weights=weights, bar=bar, key=f"quality-k{k}"):
                results[i] = result
        bar.close()
        n_all, sum_all, gram_all = 0, np.zeros(d), np.zeros((d, d))
        for group_rows, n, total_sum, total_gram in results:  # in plan order: the same sums as in-process
            rows_out.extend(group_rows)
            n_all += n
            sum_all += total_sum
            gram_all += total_gram
        pcas[k] = pca_from_moments(n_all, sum_all, gram_all, scaled=scale == "maxabs")
    frame = pd.DataFrame(rows_out, columns=["layer_id", "k", "n", "nonfinite", "zeros", "sparse", "max_abs",
                                            "entropy", "n_clean", "entropy_clean", "orthogonality"])
    return frame, pcas


def _group_quality(arr: np.ndarray, group: list[LayerSpan], k: int, scale: str, threads: int | None,
                   with_orthogonality: bool) -> tuple[list[dict[str, Any]], int, np.ndarray, np.ndarray]:
    """The quality rows of one group of whole layers of a shard, and the group's summed PCA moments (n, sum,
    gram of the kernels as ``scale`` says)."""
    d = k * k
    a = group[0].start
    b = group[-1].start + group[-1].rows
    x = arr[a:b]
    starts = np.array([g.start - a for g in group], np.int64)
    stops = starts + np.array([g.rows for g in group], np.int64)
    st = layer_stats(x, starts, stops, threads=threads)
    key_s, key_g = ("sum_scaled", "gram_scaled") if scale == "maxabs" else ("sum", "gram")
    h = entropy_from_moments(st["n"], st["sum"], st["gram"])
    rows_out: list[dict[str, Any]] = []
    for i, g in enumerate(group):
        rows = x[starts[i]:stops[i]]
        n = int(st["n"][i])
        sparse = int(st["sparse"][i])
        n_dense = n - sparse
        if sparse == 0:
            h_clean = h[i]
        else:  # the dense rows' moments: the layer's minus those of its sparse rows (native)
            h_clean = entropy_from_moments([n_dense], [st["sum"][i] - st["sum_sparse"][i]],
                                           [st["gram"][i] - st["gram_sparse"][i]])[0]
        if with_orthogonality and g.c_out * g.c_in_per_group == g.rows and g.c_out >= 2:
            orth = orthogonality(rows.reshape(g.c_out, g.c_in_per_group * d), threads=threads)
        else:
            orth = float("nan")
        rows_out.append({
            "layer_id": g.layer_id, "k": k, "n": n, "nonfinite": int(st["nonfinite"][i]),
            "zeros": int(st["zeros"][i]), "sparse": sparse, "max_abs": float(st["max_abs"][i]),
            "entropy": float(h[i]), "n_clean": int(n_dense), "entropy_clean": float(h_clean),
            "orthogonality": orth,
        })
    return rows_out, int(st["n"].sum()), st[key_s].sum(axis=0), st[key_g].sum(axis=0)


def _quality_task(shard_file: str, shape: tuple[int, int], group: list[LayerSpan], k: int, scale: str,
                  with_orthogonality: bool) -> tuple[list[dict[str, Any]], int, np.ndarray, np.ndarray]:
    """One cluster task (runs on a worker): :func:`_group_quality` of one group, the shard memory-mapped from
    the shared corpus folder."""
    from kernelatlas.cluster import engine_threads

    arr = map_shard(shard_file, shape)
    return _group_quality(arr, group, k, scale, engine_threads() or None, with_orthogonality)


def _derive(frame: Any, *, margin: float, low_entropy: float, min_sparsity: float) -> Any:
    """Add sparsity, th, entropy_ratio, random, degenerate (and the clean counterparts) to the scanned
    columns."""
    d = frame["k"].to_numpy(np.int64) ** 2
    n = frame["n"].to_numpy(np.float64)
    h = frame["entropy"].to_numpy(np.float64)
    th = np.array([threshold_entropy(ni, di) for ni, di in zip(n, d, strict=True)], dtype=np.float64)
    th_clean = np.array([threshold_entropy(ni, di) for ni, di in zip(frame["n_clean"], d, strict=True)],
                        dtype=np.float64)
    cut = np.array([low_entropy_cut(int(di), low_entropy) for di in d])
    with np.errstate(divide="ignore", invalid="ignore"):
        sparsity = np.where(n > 0, frame["sparse"].to_numpy(np.float64) / np.where(n > 0, n, 1), np.nan)
        ratio = h / th
        ratio_clean = frame["entropy_clean"].to_numpy(np.float64) / th_clean
    random_like = h > th
    degenerate = (h >= th - margin) | ((h < cut) & (sparsity >= min_sparsity))
    out = frame.copy()
    out.insert(out.columns.get_loc("sparse") + 1, "sparsity", sparsity)
    pos = out.columns.get_loc("entropy") + 1
    out.insert(pos, "th", th)
    out.insert(pos + 1, "entropy_ratio", ratio)
    out.insert(pos + 2, "random", random_like)
    out.insert(pos + 3, "degenerate", degenerate & (n > 0))
    out["th_clean"] = th_clean
    out["entropy_clean_ratio"] = ratio_clean
    out["degenerate_random"] = h >= th - margin
    out["degenerate_sparse"] = (h < cut) & (sparsity >= min_sparsity)
    return out


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class QualityRun:
    """A completed quality run: ``root`` = CORPUS/runs/RUN_ID, ``info`` its run.json, ``table``
    quality.parquet, ``pca(k)`` the global PCA of k x k kernels."""

    corpus: Corpus
    run_id: str
    root: Path
    info: dict[str, Any]

    @property
    def table(self) -> Any:
        import pandas as pd

        return pd.read_parquet(self.root / "quality.parquet")

    @property
    def kernel_sizes(self) -> list[int]:
        return [int(k) for k in self.info.get("kernel_sizes", [])]

    def pca(self, k: int) -> PCA:
        path = self.root / f"pca-k{k}.npz"
        if not path.is_file():
            raise CorpusError(f"{path} not found: quality run {self.run_id} holds no {k}x{k} kernels "
                              f"(sizes: {self.kernel_sizes or 'none'})")
        return PCA.load(path)

    def joined(self) -> Any:
        """quality.parquet joined with the corpus's layers and models tables (model columns prefixed
        model_)."""
        lay = self.corpus.layers.drop(columns=["n_kernels"], errors="ignore")
        table = self.table.merge(lay, on="layer_id", how="left", suffixes=("", "_layer"))
        models = self.corpus.models.add_prefix("model_").rename(columns={"model_model_id": "model_id"})
        return table.merge(models, on="model_id", how="left")


def load_quality_run(corpus: Corpus | str | os.PathLike[str], run_id: str) -> QualityRun:
    """The completed quality run CORPUS/runs/RUN_ID, or :class:`kernelatlas.corpus.rundir.RunError` (a
    CorpusError) naming the file and the fix."""
    c = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    run = rundir.require(c.root, run_id, rundir.QUALITY_FORMAT)
    return QualityRun(c, run_id, run.path, run.info or {})


def latest_quality_run(corpus: Corpus | str | os.PathLike[str]) -> QualityRun | None:
    """The latest completed quality run of the corpus (:func:`kernelatlas.corpus.rundir.latest`), or None."""
    c = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    best = rundir.latest(rundir.scan(c.root), format=rundir.QUALITY_FORMAT).get(None)
    return None if best is None else QualityRun(c, best.run_id, best.path, best.info or {})


def quality_options(*, kind: str = "all", scale: str = "maxabs", degenerate_margin: float = DEGENERATE_MARGIN,
                    degenerate_low_entropy: float = DEGENERATE_LOW_ENTROPY,
                    degenerate_sparsity: float = DEGENERATE_SPARSITY,
                    with_orthogonality: bool = True) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    return {"command": "quality", "kind": kind, "scale": scale, "sparsity_eps": SPARSITY_EPS,
            "degenerate_margin": float(degenerate_margin),
            "degenerate_low_entropy": float(degenerate_low_entropy),
            "degenerate_sparsity": float(degenerate_sparsity), "orthogonality": bool(with_orthogonality),
            "th_params": {str(d): list(p) for d, p in sorted(TH_PARAMS.items())}}


def quality_run_id(corpus: Corpus, options: dict[str, Any]) -> str:
    blob = json.dumps({**options, "corpus_generation": corpus.manifest.get("generation", 0)}, sort_keys=True)
    return "q" + hashlib.sha256(blob.encode()).hexdigest()[:11]


def quality_run(corpus: Corpus | str | os.PathLike[str], *, kind: str = "all", scale: str = "maxabs",
                run_id: str | None = None, threads: int | None = None, chunk_rows: int = CHUNK_ROWS,
                progress: bool = False, figures: bool = True, command: str = "",
                degenerate_margin: float = DEGENERATE_MARGIN,
                degenerate_low_entropy: float = DEGENERATE_LOW_ENTROPY,
                degenerate_sparsity: float = DEGENERATE_SPARSITY, with_orthogonality: bool = True,
                recompute: bool = False, cluster: Any = None, client: Any = None) -> QualityRun:
    """Compute (or find, when a completed run with the same options exists) the quality run of a corpus (see
    :func:`quality` for the options; ``cluster`` / ``client``: see kernelatlas.cluster)."""
    c = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be >= 1")
    options = quality_options(kind=kind, scale=scale, degenerate_margin=degenerate_margin,
                              degenerate_low_entropy=degenerate_low_entropy,
                              degenerate_sparsity=degenerate_sparsity, with_orthogonality=with_orthogonality)
    rid = run_id or quality_run_id(c, options)
    root = rundir.writable_run_dir(c.root, rid)
    info_path = root / "run.json"
    done = rundir.read(c.root, rid)
    if done.info is not None and not recompute:
        if done.format != rundir.QUALITY_FORMAT:
            raise CorpusError(f"{info_path} belongs to a {done.verb} run ({done.format!r}): choose another --run id")
        if done.completed and done.options == options \
                and done.info.get("corpus_generation") == c.manifest.get("generation", 0):
            return QualityRun(c, rid, root, done.info)
    if _stored_layers(c, kind).empty:
        what = "any kind" if kind == "all" else kind + " layers"
        raise CorpusError(f"{c.root} stores no kernels of {what}: extract with --all-convs to store regular "
                          "convs, or choose another --kind")
    root.mkdir(parents=True, exist_ok=True)
    from kernelatlas.cluster import session

    with rundir.RunLock(root, verb="quality"), session(cluster, client) as cl:
        return _quality_run(c, root, rid, options, kind=kind, scale=scale, threads=threads, chunk_rows=chunk_rows,
                            cluster=cl,
                            progress=progress, figures=figures, command=command,
                            degenerate_margin=degenerate_margin, degenerate_low_entropy=degenerate_low_entropy,
                            degenerate_sparsity=degenerate_sparsity, with_orthogonality=with_orthogonality)


def _quality_run(c: Corpus, root: Path, rid: str, options: dict[str, Any], *, kind: str, scale: str,
                 threads: int | None, chunk_rows: int, progress: bool, figures: bool, command: str,
                 degenerate_margin: float, degenerate_low_entropy: float, degenerate_sparsity: float,
                 with_orthogonality: bool, cluster: Any = None) -> QualityRun:
    """Compute the run into ``root`` (locked by the caller); run.json last."""
    info_path = root / "run.json"
    info_path.unlink(missing_ok=True)  # the run is incomplete until run.json is written again
    _clear_outputs(root)
    started = time.time()
    scanned, pcas = _scan(c, kind=kind, scale=scale, threads=threads, chunk_rows=chunk_rows,
                          progress=progress, with_orthogonality=with_orthogonality, cluster=cluster)
    table = _derive(scanned, margin=degenerate_margin, low_entropy=degenerate_low_entropy,
                    min_sparsity=degenerate_sparsity)
    _write_parquet(table, root / "quality.parquet")
    files = ["quality.parquet"]
    for k, pca in pcas.items():
        pca.save(root / f"pca-k{k}.npz")
        atomic_write_bytes(root / f"pca-k{k}.csv", pca.table().to_csv(index=False).encode())
        files += [f"pca-k{k}.npz", f"pca-k{k}.csv"]
        if figures:
            files.append(pca_figure(pca, k, root / f"pca-k{k}.png"))
            files.append(quality_figure(table[table["k"] == k], k, root / f"quality-k{k}.png"))
    notes = [f"no TH(n) for {k}x{k} kernels (d = {k * k}): th, entropy_ratio and random are NaN/False; fit "
             "one with kernelatlas.jobs.quality.fit_threshold" for k in pcas if k * k not in TH_PARAMS]
    info = {"format": QUALITY_FORMAT, "run_id": rid, "command": command or "quality", "completed": True,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "options": options,
            "corpus_generation": c.manifest.get("generation", 0), "kernel_sizes": sorted(pcas),
            "layers": len(table), "kernels": int(table["n"].sum()) if len(table) else 0,
            "degenerate_layers": int(table["degenerate"].sum()) if len(table) else 0,
            "seconds": round(time.time() - started, 3), "files": files, "notes": notes,
            "pca": {str(k): {"n": p.n, "evr": p.evr.tolist(), "scaled": p.scaled} for k, p in pcas.items()}}
    atomic_write_bytes(info_path, json.dumps(info, indent=1).encode())
    return QualityRun(c, rid, root, info)


def quality(corpus: Corpus | str | os.PathLike[str], **options: Any) -> Any:
    """Per-layer kernel quality of a corpus (CNN Filter DB metrics), as a pandas DataFrame with one row per
    stored layer: layer_id, k, n, nonfinite, zeros, sparse, sparsity, max_abs, entropy, th, entropy_ratio,
    random, degenerate, n_clean, entropy_clean, orthogonality, th_clean, entropy_clean_ratio,
    degenerate_random, degenerate_sparse.  Computed once and kept in CORPUS/runs/RUN_ID/ (with the global PCA
    per kernel size); ``frame.attrs`` holds run_id and run_dir.

    Options: ``kind`` (all | depthwise | regular | grouped: the layers measured and pooled in the PCA; default
    all stored layers), ``scale`` (maxabs: each kernel divided by its max|w| before the PCA, as the paper
    does; none), ``degenerate_margin`` / ``degenerate_low_entropy`` / ``degenerate_sparsity`` (the degenerate
    rule), ``with_orthogonality`` (False: skip it, NaN; it costs c_out^2 * c_in * k^2 per layer, the only
    part that grows faster than the kernel count), ``run_id``, ``threads``, ``chunk_rows`` (rows per native
    call; whole layers always), ``progress``, ``figures``, ``recompute``."""
    run = quality_run(corpus, **options)
    frame = run.table
    frame.attrs.update({"run_id": run.run_id, "run_dir": str(run.root)})
    return frame


def _clear_outputs(root: Path) -> None:
    """Remove what an earlier computation of this run wrote (its shift results were made from it too)."""
    import shutil

    for pattern in ("quality.parquet", "pca-k*.npz", "pca-k*.csv", "pca-k*.png", "quality-k*.png",
                    "shift-k*-box.png", "shift-k*-box.csv"):
        for path in root.glob(pattern):
            path.unlink()
    for path in root.glob("shift-k*"):
        if path.is_dir():
            shutil.rmtree(path)


def _write_parquet(frame: Any, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp))


# ---------------------------------------------------------------------------------------------- figures






def pca_figure(pca: PCA, k: int, path: Path) -> str:
    """The PCA basis as k x k images (shared symmetric colour scale) and the explained-variance ratios."""
    d = pca.d
    cols = min(d, 9 if d <= 9 else 10)
    rows = -(-d // cols)
    fig = new_figure(1.25 * cols + 3.6, 1.35 * rows + 0.6)
    grid = fig.add_gridspec(rows, cols + 3, wspace=0.15, hspace=0.35)
    lim = float(np.nanmax(np.abs(pca.basis))) if np.isfinite(pca.basis).any() else 1.0
    for i in range(d):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(pca.basis[i].reshape(k, k), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"v{i} {pca.evr[i]:.1%}", fontsize=7)
    ax = fig.add_subplot(grid[:, cols + 1:])
    ax.bar(np.arange(d), pca.evr, color="#1f77b4", label="ratio")
    ax.plot(np.arange(d), np.cumsum(pca.evr), color="#d62728", marker=".", label="cumulative")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("component")
    ax.set_title("explained variance", fontsize=9)
    ax.legend(fontsize=7, loc="center right")
    fig.suptitle(f"global PCA of {pca.n:,} {k}x{k} kernels"
                 + (" (each scaled by its max|w|)" if pca.scaled else ""), fontsize=10)

    return save_figure(fig, path, tight=True)


def quality_figure(table: Any, k: int, path: Path) -> str:
    """Entropy against log2 n with TH(n), degenerate layers marked; and sparsity against entropy."""
    fig = new_figure(10, 3.8)
    ax, ax2 = fig.subplots(1, 2)
    n = table["n"].to_numpy(np.float64)
    ok = n > 0
    deg = table["degenerate"].to_numpy(bool)
    x = np.log2(np.where(ok, n, 1))
    h = table["entropy"].to_numpy(np.float64)
    ax.scatter(x[ok & ~deg], h[ok & ~deg], s=9, color="#1f77b4", label="layer")
    ax.scatter(x[ok & deg], h[ok & deg], s=12, color="#d62728", marker="x", label="degenerate")
    if ok.any():
        grid = np.linspace(0.0, max(1.0, float(x[ok].max()) + 0.5), 200)
        th = threshold_entropy(2 ** grid, k * k)
        if np.isfinite(th).any():
            ax.plot(grid, th, color="black", lw=1, label="TH(n)")
    ax.axhline(math.log10(k * k), color="grey", lw=0.6, ls=":")
    ax.set_xlabel("log2 n (kernels in the layer)")
    ax.set_ylabel("variance entropy H")
    ax.legend(fontsize=7)
    ax2.scatter(table["sparsity"][ok & ~deg], h[ok & ~deg], s=9, color="#1f77b4")
    ax2.scatter(table["sparsity"][ok & deg], h[ok & deg], s=12, color="#d62728", marker="x")
    ax2.set_xlabel("sparsity S")
    ax2.set_ylabel("variance entropy H")
    fig.suptitle(f"{k}x{k} layers: {int(ok.sum())} measured, {int((ok & deg).sum())} degenerate", fontsize=10)
    return save_figure(fig, path, tight=True)
