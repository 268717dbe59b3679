"""kernelatlas: recurring patterns and quality of the trained convolution kernels of public CNNs, at scale.

The heavy lifting is done by a native engine (``kernelatlas._core``: C++ with per-ISA SIMD kernels and
OpenMP threads); this package is the thin, typed layer over it.  Start with :func:`assign`,
:class:`Autoencoder` and :func:`normalize`; ``kernelatlas --help`` lists the command-line jobs.
"""

from __future__ import annotations

from kernelatlas._version import __version__
from kernelatlas.autoencoder import Autoencoder
from kernelatlas.corpus import Corpus
from kernelatlas.engine import (
    assign,
    assign_prototypes,
    build_info,
    normalize,
    set_isa,
)

_LAZY = {  # need torch, pandas or matplotlib: imported on first use, so `import kernelatlas` stays light
    "train": ("kernelatlas.jobs.train", "train"),
    "clusters": ("kernelatlas.jobs.clusters", "clusters"),
    "quality": ("kernelatlas.jobs.quality", "quality"),
    "shift": ("kernelatlas.jobs.shift", "shift"),
}


def __getattr__(name: str):  # PEP 562
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'kernelatlas' has no attribute {name!r}")


__all__ = [
    "Autoencoder",
    "Corpus",
    "__version__",
    "assign",
    "assign_prototypes",
    "build_info",
    "clusters",
    "normalize",
    "quality",
    "set_isa",
    "shift",
    "train",
]
