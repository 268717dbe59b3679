"""What every checkpoint loader hands to the corpus: a model as a list of conv layers in PyTorch layout.

A loader turns one file (or a live module) into a :class:`LoadedModel`; it never writes anything.  Weights are
returned as ``[c_out, c_in_per_group, kh, kw]`` arrays in PyTorch's layout and orientation whatever the source
format stores (TFLite ``[1, kh, kw, C]``, Keras ``[kh, kw, in, out]`` ...), so the same conv saved in any
format yields identical kernel rows (``weight.reshape(-1, kh * kw)``, C order).  Loaders run no code from
the file: torch checkpoints only with ``weights_only=True``, no pickle anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ConvLayer", "LoadedModel", "LoaderError", "classify_kind", "conv_depths"]

KINDS = ("depthwise", "grouped", "regular")


class LoaderError(ValueError):
    """A file that cannot be read as a checkpoint.  The message names the file (and layer) and what to do."""


def classify_kind(c_out: int, c_in_per_group: int, groups: int) -> str:
    """depthwise: groups == in_channels (> 1), any channel multiplier; grouped: 1 < groups < in_channels;
    regular: groups == 1 (a conv on a 1-channel input is regular, not depthwise)."""
    if groups <= 1:
        return "regular"
    if c_in_per_group == 1:
        return "depthwise"
    return "grouped"


@dataclass
class ConvLayer:
    """One 2-D convolution's weight and what is known of it.

    ``weight``: [c_out, c_in_per_group, kh, kw], float32 or float16 (as stored; other dtypes are converted to
    float32 by the loader).  ``groups``: exact when the format says it; for a bare state_dict a
    [C*m, 1, kh, kw] weight is taken as depthwise with groups = C*m / m unknown -> ``groups = c_out`` and
    ``kind_inferred = True``.  ``order``: the layer's position in the network (graph depth for ONNX/TFLite,
    index in the state_dict / module walk otherwise); the corpus turns it into ``depth``/``depth_norm``.
    """

    name: str
    weight: np.ndarray
    groups: int
    kind: str
    kind_inferred: bool
    order: float
    bn_folded: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # stride, dilation, ... when known

    def __post_init__(self) -> None:
        if self.weight.ndim != 4:
            raise ValueError(f"layer {self.name}: weight must be [c_out, c_in_per_group, kh, kw], got {self.weight.shape}")
        if self.kind not in KINDS:
            raise ValueError(f"layer {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def c_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def c_in_per_group(self) -> int:
        return int(self.weight.shape[1])

    @property
    def kh(self) -> int:
        return int(self.weight.shape[2])

    @property
    def kw(self) -> int:
        return int(self.weight.shape[3])

    def kernels(self) -> np.ndarray:
        """[c_out * c_in_per_group, kh * kw] rows, C order (every (out, in) slice is a kernel)."""
        return np.ascontiguousarray(self.weight).reshape(-1, self.kh * self.kw)


@dataclass
class LoadedModel:
    """One model read from one source.  ``format``: torch | safetensors | onnx | tflite | keras | module |
    filterdb.  ``weight_set``: which of several weight sets was taken (e.g. ``params_ema``), '' if only one.
    ``warnings``: things the user should hear about (skipped tensors, NaN weights ...), each naming the layer."""

    source_path: str
    format: str
    layers: list[ConvLayer]
    weight_set: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return Path(self.source_path).stem


def conv_depths(orders: list[float]) -> tuple[list[int], list[float]]:
    """depth = rank of each layer's order among the distinct orders of all conv layers; depth_norm = depth /
    (number of distinct orders - 1), 0 for a single depth (CNN Filter DB's conv_depth / conv_depth_norm)."""
    distinct = sorted(set(orders))
    rank = {o: i for i, o in enumerate(distinct)}
    depths = [rank[o] for o in orders]
    denom = max(len(distinct) - 1, 1)
    return depths, [d / denom for d in depths]
