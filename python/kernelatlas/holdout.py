"""The held-out split: which kernels of a corpus an autoencoder was never allowed to see.

A coverage figure means something only on kernels the model did not train on (and next to the random-kernel
control, see :func:`random_control`).  Training therefore removes a fixed share of the kernels from its pool
before it samples, and the report recomputes the same split to show coverage on both sides.

The split is a pure function of a kernel's identity -- (shard path, row), DESIGN.md -- and a salt, so nothing
per kernel is stored and any later pass (assign, report, another process) can tell held-out rows apart in O(1)
memory: a row is held out when ``splitmix64(row + key(shard, salt))`` mapped to [0, 1) is below ``share``.
Rows appended to the corpus after training (shards the model's record does not list) and kernels of models
that training was told to leave out were never in the pool either: :class:`Holdout` counts them as held out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONTROL_GRID", "DEFAULT_SHARE", "Holdout", "control_at", "heldout_mask", "random_control",
           "random_kernels"]

DEFAULT_SHARE = 0.2
CONTROL_GRID = np.round(np.linspace(0.5, 1.0, 201), 6)  # thresholds the control is stored at (0.0025 apart)
CONTROL_KERNELS = 100_000  # a share of ~3% then has a standard error of ~0.05 percentage points
CONTROL_SEED = 0
RULE = "splitmix64(row + key(shard, salt)) / 2^64 < share"
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _shard_key(shard: str, salt: int) -> np.uint64:
    digest = hashlib.sha256(f"kernelatlas-holdout:{int(salt)}:{shard}".encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def heldout_mask(shard: str, start: int, stop: int, *, share: float, salt: int) -> np.ndarray:
    """Whether each row ``start <= row < stop`` of ``shard`` (its path relative to the corpus, as in
    layers.parquet) is held out, as a bool array [stop - start]."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the held-out share must be in [0, 1), got {share}")
    n = max(int(stop) - int(start), 0)
    if share == 0.0 or n == 0:
        return np.zeros(n, dtype=bool)
    with np.errstate(over="ignore"):
        z = np.arange(start, stop, dtype=np.uint64) + _shard_key(shard, salt) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    # the top 53 bits as a double in [0, 1): exact, so the cut is the same on every platform
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < share


@dataclass(frozen=True)
class Holdout:
    """The split a model was trained with (model.json ``holdout``, copied into run.json by assign).

    ``shards``: shard path -> sha256 of the shards of the model's size that the corpus held at training time;
    ``models``: the model_ids whose kernels training could draw from (None: all).  A row is in the training
    pool when its shard is listed with the same sha256, its model is allowed and :func:`heldout_mask` is false.
    """

    share: float
    salt: int
    shards: Mapping[str, str] = field(default_factory=dict)
    models: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"share": self.share, "salt": self.salt, "rule": RULE, "shards": dict(self.shards),
                "models": None if self.models is None else [int(m) for m in self.models]}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any] | None) -> Holdout | None:
        """None for a model trained before held-out splits existed (or an unreadable record)."""
        if not isinstance(spec, Mapping):
            return None
        try:
            models = spec.get("models")
            return cls(share=float(spec["share"]), salt=int(spec["salt"]),
                       shards={str(k): str(v) for k, v in dict(spec.get("shards") or {}).items()},
                       models=None if models is None else tuple(int(m) for m in models))
        except (KeyError, TypeError, ValueError):
            return None

    def shard_in_pool(self, shard: str, sha256: str | None) -> bool:
        return shard in self.shards and (sha256 is None or self.shards[shard] == sha256)

    def model_in_pool(self, model_id: int) -> bool:
        return self.models is None or int(model_id) in self.models

    def mask(self, shard: str, start: int, stop: int) -> np.ndarray:
        return heldout_mask(shard, start, stop, share=self.share, salt=self.salt)


def random_kernels(d: int, n: int, *, seed: int = 0) -> np.ndarray:
    """The control: ``n`` kernels of ``d`` i.i.d. standard normal entries, centred (float32 [n, d])."""
    rng = np.random.default_rng(seed)
    kernels = rng.standard_normal((n, d))
    return np.ascontiguousarray(kernels - kernels.mean(axis=1, keepdims=True), dtype=np.float32)


def random_control(model: Any, thresholds: Iterable[float], *, n: int = 100_000, seed: int = 0,
                   threads: int | None = None) -> dict[float, float]:
    """Share of random centred Gaussian kernels that ``model`` (an :class:`~kernelatlas.Autoencoder` with
    clusters) classifies at each threshold: the floor a coverage figure must be read against."""
    from kernelatlas.engine import assign

    thresholds = sorted(float(t) for t in thresholds)
    kernels = random_kernels(model.kernel_size ** 2, n, seed=seed)
    labels, scores, _ = assign(kernels, model, threshold=thresholds[0], threads=threads)
    inside = np.sort(scores[labels >= 0].astype(np.float64))
    # classified at t: inside an interval and score >= t
    return {t: float((len(inside) - np.searchsorted(inside, t, "left")) / n) for t in thresholds}


def control_at(control: Mapping[str, Any] | None, threshold: float) -> float | None:
    """The control share at ``threshold`` from a run.json ``control`` record (None when absent or when the
    threshold is not one of its grid points)."""
    if not isinstance(control, Mapping):
        return None
    try:
        grid = [float(t) for t in control["thresholds"]]
        share = [float(s) for s in control["share"]]
    except (KeyError, TypeError, ValueError):
        return None
    for t, s in zip(grid, share, strict=False):
        if abs(t - threshold) < 1e-9:
            return s
    return None
