"""Checkpoint loaders, one module per format family, behind one entry point :func:`load_file`.

| format | module | files |
|---|---|---|
| PyTorch | torch_checkpoint | .pth .pt .bin .ckpt (torch.load, weights_only=True), .safetensors (sharded too) |
| live modules | torch_module | torch.nn.Module (Python API: exact groups, optional BN folding) |
| ONNX | onnx_model | .onnx |
| TFLite | tflite_model | .tflite |
| Keras | keras_model | .h5 (Keras 2), .weights.h5 / .keras (Keras 3) |
| CNN Filter DB | filterdb | dataset.h5 (import / export of the whole database; not a per-model checkpoint) |
"""

from __future__ import annotations

from pathlib import Path

from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel, LoaderError, classify_kind, conv_depths

__all__ = [
    "SUFFIXES",
    "ConvLayer",
    "LoadedModel",
    "LoaderError",
    "classify_kind",
    "conv_depths",
    "is_checkpoint",
    "load_file",
    "source_files",
]

# suffix -> format family
SUFFIXES = {
    ".pth": "torch", ".pt": "torch", ".bin": "torch", ".ckpt": "torch", ".safetensors": "safetensors",
    ".onnx": "onnx", ".tflite": "tflite", ".h5": "keras", ".hdf5": "keras", ".keras": "keras",
}


def _family(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".safetensors.index.json", ".bin.index.json")):
        return "safetensors"  # sharded sets (safetensors or torch .bin shards) are read through their index
    return SUFFIXES.get(path.suffix.lower())


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` has a suffix some loader reads (shards of a sharded safetensors set count once,
    through their index file, when one exists)."""
    family = _family(path)
    if path.suffix.lower() in (".safetensors", ".bin"):
        pattern = "*.safetensors.index.json" if path.suffix.lower() == ".safetensors" else "*.bin.index.json"
        return not any(path.parent.glob(pattern))  # a shard of an indexed set: read once, via the index
    return family is not None


def source_files(path: str | Path) -> list[Path]:
    """Every file besides ``path`` whose bytes loading ``path`` reads: an ONNX model's external-data files, the
    shards of a sharded safetensors set.  A model's identity must cover them all -- two ONNX files that differ
    only in their external data are two models."""
    p = Path(path)
    family = _family(p)
    if family == "onnx":
        from kernelatlas.corpus.loaders import onnx_model

        return onnx_model.external_files(p)
    if family == "safetensors":
        from kernelatlas.corpus.loaders import torch_checkpoint

        try:
            shards, _ = torch_checkpoint._resolve_shards(p)
        except LoaderError:
            return []  # the loader reports it
        return sorted({s.resolve() for s in shards} - {p.resolve()})
    return []


def load_file(path: str | Path, *, weight_set: str | None = None) -> LoadedModel:
    """Read one checkpoint file into a :class:`LoadedModel`.  Raises :class:`LoaderError` (naming the file
    and the fix) for anything that is not a readable checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise LoaderError(f"{p}: no such file")
    family = _family(p)
    if family is None:
        raise LoaderError(f"{p}: unknown checkpoint type {p.suffix!r}; kernelatlas reads "
                          f"{', '.join(sorted(set(SUFFIXES)))} and *.safetensors.index.json")
    if p.stat().st_size == 0:
        raise LoaderError(f"{p}: the file is empty")
    if family == "torch":
        from kernelatlas.corpus.loaders import torch_checkpoint

        return torch_checkpoint.load(p, weight_set=weight_set)
    if family == "safetensors":
        from kernelatlas.corpus.loaders import torch_checkpoint

        return torch_checkpoint.load_safetensors(p, weight_set=weight_set)
    if family == "onnx":
        from kernelatlas.corpus.loaders import onnx_model

        return onnx_model.load(p)
    if family == "tflite":
        from kernelatlas.corpus.loaders import tflite_model

        return tflite_model.load(p)
    from kernelatlas.corpus.loaders import keras_model

    return keras_model.load(p)
