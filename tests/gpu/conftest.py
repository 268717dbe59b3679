"""tests/gpu/: real device runs of the CUDA backend against the CPU engine.  Every test here is marked ``gpu``
and skipped, with the reason, when no GPU is usable (the CUDA module not built, no device visible); on a
machine with one, ``bash scripts/gpu-check.sh`` builds the package and runs them with the GPU benchmark."""

from __future__ import annotations

import pytest

from kernelatlas import gpu


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ok, why = gpu._probe()
    for item in items:
        if "/tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not ok:
                item.add_marker(pytest.mark.skip(reason=f"no usable GPU: {why}"))
