"""What every checkpoint loader hands to the corpus: a model as a list of conv layers in PyTorch layout.

A loader turns one file (or a live module) into a :class:`LoadedModel`; it never writes anything.  Weights are
returned as ``[c_out, c_in_per_group, kh, kw]`` arrays in PyTorch's layout and orientation whatever the source
format stores (TFLite ``[1, kh, kw, C]``, Keras ``[kh, kw, in, out]`` ...), so the same conv saved in any
format yields identical kernel rows (``weight.reshape(-1, kh * kw)``, C order).  Loaders run no code from
the file: torch checkpoints only with ``weights_only=True``, no pickle anywhere else.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ConvLayer", "LoadedModel", "LoaderError", "check_finite", "classify_kind", "conv_depths", "graph_depths",
           "unique_name"]

KINDS = ("depthwise", "grouped", "regular")


class LoaderError(ValueError):
    """A file that cannot be read as a checkpoint.  The message names the file (and layer) and what to do."""


MIN_SAFE_TORCH = (2, 10)  # weights_only=True had code-execution bypasses before (CVE-2025-32434 and later)


def safe_torch_load(path: Path, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True, ...)``, refused outright on a torch older than 2.10: there the
    weights-only unpickler could be made to run code (CVE-2025-32434 and a 2026 advisory), so an untrusted
    checkpoint must not reach it."""
    import torch

    found = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if found < MIN_SAFE_TORCH:
        raise LoaderError(f"{path}: not read: torch {torch.__version__} is installed, and torch.load(weights_only="
                          "True) before torch 2.10 can be made to execute code by a crafted file (CVE-2025-32434 "
                          "and later advisories).  Upgrade: pip install 'torch>=2.10'")
    return torch.load(path, map_location="cpu", weights_only=True, **kwargs)


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
            raise ValueError(f"layer {self.name}: weight must be [c_out, c_in_per_group, kh, kw], got "
                             f"{self.weight.shape}")
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


def check_finite(weight: np.ndarray, where: str, warnings: list[str]) -> None:
    """Warn (naming ``where``, i.e. file and layer) when kernels hold NaN/Inf; they are kept, never dropped:
    the engine labels them -1 and the corpus counts them."""
    kernels = weight.reshape(weight.shape[0] * weight.shape[1], -1)
    bad = int(np.count_nonzero(~np.isfinite(kernels).all(axis=1)))
    if bad:
        warnings.append(f"{where}: {bad} of {len(kernels)} kernels hold NaN/Inf (kept; the engine labels them -1)")


def unique_name(name: str, taken: set[str], next_suffix: dict[str, int] | None = None) -> str:
    """``name``, or ``name#2``, ``name#3``... when a layer of that name exists already (records ``taken``).
    ``next_suffix`` (a dict kept across calls) remembers the last suffix per name, so a file naming 10^5 convs
    alike costs 10^5 steps, not 10^10."""
    if name not in taken:
        taken.add(name)
        return name
    n = 1 if next_suffix is None else next_suffix.get(name, 1)
    while True:
        n += 1
        candidate = f"{name}#{n}"
        if candidate not in taken:
            break
    if next_suffix is not None:
        next_suffix[name] = n
    taken.add(candidate)
    return candidate


def graph_depths(
    node_inputs: Sequence[Sequence[Hashable]],
    node_outputs: Sequence[Sequence[Hashable]],
    graph_inputs: set,
) -> list[int | None]:
    """Longest path, counted in nodes, from any graph input to each node (a node fed by a graph input has
    depth 1); None for nodes that no graph input reaches (constant folding chains).  Raises ValueError on a
    cycle.  Kahn's algorithm, so node order in the file does not matter."""
    producer: dict[Hashable, int] = {}
    for i, outs in enumerate(node_outputs):
        for tensor in outs:
            producer[tensor] = i
    n = len(node_inputs)
    users: list[list[int]] = [[] for _ in range(n)]
    waiting = [0] * n
    for i, ins in enumerate(node_inputs):
        for j in {producer[t] for t in ins if t in producer}:
            if j == i:
                raise ValueError(f"node {i} consumes its own output; the graph is cyclic")
            users[j].append(i)
            waiting[i] += 1
    queue = deque(i for i in range(n) if waiting[i] == 0)
    depths: list[int | None] = [None] * n
    done = 0
    while queue:
        i = queue.popleft()
        done += 1
        best = None
        for tensor in node_inputs[i]:
            d = depths[producer[tensor]] if tensor in producer else (0 if tensor in graph_inputs else None)
            if d is not None and (best is None or d > best):
                best = d
        depths[i] = None if best is None else best + 1
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                queue.append(u)
    if done != n:
        raise ValueError(f"the graph has a cycle ({n - done} nodes never become ready)")
    return depths
