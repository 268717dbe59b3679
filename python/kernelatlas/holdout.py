"""The held-out split: which kernels of a corpus an autoencoder was never allowed to see.

A coverage figure means something only on kernels the model did not train on (and next to the random-kernel
control, see :func:`random_control`).  Training therefore removes a fixed share of the kernels from its pool
before it samples, and the report recomputes the same split to show coverage on both sides.

The split is a pure function of a kernel's identity -- its model (the sha256 the corpus keys it by), the layer's
index in that model and its row in the layer -- and a salt, so nothing per kernel is stored and any later pass
(assign, report, another process) can tell held-out rows apart in O(1) memory: a row is held out when
``splitmix64(row in layer + key(model, layer index, salt))`` mapped to [0, 1) is below ``share``.  Where a
kernel is stored (shard, row) does not enter: the same models extracted in-process or on a cluster, committed
in other batches or sharded otherwise, have the same split (models trained before 2026-12-07 used
``splitmix64(row + key(shard, salt))`` and keep it: :data:`SHARD_RULE`).
Rows appended to the corpus after training (shards the model's record does not list) and kernels of models
that training was told to leave out were never in the pool either: :class:`Holdout` counts them as held out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONTROL_GRID", "DEFAULT_SHARE", "RULE", "SHARD_RULE", "Holdout", "control_at", "heldout_mask",
           "heldout_rows", "layer_key", "layer_keys", "random_control", "random_kernels"]

DEFAULT_SHARE = 0.2
CONTROL_GRID = np.round(np.linspace(0.5, 1.0, 201), 6)  # thresholds the control is stored at (0.0025 apart)
CONTROL_KERNELS = 100_000  # a share of ~3% then has a standard error of ~0.05 percentage points
CONTROL_SEED = 0
RULE = "splitmix64(row in layer + key(model sha256, layer index in model, salt)) / 2^64 < share"
SHARD_RULE = "splitmix64(row + key(shard, salt)) / 2^64 < share"  # models trained before 2026-12-07
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _key(text: str) -> np.uint64:
    digest = hashlib.sha256(text.encode()).digest()
    return np.uint64(int.from_bytes(digest[:8], "little"))


def _shard_key(shard: str, salt: int) -> np.uint64:
    return _key(f"kernelatlas-holdout:{int(salt)}:{shard}")


def layer_key(model_sha256: str, layer_index: int, salt: int) -> np.uint64:
    """The key of one layer: its model's corpus key (sha256) and its index among the model's layers."""
    return _key(f"kernelatlas-holdout:{int(salt)}:{model_sha256}:{int(layer_index)}")


def _check_share(share: float) -> None:
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the held-out share must be in [0, 1), got {share}")


def _below(z: np.ndarray, share: float) -> np.ndarray:
    """splitmix64 of each uint64, as a double in [0, 1), below ``share``."""
    with np.errstate(over="ignore"):
        z = z + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    # the top 53 bits as a double in [0, 1): exact, so the cut is the same on every platform
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)) < share


def heldout_rows(keys: Any, positions: Any, *, share: float) -> np.ndarray:
    """Whether each kernel is held out, given its layer's :func:`layer_key` and its row in the layer (arrays of
    one length, or a scalar key for one layer)."""
    _check_share(share)
    positions = np.asarray(positions, dtype=np.uint64)
    if share == 0.0 or positions.size == 0:
        return np.zeros(positions.shape, dtype=bool)
    with np.errstate(over="ignore"):
        return _below(positions + np.asarray(keys, dtype=np.uint64), share)


def heldout_mask(shard: str, start: int, stop: int, *, share: float, salt: int) -> np.ndarray:
    """:data:`SHARD_RULE` (models trained before 2026-12-07): whether each row ``start <= row < stop`` of
    ``shard`` (its path relative to the corpus, as in layers.parquet) is held out, as a bool array."""
    _check_share(share)
    n = max(int(stop) - int(start), 0)
    if share == 0.0 or n == 0:
        return np.zeros(n, dtype=bool)
    with np.errstate(over="ignore"):
        return _below(np.arange(start, stop, dtype=np.uint64) + _shard_key(shard, salt), share)


def layer_keys(corpus: Any, layers: Any, salt: int) -> np.ndarray:
    """:func:`layer_key` of each row of ``layers`` (a selection of ``corpus.layers``), as uint64 [n]."""
    if not len(layers):
        return np.zeros(0, np.uint64)
    sha = corpus.models.set_index("model_id")["sha256"].astype(str)
    first = corpus.layers.groupby("model_id")["layer_id"].min()
    return np.array([layer_key(sha[m], int(lid) - int(first[m]), salt)
                     for m, lid in zip(layers["model_id"].tolist(), layers["layer_id"].tolist(), strict=True)],
                    dtype=np.uint64)


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
    rule: str = RULE

    @property
    def by_layer(self) -> bool:
        """The split of :data:`RULE` (by model and layer); False: :data:`SHARD_RULE` (an older model)."""
        return self.rule == RULE

    def to_json(self) -> dict[str, Any]:
        return {"share": self.share, "salt": self.salt, "rule": self.rule, "shards": dict(self.shards),
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
                       models=None if models is None else tuple(int(m) for m in models),
                       rule=RULE if spec.get("rule") == RULE else SHARD_RULE)
        except (KeyError, TypeError, ValueError):
            return None

    def shard_in_pool(self, shard: str, sha256: str | None) -> bool:
        return shard in self.shards and (sha256 is None or self.shards[shard] == sha256)

    def model_in_pool(self, model_id: int) -> bool:
        return self.models is None or int(model_id) in self.models

    def layer_mask(self, key: Any, shard: str, row_start: int, rows: int) -> np.ndarray:
        """Whether each of the ``rows`` kernels of one layer (its :func:`layer_key` ``key`` under this split's
        salt; stored at ``row_start`` of ``shard``) is held out."""
        if self.by_layer:
            return heldout_rows(key, np.arange(rows, dtype=np.uint64), share=self.share)
        return heldout_mask(shard, row_start, row_start + rows, share=self.share, salt=self.salt)

    def row_mask(self, keys: np.ndarray, in_layer: np.ndarray, shard: str, rows: np.ndarray) -> np.ndarray:
        """Whether each kernel is held out, given per kernel its layer's key, its row in the layer and its row in
        ``shard``."""
        if self.by_layer:
            return heldout_rows(keys, in_layer, share=self.share)
        _check_share(self.share)
        if self.share == 0.0 or not len(rows):
            return np.zeros(len(rows), dtype=bool)
        return _below(np.asarray(rows, dtype=np.uint64) + _shard_key(shard, self.salt), self.share)

    def keys(self, corpus: Any, layers: Any) -> np.ndarray:
        """:func:`layer_keys` of ``layers`` under this split's salt."""
        return layer_keys(corpus, layers, self.salt)


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
