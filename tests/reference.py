"""Plain numpy / torch references for the engine, written from the documented semantics only (engine.py,
autoencoder.py) and never from the engine's code: every test compares the native kernels with these.

Everything is computed in float64 from the input's own values (an fp16 input is upcast exactly), so the
references carry no rounding of their own worth speaking of.  The autoencoder runs through the torch
``nn.Sequential`` stacks the test model was built from, cast to float64 (or kept in float32 on request).
"""

from __future__ import annotations

import collections
import copy
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FLAT_REL_TOL = 1e-5  # a kernel whose centred norm is <= this x max|w| is "flat" (engine.py)


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
