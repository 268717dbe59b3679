"""The autoencoder of the paper pipeline, as the engine runs it: an MLP d -> h1 -> ... -> 1 -> ... -> d with a
one-dimensional code, plus the cluster intervals on the code axis.

Weights live in a model directory (DESIGN.md): ``autoencoder.safetensors`` (float32 tensors
``encoder.{i}.weight`` / ``encoder.{i}.bias`` / ``decoder.{i}...`` for the i-th Linear layer of each side),
``model.json`` (kernel size, layer widths and activations, preprocessing, training record) and optionally
``clusters.json`` (code intervals -> names).  Loading needs neither torch nor pickle; ``from_torch`` converts
two ``nn.Sequential`` stacks of Linear + activation modules.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas import _core
from kernelatlas._files import atomic_write as _atomic_write
from kernelatlas.engine import _back, _on_host, thread_count

__all__ = ["ACTIVATIONS", "Autoencoder", "Dense"]

ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh", "gelu", "gelu_tanh")
FORMAT = "kernelatlas-autoencoder"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Dense:
    """One Linear layer and the activation after it: weight [out, in] (torch layout), bias [out]."""

    weight: np.ndarray
    bias: np.ndarray
    activation: str = "identity"

    def __post_init__(self) -> None:
        w = np.ascontiguousarray(self.weight, dtype=np.float32)
        b = np.ascontiguousarray(self.bias, dtype=np.float32)
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise ValueError(f"Dense layer: weight must be [out, in] and bias [out], got {w.shape} and {b.shape}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}: use one of {', '.join(ACTIVATIONS)}")
        object.__setattr__(self, "weight", w)
        object.__setattr__(self, "bias", b)


@dataclass
class Autoencoder:
    """Encoder and decoder layers, kernel size, optional cluster intervals [(lo, hi), ...] with names.

    Intervals are [lo, hi) except the last, which is closed (a code of exactly its hi belongs to it); they
    must be sorted and must not overlap.  Without intervals, every kernel that passes the threshold gets
    label 0.
    """

    encoder: list[Dense]
    decoder: list[Dense]
    kernel_size: int
    clusters: list[tuple[float, float]] | None = None
    cluster_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # clusters.json as read (prototypes, colours, template matches, thresholds...): written back by save()
    # for every interval whose (lo, hi) is unchanged, so load + save never loses what `clusters` wrote
    cluster_spec: dict[str, Any] | None = None
    _engine_cache: Any = field(default=None, init=False, repr=False, compare=False)
    _gpu_cache: Any = field(default=None, init=False, repr=False, compare=False)  # kernelatlas.gpu's upload
    _margins_cache: dict[str, tuple[float, float]] = field(default_factory=dict, init=False, repr=False,
                                                           compare=False)

    def __post_init__(self) -> None:
        d = self.d
        if not self.encoder or self.encoder[0].weight.shape[1] != d:
            raise ValueError(f"the encoder must take {d} inputs for {self.kernel_size}x{self.kernel_size} kernels")
        if self.clusters is not None:
            self.clusters = [(float(lo), float(hi)) for lo, hi in self.clusters]
            if self.cluster_names is None:
                self.cluster_names = [f"cluster_{i}" for i in range(len(self.clusters))]
            if len(self.cluster_names) != len(self.clusters):
                raise ValueError("cluster_names must name every interval")
        _ = self._engine  # validate now (shapes, widths, intervals), not at the first call

    # ------------------------------------------------------------------ properties
    @property
    def d(self) -> int:
        return self.kernel_size * self.kernel_size

    @property
    def code_activation(self) -> str:
        return self.encoder[-1].activation

    @property
    def piecewise_linear(self) -> bool:
        """True when the decoder is exactly a table of linear segments in the code (ReLU/identity only)."""
        return bool(self._engine.piecewise_linear)

    @property
    def n_segments(self) -> int:
        return int(self._engine.n_segments)

    def _engine_args(self) -> tuple[int, list, list, list[float], list[float]]:
        """The native model's constructor arguments (d, encoder, decoder, interval lows, interval highs), the same
        for the CPU engine and the GPU module."""
        lo, hi = _float32_bounds(self.clusters or [])
        return (self.d, [(L.weight, L.bias, L.activation) for L in self.encoder],
                [(L.weight, L.bias, L.activation) for L in self.decoder], lo, hi)

    @property
    def _engine(self) -> _core.AutoencoderEngine:
        if self._engine_cache is None:
            self._engine_cache = _core.AutoencoderEngine(*self._engine_args())
        return self._engine_cache

    def with_clusters(self, clusters: Sequence[tuple[float, float]], names: Sequence[str] | None = None) -> Autoencoder:
        """The same network with other cluster intervals."""
        return Autoencoder(self.encoder, self.decoder, self.kernel_size, list(clusters),
                           list(names) if names else None, dict(self.info))

    # ------------------------------------------------------------------ inference
    def encode(
        self,
        x: np.ndarray,
        *,
        min_abs: float = 0.0,
        threads: int | None = None,
        out: np.ndarray | None = None,
        precision: str = "fp32",
        device: str = "auto",
    ) -> np.ndarray:
        """Normalise kernels [n, d] / [n, k, k] and encode them: codes float32 [n] (NaN for dead/flat/non-finite).
        ``precision``: 'fp32' (default), 'bf16' (opt-in, AVX512_BF16 CPUs) or 'tf32' (opt-in, GPU tensor cores);
        see :func:`kernelatlas.assign`.  ``device``: 'cpu', 'cuda' or 'auto', as for :func:`kernelatlas.assign`."""
        from kernelatlas import gpu

        where, dev_in = gpu.resolve(device, x)
        gpu.check_precision(where, precision)
        if where == "cuda":
            return gpu.encode(self, x, dev_in, out, float(min_abs), precision)
        codes = self._engine.encode(_on_host(dev_in, x), out=out, min_abs=float(min_abs),
                                    threads=thread_count(threads), precision=precision)
        return _back(dev_in, (codes,))[0]

    def bf16_margins(self, decoder: str = "auto") -> tuple[float, float]:
        """The recheck margins of ``precision='bf16'`` for this model: (code, score) = twice the 90th percentile
        of the deviation of bf16 from fp32 in code and in score over a calibration set of 8,192 kernels -- the
        model's decoded patterns at codes spread over its interval span, with Gaussian noise of 0-50% of their
        spread, and standard normal kernels.  Rows whose bf16 code lies within the code margin of an interval
        edge, or whose score within the score margin of the threshold, are recomputed in fp32.  (Margins from the
        largest deviation recheck 70-95% of the rows of a trained model -- slower than fp32; these recheck 4-11%
        and keep >= 99.96% of labels, BENCHMARKS.md "Reduced precision".)  Cached per decoder."""
        return self._margins("bf16", decoder)

    def tf32_margins(self, decoder: str = "auto") -> tuple[float, float]:
        """The recheck margins of ``precision='tf32'`` on the GPU, calibrated as :meth:`bf16_margins` is, from
        the TF32 path's own deviation (run on the GPU with no recheck).  Rows near a decision are recomputed with
        the exact first layer on the GPU.  Cached per decoder."""
        return self._margins("tf32", decoder)

    def _calibration_set(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        noise = rng.standard_normal((4096, self.d)).astype(np.float32)
        if self.clusters:
            lo, hi = self.clusters[0][0], self.clusters[-1][1]
        else:
            codes = self.encode(noise, device="cpu")
            lo, hi = float(np.nanmin(codes)), float(np.nanmax(codes))
        pat = self.decode(np.linspace(lo, hi, 1024, dtype=np.float32))
        spread = pat.std(axis=1, keepdims=True)
        return np.concatenate([pat + level * spread * rng.standard_normal(pat.shape).astype(np.float32)
                               for level in (0.0, 0.05, 0.2, 0.5)] + [noise]).astype(np.float32)

    def _margins(self, precision: str, decoder: str) -> tuple[float, float]:
        key = f"{precision}:{decoder}"
        if key not in self._margins_cache:
            calib = self._calibration_set()
            ref = self._engine.assign(calib, threshold=-1.0, decoder=decoder, threads=thread_count(None))
            if precision == "bf16":
                low = self._engine.assign(calib, threshold=-1.0, decoder=decoder, threads=thread_count(None),
                                          precision="bf16")
            else:
                from kernelatlas import gpu

                low = gpu.device_autoencoder(self).assign_host(calib, threshold=-1.0, decoder=decoder,
                                                               precision="tf32")
            live = ~np.isnan(ref[2])
            dz = float(np.quantile(np.abs(low[2][live] - ref[2][live]), 0.9)) if live.any() else 0.0
            ds = float(np.quantile(np.abs(low[1][live] - ref[1][live]), 0.9)) if live.any() else 0.0
            self._margins_cache[key] = (2.0 * dz, 2.0 * ds)
        return self._margins_cache[key]

    def decode(self, codes: np.ndarray, *, threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Decode codes float32 [n] into patterns [n, d] (rows of NaN for non-finite codes)."""
        return self._engine.decode(codes, out=out, threads=thread_count(threads))

    def reconstruct(
        self, x: np.ndarray, *, min_abs: float = 0.0, threads: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """decode(encode(x)): the model's reconstruction of each normalised kernel, [n, d]."""
        return self._engine.reconstruct(x, out=out, min_abs=float(min_abs), threads=thread_count(threads))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_torch(
        cls,
        encoder: Any,
        decoder: Any,
        *,
        clusters: Sequence[tuple[float, float]] | None = None,
        names: Sequence[str] | None = None,
    ) -> Autoencoder:
        """Convert two ``torch.nn.Sequential`` of Linear layers, each optionally followed by one activation
        module (ReLU, GELU, Tanh, Sigmoid, Identity)."""
        enc = _layers_from_torch(encoder, "encoder")
        dec = _layers_from_torch(decoder, "decoder")
        d = enc[0].weight.shape[1]
        k = math.isqrt(d)
        if k * k != d:
            raise ValueError(f"the encoder takes {d} inputs, which is not a square kernel (9, 25, 49, ...)")
        return cls(enc, dec, k, list(clusters) if clusters is not None else None, list(names) if names else None)

    def to_torch(self) -> tuple[Any, Any]:
        """The same network as two ``torch.nn.Sequential`` (for training or as a reference)."""
        import torch
        from torch import nn

        def build(layers: list[Dense]) -> nn.Sequential:
            mods: list[nn.Module] = []
            for L in layers:
                lin = nn.Linear(L.weight.shape[1], L.weight.shape[0])
                with torch.no_grad():
                    lin.weight.copy_(torch.from_numpy(L.weight))
                    lin.bias.copy_(torch.from_numpy(L.bias))
                mods.append(lin)
                if L.activation != "identity":
                    mods.append(torch_activation(L.activation))
            return nn.Sequential(*mods)

        return build(self.encoder), build(self.decoder)

    # ------------------------------------------------------------------ model directory
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write autoencoder.safetensors, model.json and (with clusters) clusters.json into directory ``path``."""
        from safetensors.numpy import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {}
        for side, layers in (("encoder", self.encoder), ("decoder", self.decoder)):
            for i, L in enumerate(layers):
                tensors[f"{side}.{i}.weight"] = L.weight
                tensors[f"{side}.{i}.bias"] = L.bias
        _atomic_write(out / "autoencoder.safetensors", lambda p: save_file(tensors, str(p)))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kernel_size": self.kernel_size,
            "d": self.d,
            "encoder": [_layer_meta(L) for L in self.encoder],
            "decoder": [_layer_meta(L) for L in self.decoder],
            "code_activation": self.code_activation,
            "preprocessing": "center_l2",
            **{k: v for k, v in self.info.items() if k not in ("encoder", "decoder", "kernel_size", "d")},
        }
        _atomic_write_text(out / "model.json", json.dumps(meta, indent=2))
        if self.clusters is not None:
            assert self.cluster_names is not None
            previous = self.cluster_spec or {}
            extras = {(float(iv["lo"]), float(iv["hi"])): iv for iv in previous.get("intervals", [])}
            spec = {k: v for k, v in previous.items() if k != "intervals"}
            spec["intervals"] = [
                {**extras.get((lo, hi), {}), "lo": lo, "hi": hi, "name": name}
                for (lo, hi), name in zip(self.clusters, self.cluster_names, strict=True)
            ]
            spec.setdefault("note", "intervals are [lo, hi) on the code axis; the last is closed at hi")
            _atomic_write_text(out / "clusters.json", json.dumps(spec, indent=2))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Autoencoder:
        """Read a model directory written by :meth:`save` (or by ``kernelatlas train``)."""
        from safetensors.numpy import load_file

        root = Path(path)
        meta_path, weights_path = root / "model.json", root / "autoencoder.safetensors"
        for p in (meta_path, weights_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found: {root} is not a kernelatlas model directory "
                                        "(train one with `kernelatlas train`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta['format_version']} is newer than this kernelatlas "
                             f"reads ({FORMAT_VERSION}): upgrade kernelatlas")
        tensors = load_file(str(weights_path))

        def side(name: str) -> list[Dense]:
            layers = []
            for i, spec in enumerate(meta[name]):
                try:
                    w, b = tensors[f"{name}.{i}.weight"], tensors[f"{name}.{i}.bias"]
                except KeyError as exc:
                    raise ValueError(f"{weights_path}: missing tensor {exc.args[0]}") from None
                if w.shape != (spec["out"], spec["in"]):
                    raise ValueError(f"{weights_path}: {name}.{i}.weight is {w.shape}, model.json says "
                                     f"({spec['out']}, {spec['in']})")
                layers.append(Dense(w, b, spec["activation"]))
            return layers

        clusters = names = spec = None
        cpath = root / "clusters.json"
        if cpath.is_file():
            spec = json.loads(cpath.read_text())
            ivs = spec.get("intervals", [])
            clusters = [(float(iv["lo"]), float(iv["hi"])) for iv in ivs]
            names = [str(iv.get("name", f"cluster_{i}")) for i, iv in enumerate(ivs)]
        info = {k: v for k, v in meta.items() if k not in ("encoder", "decoder")}
        return cls(side("encoder"), side("decoder"), int(meta["kernel_size"]), clusters, names, info, spec)


def _float32_bounds(intervals: Sequence[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Interval edges as float32 values that give exactly the real-number comparisons for float32 codes:
    ``z >= lo`` and ``z < hi`` hold for a float32 z iff they hold against the float32 edge rounded up;
    the closed last ``z <= hi`` iff against hi rounded down.  (Plain rounding to nearest would put a code of
    float32(0.7) = 0.69999999 inside [0.7, ...).)"""
    lo32: list[float] = []
    hi32: list[float] = []
    for i, (lo, hi) in enumerate(intervals):
        lo_f, hi_f = np.float32(lo), np.float32(hi)
        if float(lo_f) < lo:
            lo_f = np.nextafter(lo_f, np.float32(np.inf))
        last = i == len(intervals) - 1
        if not last and float(hi_f) < hi:
            hi_f = np.nextafter(hi_f, np.float32(np.inf))
        if last and float(hi_f) > hi:
            hi_f = np.nextafter(hi_f, np.float32(-np.inf))
        lo32.append(float(lo_f))
        hi32.append(float(hi_f))
    return lo32, hi32


def _layer_meta(L: Dense) -> dict[str, Any]:
    return {"in": int(L.weight.shape[1]), "out": int(L.weight.shape[0]), "activation": L.activation}


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: Path(p).write_text(text))


def torch_activation(name: str) -> Any:
    from torch import nn

    return {
        "relu": nn.ReLU(),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
        "gelu": nn.GELU(),
        "gelu_tanh": nn.GELU(approximate="tanh"),
        "identity": nn.Identity(),
    }[name]


def _layers_from_torch(seq: Any, side: str) -> list[Dense]:
    from torch import nn

    names = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Identity: "identity"}
    layers: list[Dense] = []
    pending: nn.Linear | None = None
    act = "identity"

    def flush() -> None:
        nonlocal pending, act
        if pending is not None:
            w = pending.weight.detach().cpu().float().numpy()
            b = (pending.bias.detach().cpu().float().numpy() if pending.bias is not None
                 else np.zeros(w.shape[0], np.float32))
            layers.append(Dense(w, b, act))
        pending, act = None, "identity"

    for i, mod in enumerate(seq):
        if isinstance(mod, nn.Linear):
            flush()
            pending = mod
            continue
        if pending is None:
            raise ValueError(f"{side}[{i}] ({type(mod).__name__}) comes before any Linear layer")
        if act != "identity":
            raise ValueError(f"{side}[{i}]: two activations in a row after one Linear layer")
        if isinstance(mod, nn.GELU):
            act = "gelu" if mod.approximate == "none" else "gelu_tanh"
        elif type(mod) in names:
            act = names[type(mod)]
        else:
            raise ValueError(f"{side}[{i}] is {type(mod).__name__}: the engine runs Linear layers with ReLU, GELU, "
                             "Tanh, Sigmoid or Identity activations only")
    flush()
    if not layers:
        raise ValueError(f"{side} holds no Linear layer")
    return layers
