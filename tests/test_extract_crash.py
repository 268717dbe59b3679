"""kill -9 during `kernelatlas extract` never damages the committed corpus, and a rerun completes it.

A real extract subprocess (committing after almost every model) is killed with SIGKILL at random moments;
after every kill the corpus must open, hold only whole models whose kernels equal their source files, and a
final rerun must leave every model exactly once, identical to an uninterrupted extraction."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from kernelatlas.corpus import Corpus

N_FILES = 80


def make_checkpoints(folder, n=N_FILES):
    folder.mkdir()
    rng = np.random.default_rng(7)
    expected = {}
    for i in range(n):
        tensors = {
            f"blocks.{j}.dw.weight": rng.standard_normal((64 * (j + 1), 1, 3 if j % 2 == 0 else 5,
                                                           3 if j % 2 == 0 else 5)).astype(np.float32)
            for j in range(6)
        }
        tensors["head.weight"] = rng.standard_normal((10, 64)).astype(np.float32)
        name = f"model{i:03d}"
        safetensors_numpy.save_file(tensors, str(folder / f"{name}.safetensors"))
        expected[name] = tensors
    return expected


def _generation_models(root) -> int:
    try:
        return json.loads((root / "manifest.json").read_text())["n_models"]
    except (OSError, ValueError, KeyError):
        return 0


def extract_cmd(src, out):
    return [sys.executable, "-m", "kernelatlas", "extract", str(src), "--out", str(out), "--no-progress",
            "--commit-rows", "1"]


def check_consistent(root, expected):
    c = Corpus.open(root)
    models = c.models
    assert models["sha256"].is_unique and models["name"].is_unique
    assert list(models["model_id"]) == list(range(len(models)))
    layers = c.layers
    assert list(layers["layer_id"]) == list(range(len(layers)))
    for _, m in models.iterrows():
        ml = layers[layers["model_id"] == m["model_id"]]
        assert len(ml) == 6, m["name"]                    # a model is committed whole or not at all
        src = expected[m["name"]]
        for _, row in ml.iterrows():
            arr = c.shard_array(row["shard"])
            got = arr[row["row_start"]:row["row_start"] + row["rows"]]
            want = src[row["name"] if row["name"] in src else row["name"] + ".weight"]
            np.testing.assert_array_equal(got, want.reshape(len(want), -1))
    return len(models)


def test_kill_9_at_random_points_then_rerun(tmp_path):
    src = tmp_path / "ckpts"
    expected = make_checkpoints(src)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # how long an uninterrupted extraction takes here, so the kills land inside the run
    t0 = time.monotonic()
    full = subprocess.run(extract_cmd(src, tmp_path / "reference"), env=env, capture_output=True, text=True,
                          timeout=300)
    duration = time.monotonic() - t0
    assert full.returncode == 0, full.stderr
    assert check_consistent(tmp_path / "reference", expected) == N_FILES

    root = tmp_path / "corpus"
    rng = random.Random(1234)
    counts = []
    for _ in range(8):
        committed = counts[-1] if counts else 0
        proc = subprocess.Popen(extract_cmd(src, root), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # let it commit a random number of further models, then kill it a random moment later (inside the
        # next model's extraction or commit)
        target = committed + rng.randint(1, max(1, (N_FILES - committed) // 3))
        while proc.poll() is None and _generation_models(root) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (root / "manifest.json").exists():
            counts.append(check_consistent(root, expected))
    print("models committed after each kill:", counts, f"(full run {duration:.1f} s)")
    assert counts == sorted(counts)                       # committed models only ever accumulate
    assert any(0 < c < N_FILES for c in counts), counts   # at least one kill landed mid-run
    done = subprocess.run(extract_cmd(src, root), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert check_consistent(root, expected) == N_FILES
    assert not list(root.rglob("*.partial")) and not list(root.glob(".*.tmp"))
    # identical content to the uninterrupted extraction, model by model
    ref, got = Corpus.open(tmp_path / "reference"), Corpus.open(root)
    assert sorted(ref.models["sha256"]) == sorted(got.models["sha256"])
    # a second rerun adds nothing
    again = subprocess.run(extract_cmd(src, root), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "added 0 model(s)" in again.stdout
