"""Training the autoencoder (kernelatlas.train): bit-reproducible on the CPU, samples only what it is asked to
(the held-out split and model filters included), records what it did and why it stopped."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import kernelatlas as ka
from kernelatlas import Autoencoder
from kernelatlas.corpus import Corpus
from kernelatlas.training import sample_kernels, train
from planted import make_small_corpus


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Corpus, np.ndarray, np.ndarray]:
    return make_small_corpus(tmp_path_factory.mktemp("small") / "corpus")


def test_training_is_bit_reproducible(small_corpus, tmp_path):
    corpus, _, _ = small_corpus
    opts = dict(epochs=3, batch_size=128, threads=2, progress=False, sample=2000)
    train(corpus, 3, tmp_path / "a", seed=11, **opts)
    train(corpus.root, 3, tmp_path / "b", seed=11, **opts)
    train(corpus, 3, tmp_path / "c", seed=12, **opts)
    a, b, c = ((tmp_path / m / "autoencoder.safetensors").read_bytes() for m in "abc")
    assert a == b, "the same seed must give bit-identical weights"
    assert a != c, "another seed must give other weights"
    ja, jb = (json.loads((tmp_path / m / "model.json").read_text()) for m in "ab")
    assert ja["training"]["history"] == jb["training"]["history"]


def test_training_records_what_it_did(small_corpus, tmp_path):
    corpus, _, _ = small_corpus
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "clusters.json").write_text("{}")  # stale: from another model
    model = train(corpus, 3, tmp_path / "m", epochs=2, batch_size=256, seed=0, threads=1, progress=False,
                  sample=None)
    assert not (tmp_path / "m" / "clusters.json").exists()
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    t, s, c = meta["training"], meta["sample"], meta["corpus"]
    assert meta["kernel_size"] == 3 and [L["out"] for L in meta["encoder"]] == [64, 32, 1]
    assert [L["activation"] for L in meta["encoder"]] == ["relu", "relu", "sigmoid"]
    assert [L["activation"] for L in meta["decoder"]] == ["relu", "relu", "identity"]
    assert t["seed"] == 0 and t["epochs_run"] == 2 and t["min_abs"] == 1e-4 and t["kind"] == "depthwise"
    assert t["torch_version"] == torch.__version__ and t["device"] == "cpu" and t["threads"] == 1
    assert 0 < t["val_loss"] < 2 and len(t["history"]["val_loss"]) == 2 and t["train_seconds"] > 0
    assert c["generation"] == corpus.manifest["generation"]
    assert c["manifest_sha256"] == hashlib.sha256((corpus.root / "manifest.json").read_bytes()).hexdigest()
    # 3,000 planted + 200 dead + 50 NaN + 50 flat depthwise kernels; the regular layer is not sampled
    assert s["available"] == s["drawn"] == 3300
    assert s["excluded"] == {"nonfinite": 50, "dead": 200, "flat": 50}
    assert s["used"] == 3000 and s["validation"] == 150 and s["train"] == 2850
    loaded = Autoencoder.load(tmp_path / "m")
    assert loaded.info["training"]["seed"] == 0
    x = np.random.default_rng(0).standard_normal((10, 9)).astype(np.float32)
    np.testing.assert_array_equal(loaded.encode(x), model.encode(x))


def test_sampling_is_uniform_seeded_and_of_the_kind(small_corpus):
    corpus, kernels, _ = small_corpus
    every, counts = sample_kernels(corpus, 3, sample=None)
    assert counts == {"available": 3300, "drawn": 3300}
    np.testing.assert_array_equal(every, kernels)  # all rows, in corpus order, the regular layer left out
    one, _ = sample_kernels(corpus, 3, sample=1000, rng=np.random.default_rng(3))
    two, _ = sample_kernels(corpus, 3, sample=1000, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(one, two)
    assert len(one) == 1000 and not (one == 7.0).all(axis=1).any()
    # without replacement, and drawn from every part of the corpus
    rows = {kernels[i].tobytes(): i for i in range(len(kernels)) if np.isfinite(kernels[i]).all()}
    idx = [rows[r.tobytes()] for r in one if r.tobytes() in rows]
    assert len(set(idx)) == len(idx) > 950
    assert np.histogram(idx, bins=5, range=(0, len(kernels)))[0].min() > 120
    regular, counts = sample_kernels(corpus, 3, kind="regular", sample=None)
    assert counts["available"] == 500 and (regular == 7.0).all()
    assert sample_kernels(corpus, 3, kind="all", sample=None)[1]["available"] == 3800


def test_training_input_errors(small_corpus, tmp_path):
    corpus, _, _ = small_corpus
    with pytest.raises(ValueError, match="stores no 5x5 kernels"):
        train(corpus, 5, tmp_path / "m", epochs=1, progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        train(corpus, 3, tmp_path / "m", kind="pointwise", progress=False)
    with pytest.raises(ValueError, match="widths"):
        train(corpus, 3, tmp_path / "m", widths=(), progress=False)
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        train(corpus, 3, tmp_path / "m", device="cuda", progress=False)
    with pytest.raises(ka.corpus.CorpusError, match="not a kernelatlas corpus"):
        train(tmp_path / "nowhere", 3, tmp_path / "m", progress=False)
