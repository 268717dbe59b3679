"""The PyTorch peer: the pipeline a researcher would write in PyTorch on the CPU without kernelatlas,
exactly as section C of reference/README.md defines it.  It is the baseline every speed claim of the engine is
measured against (``kernelatlas bench``, benchmarks/), so it is written the plain, idiomatic way -- not tuned,
and not handicapped either:

* the input is walked in chunks of ``chunk_rows`` rows of a numpy array / ``np.memmap``; each chunk becomes
  ``torch.from_numpy(chunk)`` (zero-copy; float16 chunks are upcast with ``.float()``);
* per kernel: subtract the mean, divide by the L2 norm;
* the autoencoder runs as one ``nn.Sequential(encoder, decoder)`` under ``torch.inference_mode()``; the code
  is the output of ``net[0]``, the reconstruction that of ``net[1]``;
* ``F.cosine_similarity(x, recon)``; the label is the code's interval (``torch.bucketize`` on the interval
  lower bounds, the last interval closed at its upper bound) and ``torch.where(score >= tau, label, -1)``;
* prototypes: ``x @ P.T`` and ``max(1)`` (P centred and L2-normalised like the kernels);
* results are copied into preallocated output arrays (``int16`` labels, ``float32`` scores and codes), which
  may be writable memmaps.

Dead (all-zero) kernels are treated the way the naive user code treats them, which is NOT the engine's
documented behaviour: their centred norm is 0, so the division gives a row of NaN; the NaN code,
reconstruction and score follow, and since ``NaN >= tau`` is false, ``torch.where`` maps every NaN score to
label -1.  So a dead kernel gets label -1 (as in the engine) but score NaN and code NaN (the engine: score 0,
code NaN), and its normalised row is NaN (the engine: a zero row).  Flat (constant, non-zero) kernels are
divided by a rounding-level norm and give arbitrary scores; the benchmark corpus holds none.

torch is imported lazily: ``import kernelatlas`` never needs it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kernelatlas.autoencoder import Autoencoder

__all__ = ["DEFAULT_CHUNK_ROWS", "TorchPeer", "require_torch"]

DEFAULT_CHUNK_ROWS = 32768

# torch.from_numpy warns once per process about read-only arrays (np.load(..., mmap_mode="r")); the peer only
# reads its input, so the warning says nothing here (and pytest's filterwarnings=error would make it a crash).
_READONLY_WARNING = "The given NumPy array is not writable"


def require_torch() -> Any:
    """The torch module, or an ImportError that says how to install it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the PyTorch peer needs torch: pip install 'kernelatlas[torch]' (or a CPU wheel of torch)"
        ) from exc
    return torch


def _kernel_rows(x: np.ndarray) -> tuple[int, int]:
    if x.ndim == 2:
        return int(x.shape[0]), int(x.shape[1])
    if x.ndim == 3 and x.shape[1] == x.shape[2]:
        return int(x.shape[0]), int(x.shape[1] * x.shape[2])
    raise ValueError(f"kernels must have shape [n, k*k] or [n, k, k], got {x.shape}")


def _out(arr: np.ndarray | None, shape: tuple[int, ...], dtype: Any, name: str) -> np.ndarray:
    if arr is None:
        return np.empty(shape, dtype=dtype)
    if arr.shape != shape or arr.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must be {np.dtype(dtype)} of shape {shape}, got {arr.dtype} {arr.shape}")
    return arr


class TorchPeer:
    """The section-C pipeline around one autoencoder (``encoder``, ``decoder``: ``nn.Sequential``) and/or one
    prototype set, with the cluster intervals ``[(lo, hi), ...]`` (``[lo, hi)``, the last closed).

    ``threads``: ``torch.set_num_threads`` before every call (None: leave torch's setting alone).
    ``chunk_rows``: rows per ``torch.from_numpy`` chunk.
    """

    def __init__(
        self,
        encoder: Any = None,
        decoder: Any = None,
        *,
        clusters: Sequence[tuple[float, float]] | None = None,
        prototypes: np.ndarray | None = None,
        threads: int | None = None,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> None:
        torch = require_torch()
        from torch import nn

        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.threads = threads
        self.chunk_rows = int(chunk_rows)
        self.net = None
        if encoder is not None:
            if decoder is None:
                raise ValueError("give both the encoder and the decoder")
            self.net = nn.Sequential(encoder, decoder).eval()
        self.clusters = [(float(lo), float(hi)) for lo, hi in clusters] if clusters else []
        self._lo = torch.tensor([lo for lo, _ in self.clusters], dtype=torch.float32)
        self._hi = torch.tensor([hi for _, hi in self.clusters], dtype=torch.float32)
        self.prototypes = None
        if prototypes is not None:
            p = torch.as_tensor(np.asarray(prototypes, dtype=np.float32)).reshape(len(prototypes), -1)
            p = p - p.mean(1, keepdim=True)
            self.prototypes = p / torch.linalg.vector_norm(p, dim=1, keepdim=True)

    @classmethod
    def from_model(
        cls, model: Autoencoder, *, threads: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
    ) -> TorchPeer:
        """The peer of a kernelatlas :class:`Autoencoder`: its weights as ``nn.Sequential``, its intervals."""
        encoder, decoder = model.to_torch()
        return cls(encoder, decoder, clusters=model.clusters, threads=threads, chunk_rows=chunk_rows)

    # ------------------------------------------------------------------ the pipeline, chunk by chunk
    def _chunks(self, x: np.ndarray) -> Any:
        """Yield (start, stop, float32 tensor [rows, d]) for each chunk of x."""
        torch = require_torch()
        n, d = _kernel_rows(x)
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_READONLY_WARNING, category=UserWarning)
            for start in range(0, n, self.chunk_rows):
                stop = min(start + self.chunk_rows, n)
                chunk = torch.from_numpy(x[start:stop]).reshape(stop - start, d)
                if chunk.dtype != torch.float32:
                    chunk = chunk.float()
                yield start, stop, chunk

    @staticmethod
    def _normalize(chunk: Any) -> tuple[Any, Any]:
        torch = require_torch()
        centred = chunk - chunk.mean(1, keepdim=True)
        norms = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
        return centred / norms, norms

    def _labels(self, codes: Any, scores: Any, threshold: float) -> Any:
        torch = require_torch()
        if self.clusters:
            idx = torch.bucketize(codes, self._lo, right=True) - 1  # last interval whose lo <= code
            at = idx.clamp(min=0)
            last = len(self.clusters) - 1
            inside = (idx >= 0) & ((codes < self._hi[at]) | ((at == last) & (codes <= self._hi[last])))
            label = torch.where(inside, idx, -1)
        else:
            label = torch.zeros_like(codes, dtype=torch.int64)
        return torch.where(scores >= threshold, label, -1)

    def _need_net(self) -> Any:
        if self.net is None:
            raise ValueError("this TorchPeer holds no autoencoder: pass encoder and decoder")
        return self.net

    def normalize(
        self, x: np.ndarray, *, out: np.ndarray | None = None, norms: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Centred, L2-normalised kernels float32 [n, d] (NaN rows for dead kernels) and the norms [n]."""
        torch = require_torch()
        n, d = _kernel_rows(x)
        out = _out(out, (n, d), np.float32, "out")
        norms = _out(norms, (n,), np.float32, "norms")
        out_t, norms_t = torch.from_numpy(out), torch.from_numpy(norms)
        with torch.inference_mode():
            for start, stop, chunk in self._chunks(x):
                centred = chunk - chunk.mean(1, keepdim=True)
                nrm = torch.linalg.vector_norm(centred, dim=1, keepdim=True)
                torch.div(centred, nrm, out=out_t[start:stop])
                norms_t[start:stop].copy_(nrm.squeeze(1))
        return out, norms

    def encode(self, x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Normalise and encode: codes float32 [n] (NaN for dead kernels)."""
        torch = require_torch()
        encoder = self._need_net()[0]
        n, _ = _kernel_rows(x)
        out = _out(out, (n,), np.float32, "out")
        codes_t = torch.from_numpy(out)
        with torch.inference_mode():
            for start, stop, chunk in self._chunks(x):
                xn, _ = self._normalize(chunk)
                codes_t[start:stop].copy_(encoder(xn).squeeze(1))
        return out

    def assign(
        self,
        x: np.ndarray,
        *,
        threshold: float = 0.85,
        out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole pipeline: (labels int16, scores float32, codes float32), each [n]."""
        torch = require_torch()
        import torch.nn.functional as F

        net = self._need_net()
        encoder, decoder = net[0], net[1]
        n, _ = _kernel_rows(x)
        labels, scores, codes = out if out is not None else (None, None, None)
        labels = _out(labels, (n,), np.int16, "labels")
        scores = _out(scores, (n,), np.float32, "scores")
        codes = _out(codes, (n,), np.float32, "codes")
        labels_t, scores_t = torch.from_numpy(labels), torch.from_numpy(scores)
        codes_t = torch.from_numpy(codes)
        with torch.inference_mode():
            for start, stop, chunk in self._chunks(x):
                xn, _ = self._normalize(chunk)
                code = encoder(xn)
                recon = decoder(code)
                score = F.cosine_similarity(xn, recon, dim=1)
                code = code.squeeze(1)
                labels_t[start:stop].copy_(self._labels(code, score, threshold))
                scores_t[start:stop].copy_(score)
                codes_t[start:stop].copy_(code)
        return labels, scores, codes

    def assign_prototypes(
        self, x: np.ndarray, *, threshold: float, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Label = the prototype of highest cosine (``x @ P.T``, ``max(1)``), -1 below ``threshold``."""
        torch = require_torch()
        if self.prototypes is None:
            raise ValueError("this TorchPeer holds no prototypes: pass prototypes=")
        n, _ = _kernel_rows(x)
        labels, scores = out if out is not None else (None, None)
        labels = _out(labels, (n,), np.int16, "labels")
        scores = _out(scores, (n,), np.float32, "scores")
        labels_t, scores_t = torch.from_numpy(labels), torch.from_numpy(scores)
        with torch.inference_mode():
            for start, stop, chunk in self._chunks(x):
                xn, _ = self._normalize(chunk)
                best, idx = (xn @ self.prototypes.T).max(1)
                labels_t[start:stop].copy_(torch.where(best >= threshold, idx, -1))
                scores_t[start:stop].copy_(best)
        return labels, scores
