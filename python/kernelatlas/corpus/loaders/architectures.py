"""Weights files read through their architecture: build the network locally (timm, torchvision, or any
callable of yours), load the file's tensors into it, then walk it as a live module.  Unlike a bare
state_dict, this knows every conv's groups exactly (kind_inferred = false) and can fold BatchNorm.

``--arch`` specs: ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``), ``torchvision:NAME``
(``torchvision.models.get_model(NAME, weights=None)``), ``python:MODULE:CALLABLE`` (a callable of your own
returning an ``nn.Module``; importing MODULE runs your code, which you asked for -- the *weights file* is
still read with ``weights_only=True`` and never runs anything).  timm and torchvision are optional: install
them to use their specs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from kernelatlas.corpus.loaders.base import LoadedModel, LoaderError, safe_torch_load

__all__ = ["build_architecture", "load_with_architecture"]

# wrapper keys holding the weights, best first (EMA weights are what such checkpoints are evaluated with)
_WRAPPERS = ("params_ema", "model_ema", "state_dict_ema", "ema", "state_dict", "model", "params", "net")


def build_architecture(spec: str) -> Any:
    """An untrained ``nn.Module`` for ``spec`` (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "timm":
            timm = importlib.import_module("timm")
            return timm.create_model(rest, pretrained=False)
        if kind == "torchvision":
            models = importlib.import_module("torchvision.models")
            return models.get_model(rest, weights=None)
        if kind == "python":
            module_name, _, attr = rest.partition(":")
            if not module_name or not attr:
                raise ValueError(f"--arch {spec}: write python:MODULE:CALLABLE")
            return getattr(importlib.import_module(module_name), attr)()
    except ImportError as exc:
        raise ValueError(f"--arch {spec}: {exc.name or exc} is not installed (pip install {kind})") from None
    raise ValueError(f"--arch {spec}: use timm:NAME, torchvision:NAME or python:MODULE:CALLABLE")


def _state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        obj = safe_torch_load(path)
    except LoaderError:
        raise
    except Exception as exc:  # torch raises many types for refused or broken pickles
        raise LoaderError(f"{path}: torch.load(weights_only=True) refused or failed: {exc}") from None
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _WRAPPERS if k in obj), None)
        if key is None:
            raise LoaderError(f"{path}: no state_dict found (top-level keys: {', '.join(map(str, list(obj)[:8]))})")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise LoaderError(f"{path}: holds {type(obj).__name__}, not a state_dict")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_with_architecture(path: str | Path, spec: str, *, fold_bn: bool = False) -> LoadedModel:
    """Build ``spec``, load the weights of ``path`` into it (strictly: every tensor must fit), and read its
    convs as a live module."""
    from kernelatlas.corpus.loaders.torch_module import load_module

    p = Path(path)
    module = build_architecture(spec)
    state = _state_dict(p)
    missing, unexpected = [], []
    try:
        result = module.load_state_dict(state, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as exc:  # shape mismatches
        raise LoaderError(f"{p}: its weights do not fit --arch {spec}: {str(exc).splitlines()[0]}") from None
    if missing or unexpected:
        raise LoaderError(f"{p}: its weights do not fit --arch {spec}: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]} -- check the architecture name")
    module.eval()
    model = load_module(module, name=p.stem, fold_bn=fold_bn)
    model.source_path = str(p)
    model.meta["architecture"] = spec
    return model
