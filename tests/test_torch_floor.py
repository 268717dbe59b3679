"""Untrusted torch files are refused outright on a torch whose weights_only unpickler had code-execution
bypasses (before 2.10), through every path that calls torch.load (issue 12, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from kernelatlas.corpus.loaders import torch_checkpoint
from kernelatlas.corpus.loaders.base import LoaderError
from kernelatlas.jobs.extract import extract


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "net.pth"
    torch.save({"conv.weight": torch.randn(8, 1, 3, 3)}, path)
    return path


@pytest.mark.parametrize("version", ["2.9.1", "2.5.0+cpu", "1.13.1"])
def test_old_torch_is_refused_with_the_reason(checkpoint, monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(LoaderError, match=r"CVE-2025-32434.*pip install 'torch>=2.10'"):
        torch_checkpoint.load(checkpoint)


def test_old_torch_fails_the_file_not_the_extract(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    result = extract([str(checkpoint)], tmp_path / "corpus", progress=False)
    assert [Path(p).name for p, _ in result.failed] == ["net.pth"]
    assert "torch 2.9.1" in result.failed[0][1]


def test_current_torch_reads_the_file(checkpoint):
    assert tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10)
    model = torch_checkpoint.load(checkpoint)
    assert [layer.name for layer in model.layers] == ["conv.weight"]
