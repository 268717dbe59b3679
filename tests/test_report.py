"""kernelatlas report: a small corpus (3 models; depthwise and regular layers; 3x3 and 5x5; several shards) with
run outputs planted in the format of runs/RUN_ID (run.json, labels/scores/codes per shard), then the report's
numbers against counts made here from the planted arrays, its files (valid PNGs, CSVs, every figure referenced
by the pages), the default run selection, the depthwise vs regular comparison and the errors on bad runs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kernelatlas.cli import main
from kernelatlas.corpus import Corpus, CorpusWriter
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
from kernelatlas.jobs.report import RunError, find_runs, report

THRESHOLDS = (0.80, 0.85, 0.90)
# code intervals; [0.6, 0.7) is a gap (codes there are unclassified); the top interval is closed at 1.0
CLUSTERS3 = [("on-centre", 0.0, 0.3, "#d62728"), ("off-centre", 0.3, 0.6, "#1f77b4"),
             ("x-derivative", 0.7, 1.0, "not a colour")]
# model "c"'s one layer: planted by hand (code, score); see test_hand_counted_layer
HAND_CODES = np.array([0.1, 0.4, 0.8, 0.6, 1.0, np.nan], np.float32)
HAND_SCORES = np.array([0.95, 0.87, 0.82, 0.99, 0.91, 0.0], np.float32)


def _model(name: str, spec, seed: int) -> LoadedModel:
    rng = np.random.default_rng(seed)
    layers = []
    for i, (c_out, c_in, k) in enumerate(spec):
        kind = "depthwise" if c_in == 1 else "regular"
        w = rng.standard_normal((c_out, c_in, k, k)).astype(np.float32)
        layers.append(ConvLayer(f"conv{i}", w, c_out if kind == "depthwise" else 1, kind, False, float(i)))
    return LoadedModel(f"/zoo/{name}.pth", "torch", layers)


def build_corpus(root: Path) -> Corpus:
    models = {
        "a": [(6, 1, 3), (4, 3, 3), (5, 1, 5), (8, 1, 3), (3, 1, 5)],
        "b": [(7, 1, 3), (2, 2, 3), (4, 1, 5), (9, 1, 3)],
        "c": [(6, 1, 3)],
    }
    with CorpusWriter(root, shard_rows=16) as w:  # small shards: several per size, layers never split
        for i, (name, spec) in enumerate(models.items()):
            w.add_model(_model(name, spec, i), sha256=f"{i:064d}", all_convs=True, sizes=(3, 5), name=name)
    return Corpus.open(root)


def _colour_prototype(k: int, i: int) -> list[list[float]]:
    g = np.arange(k) - k // 2
    yy, xx = np.meshgrid(g, g, indexing="ij")
    pats = [np.exp(-(xx**2 + yy**2)), -np.exp(-(xx**2 + yy**2)), xx * np.exp(-(xx**2 + yy**2) / 2), yy + 0.0]
    return pats[i % len(pats)].tolist()


def write_run(corpus: Corpus, run_id: str, *, k: int = 3, kind: str = "depthwise", mode: str = "autoencoder",
              created: str = "2025-01-01T10:00:00+0000", threshold: float = 0.85, seed: int = 0,
              model_dir: Path | None = None, completed: bool = True, hand: bool = True) -> dict:
    """Plant a run: per shard labels/scores/codes in the exact runs/ format; returns {shard: (labels, scores,
    codes)}.  Rows of other kinds: -2 (score/code NaN); dead rows: label -1, score 0, code NaN."""
    rng = np.random.default_rng(seed)
    clusters = CLUSTERS3 if mode == "autoencoder" else [(f"proto{i}", None, None, None) for i in range(2)]
    root = corpus.root / "runs" / run_id
    (root / f"k{k}").mkdir(parents=True, exist_ok=True)
    lay = corpus.layers
    planted = {}
    for shard in corpus.shards(k):
        n = int(next(s["rows"] for s in corpus.manifest["shards"] if s["path"] == shard))
        labels = np.full(n, -2, np.int16)
        scores = np.full(n, np.nan, np.float32)
        codes = np.full(n, np.nan, np.float32)
        for row in lay[(lay["shard"] == shard) & (lay["rows"] > 0)].itertuples():
            if kind != "all" and row.kind != kind:
                continue
            sl = slice(row.row_start, row.row_start + row.rows)
            if hand and row.model_id == 2 and k == 3:
                code, score = HAND_CODES.copy(), HAND_SCORES.copy()
            else:
                code = rng.uniform(0, 1, row.rows).astype(np.float32)
                code[rng.random(row.rows) < 0.1] = 0.65  # in the gap
                score = rng.uniform(0.6, 1.0, row.rows).astype(np.float32)
                score[rng.random(row.rows) < 0.1] = np.float32(0.85)  # on a threshold
                dead = rng.random(row.rows) < 0.12
                code[dead], score[dead] = np.nan, 0.0
            if mode == "prototypes":
                lab = np.where(score.astype(np.float64) >= threshold, rng.integers(0, 2, row.rows), -1)
                lab[score == 0] = -1
            else:
                idx = np.full(row.rows, -1)
                for i, (_, lo, hi, _) in enumerate(clusters):
                    idx[(code >= lo) & ((code <= hi) if i == 2 else (code < hi))] = i
                lab = np.where(score.astype(np.float64) >= threshold, idx, -1)
            labels[sl], scores[sl] = lab, score
            if mode == "autoencoder":
                codes[sl] = code
        num = shard.split("-")[-1].split(".")[0]
        np.save(root / f"k{k}" / f"labels-{num}.npy", labels)
        np.save(root / f"k{k}" / f"scores-{num}.npy", scores)
        if mode == "autoencoder":
            np.save(root / f"k{k}" / f"codes-{num}.npy", codes)
        planted[shard] = (labels, scores, codes if mode == "autoencoder" else None)
    spec = {"run_id": run_id, "created": created, "completed": completed, "mode": mode, "kernel_size": k,
            "kind": kind, "threshold": threshold, "model_dir": str(model_dir) if model_dir else None,
            "prototypes": "/p/protos.npy" if mode == "prototypes" else None,
            "clusters": [{"name": n, "lo": lo, "hi": hi, "colour": c, "prototype": _colour_prototype(k, i)}
                         for i, (n, lo, hi, c) in enumerate(clusters)],
            "shards": corpus.shards(k), "command": f"kernelatlas assign corpus --kind {kind}",
            "corpus_generation": corpus.manifest["generation"]}
    pd.DataFrame({"layer_id": [0], "kernels": [1], "assigned_share": [0.5]}).to_parquet(root / "assign_layers.parquet")
    (root / "run.json").write_text(json.dumps(spec))
    return planted


def expected(corpus: Corpus, planted: dict, mode: str, t: float) -> dict[str, tuple[int, int]]:
    """{model name: (live, classified at t)}, counted layer by layer from the planted arrays."""
    names = dict(zip(corpus.models["model_id"], corpus.models["name"], strict=True))
    out: dict[str, list[int]] = {}
    for row in corpus.layers.itertuples():
        if row.shard not in planted:
            continue
        labels, scores, codes = (a[row.row_start:row.row_start + row.rows] if a is not None else None
                                 for a in planted[row.shard])
        for i in range(row.rows):
            if labels[i] == -2:
                continue
            if (mode == "autoencoder" and np.isnan(codes[i])) or (mode == "prototypes" and scores[i] == 0):
                continue
            entry = out.setdefault(names[row.model_id], [0, 0])
            entry[0] += 1
            if mode == "autoencoder":
                c = float(codes[i])
                inside = 0 <= c < 0.3 or 0.3 <= c < 0.6 or 0.7 <= c <= 1.0
            else:
                inside = True
            entry[1] += int(inside and float(scores[i]) >= t)
    return {m: (v[0], v[1]) for m, v in out.items()}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One corpus with: an old and a new depthwise 3x3 run (autoencoder, spectrum.png in the new one's model
    dir), a regular 3x3 run, a 5x5 prototypes run, and one unfinished run; the report over the default runs."""
    tmp = tmp_path_factory.mktemp("report")
    corpus = build_corpus(tmp / "corpus")
    assert len(corpus.shards(3)) >= 2 and len(corpus.shards(5)) >= 1
    model_dir = tmp / "model3"
    model_dir.mkdir()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    fig.text(0.5, 0.5, "SPECTRUM")
    fig.savefig(model_dir / "spectrum.png")
    planted = {
        "old": write_run(corpus, "old3", created="2025-01-01T09:00:00+0000", seed=1, hand=False),
        "dw3": write_run(corpus, "dw3", created="2025-01-02T09:00:00+0000", seed=2, model_dir=model_dir),
        "reg3": write_run(corpus, "reg3", kind="regular", created="2025-01-01T08:00:00+0000", seed=3),
        "p5": write_run(corpus, "p5", k=5, mode="prototypes", seed=4, threshold=0.9),
    }
    write_run(corpus, "unfinished", created="2026-01-01T00:00:00+0000", completed=False, seed=5)
    out = tmp / "out"
    page = report(corpus.root, out)
    return corpus, planted, out, page


def test_files_and_default_runs(world):
    corpus, _, out, page = world
    assert page == out / "report.html"
    for name in ("report.md", "report.html", "coverage.csv", "coverage-totals.csv", "coverage-curves.csv",
                 "runs.csv", "corpus.csv", "compare.csv", "coverage-runs.png", "compare-k3.png"):
        assert (out / name).is_file(), name
    runs = pd.read_csv(out / "runs.csv")
    # latest completed per (size, kind): dw3 (not old3, not the unfinished one), reg3, p5
    assert sorted(runs["run_id"]) == ["dw3", "p5", "reg3"]
    md = (out / "report.md").read_text()
    assert "unfinished" in md and "old3" in md  # both named in the notes: skipped / not shown
    selected, notes = find_runs(corpus.root)
    assert [r.run_id for r in selected] == ["dw3", "reg3", "p5"]
    assert any("unfinished" in n and "not completed" in n for n in notes)


@pytest.mark.parametrize("run_id,key,mode", [("dw3", "dw3", "autoencoder"), ("reg3", "reg3", "autoencoder"),
                                             ("p5", "p5", "prototypes")])
def test_coverage_csv_matches_planted(world, run_id, key, mode):
    corpus, planted, out, _ = world
    cov = pd.read_csv(out / "coverage.csv")
    cov = cov[cov["run_id"] == run_id]
    assert len(cov) > 0
    for t in THRESHOLDS:
        want = expected(corpus, planted[key], mode, t)
        assert set(cov["model"]) == set(want)
        for row in cov.to_dict("records"):
            live, hit = want[row["model"]]
            assert row["live"] == live
            assert row[f"classified_{t:.2f}"] == hit
            np.testing.assert_allclose(row[f"share_{t:.2f}"], hit / live, rtol=1e-12)
    totals = pd.read_csv(out / "coverage-totals.csv").set_index("run_id")
    want = expected(corpus, planted[key], mode, 0.85)
    assert totals.loc[run_id, "live"] == sum(v[0] for v in want.values())
    assert totals.loc[run_id, "classified_0.85"] == sum(v[1] for v in want.values())


def test_hand_counted_layer(world):
    """Model c's one 3x3 depthwise layer: codes 0.1 0.4 0.8 0.6(gap) 1.0(closed top) NaN(dead), scores 0.95
    0.87 0.82 0.99 0.91 0: 5 live; classified 4 at 0.80, 3 at 0.85, 2 at 0.90."""
    _, _, out, _ = world
    cov = pd.read_csv(out / "coverage.csv")
    row = cov[(cov["run_id"] == "dw3") & (cov["model"] == "c")].iloc[0]
    assert (row["kernels"], row["dead"], row["live"]) == (6, 1, 5)
    assert [row["share_0.80"], row["share_0.85"], row["share_0.90"]] == [0.8, 0.6, 0.4]
    layers = pd.read_csv(out / "layers-k3-depthwise-dw3.csv")
    lc = layers[layers["model"] == "c"].iloc[0]
    # stored labels at 0.85: [0, 1, -1, -1, 2, -1] -> one each of the three clusters out of 5 live
    assert lc["share_on-centre"] == lc["share_off-centre"] == lc["share_x-derivative"] == pytest.approx(0.2)
    assert lc["share_unclassified"] == pytest.approx(0.4)


def test_cluster_and_layer_tables(world):
    corpus, planted, out, _ = world
    labels = np.concatenate([p[0] for p in planted["dw3"].values()])
    codes = np.concatenate([p[2] for p in planted["dw3"].values()])
    live = int(((labels != -2) & ~np.isnan(codes)).sum())
    ct = pd.read_csv(out / "clusters-k3-depthwise-dw3.csv").set_index("cluster")
    for i, name in enumerate(c[0] for c in CLUSTERS3):
        assert ct.loc[name, "kernels"] == int((labels == i).sum())
        assert ct.loc[name, "share"] == pytest.approx((labels == i).sum() / live)
    assert ct.loc["unclassified", "kernels"] == int(((labels == -1) & ~np.isnan(codes)).sum())
    # the invalid colour was replaced by a valid one
    assert ct.loc["x-derivative", "colour"].startswith("#")
    layers = pd.read_csv(out / "layers-k3-depthwise-dw3.csv")
    dw = corpus.layers[(corpus.layers["kind"] == "depthwise") & (corpus.layers["kh"] == 3)]
    assert sorted(layers["layer_id"]) == sorted(dw["layer_id"])
    share_cols = [c for c in layers.columns if c.startswith("share_") and not c.startswith("share_classified")]
    np.testing.assert_allclose(layers[share_cols].sum(axis=1), 1.0)


def test_pngs_are_valid_and_referenced(world):
    _, _, out, _ = world
    pngs = sorted(p.name for p in out.glob("*.png"))
    for name in ("prototypes-k3-depthwise-dw3.png", "spectrum-k3-depthwise-dw3.png", "coverage-k3-depthwise-dw3.png",
                 "depth-k3-depthwise-dw3.png", "layers-k3-depthwise-dw3.png", "prototypes-k5-depthwise-p5.png",
                 "layers-k5-depthwise-p5.png", "spectrum-k3-regular-reg3.png"):
        assert name in pngs
    assert not any("p5" in n and n.startswith("spectrum") for n in pngs)  # prototypes mode: no code axis
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    for name in pngs:
        w, h = png_size(out / name)
        if not name.startswith("spectrum-k3-depthwise"):  # that one is the planted model-dir file
            assert w >= 500 and h >= 250, (name, w, h)
            assert (out / name).stat().st_size > 10_000, name
        assert f'src="{name}"' in page, name
        assert f"]({name})" in md, name
    for csv in out.glob("*.csv"):
        assert csv.name in page, csv.name
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<table>" in page and "http" not in page.split("<body>")[1].replace("https://", "")  # self-contained


def test_spectrum_copied_or_drawn(world, tmp_path):
    corpus, _, out, _ = world
    copied = (out / "spectrum-k3-depthwise-dw3.png").read_bytes()
    assert copied == (corpus.root.parent / "model3" / "spectrum.png").read_bytes()
    assert "drawn from the clusters" in (out / "report.md").read_text()  # reg3 has no model dir


def test_chunking_does_not_change_numbers(world, tmp_path):
    corpus, _, out, _ = world
    small = report(corpus, tmp_path / "small", runs=["dw3"], chunk_rows=5)
    a = pd.read_csv(small.parent / "coverage.csv")
    b = pd.read_csv(out / "coverage.csv")
    b = b[b["run_id"] == "dw3"].reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(pd.read_csv(small.parent / "layers-k3-depthwise-dw3.csv"),
                                  pd.read_csv(out / "layers-k3-depthwise-dw3.csv"))
    # one depthwise run only, regular kernels stored: said so, no comparison figure
    md = (small.parent / "report.md").read_text()
    assert "regular 3×3 kernels" in md and "--kind regular" in md
    assert not (small.parent / "compare-k3.png").exists()


def test_named_runs_must_exist_and_be_complete(world, tmp_path):
    corpus, _, _, _ = world
    with pytest.raises(RunError, match=r"runs/nope/run\.json not found"):
        report(corpus, tmp_path / "x", runs=["nope"])
    with pytest.raises(RunError, match=r"runs/unfinished/run\.json.*not completed"):
        report(corpus, tmp_path / "x", runs=["unfinished"])
    broken = corpus.root / "runs" / "broken"
    broken.mkdir()
    with pytest.raises(RunError, match=r"runs/broken/run\.json not found.*interrupted"):
        report(corpus, tmp_path / "x", runs=["broken"])
    (broken / "run.json").write_text("{not json")
    with pytest.raises(RunError, match=r"runs/broken/run\.json is unreadable"):
        report(corpus, tmp_path / "x", runs=["broken"])
    broken.joinpath("run.json").unlink()
    broken.rmdir()


def test_damaged_outputs_named(tmp_path):
    corpus = build_corpus(tmp_path / "c")
    write_run(corpus, "r")
    victim = min((corpus.root / "runs" / "r" / "k3").glob("scores-*.npy"))
    np.save(victim, np.zeros(3, np.float32))
    with pytest.raises(RunError, match=f"{victim.name} has shape"):
        report(corpus, tmp_path / "o", runs=["r"])
    victim.unlink()
    with pytest.raises(RunError, match=f"{victim.name} not found"):
        report(corpus, tmp_path / "o", runs=["r"])


def test_no_completed_run(tmp_path):
    corpus = build_corpus(tmp_path / "c")
    with pytest.raises(RunError, match="no completed run"):
        report(corpus, tmp_path / "o")
    write_run(corpus, "half", completed=False)
    with pytest.raises(RunError, match=r"no completed run.*half"):
        report(corpus, tmp_path / "o")


def test_cli(world, tmp_path, capsys):
    corpus, planted, _, _ = world
    assert main(["report", str(corpus.root), "--run", "p5", "--out", str(tmp_path / "r"), "--thresholds",
                 "0.9,0.7", "--no-progress"]) == 0
    cov = pd.read_csv(tmp_path / "r" / "coverage.csv")
    assert [c for c in cov.columns if c.startswith("share_")] == [
        "share_0.70", "share_0.90", "share_in_sample_0.70", "share_held_out_0.70", "share_in_sample_0.90",
        "share_held_out_0.90"]
    want = expected(corpus, planted["p5"], "prototypes", 0.7)
    assert dict(zip(cov["model"], cov["classified_0.70"], strict=True)) == {m: v[1] for m, v in want.items()}
    assert main(["report", str(corpus.root), "--run", "nope", "--out", str(tmp_path / "r2")]) == 1
    assert "runs/nope/run.json not found" in capsys.readouterr().err


def test_comparison_numbers(world):
    corpus, planted, out, _ = world
    cmp = pd.read_csv(out / "compare.csv").set_index("kind")
    assert list(cmp.index) == ["depthwise", "regular"] and set(cmp["kernel_size"]) == {3}
    for kind, key in (("depthwise", "dw3"), ("regular", "reg3")):
        want = expected(corpus, planted[key], "autoencoder", 0.85)
        assert cmp.loc[kind, "run_id"] == key
        assert cmp.loc[kind, "live"] == sum(v[0] for v in want.values())
        assert cmp.loc[kind, "share_0.85"] == pytest.approx(sum(v[1] for v in want.values()) / cmp.loc[kind, "live"])
    # 5x5: no regular kernels stored at that size
    assert "the corpus stores no regular 5×5 kernels" in (out / "report.md").read_text()


def test_all_kind_run_is_split_for_the_comparison(tmp_path):
    """A run of kind 'all' covers both kinds: the comparison splits it by the layers' kinds."""
    corpus = build_corpus(tmp_path / "c")
    planted = write_run(corpus, "everything", kind="all", hand=False)
    out = tmp_path / "o"
    report(corpus, out)
    cmp = pd.read_csv(out / "compare.csv").set_index("kind")
    assert list(cmp["run_id"]) == ["everything", "everything"]
    kinds = dict(zip(corpus.layers["layer_id"], corpus.layers["kind"], strict=True))
    for kind in ("depthwise", "regular"):
        sub = {s: tuple(a.copy() if a is not None else None for a in arrays) for s, arrays in planted.items()}
        for row in corpus.layers.itertuples():
            if row.shard in sub and kinds[row.layer_id] != kind:
                sub[row.shard][0][row.row_start:row.row_start + row.rows] = -2
        want = expected(corpus, sub, "autoencoder", 0.9)
        assert cmp.loc[kind, "live"] == sum(v[0] for v in want.values())
        assert cmp.loc[kind, "share_0.90"] == pytest.approx(sum(v[1] for v in want.values()) / cmp.loc[kind, "live"])
    assert (out / "compare-k3.png").is_file()


def test_rerun_replaces_own_files_only(world, tmp_path):
    corpus, _, _, _ = world
    out = tmp_path / "again"
    out.mkdir()
    (out / "layers-k3-depthwise-gone-7.png").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    report(corpus, out, runs=["p5"])
    assert not (out / "layers-k3-depthwise-gone-7.png").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_grid_bins_are_exact():
    """The coverage curves bin scores by the largest grid threshold <= score, as np.searchsorted would."""
    from kernelatlas.jobs.report.scan import CURVE_GRID, _grid_bin

    rng = np.random.default_rng(0)
    g = CURVE_GRID
    scores = np.concatenate([g, np.nextafter(g, -1), np.nextafter(g, 2), rng.uniform(-0.1, 1.1, 10_001),
                             np.float32(g).astype(np.float64), [np.nan, 0.0, 1.0, 1.0000001]])
    ref = np.searchsorted(g, scores, "right") - 1
    ref[np.isnan(scores)] = -1
    np.testing.assert_array_equal(_grid_bin(scores), ref)
