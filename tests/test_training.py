"""Training the autoencoder (kernelatlas.train): bit-reproducible on the CPU, samples only what it is asked to
(the held-out split and model filters included), records what it did and why it stopped."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import reference as R
import torch
from planted import make_small_corpus

import kernelatlas as ka
from kernelatlas import Autoencoder
from kernelatlas.corpus import Corpus
from kernelatlas.jobs.train import sample_kernels, train


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Corpus, np.ndarray, np.ndarray]:
    return make_small_corpus(tmp_path_factory.mktemp("small") / "corpus")


def test_training_is_bit_reproducible(small_corpus, tmp_path):
    corpus, _, _ = small_corpus
    opts = dict(max_steps=60, eval_every=20, batch_size=128, threads=2, progress=False, sample=2000)
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
                  sample=None, eval_every=5, holdout=0.0)
    assert not (tmp_path / "m" / "clusters.json").exists()
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    t, s, c = meta["training"], meta["sample"], meta["corpus"]
    assert meta["kernel_size"] == 3 and [L["out"] for L in meta["encoder"]] == [64, 32, 1]
    assert [L["activation"] for L in meta["encoder"]] == ["relu", "relu", "sigmoid"]
    assert [L["activation"] for L in meta["decoder"]] == ["relu", "relu", "identity"]
    # 2,850 training rows in batches of 256: 12 steps an epoch, so the 2-epoch cap is 24 steps
    assert t["seed"] == 0 and t["epochs_max"] == 2 and t["min_abs"] == 1e-4 and t["kind"] == "depthwise"
    assert t["steps_per_epoch"] == 12 and t["steps_run"] == t["max_steps"] == 24 and t["epochs_run"] == 2.16
    assert t["stop_reason"].startswith("epochs")
    assert t["torch_version"] == torch.__version__ and t["device"] == "cpu" and t["threads"] == 1
    assert 0 < t["val_loss"] < 2 and t["history"]["step"] == [5, 10, 15, 20, 24] and t["train_seconds"] > 0
    assert t["val_loss"] == min(t["history"]["val_loss"]) and t["best_step"] in t["history"]["step"]
    density = t["code_density"]
    assert (density["lo"], density["hi"]) == (0.0, 1.0) and sum(density["counts"]) == 3000
    assert meta["holdout"]["share"] == 0.0 and meta["holdout"]["models"] is None
    assert list(meta["holdout"]["shards"]) == corpus.shards(3)
    assert c["generation"] == corpus.manifest["generation"]
    assert c["manifest_sha256"] == hashlib.sha256((corpus.root / "manifest.json").read_bytes()).hexdigest()
    # 3,000 planted + 200 dead + 50 NaN + 50 flat depthwise kernels; the regular layer is not sampled
    assert s["available"] == s["pool"] == s["drawn"] == 3300
    assert s["excluded"] == {"nonfinite": 50, "dead": 200, "flat": 50}
    assert s["used"] == 3000 and s["validation"] == 150 and s["train"] == 2850
    loaded = Autoencoder.load(tmp_path / "m")
    assert loaded.info["training"]["seed"] == 0
    x = np.random.default_rng(0).standard_normal((10, 9)).astype(np.float32)
    np.testing.assert_array_equal(loaded.encode(x), model.encode(x))


def test_sampling_is_uniform_seeded_and_of_the_kind(small_corpus):
    corpus, kernels, _ = small_corpus
    every, counts = sample_kernels(corpus, 3, sample=None)
    assert counts == {"available": 3300, "pool": 3300, "drawn": 3300}
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
    with pytest.raises(ValueError, match="schedule must be one of"):
        train(corpus, 3, tmp_path / "m", schedule="linear", progress=False)
    with pytest.raises(ValueError, match="holdout must be in"):
        train(corpus, 3, tmp_path / "m", holdout=1.0, progress=False)
    with pytest.raises(ValueError, match="no model named 'nope'"):
        train(corpus, 3, tmp_path / "m", models=["nope"], progress=False)
    with pytest.raises(ValueError, match="leave no model"):
        train(corpus, 3, tmp_path / "m", exclude_models=[0], progress=False)
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
    for bad in ({"code_penalty": -0.1}, {"code_margin": -1.0}, {"code_penalty": float("nan")}):
        with pytest.raises(ValueError, match="code_penalty and code_margin must be finite and >= 0"):
            train(corpus, 3, tmp_path / "m", progress=False, **bad)


def test_code_penalty_bounds_the_code_pre_activations(small_corpus, tmp_path):
    """The penalty on code pre-activations beyond +-code_margin (what keeps clusters off the saturated ends of
    the sigmoid code; the default is 0.01 beyond 4) is in the objective: with a strong one and margin 1 every
    training kernel's pre-activation stays within about +-1.5, where without it (code_penalty=0) they reach about
    +-4 in the same 800 steps.  Both runs record the options in model.json."""
    corpus, kernels, _ = small_corpus
    x = kernels[np.isfinite(kernels).all(axis=1)]
    spread = {}
    for penalty in (0.0, 1.0):
        model = train(corpus, 3, tmp_path / f"m{penalty}", seed=0, threads=1, progress=False, max_steps=800,
                      eval_every=100, code_penalty=penalty, code_margin=1.0)
        t = json.loads((tmp_path / f"m{penalty}" / "model.json").read_text())["training"]
        assert (t["code_penalty"], t["code_margin"]) == (penalty, 1.0)
        codes = model.encode(x).astype(np.float64)
        codes = codes[np.isfinite(codes)]
        spread[penalty] = float(np.abs(np.log(codes) - np.log1p(-codes)).max())
    assert spread[1.0] < 1.6 and spread[0.0] > 2.5, spread
    defaults = train(corpus, 3, tmp_path / "d", seed=0, threads=1, progress=False, max_steps=20)
    assert (defaults.info["training"]["code_penalty"], defaults.info["training"]["code_margin"]) == (0.01, 4.0)


# ---------------------------------------------------------------------------------------------- held-out split


def test_heldout_rule_by_model_and_layer_matches_the_plain_integer_reference():
    from kernelatlas.holdout import Holdout, heldout_rows, layer_key

    sha = "ab" * 32
    for index, salt, share in ((0, 0, 0.2), (3, 7, 0.2), (17, 1, 0.5)):
        key = layer_key(sha, index, salt)
        got = heldout_rows(key, np.arange(3000), share=share)
        np.testing.assert_array_equal(got, R.heldout_layer(sha, index, salt, 3000, share))
        split = Holdout(share=share, salt=salt)
        np.testing.assert_array_equal(split.layer_mask(key, "k3/shard-000009.npy", 12345, 3000), got)
    whole = heldout_rows(layer_key(sha, 0, 0), np.arange(100_000), share=0.2)
    assert abs(whole.mean() - 0.2) < 0.01
    assert (heldout_rows(layer_key(sha, 1, 0), np.arange(100_000), share=0.2) != whole).mean() > 0.25
    assert (heldout_rows(layer_key(sha, 0, 1), np.arange(100_000), share=0.2) != whole).mean() > 0.25
    assert (heldout_rows(layer_key(sha, 0, 0), np.arange(100_000), share=0.3) >= whole).all()
    assert not heldout_rows(layer_key(sha, 0, 0), np.arange(100), share=0.0).any()
    with pytest.raises(ValueError, match="held-out share"):
        heldout_rows(layer_key(sha, 0, 0), np.arange(10), share=1.0)


def test_models_trained_with_the_shard_rule_keep_it():
    """model.json records written before 2026-12-07 name the (shard, row) rule: their split is still read that
    way, so their held-out coverage figures do not move."""
    from kernelatlas.holdout import RULE, SHARD_RULE, Holdout, heldout_mask

    old = Holdout.from_json({"share": 0.2, "salt": 3, "rule": SHARD_RULE, "shards": {}, "models": None})
    assert old is not None and not old.by_layer and old.to_json()["rule"] == SHARD_RULE
    np.testing.assert_array_equal(old.layer_mask(np.uint64(5), "k3/shard-000001.npy", 100, 5000),
                                  heldout_mask("k3/shard-000001.npy", 100, 5100, share=0.2, salt=3))
    new = Holdout.from_json(Holdout(share=0.2, salt=3).to_json())
    assert new is not None and new.by_layer and new.rule == RULE


def test_heldout_split_does_not_depend_on_where_kernels_are_stored(tmp_path):
    """The same models written into corpora sharded differently (as in-process and cluster extracts, or commits
    at other times, shard them): the same kernels are held out."""
    from kernelatlas.corpus import Corpus, CorpusWriter
    from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
    from kernelatlas.holdout import Holdout

    rng = np.random.default_rng(0)
    models = [[rng.standard_normal((int(rng.integers(200, 900)), 1, 3, 3)).astype(np.float32) for _ in range(3)]
              for _ in range(4)]
    held, shard_counts = [], []
    for shard_rows in (1 << 26, 1000):
        with CorpusWriter(tmp_path / f"c{shard_rows}", shard_rows=shard_rows) as w:
            for m, weights in enumerate(models):
                layers = [ConvLayer(f"dw{i}", x, len(x), "depthwise", False, float(i)) for i, x in enumerate(weights)]
                w.add_model(LoadedModel(f"/m/{m}.pth", "torch", layers), sha256=f"model-{m}")
        c = Corpus.open(tmp_path / f"c{shard_rows}")
        split = Holdout(share=0.3, salt=2, shards=dict.fromkeys(c.shards(3), ""))
        lay = c.layers.sort_values("layer_id")
        keys = split.keys(c, lay)
        held.append(b"".join(np.asarray(c.shard_array(r.shard)[r.row_start:r.row_start + r.rows])[
            split.layer_mask(key, r.shard, r.row_start, r.rows)].tobytes() for r, key in zip(lay.itertuples(), keys,
                                                                                            strict=True)))
        shard_counts.append(len(c.shards(3)))
    assert shard_counts[0] == 1 and shard_counts[1] >= 4  # the same kernels, stored differently ...
    assert held[0] == held[1] and len(held[0]) > 0  # ... held out alike


def test_heldout_mask_is_a_function_of_the_kernel_identity():
    """The (shard, row) rule of models trained before 2026-12-07."""
    from kernelatlas.holdout import heldout_mask

    whole = heldout_mask("k3/shard-000000.npy", 0, 100_000, share=0.2, salt=7)
    assert abs(whole.mean() - 0.2) < 0.01
    # the same rows give the same answer however the range is cut
    parts = np.concatenate([heldout_mask("k3/shard-000000.npy", a, min(a + 999, 100_000), share=0.2, salt=7)
                            for a in range(0, 100_000, 999)])
    np.testing.assert_array_equal(parts, whole)
    # another salt or shard gives another split; a larger share holds out a superset
    assert (heldout_mask("k3/shard-000000.npy", 0, 100_000, share=0.2, salt=8) != whole).mean() > 0.25
    assert (heldout_mask("k3/shard-000001.npy", 0, 100_000, share=0.2, salt=7) != whole).mean() > 0.25
    assert (heldout_mask("k3/shard-000000.npy", 0, 100_000, share=0.3, salt=7) >= whole).all()
    assert not heldout_mask("k3/shard-000000.npy", 0, 100, share=0.0, salt=7).any()
    assert heldout_mask("k3/shard-000000.npy", 5, 5, share=0.5, salt=7).shape == (0,)
    with pytest.raises(ValueError, match="held-out share"):
        heldout_mask("k3/shard-000000.npy", 0, 10, share=1.0, salt=7)


def test_held_out_kernels_never_reach_training(small_corpus):
    from kernelatlas.holdout import Holdout

    corpus, _, _ = small_corpus
    split = Holdout(share=0.3, salt=5, shards=dict.fromkeys(corpus.shards(3), ""))
    pool, counts = sample_kernels(corpus, 3, sample=None, holdout=split)
    lay = corpus.layers
    index = R.layer_index_in_model(lay)
    sha = dict(zip(corpus.models["model_id"], corpus.models["sha256"], strict=True))
    lay = lay[(lay.kind == "depthwise") & (lay.kh == 3)].sort_values("row_start")
    expect, held = [], 0
    for _, r in lay.iterrows():
        rows = np.asarray(corpus.shard_array(r.shard)[r.row_start:r.row_start + r.rows])
        mask = R.heldout_layer(sha[r.model_id], index[r.layer_id], 5, r.rows, 0.3)
        expect.append(rows[~mask])
        held += int(mask.sum())
    np.testing.assert_array_equal(pool, np.concatenate(expect))
    assert counts == {"available": 3300, "pool": 3300 - held, "drawn": 3300 - held} and 850 < held < 1130
    part, counts = sample_kernels(corpus, 3, sample=500, holdout=split, rng=np.random.default_rng(1))
    assert counts["drawn"] == 500 and len(part) == 500
    pool_rows = {r.tobytes() for r in pool}
    assert all(r.tobytes() in pool_rows for r in part)


def test_training_records_its_split_and_converges(small_corpus, tmp_path):
    corpus, _, _ = small_corpus
    model = train(corpus, 3, tmp_path / "m", seed=3, threads=2, progress=False, patience=300, eval_every=50)
    t, s, h = model.info["training"], model.info["sample"], model.info["holdout"]
    assert t["stop_reason"].startswith("converged") and "3 learning-rate drops" in t["stop_reason"]
    assert t["steps_run"] < t["max_steps"] and t["lr_final"] == pytest.approx(t["lr"] * 0.25 ** 3)
    assert h["share"] == 0.2 and h["salt"] == 3 and h["models"] is None
    # the pool is what the rule leaves: 3,300 rows less the held-out ones, of which dead/flat/NaN are dropped
    assert 2500 < s["pool"] < 2800 and s["used"] == s["pool"] - sum(s["excluded"].values())


def two_model_corpus(root):
    """Two models of 3x3 depthwise kernels: 'left' (600 kernels) and 'right' (400 kernels of all 7s but noise)."""
    from kernelatlas.corpus import CorpusWriter
    from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel

    rng = np.random.default_rng(0)
    left = rng.standard_normal((600, 9)).astype(np.float32)
    right = (7.0 + 0.1 * rng.standard_normal((400, 9))).astype(np.float32)
    with CorpusWriter(root) as writer:
        for name, kernels in (("left", left), ("right", right)):
            layer = ConvLayer("dw", kernels.reshape(-1, 1, 3, 3), groups=len(kernels), kind="depthwise",
                              kind_inferred=False, order=0.0)
            writer.add_model(LoadedModel(f"/x/{name}.pth", "torch", [layer]),
                             sha256=hashlib.sha256(kernels.tobytes()).hexdigest(), sizes=(3,))
    return Corpus.open(root), left, right


def test_training_pool_of_chosen_models(tmp_path):
    from kernelatlas.holdout import Holdout

    corpus, _left, right = two_model_corpus(tmp_path / "c")
    ids = dict(zip(corpus.models["name"], corpus.models["model_id"], strict=True))
    m = train(corpus, 3, tmp_path / "only-left", models=["left"], holdout=0.0, epochs=1, progress=False, threads=1)
    assert m.info["holdout"]["models"] == [ids["left"]] and m.info["sample"]["pool"] == 600
    m = train(corpus, 3, tmp_path / "not-left", exclude_models=["left"], holdout=0.0, epochs=1, progress=False,
              threads=1)
    assert m.info["holdout"]["models"] == [ids["right"]] and m.info["sample"]["pool"] == 400
    pool, _ = sample_kernels(corpus, 3, sample=None, holdout=Holdout.from_json(m.info["holdout"]))
    np.testing.assert_array_equal(pool, right)


def test_per_layer_counts_for_pools_beyond_numpys_limit():
    """A corpus of 1.46x10^9 rows (CNN Filter DB): numpy's multivariate hypergeometric refuses pools of 10^9 or
    more, so the counts come from n distinct pool positions; they sum to n, never exceed a layer and follow the
    layer sizes."""
    from kernelatlas.jobs.train import per_layer_counts

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 200_000, 20_000).astype(np.int64)
    sizes[0] = 400_000_000  # one huge layer: ~27% of the pool
    assert sizes.sum() > 1_000_000_000
    counts = per_layer_counts(rng, sizes, 2_000_000)
    assert counts.sum() == 2_000_000 and (counts >= 0).all() and (counts <= sizes).all()
    share = counts[0] / 2_000_000
    assert abs(share - sizes[0] / sizes.sum()) < 0.002
    small = per_layer_counts(np.random.default_rng(1), np.array([5, 0, 7]), 12)  # below the limit: numpy's draw
    assert small.tolist() == [5, 0, 7]
