"""Honest coverage: the held-out split and the random-kernel control reach run.json and the report, and the
report's in-sample / held-out shares equal a plain numpy recount from the run's files; per-model runs cover
only their model and get their own table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import reference as R
import torch
from planted import planted_kernels

import kernelatlas as ka
from kernelatlas.holdout import CONTROL_GRID, Holdout, random_control, random_kernels
from kernelatlas.jobs.assign import assign_corpus
from kernelatlas.jobs.report import report
from kernelatlas.templates import templates

THRESHOLDS = (0.8, 0.85, 0.9)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two models of planted 3x3 kernels, an autoencoder trained briefly on both (20% held out), a pooled run."""
    from kernelatlas.corpus import Corpus, CorpusWriter
    from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel

    root = tmp_path_factory.mktemp("heldout")
    bank = templates(3)
    sources = np.array([bank[n] for n in ("dog_on", "dx+", "dy-")])
    with CorpusWriter(root / "corpus") as writer:
        for i, name in enumerate(("left", "right")):
            kernels, _ = planted_kernels(sources, 500, 300, 0.4, seed=i)
            layers = [ConvLayer(f"dw{j}", kernels[a:a + 600].reshape(-1, 1, 3, 3), groups=len(kernels[a:a + 600]),
                                kind="depthwise", kind_inferred=False, order=float(j))
                      for j, a in enumerate(range(0, len(kernels), 600))]
            writer.add_model(LoadedModel(f"/x/{name}.pth", "torch", layers), sha256=f"{i:064d}", sizes=(3,))
    corpus = Corpus.open(root / "corpus")
    model = ka.train(corpus, 3, root / "model", max_steps=600, eval_every=100, threads=2, progress=False, seed=4)
    rid = assign_corpus(corpus, model=root / "model", threshold=0.85, progress=False)
    return corpus, root / "model", rid, model


def recount(corpus, run_dir, split: Holdout, model_name: str) -> dict[str, np.ndarray]:
    """[live, classified at each threshold] in-sample and held out, from the run's files, in numpy."""
    lay = corpus.layers
    ids = dict(zip(corpus.models["name"], corpus.models["model_id"], strict=True))
    lay = lay[(lay.model_id == ids[model_name]) & (lay.rows > 0)]
    acc = {"in": np.zeros(4, np.int64), "ho": np.zeros(4, np.int64)}
    index = R.layer_index_in_model(corpus.layers)
    sha = dict(zip(corpus.models["model_id"], corpus.models["sha256"], strict=True))
    for _, r in lay.iterrows():
        num = r.shard.split("-")[-1]
        rows = slice(r.row_start, r.row_start + r.rows)
        scores = np.load(run_dir / "k3" / f"scores-{num}", mmap_mode="r")[rows].astype(np.float64)
        codes = np.load(run_dir / "k3" / f"codes-{num}", mmap_mode="r")[rows]
        live = np.isfinite(codes)
        held = R.heldout_layer(sha[r.model_id], index[r.layer_id], split.salt, r.rows, split.share) \
            | (not split.model_in_pool(r.model_id))
        for part, mask in (("in", live & ~held), ("ho", live & held)):
            acc[part] += [mask.sum()] + [(mask & (scores >= t)).sum() for t in THRESHOLDS]
    return acc


def test_run_records_split_and_control(trained):
    corpus, mdir, rid, model = trained
    spec = json.loads((corpus.root / "runs" / rid / "run.json").read_text())
    assert spec["holdout"] == model.info["holdout"] and spec["holdout"]["share"] == 0.2
    assert spec["models"] is None
    control = spec["control"]
    assert control["thresholds"] == [float(t) for t in CONTROL_GRID] and control["kernels"] == 100_000
    share = np.array(control["share"])
    assert (np.diff(share) <= 0).all() and 0 < share[0] <= 1  # fewer random kernels pass a higher threshold
    # the control against a torch reconstruction of the same random kernels
    enc, dec = ka.Autoencoder.load(mdir).to_torch()
    x = torch.from_numpy(random_kernels(9, 100_000, seed=control["seed"]))
    with torch.no_grad():
        x = x / x.norm(dim=1, keepdim=True)
        recon = dec(enc(x))
        cos = ((x * recon).sum(1) / recon.norm(dim=1)).numpy()
    for t in THRESHOLDS:
        i = int(np.argmin(np.abs(CONTROL_GRID - t)))
        assert share[i] == pytest.approx(float(np.mean(cos >= t)), abs=2e-4)
    assert random_control(ka.Autoencoder.load(mdir), [0.85])[0.85] == share[int(np.argmin(np.abs(CONTROL_GRID - 0.85)))]


def test_report_splits_coverage_in_sample_and_held_out(trained, tmp_path):
    corpus, _, rid, model = trained
    report(corpus, tmp_path / "r", runs=[rid])
    cov = pd.read_csv(tmp_path / "r" / "coverage.csv").set_index("model")
    split = Holdout.from_json(model.info["holdout"])
    for name in ("left", "right"):
        acc = recount(corpus, corpus.root / "runs" / rid, split, name)
        row = cov.loc[name]
        assert row["live_in_sample"] == acc["in"][0] and row["live_held_out"] == acc["ho"][0]
        assert 0.12 < acc["ho"][0] / (acc["in"][0] + acc["ho"][0]) < 0.28
        for j, t in enumerate(THRESHOLDS):
            assert row[f"share_in_sample_{t:.2f}"] == pytest.approx(acc["in"][j + 1] / acc["in"][0])
            assert row[f"share_held_out_{t:.2f}"] == pytest.approx(acc["ho"][j + 1] / acc["ho"][0])
            assert row[f"control_{t:.2f}"] == pytest.approx(
                json.loads((corpus.root / "runs" / rid / "run.json").read_text())["control"]["share"][
                    int(np.argmin(np.abs(CONTROL_GRID - t)))])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "in-sample / held-out" in md and "random kernels (control)" in md


def test_models_left_out_of_training_count_as_held_out(trained, tmp_path):
    corpus, _, _, _ = trained
    ka.train(corpus, 3, tmp_path / "m", max_steps=200, exclude_models=["right"], threads=2, progress=False)
    rid = assign_corpus(corpus, model=tmp_path / "m", threshold=0.85, progress=False)
    report(corpus, tmp_path / "r", runs=[rid])
    cov = pd.read_csv(tmp_path / "r" / "coverage.csv").set_index("model")
    assert cov.loc["right", "live_in_sample"] == 0 and cov.loc["right", "live_held_out"] == cov.loc["right", "live"]
    assert 0 < cov.loc["left", "live_held_out"] < cov.loc["left", "live"]


def test_per_model_run_covers_its_model_only(trained, tmp_path):
    corpus, _pooled_dir, pooled_rid, _ = trained
    model = ka.train(corpus, 3, tmp_path / "left", max_steps=200, models=["left"], threads=2, progress=False)
    assert model.info["holdout"]["models"] == [int(corpus.model_ids(["left"])[0])]
    rid = assign_corpus(corpus, model=tmp_path / "left", models=["left"], threshold=0.85, progress=False)
    spec = json.loads((corpus.root / "runs" / rid / "run.json").read_text())
    lay = corpus.layers
    left = lay[lay.model_id == corpus.model_ids(["left"])[0]]
    assert spec["models"] == corpus.model_ids(["left"]) and spec["shards"] == sorted(set(left.shard))
    labels = np.load(corpus.root / "runs" / rid / "k3" / "labels-000000.npy")
    inside = np.zeros(len(labels), bool)
    for _, r in left.iterrows():
        inside[r.row_start:r.row_start + r.rows] = True
    assert (labels[~inside] == -2).all() and (labels[inside] >= -1).all()
    report(corpus, tmp_path / "r", runs=[pooled_rid, rid])
    per = pd.read_csv(tmp_path / "r" / "coverage-per-model.csv")
    assert list(per["model"]) == ["left"] and per.loc[0, "run_id"] == rid
    pooled = pd.read_csv(tmp_path / "r" / "coverage.csv")
    assert set(pooled["run_id"]) == {pooled_rid}  # the per-model run is not in the pooled table
    assert "one autoencoder per model" in (tmp_path / "r" / "report.md").read_text()
