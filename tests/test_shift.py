"""Distribution shift (kernelatlas.jobs.shift) against plain numpy references written from
reference/README.md section B: PCA coefficients of max-abs-scaled kernels, 70-bin histograms over one shared
range, float32-eps floor and renormalisation, the explained-variance-weighted symmetric KL; groups from
models.parquet and depth deciles; thread-count and chunk-size invariance; a CNN Filter DB import grouped by
its visual category; the CLI; and the report section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reference as R
from test_quality import build_filterdb, make_corpus, structured

import kernelatlas
from kernelatlas import cli
from kernelatlas.corpus import Corpus
from kernelatlas.jobs import quality as lq
from kernelatlas.jobs import shift as ds

# ---------------------------------------------------------------------------------------------- references


# ---------------------------------------------------------------------------------------------- corpora

FAMILIES = ["Alpha", "Alpha", "Beta", "Gamma", ""]  # the last model has no family


def family_layers(seed: int = 0) -> list[list[tuple[str, np.ndarray, int, str]]]:
    """Per model, layers whose kernels depend on the family (so that families differ) and on depth."""
    rng = np.random.default_rng(seed)
    base = {f: rng.standard_normal(9) for f in set(FAMILIES)}
    models = []
    for m, fam in enumerate(FAMILIES):
        layers = []
        for i, n in enumerate((64, 200, 96, 300)):
            w = structured(rng, n, 9) * 0.3 + base[fam] * (0.5 + 0.3 * i)
            if i == 1:
                w[::4] = 0.0
            layers.append((f"m{m}l{i}", w.astype(np.float32).reshape(n, 1, 3, 3), n, "depthwise"))
        reg = (rng.standard_normal((16, 8, 5, 5)) * 0.1).astype(np.float32)
        layers.append((f"m{m}r", reg, 1, "regular"))
        models.append(layers)
    return models


def make_family_corpus(root: Path, shard_rows: int = 1 << 26) -> Corpus:
    models = family_layers()
    flat = [layer for layers in models for layer in layers]
    meta = [{"family": f, "task": "t0" if m < 3 else "t1"} | ({"category": "c"} if m else {})
            for m, f in enumerate(FAMILIES)]
    return make_corpus(root, flat, shard_rows=shard_rows, models=len(models), meta=meta)


@pytest.fixture(scope="module")
def family_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_family_corpus(tmp_path_factory.mktemp("fam") / "c", shard_rows=700)


def kernels_by(corpus: Corpus, by: str, k: int = 3) -> dict[str, list[np.ndarray]]:
    """The stored k x k kernels of every layer, grouped by a models column (empty values left out)."""
    lay = corpus.layers.merge(corpus.models[["model_id", by]], on="model_id")
    out: dict[str, list[np.ndarray]] = {}
    for row in lay[(lay["kh"] == k) & (lay["rows"] > 0)].itertuples(index=False):
        label = getattr(row, by)
        if label:
            rows = np.asarray(corpus.shard_array(row.shard)[row.row_start:row.row_start + row.rows])
            out.setdefault(label, []).append(rows)
    return out


# ---------------------------------------------------------------------------------------------- maths


def test_probabilities_floor_empty_bins_then_renormalise() -> None:
    counts = np.array([[0, 5, 5, 0], [0, 0, 0, 0]])
    p = ds.histogram_probabilities(counts)
    np.testing.assert_allclose(p[0], np.array([R.EPS32, 0.5, 0.5, R.EPS32]) / (1 + 2 * R.EPS32), rtol=1e-15)
    np.testing.assert_allclose(p[1], 0.25)  # an empty histogram becomes uniform
    rng = np.random.default_rng(0)
    c = rng.integers(0, 4, (3, 5, 70))
    np.testing.assert_allclose(ds.histogram_probabilities(c)[1, 2], R.histogram_probabilities(c[1, 2].astype(float)),
                               rtol=1e-14)


def test_shift_matrix_is_the_weighted_symmetric_kl() -> None:
    rng = np.random.default_rng(1)
    probs = ds.histogram_probabilities(rng.integers(0, 50, (5, 9, 70)) * (rng.random((5, 9, 70)) > 0.3))
    evr = rng.random(9)
    evr /= evr.sum()
    got = ds.shift_matrix(probs, evr)
    want = R.shift_matrix(probs, evr)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    assert (got == got.T).all() and (np.diag(got) == 0).all() and (got >= 0).all()
    same = ds.shift_matrix(np.stack([probs[0], probs[0]]), evr)
    assert same[0, 1] == pytest.approx(0.0, abs=1e-15)


def test_depth_deciles_first_bin_closed() -> None:
    x = np.array([0.0, 0.05, 0.1, 0.1000001, 0.2, 0.3, 0.7, 0.95, 1.0, np.nan, 1.2, -0.1])
    got = ds.depth_deciles(x)
    assert got.tolist() == [0, 0, 0, 1, 1, 2, 6, 9, 9, -1, -1, -1]
    ok = np.isfinite(x) & (x >= 0) & (x <= 1)
    cut = pd.cut(x[ok], bins=np.linspace(0, 1, 11), include_lowest=True, labels=False)
    assert got[ok].tolist() == list(cut)


def test_layer_groups(family_corpus: Corpus) -> None:
    lay = family_corpus.layers
    codes, names, missing = ds.layer_groups(family_corpus, lay["layer_id"], "family")
    assert names == ["Alpha", "Beta", "Gamma"] and missing == 5  # the model without a family: its 5 layers
    fam = lay["model_id"].map(dict(zip(family_corpus.models["model_id"], family_corpus.models["family"],
                                       strict=True)))
    assert [names[c] if c >= 0 else "" for c in codes] == fam.tolist()
    codes, names, missing = ds.layer_groups(family_corpus, lay["layer_id"], "model")
    assert len(names) == 5 and missing == 0 and len(set(names)) == 5
    codes, names, _ = ds.layer_groups(family_corpus, lay["layer_id"], "depth")
    assert names[0] == "[0.0, 0.1]" and all(n.startswith("(") for n in names[1:])
    np.testing.assert_array_equal(np.array(names)[codes],
                                  np.array([ds._depth_label(i) for i in ds.depth_deciles(lay["depth_norm"])]))
    with pytest.raises(ValueError, match=r"no such column.*--meta"):
        ds.layer_groups(family_corpus, lay["layer_id"], "colour")


# ---------------------------------------------------------------------------------------------- histograms


@pytest.mark.parametrize("k", [3, 5])
def test_coefficient_histograms_match_reference(family_corpus: Corpus, k: int) -> None:
    run = lq.quality_run(family_corpus, figures=False)
    pca = run.pca(k)
    table = run.table
    ids = table.loc[table["k"] == k, "layer_id"].to_numpy()
    codes, names, _ = ds.layer_groups(family_corpus, ids, "family")
    counts, lo, hi = ds.coefficient_histograms(family_corpus, k, ids, codes, len(names), pca)
    want, want_names = R.group_histograms(kernels_by(family_corpus, "family", k), pca)
    assert names == want_names
    np.testing.assert_array_equal(counts, want)
    allc = np.concatenate([R.scaled_pca_coefficients(np.concatenate(v), pca)
                           for v in kernels_by(family_corpus, "family", k).values()])
    np.testing.assert_allclose(lo, allc.min(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(hi, allc.max(axis=0), rtol=1e-12, atol=1e-12)


def test_shift_matches_reference_and_is_stored(family_corpus: Corpus) -> None:
    frame = kernelatlas.shift(family_corpus, "family")
    run = lq.latest_quality_run(family_corpus)
    pca = run.pca(3)
    counts, names = R.group_histograms(kernels_by(family_corpus, "family"), pca)
    probs = np.array([[R.histogram_probabilities(c.astype(float)) for c in g] for g in counts])
    want = R.shift_matrix(probs, pca.evr)
    assert list(frame.index) == names == list(frame.columns)
    np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-6, atol=1e-9)
    assert frame.loc["Alpha", "Beta"] > 0
    assert frame.attrs["by"] == "family" and frame.attrs["kernel_size"] == 3
    root = Path(frame.attrs["dir"])
    info = json.loads((root / "shift.json").read_text())
    assert info["completed"] and info["layers_without_group"] == 4
    for name in ("shift.csv", "pairs.csv", "groups.csv", "coefficients.csv", "histograms.npz", "shift.png",
                 "coefficients.png"):
        assert (root / name).stat().st_size > 0, name
    csv = pd.read_csv(root / "shift.csv", index_col=0)
    np.testing.assert_allclose(csv.to_numpy(), frame.to_numpy(), rtol=1e-12)
    pairs = pd.read_csv(root / "pairs.csv")
    assert len(pairs) == 3 and np.allclose(pairs[[f"kl_v{j}" for j in range(9)]].to_numpy() @ pca.evr,
                                           pairs["shift"])
    coef = pd.read_csv(root / "coefficients.csv")
    assert len(coef) == 3 * 9 * 70
    assert (coef.groupby(["group", "component"])["probability"].sum() - 1).abs().max() < 1e-12

    groups = pd.read_csv(root / "groups.csv")
    assert groups["kernels"].tolist() == [int(sum(len(r) for r in kernels_by(family_corpus, "family")[g]))
                                          for g in names]
    stamp = (root / "shift.json").stat().st_mtime_ns
    again = kernelatlas.shift(family_corpus, "family")  # done: loaded, not recomputed
    assert (root / "shift.json").stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.to_numpy(), frame.to_numpy(), rtol=1e-12)
    assert (run.root / "shift-k3-box.png").is_file() and (run.root / "shift-k3-box.csv").is_file()


def test_threads_and_chunks_do_not_change_the_shift(tmp_path: Path) -> None:
    c = make_family_corpus(tmp_path / "c")
    results = []
    for threads, chunk in ((1, 1 << 22), (2, 1 << 22), (2, 100), (1, 1)):
        res = ds.shift_result(c, "task", threads=threads, chunk_rows=chunk, recompute=True, figures=False)
        results.append(res)
    for res in results[1:]:
        np.testing.assert_array_equal(res.counts, results[0].counts)
        np.testing.assert_allclose(res.matrix.to_numpy(), results[0].matrix.to_numpy(), rtol=1e-9)


def test_depth_model_and_degenerate_filter(family_corpus: Corpus) -> None:
    depth = ds.shift_result(family_corpus, "depth", figures=False)
    assert len(depth.matrix) >= 2 and depth.groups["kernels"].sum() == 5 * (64 + 200 + 96 + 300)
    model = ds.shift_result(family_corpus, "model", kernel_size=5, figures=False)
    assert len(model.matrix) == 5 and model.k == 5
    run = lq.latest_quality_run(family_corpus)
    table = run.table
    dropped = ds.shift_result(family_corpus, "model", drop_degenerate=True, figures=False)
    keep = table[(table["k"] == 3) & ~table["degenerate"]]
    assert dropped.groups["layers"].sum() == len(keep)
    assert dropped.root != ds.shift_result(family_corpus, "model", figures=False).root


def test_too_few_groups_names_the_fix(tmp_path: Path) -> None:
    layers = family_layers()[0]
    c = make_corpus(tmp_path / "c", layers, models=1)
    with pytest.raises(ValueError, match="--meta family="):
        kernelatlas.shift(c, "family")
    with pytest.raises(ValueError, match="no such column"):
        kernelatlas.shift(c, "colour")


def test_identical_kernels_everywhere_give_no_shift(tmp_path: Path) -> None:
    same = np.tile(np.arange(9, dtype=np.float32) - 4, (50, 1)).reshape(50, 1, 3, 3)
    layers = [("a", same, 50, "depthwise"), ("b", same.copy(), 50, "depthwise")]
    c = make_corpus(tmp_path / "c", layers, models=2, meta=[{"family": "A"}, {"family": "B"}])
    res = ds.shift_result(c, "family", figures=False)
    assert (res.matrix.to_numpy() == 0).all() and (res.counts[:, :, 35] == 50).all()
    assert (lq.latest_quality_run(c).table["entropy"] == 0).all()


def test_filterdb_import_shift_by_category(tmp_path: Path) -> None:
    from kernelatlas.jobs.filterdb import import_filterdb

    originals = build_filterdb(tmp_path / "dataset.h5")
    import_filterdb(tmp_path / "dataset.h5", tmp_path / "c", progress=False)
    c = Corpus.open(tmp_path / "c")
    frame = kernelatlas.shift(c, "category")
    assert sorted(frame.index) == ["medical", "natural"]
    pca = lq.latest_quality_run(c).pca(3)
    groups = {"natural": [w.reshape(-1, 9) for m, _, w in originals if m == 11],
              "medical": [w.reshape(-1, 9) for m, _, w in originals if m == 12]}
    counts, names = R.group_histograms(groups, pca)
    probs = np.array([[R.histogram_probabilities(x.astype(float)) for x in g] for g in counts])
    np.testing.assert_allclose(frame.loc[names, names].to_numpy(), R.shift_matrix(probs, pca.evr), rtol=1e-6)
    fam = kernelatlas.shift(c, "family")  # CNN Filter DB's "Name" column
    assert sorted(fam.index) == ["Family0", "Family1"]


# ------------------------------------------------------------------------------------------ CLI and report


def test_cli_shift_and_report_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = make_family_corpus(tmp_path / "c")
    assert cli.main(["shift", str(c.root), "--by", "family,depth", "--by", "task", "--kernel-size", "3",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3x3 by family: 3 groups" in out and "3x3 by depth" in out and "3x3 by task" in out
    assert cli.main(["shift", str(c.root), "--by", "colour", "--no-progress"]) == 1
    assert "no such column" in capsys.readouterr().err
    md, page = ds.quality_section(c, tmp_path / "report")
    assert "## Kernel quality and distribution shift" in md and "Degenerate layers per model" in md
    for name in ("quality-shift-k3-family.png", "quality-shift-k3-box.png", "quality-pca-k3.png"):
        assert name in md
    assert "<img" in page and "<table>" in page
    for name in ("quality-layers.csv", "quality-models.csv", "quality-pca-k3.png", "quality-pca-k5.png",
                 "quality-shift-k3-family.png", "quality-shift-k3-box.png", "quality-shift-k3-family.csv"):
        assert (tmp_path / "report" / name).is_file(), name
    empty = make_corpus(tmp_path / "e", family_layers()[0][:1], models=1)
    md, _ = ds.quality_section(empty, tmp_path / "report2")
    assert "kernelatlas quality" in md
