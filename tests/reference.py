"""Plain numpy / torch references for the engine, written from the documented semantics only (engine.py,
autoencoder.py, the quality and shift docs, the papers) and never from the code under test: every test of a
kernel or a metric compares it with these.

Everything is computed in float64 from the input's own values (an fp16 input is upcast exactly), so the
references carry no rounding of their own worth speaking of.  The autoencoder runs through the torch
``nn.Sequential`` stacks the test model was built from, cast to float64 (or kept in float32 on request).
"""

from __future__ import annotations

import collections
import copy
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FLAT_REL_TOL = 1e-5  # a kernel whose centred norm is <= this x max|w| is "flat" (engine.py)
EPS32 = float(np.finfo(np.float32).eps)  # the floor of an empty histogram bin's probability (shift)
# the integer and moment keys of _core.layer_stats
LAYER_STATS_KEYS = ("n", "nonfinite", "zeros", "sparse", "max_abs", "sum", "gram", "sum_scaled", "gram_scaled",
                    "sum_sparse", "gram_sparse")


@dataclass
class Normalized:
    """The reference normalisation of a batch: rows [n, d] float64, norms [n] and the per-row status."""

    rows: np.ndarray
    norms: np.ndarray
    good: np.ndarray  # [n] bool: a live, shaped, finite kernel
    nonfinite: np.ndarray  # [n] bool
    dead: np.ndarray  # [n] bool (all |w| <= min_abs)
    flat: np.ndarray  # [n] bool (centred norm <= 1e-5 max|w|)


def as_rows(x: np.ndarray) -> np.ndarray:
    """[n, d] or [n, k, k] -> float64 [n, d] (fp16 values upcast exactly)."""
    x = np.asarray(x)
    return x.reshape(len(x), int(np.prod(x.shape[1:]))).astype(np.float64)


def normalize(x: np.ndarray, min_abs: float = 0.0) -> Normalized:
    """Centre every kernel and divide it by the L2 norm of the centred kernel, in float64.

    Non-finite rows -> zero row, norm NaN; dead rows (max|w| <= min_abs) and flat rows (centred norm
    <= 1e-5 max|w|) -> zero row, norm 0.
    """
    w = as_rows(x)
    _n, _d = w.shape
    nonfinite = ~np.isfinite(w).all(axis=1)
    safe = np.where(nonfinite[:, None], 0.0, w)
    amax = np.abs(safe).max(axis=1, initial=0.0)
    centred = safe - safe.mean(axis=1, keepdims=True)
    norms = np.sqrt((centred * centred).sum(axis=1))
    dead = ~nonfinite & (amax <= min_abs)
    flat = ~nonfinite & ~dead & (norms <= FLAT_REL_TOL * amax)
    good = ~(nonfinite | dead | flat)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = np.where(good[:, None], centred / np.where(good, norms, 1.0)[:, None], 0.0)
    out_norms = np.where(good, norms, 0.0)
    out_norms[nonfinite] = np.nan
    return Normalized(rows, out_norms, good, nonfinite, dead, flat)


def torch_stack(seq: torch.nn.Module, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A copy of an ``nn.Sequential`` in ``dtype`` (the original stays untouched)."""
    return copy.deepcopy(seq).to(dtype).eval()


def run_stack(seq: torch.nn.Module, inputs: np.ndarray, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """seq(inputs) in ``dtype``, as float64 numpy."""
    stack = torch_stack(seq, dtype)
    with torch.no_grad():
        return stack(torch.from_numpy(np.asarray(inputs, dtype=np.float64)).to(dtype)).double().numpy()


def encode(enc: torch.nn.Module, norm: Normalized, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Codes [n] of the normalised rows; NaN for rows that are not good."""
    if len(norm.rows) == 0:
        return np.zeros(0)
    codes = run_stack(enc, norm.rows, dtype)[:, 0]
    return np.where(norm.good, codes, np.nan)


def decode(dec: torch.nn.Module, codes: np.ndarray, dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Patterns [n, d] for codes [n]; NaN rows for non-finite codes."""
    codes = np.asarray(codes, dtype=np.float64)
    finite = np.isfinite(codes)
    out = run_stack(dec, np.where(finite, codes, 0.0)[:, None], dtype) if len(codes) else np.zeros((0, 0))
    if len(codes):
        out[~finite] = np.nan
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of [n, d] arrays; 0 where either row has zero norm."""
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((na > 0) & (nb > 0), dot / (na * nb), 0.0)


def interval_labels(
    codes: np.ndarray, scores: np.ndarray, good: np.ndarray, intervals: list[tuple[float, float]] | None, threshold: float
) -> np.ndarray:
    """The documented label rule: index of the interval holding the code ([lo, hi), the last closed at hi), or
    0 for every passing kernel when there are no intervals; -1 when no interval holds it, when the score is
    below the threshold, or when the kernel is dead / flat / non-finite."""
    labels = np.full(len(codes), -1, np.int64)
    if not intervals:
        labels[:] = 0
    else:
        last = len(intervals) - 1
        for i, (lo, hi) in enumerate(intervals):
            inside = (codes >= lo) & ((codes <= hi) if i == last else (codes < hi))
            labels[inside] = i
    labels[~good | ~(scores >= threshold)] = -1
    return labels


@dataclass
class Assigned:
    labels: np.ndarray
    scores: np.ndarray
    codes: np.ndarray
    norm: Normalized


def assign(
    x: np.ndarray,
    enc: torch.nn.Module,
    dec: torch.nn.Module,
    *,
    intervals: list[tuple[float, float]] | None,
    threshold: float,
    min_abs: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> Assigned:
    """Paper-mode assignment: normalise, encode, decode, cosine(kernel, reconstruction), interval label.
    Dead / flat / non-finite kernels: label -1, score 0, code NaN."""
    norm = normalize(x, min_abs)
    codes = encode(enc, norm, dtype)
    if len(codes):
        rec = run_stack(dec, np.where(norm.good, codes, 0.0)[:, None], dtype)
        scores = np.where(norm.good, cosine(norm.rows, rec), 0.0)
    else:
        scores = np.zeros(0)
    labels = interval_labels(codes, scores, norm.good, intervals, threshold)
    return Assigned(labels, scores, codes, norm)


def normalize_prototypes(prototypes: np.ndarray) -> np.ndarray:
    p = as_rows(prototypes)
    c = p - p.mean(axis=1, keepdims=True)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


@dataclass
class PrototypeAssigned:
    labels: np.ndarray
    scores: np.ndarray
    cosines: np.ndarray  # [n, P]
    norm: Normalized


def assign_prototypes(x: np.ndarray, prototypes: np.ndarray, *, threshold: float, min_abs: float = 0.0) -> Any:
    """Label = argmax cosine with the centred, L2-normalised prototypes (first on ties), -1 below threshold;
    dead / flat / non-finite kernels: label -1, score 0."""
    norm = normalize(x, min_abs)
    protos = normalize_prototypes(prototypes)
    cosines = norm.rows @ protos.T
    best = cosines.argmax(axis=1) if len(cosines) else np.zeros(0, np.int64)
    scores = cosines[np.arange(len(cosines)), best] if len(cosines) else np.zeros(0)
    scores = np.where(norm.good, scores, 0.0)
    labels = np.where(norm.good & (scores >= threshold), best, -1)
    return PrototypeAssigned(labels, scores, cosines, norm)


# ---------------------------------------------------------------------------------------------- tolerances


def conditioning(x: np.ndarray, norm: Normalized) -> np.ndarray:
    """max(1, max|w| / centred norm) per row (1 for rows that are not good).

    fp32 centring loses about one fp32 ulp of max|w| per entry, so the normalised values of a kernel whose
    mean is large next to its spread carry an error of ~eps x max|w| / norm: every absolute tolerance on a
    normalised value or a quantity derived from it (code, score) is scaled by this factor.  It is 1 for
    every kernel whose mean does not exceed its spread, i.e. the stated tolerance holds as is there.
    """
    w = as_rows(x)
    amax = np.abs(np.where(norm.good[:, None], w, 0.0)).max(axis=1, initial=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(norm.good, amax / np.where(norm.good, norm.norms, 1.0), 1.0)
    return np.maximum(k, 1.0)


def near_interval_edge(codes: np.ndarray, intervals: list[tuple[float, float]] | None, tol: np.ndarray | float) -> np.ndarray:
    """Rows whose code lies within ``tol`` of an interval end (their label may flip under fp32 rounding)."""
    near = np.zeros(len(codes), bool)
    for lo, hi in intervals or []:
        near |= (np.abs(codes - lo) <= tol) | (np.abs(codes - hi) <= tol)
    return near


def memo_by_identity(fn: Any) -> Any:
    """Cache ``fn(x, *args)`` for read-only arrays ``x`` (the fixtures' shared batches), keyed by the identity
    of every array argument (held, so that an id cannot be reused) and the value of the others, keeping the
    last few results: the matrix tests run one batch under every ISA and thread count in a row.  Writable
    arrays are never cached (they may change between calls)."""
    cache: collections.OrderedDict = collections.OrderedDict()

    @functools.wraps(fn)
    def wrapper(x: np.ndarray, *args: Any) -> Any:
        if x.flags.writeable:
            return fn(x, *args)
        everything = (x, *args)
        key = tuple(id(a) if isinstance(a, np.ndarray) else a for a in everything)
        hit = cache.get(key)
        if hit is None or any(h is not a for h, a in zip(hit[0], everything, strict=True)):
            hit = cache[key] = (everything, fn(x, *args))
            while len(cache) > 4:
                cache.popitem(last=False)
        cache.move_to_end(key)
        return hit[1]

    return wrapper


# ------------------------------------------------------------------------ assign runs: per-layer label counts


def label_counts(labels, values, starts, stops, n_labels, nan_is_dead):
    out = np.zeros((len(starts), n_labels + 2), np.int64)
    for j, (a, b) in enumerate(zip(starts, stops, strict=True)):
        lab, val = labels[a:b], values[a:b]
        out[j, :-1] = np.bincount(lab.astype(np.int64) + 1, minlength=n_labels + 1)
        out[j, -1] = np.isnan(val).sum() if nan_is_dead else ((lab == -1) & (val == 0)).sum()
    return out


# ----------------------------------------------------------------------------- kernel quality (CNN Filter DB)


def variance_entropy(rows: np.ndarray) -> float:
    """-sum p log10 p of the squared singular values of the centred rows (0 without variance)."""
    w = np.asarray(rows, np.float64)
    if len(w) == 0:
        return float("nan")
    s = np.linalg.svd(w - w.mean(axis=0), compute_uv=False)
    v = s ** 2
    if v.sum() == 0:
        return 0.0
    p = v / v.sum()
    p = p[p > 0]
    return float(-(p * np.log10(p)).sum())


def threshold_entropy(n: float, params: tuple[float, float, float, float]) -> float:
    big_l, k, x0, b = params
    return big_l / (1 + math.exp(-k * (math.log2(n) - x0))) + b


def layer_quality(weight: np.ndarray) -> dict[str, float]:
    """Every per-layer metric from the original weight [c_out, c_in_per_group, k, k]."""
    c_out = weight.shape[0]
    d = weight.shape[2] * weight.shape[3]
    w = weight.reshape(-1, d).astype(np.float64)
    finite = np.isfinite(w).all(axis=1)
    wf = w[finite]
    n = len(wf)
    t = np.abs(wf).max() * 0.01 if n else 0.0
    t = t if t > 0 else 1.0  # torchconvquality: an all-zero layer is all sparse
    sparse = (np.abs(wf) < t).all(axis=1)
    f = weight.reshape(c_out, -1).astype(np.float64)
    f = f[np.isfinite(f).all(axis=1)]
    norms = np.linalg.norm(f, axis=1)
    norms[norms == 0] = 1.0
    fn = f / norms[:, None]
    c = len(fn)
    orth = 1 - np.abs(fn @ fn.T - np.eye(c)).sum() / (c * (c - 1)) if c >= 2 else float("nan")
    return {"n": n, "nonfinite": int((~finite).sum()), "zeros": int((~wf.any(axis=1)).sum()),
            "sparsity": sparse.mean() if n else float("nan"), "entropy": variance_entropy(wf),
            "entropy_clean": variance_entropy(wf[~sparse]), "n_clean": int((~sparse).sum()), "orthogonality": orth}


def pca(rows: np.ndarray, scaled: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, basis rows signed with their largest-magnitude entry positive, explained-variance ratios) by
    SVD."""
    w = np.asarray(rows, np.float64)
    w = w[np.isfinite(w).all(axis=1)]
    if scaled:
        m = np.abs(w).max(axis=1)
        w = w / np.where(m > 0, m, 1.0)[:, None]
    mean = w.mean(axis=0)
    _, s, vt = np.linalg.svd(w - mean, full_matrices=False)
    for row in vt:
        if row[np.argmax(np.abs(row))] < 0:
            row *= -1
    return mean, vt, s ** 2 / (s ** 2).sum()


# ---------------------------------------- kernel quality: the native layer moments and coefficient histograms


def layer_stats(x: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> dict[str, np.ndarray]:
    d = int(np.prod(x.shape[1:]))
    w_all = x.reshape(len(x), d).astype(np.float64)
    out: dict[str, list] = {k: [] for k in LAYER_STATS_KEYS}
    out["abs_sum"], out["abs_sum_scaled"], out["abs_sum_sparse"], out["abs_gram_sparse"] = [], [], [], []
    for a, b in zip(starts, stops, strict=True):
        w = w_all[a:b]
        finite = np.isfinite(w).all(axis=1)
        w = w[finite]
        m = np.abs(w).max(axis=1) if len(w) else np.zeros(0)
        big = float(m.max()) if len(w) else 0.0
        scaled = w / np.where(m > 0, m, 1.0)[:, None]  # all-zero rows stay zero
        out["n"].append(len(w))
        out["nonfinite"].append(int((~finite).sum()))
        out["zeros"].append(int((m == 0).sum()))
        out["sparse"].append(int((m < 0.01 * big).sum()) if big > 0 else len(w))
        out["max_abs"].append(big)
        out["sum"].append(w.sum(axis=0) if len(w) else np.zeros(d))
        out["gram"].append(w.T @ w)
        out["sum_scaled"].append(scaled.sum(axis=0) if len(w) else np.zeros(d))
        out["gram_scaled"].append(scaled.T @ scaled)
        out["abs_sum"].append(np.abs(w).sum(axis=0) if len(w) else np.zeros(d))
        out["abs_sum_scaled"].append(np.abs(scaled).sum(axis=0) if len(w) else np.zeros(d))
        sp = w[m < 0.01 * big] if big > 0 else np.zeros((0, d))  # all-zero layer: sparse rows are zeros
        out["sum_sparse"].append(sp.sum(axis=0) if len(sp) else np.zeros(d))
        out["gram_sparse"].append(sp.T @ sp)
        out["abs_sum_sparse"].append(np.abs(sp).sum(axis=0) if len(sp) else np.zeros(d))
        out["abs_gram_sparse"].append(np.abs(sp).T @ np.abs(sp))
    shapes = {"sum": (d,), "gram": (d, d), "sum_scaled": (d,), "gram_scaled": (d, d), "abs_sum": (d,),
              "abs_sum_scaled": (d,), "sum_sparse": (d,), "gram_sparse": (d, d), "abs_sum_sparse": (d,),
              "abs_gram_sparse": (d, d)}
    return {k: np.array(v, dtype=np.float64 if k in shapes or k == "max_abs" else np.int64).reshape(
        (len(starts), *shapes.get(k, ()))) for k, v in out.items()}


def pca_coefficients(x: np.ndarray, mean: np.ndarray, basis: np.ndarray, scale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of every row [n, n_components] and the finite-row mask."""
    w = x.reshape(len(x), int(np.prod(x.shape[1:]))).astype(np.float64)
    finite = np.isfinite(w).all(axis=1)
    w = np.where(finite[:, None], w, 0.0)
    if scale:
        m = np.abs(w).max(axis=1) if w.shape[0] else np.zeros(0)
        w = w / np.where(m > 0, m, 1.0)[:, None]
    return (w - mean) @ basis.T, finite


def coef_bins(c: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """floor((c - lo) / (hi - lo) * bins) clipped into [0, bins - 1]; and where c lies within 1e-9 of an inner
    bin edge (in bins), where float64 rounding may legitimately decide either way (at lo and hi the clamping
    decides)."""
    t = (c - lo) / (hi - lo) * bins
    near = (np.abs(t - np.round(t)) < 1e-9) & (t > 0.5) & (t < bins - 0.5)
    return np.clip(np.floor(t), 0, bins - 1).astype(np.int64), near


def coef_histograms(x, starts, stops, groups, n_groups, mean, basis, lo, hi, bins, scale):
    c, finite = pca_coefficients(x, mean, basis, scale)
    b, near = coef_bins(c, lo, hi, bins)
    hist = np.zeros((n_groups, len(basis), bins), np.int64)
    n_near = 0
    for a, e, g in zip(starts, stops, groups, strict=True):
        if g < 0:
            continue
        rows = np.arange(a, e)[finite[a:e]]
        n_near += int(near[rows].sum())
        for k in range(len(basis)):
            hist[g, k] += np.bincount(b[rows, k], minlength=bins)
    return hist, n_near


# ----------------------------------------------------------------------------------------- distribution shift


def histogram_probabilities(counts: np.ndarray) -> np.ndarray:
    p = counts / counts.sum()
    p[p == 0] = EPS32
    return p / p.sum()


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def shift_matrix(probs: np.ndarray, evr: np.ndarray) -> np.ndarray:
    g, comps, _ = probs.shape
    out = np.zeros((g, g))
    for a in range(g):
        for b in range(g):
            out[a, b] = sum(evr[j] * (kl_divergence(probs[a, j], probs[b, j]) + kl_divergence(probs[b, j], probs[a, j]))
                            for j in range(comps))
    return out


def scaled_pca_coefficients(rows: np.ndarray, pca: Any) -> np.ndarray:
    """The PCA coefficients of the finite rows, each scaled by its max|w| first (the shift's histograms)."""
    coefs, finite = pca_coefficients(np.asarray(rows), pca.mean, pca.basis, True)
    return coefs[finite]


def group_histograms(groups: dict[str, list[np.ndarray]], pca: Any,
                   bins: int = 70) -> tuple[np.ndarray, list[str]]:
    """counts [G, C, bins] over the shared range of all coefficients (np.histogram: last bin closed)."""
    names = sorted(groups)
    coefs = {g: scaled_pca_coefficients(np.concatenate(groups[g]), pca) for g in names}
    allc = np.concatenate(list(coefs.values()))
    lo, hi = allc.min(axis=0), allc.max(axis=0)
    counts = np.zeros((len(names), pca.d, bins), np.int64)
    for i, g in enumerate(names):
        for j in range(pca.d):
            counts[i, j] = np.histogram(coefs[g][:, j], bins=bins, range=(lo[j], hi[j]))[0]
    return counts, names


def heldout_layer(model_sha256: str, layer_index: int, salt: int, rows: int, share: float) -> np.ndarray:
    """The held-out rule (kernelatlas.holdout.RULE) in plain Python integers: kernel r of the layer is held out
    when splitmix64(r + key) / 2^64 < share, key = the first 8 bytes (little-endian) of
    sha256("kernelatlas-holdout:SALT:MODEL_SHA256:LAYER_INDEX")."""
    import hashlib

    mask64 = (1 << 64) - 1
    key = int.from_bytes(hashlib.sha256(f"kernelatlas-holdout:{salt}:{model_sha256}:{layer_index}".encode())
                         .digest()[:8], "little")
    out = np.zeros(rows, bool)
    for r in range(rows):
        z = (r + key + 0x9E3779B97F4A7C15) & mask64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        z ^= z >> 31
        out[r] = (z >> 11) / float(1 << 53) < share
    return out


def layer_index_in_model(layers: Any) -> dict[int, int]:
    """layer_id -> the layer's index among its model's layers (ids are consecutive per model, in order)."""
    first = layers.groupby("model_id")["layer_id"].min()
    return {int(lid): int(lid) - int(first[m]) for lid, m in zip(layers["layer_id"], layers["model_id"], strict=True)}
