"""`kernelatlas extract` and `kernelatlas info` as a user runs them: the real checkpoints of ../shared/weights,
a folder with unreadable files among good ones, files without convs, and exit statuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernelatlas.corpus import Corpus

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kernelatlas", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not WEIGHTS.is_dir(), reason="../shared/weights (the real checkpoints) is not present")
def test_extract_shared_weights_counts(tmp_path):
    out = tmp_path / "corpus"
    done = cli("extract", str(WEIGHTS), "--out", str(out), "--no-progress", "--meta", "dataset=mixed")
    assert done.returncode == 0, done.stderr
    c = Corpus.open(out)
    assert len(c.models) == 16 and (c.models["dataset"] == "mixed").all()
    lay = c.layers
    dw = lay[lay["kind"] == "depthwise"]
    # SOURCES.md: depthwise 3x3 and 5x5 kernels over all files
    assert int(dw.loc[(dw.kh == 3) & (dw.kw == 3), "rows"].sum()) == 18_570
    assert int(dw.loc[(dw.kh == 5) & (dw.kw == 5), "rows"].sum()) == 25_776
    assert int(lay.loc[lay["kind"] == "regular", "rows"].sum()) == 0          # not stored without --all-convs
    sr = c.models[c.models["name"] == "team18_SGSDN"].iloc[0]
    assert sr["weight_set"] == "params_ema"
    info = json.loads(cli("info", str(out), "--json").stdout)
    assert info["models"] == 16 and info["kernels_stored"] == 18_570 + 25_776
    again = cli("extract", str(WEIGHTS), "--out", str(out), "--no-progress")
    assert again.returncode == 0 and "added 0 model(s)" in again.stdout and "skipped 16" in again.stdout


def test_unreadable_files_are_named_and_others_extracted(tmp_path):
    from safetensors.numpy import save_file

    src = tmp_path / "zoo"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"dw.weight": rng.standard_normal((16, 1, 3, 3)).astype(np.float32)}, str(src / "good.safetensors"))
    save_file({"fc.weight": rng.standard_normal((4, 4)).astype(np.float32)}, str(src / "noconv.safetensors"))
    (src / "empty.pth").write_bytes(b"")
    (src / "sub" / "garbage.onnx").write_bytes(rng.bytes(1000))
    (src / "notes.txt").write_text("not a checkpoint: ignored in folders")
    out = tmp_path / "corpus"
    done = cli("extract", str(src), "--out", str(out), "--no-progress")
    assert done.returncode == 1
    assert "empty.pth" in done.stderr and "garbage.onnx" in done.stderr
    assert "noconv.safetensors holds no conv layer" in done.stderr
    c = Corpus.open(out)
    assert sorted(c.models["name"]) == ["good", "noconv"]
    assert int(c.layers["rows"].sum()) == 16
    # the rerun reads only what failed, and the corpus is unchanged
    manifest = (out / "manifest.json").read_bytes()
    again = cli("extract", str(src), "--out", str(out), "--no-progress")
    assert again.returncode == 1 and "added 0 model(s)" in again.stdout
    assert (out / "manifest.json").read_bytes() == manifest


def test_missing_source_and_bad_options(tmp_path):
    (tmp_path / "dangling.pth").symlink_to(tmp_path / "gone.pth")   # listed, but cannot be read
    (tmp_path / "empty_folder").mkdir()
    done = cli("extract", str(tmp_path / "nope.pth"), str(tmp_path / "dangling.pth"), str(tmp_path / "empty_folder"),
               "--out", str(tmp_path / "c"), "--no-progress")
    assert done.returncode == 1 and "nope.pth" in done.stderr and "dangling.pth" in done.stderr
    assert "no checkpoint file" in done.stderr and "empty_folder" in done.stderr
    c = Corpus.open(tmp_path / "c")                       # nothing read: still a valid, empty corpus
    assert len(c.models) == 0 and (tmp_path / "c" / "models.parquet").is_file()
    assert (tmp_path / "c" / "layers.parquet").is_file()
    bad = cli("extract", str(tmp_path), "--out", str(tmp_path / "c"), "--meta", "novalue")
    assert bad.returncode != 0 and "KEY=VALUE" in bad.stderr
    missing = cli("info", str(tmp_path / "absent"))
    assert missing.returncode == 1 and "not a kernelatlas corpus" in missing.stderr


ARCH_MODULE = '''
from torch import nn


def tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, groups=8), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 5, groups=4))
'''


def test_extract_with_architecture_and_bn_folding(tmp_path):
    torch = pytest.importorskip("torch")
    (tmp_path / "tinyarch.py").write_text(ARCH_MODULE)
    import importlib
    import sys as _sys

    _sys.path.insert(0, str(tmp_path))
    try:
        net = importlib.import_module("tinyarch").tiny()
    finally:
        _sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "tiny.pth")
    out = tmp_path / "c"
    done = subprocess.run([sys.executable, "-m", "kernelatlas", "extract", str(tmp_path / "tiny.pth"), "--out", str(out),
                           "--arch", "python:tinyarch:tiny", "--fold-bn", "--all-convs", "--no-progress"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    lay = Corpus.open(out).layers
    # exact kinds (a bare state_dict could not tell the grouped convs from regular ones)
    assert list(lay["kind"]) == ["regular", "depthwise", "grouped"]
    assert not lay["kind_inferred"].any() and list(lay["groups"]) == [1, 8, 4]
    assert list(lay["bn_folded"]) == [True, True, False]
    # the same file without --arch: kinds are inferred ([C*m, 1, k, k] -> depthwise), the grouped conv looks regular
    plain = cli("extract", str(tmp_path / "tiny.pth"), "--out", str(tmp_path / "p"), "--all-convs", "--no-progress")
    assert plain.returncode == 0
    lay2 = Corpus.open(tmp_path / "p").layers
    assert lay2["kind_inferred"].all() and list(lay2["kind"]) == ["regular", "depthwise", "regular"]
    bad = cli("extract", str(tmp_path / "tiny.pth"), "--out", str(tmp_path / "q"), "--fold-bn")
    assert bad.returncode == 1 and "--arch" in bad.stderr
