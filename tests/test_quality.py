"""Per-layer kernel quality and the global PCA (kernelatlas.jobs.quality) against plain numpy references
written from the definitions of reference/README.md section B (and torchconvquality's published code for the
edge cases: an all-zero layer is all sparse, an all-zero filter stays zero in the orthogonality): SVD entropy,
1%-rule sparsity, TH(n), orthogonality, PCA, on every kernel size, through the native streaming statistics;
thread-count and chunk-size invariance; random-init and trained layers; the TH(n) fit; a CNN Filter DB file
imported."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import reference as R

import kernelatlas
from kernelatlas import cli
from kernelatlas.corpus import Corpus, CorpusWriter
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
from kernelatlas.jobs import quality as lq

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
TOL = 1e-6


# ---------------------------------------------------------------------------------------------- references


# ---------------------------------------------------------------------------------------------- corpora


def structured(rng: np.random.Generator, n: int, d: int, offset: float = 0.0) -> np.ndarray:
    """n kernels with well separated variances along random directions (so that PCA bases are well
    defined)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    sig = 0.6 ** np.arange(d)
    return (rng.standard_normal((n, d)) * sig) @ q.T + offset


def layer_weights(seed: int = 0) -> list[tuple[str, np.ndarray, int, str]]:
    """(name, weight [c_out, c_in_per_group, k, k] float32, groups, kind): every edge case of the metrics."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray, int, str]] = []
    for k in (3, 5, 7):
        d = k * k
        dw = structured(rng, 96, d, 0.05).astype(np.float32).reshape(96, 1, k, k)
        out.append((f"dw{k}", dw, 96, "depthwise"))
        reg = (rng.standard_normal((12, 7, k, k)) * 0.2).astype(np.float32)
        reg[3] = 0.0  # an all-zero output channel (orthogonality keeps it as a zero row)
        reg[5, 2] *= 1e-4  # a sparse kernel
        reg[0, :3] = 0.0
        out.append((f"reg{k}", reg, 1, "regular"))
        grouped = structured(rng, 8 * 4, d).astype(np.float32).reshape(8, 4, k, k)
        out.append((f"grp{k}", grouped, 2, "grouped"))
    k, d = 3, 9
    out.append(("zeros", np.zeros((16, 4, 3, 3), np.float32), 1, "regular"))
    same = np.tile(rng.standard_normal(9).astype(np.float32), (40, 1)).reshape(40, 1, 3, 3)
    out.append(("identical", same, 40, "depthwise"))
    nan = (rng.standard_normal((10, 3, 3, 3)) * 0.3).astype(np.float32)
    nan[2, 1, 0, 0] = np.nan
    nan[7, 0, 1, 1] = np.inf
    out.append(("nonfinite", nan, 1, "regular"))
    one = rng.standard_normal((1, 1, 3, 3)).astype(np.float32)
    out.append(("single", one, 1, "regular"))
    pruned = (rng.standard_normal((64, 1, 3, 3)) * 0.5).astype(np.float32)
    pruned[::3] *= 1e-3
    pruned[1::5] = 0.0
    out.append(("pruned", pruned, 64, "depthwise"))
    big = structured(rng, 6000, d, 0.02).astype(np.float32).reshape(6000, 1, 3, 3)
    big[::7] *= 1e-3
    out.append(("big", big, 6000, "depthwise"))
    return out


def make_corpus(root: Path, layers: list[tuple[str, np.ndarray, int, str]], *, shard_rows: int = 1 << 26,
                dtype: str = "float32", models: int = 2, meta: list[dict[str, str]] | None = None) -> Corpus:
    with CorpusWriter(root, shard_rows=shard_rows, dtype=dtype) as w:
        per = -(-len(layers) // models)
        for m in range(models):
            part = layers[m * per:(m + 1) * per]
            convs = [ConvLayer(name, weight, groups, kind, False, float(i))
                     for i, (name, weight, groups, kind) in enumerate(part)]
            w.add_model(LoadedModel(f"/m/model{m}.pth", "torch", convs), sha256=f"sha-{m}", all_convs=True,
                        meta=(meta[m] if meta else None))
    return Corpus.open(root)


@pytest.fixture(scope="module")
def edge_layers() -> list[tuple[str, np.ndarray, int, str]]:
    return layer_weights()


@pytest.fixture(scope="module")
def edge_corpus(tmp_path_factory: pytest.TempPathFactory, edge_layers: Any) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("edge") / "c", edge_layers, shard_rows=2000)


# ---------------------------------------------------------------------------------------------- formulas


def test_threshold_is_the_papers_logistic() -> None:
    params = (1.2618047, 0.88767525, 2.30436435, -0.31050834)
    for n in (1, 2, 3, 9, 64, 1000, 2 ** 20):
        assert lq.threshold_entropy(n, 9) == pytest.approx(R.threshold_entropy(n, params), abs=1e-12)
    assert lq.threshold_entropy(2 ** 30, 9) == pytest.approx(0.95129636, abs=1e-6)  # L + b: ~log10(9)
    assert np.isnan(lq.threshold_entropy(0, 9)) and np.isnan(lq.threshold_entropy(64, 16))
    for d in (25, 49):  # the fitted curves rise from ~0 at n = 2 to ~log10(d)
        assert abs(lq.threshold_entropy(2, d)) < 0.05
        assert lq.threshold_entropy(2 ** 16, d) == pytest.approx(math.log10(d), abs=0.02)
        grid = lq.threshold_entropy(2.0 ** np.arange(1, 20), d)
        assert (np.diff(grid) > 0).all()


@pytest.mark.parametrize("d", [9, 25, 49])
@pytest.mark.parametrize("n", [1, 2, 7, 9, 25, 64, 1025])
def test_entropy_from_moments_matches_svd(d: int, n: int) -> None:
    rng = np.random.default_rng(n * 100 + d)
    for rows in (rng.standard_normal((n, d)), structured(rng, n, d, offset=3.0),
                 rng.uniform(-1, 1, (n, d)) * 1e-3):
        h = lq.entropy_from_moments([n], [rows.sum(axis=0)], [rows.T @ rows])[0]
        assert h == pytest.approx(R.variance_entropy(rows), abs=TOL)
        assert 0.0 <= h <= math.log10(d) + 1e-12


def test_entropy_edge_cases() -> None:
    w = np.tile(np.random.default_rng(1).standard_normal(9).astype(np.float32), (1000, 1)).astype(np.float64)
    assert lq.entropy_from_moments([1000], [w.sum(0)], [w.T @ w])[0] == 0.0  # identical kernels
    z = np.zeros((5, 9))
    assert lq.entropy_from_moments([5], [z.sum(0)], [z.T @ z])[0] == 0.0
    assert np.isnan(lq.entropy_from_moments([0], [np.zeros(9)], [np.zeros((9, 9))])[0])
    line = np.outer(np.arange(50.0), np.ones(9))  # one direction of variance
    assert lq.entropy_from_moments([50], [line.sum(0)], [line.T @ line])[0] == pytest.approx(0.0, abs=1e-9)


def test_orthogonality_matches_reference_in_blocks() -> None:
    rng = np.random.default_rng(3)
    f = rng.standard_normal((50, 36))
    f[4] = 0.0
    want = R.layer_quality(f.reshape(50, 4, 3, 3))["orthogonality"]
    assert lq.orthogonality(f) == pytest.approx(want, abs=1e-12)
    assert lq.orthogonality(f, block_bytes=36 * 8 * 7) == pytest.approx(want, abs=1e-12)  # 7-row blocks
    q, _ = np.linalg.qr(rng.standard_normal((36, 36)))
    assert lq.orthogonality(q[:10] * 3.0) == pytest.approx(1.0, abs=1e-12)
    assert lq.orthogonality(np.tile(f[:1], (6, 1))) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(lq.orthogonality(f[:1]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_orthogonality_of_corpus_dtypes_is_native_within_tolerance(dtype) -> None:
    """float16 / float32 layers take the native kernel (fp32 Gram): within ORTHOGONALITY_TOL of the float64
    reference; non-contiguous views are copied explicitly; a layer too big for block_bytes falls back to the
    float64 blocks (and then agrees with them to 1e-12)."""
    rng = np.random.default_rng(9)
    f = (rng.standard_normal((70, 4, 3, 3)) * 0.1).astype(dtype)
    f[6] = 0.0
    f[9, 1, 1, 1] = np.nan
    want = R.layer_quality(f.astype(np.float64))["orthogonality"]
    flat = f.reshape(70, 36)
    assert abs(lq.orthogonality(flat) - want) <= lq.ORTHOGONALITY_TOL
    assert lq.orthogonality(flat) != lq.orthogonality(flat.astype(np.float64))  # the fp32 path ran
    wide = np.zeros((70, 72), dtype)
    wide[:, ::2] = flat
    assert abs(lq.orthogonality(wide[:, ::2]) - want) <= lq.ORTHOGONALITY_TOL
    small_blocks = lq.orthogonality(flat, block_bytes=70 * 48 * 4 - 1)  # the native rows would not fit
    assert small_blocks == pytest.approx(lq.orthogonality(flat.astype(np.float64)), abs=1e-12)
    assert np.isnan(lq.orthogonality(flat[:1])) and np.isnan(lq.orthogonality(flat[:0]))


def test_orthogonality_of_a_tall_depthwise_layer_stays_within_its_block_memory() -> None:
    """A depthwise layer is many 9-wide filters: the Gram blocks (rows x rows), not just the input blocks, must
    stay within block_bytes (sized by the input alone, 20,000 filters asked for a 1.7 GB block here)."""
    import tracemalloc

    rng = np.random.default_rng(5)
    tall = rng.standard_normal((20_000, 9))
    want = R.layer_quality(tall[:3000].reshape(3000, 1, 3, 3))["orthogonality"]
    assert lq.orthogonality(tall[:3000], block_bytes=1 << 14) == pytest.approx(want, abs=1e-12)
    tracemalloc.start()
    try:
        value = lq.orthogonality(tall, block_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.0 < value < 1.0
    assert peak < 16 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_pca_from_moments_matches_svd() -> None:
    rng = np.random.default_rng(4)
    for d in (9, 25, 49):
        rows = structured(rng, 3000, d, 0.1)
        m = np.abs(rows).max(axis=1)
        s = rows / m[:, None]
        pca = lq.pca_from_moments(len(s), s.sum(0), s.T @ s)
        mean, basis, evr = R.pca(rows)
        np.testing.assert_allclose(pca.mean, mean, atol=TOL)
        np.testing.assert_allclose(pca.evr, evr, atol=TOL)
        # the first components have well separated variances, so their directions are well defined
        np.testing.assert_allclose(pca.basis[:6], basis[:6], atol=TOL)
        assert pca.evr.sum() == pytest.approx(1.0) and (np.diff(pca.evr) <= 1e-15).all()


def test_degenerate_rule_constants() -> None:
    frame = pd.DataFrame({"layer_id": range(6), "k": [3, 3, 3, 3, 7, 3], "n": [64, 64, 64, 64, 64, 0],
                          "nonfinite": 0, "zeros": 0, "sparse": [0, 0, 9, 8, 20, 0], "max_abs": 1.0,
                          "entropy": [0.9, 0.4, 0.4, 0.4, 0.7, np.nan], "n_clean": 64,
                          "entropy_clean": 0.5, "orthogonality": 0.5})
    th = lq.threshold_entropy(64, 9)
    frame.loc[0, "entropy"] = th - 0.0199
    out = lq._derive(frame, margin=0.02, low_entropy=0.5, min_sparsity=0.14)
    # random-looking within the margin; low entropy but not sparse; 9/64 = 0.1406 >= 0.14; 8/64 = 0.125 <
    # 0.14; 7x7: the low-entropy bound is 0.5 * log10(49) / log10(9) = 0.886; no kernels
    assert out["degenerate"].tolist() == [True, False, True, False, True, False]
    assert out["random"].tolist() == [False, False, False, False, False, False]
    assert lq.low_entropy_cut(49) == pytest.approx(0.5 * math.log10(49) / math.log10(9))


# ---------------------------------------------------------------------------------------------- layer_stats


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_layer_stats_matches_reference(dtype: Any) -> None:
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3000, 25)) * 0.3).astype(dtype)
    x[10:20] = 0
    x[30, 3] = np.nan
    x[31, 0] = np.inf
    x[100:140] *= dtype(1e-3)
    x[500:600] = 0
    starts = np.array([0, 7, 500, 600, 600, 1000], np.int64)
    stops = np.array([7, 500, 600, 600, 3000, 1001], np.int64)
    st = lq.layer_stats(np.ascontiguousarray(x), starts, stops)
    for i, (a, b) in enumerate(zip(starts, stops, strict=True)):
        w = x[a:b].astype(np.float64)
        fin = np.isfinite(w).all(axis=1)
        wf = w[fin]
        amax = np.abs(wf).max(axis=1) if len(wf) else np.zeros(0)
        mx = amax.max(initial=0.0)
        scaled = wf / np.where(amax > 0, amax, 1)[:, None]
        assert st["n"][i] == len(wf) and st["nonfinite"][i] == (~fin).sum()
        assert st["zeros"][i] == (amax == 0).sum()
        assert st["max_abs"][i] == mx
        assert st["sparse"][i] == ((amax < 0.01 * mx).sum() if mx > 0 else len(wf))
        # the documented accuracy of the native moments: fp32 partial sums over 64 rows per lane, combined in
        # float64 -- at worst ~3.8e-6 of sum |w_i w_j|
        for key, rows in (("sum", wf), ("gram", wf), ("sum_scaled", scaled), ("gram_scaled", scaled)):
            ones = np.ones((len(rows), 1))
            want = rows.sum(0) if key.startswith("sum") else rows.T @ rows
            bound = (np.abs(rows).T @ ones)[:, 0] if key.startswith("sum") else np.abs(rows).T @ np.abs(rows)
            assert (np.abs(st[key][i] - want) <= 4e-6 * bound + 1e-300).all(), key


# ---------------------------------------------------------------------------------------------- corpus runs


def test_quality_matches_reference(edge_corpus: Corpus, edge_layers: Any) -> None:
    frame = kernelatlas.quality(edge_corpus)
    lay = edge_corpus.layers.set_index("layer_id")
    assert len(frame) == len(edge_layers)
    assert {"layer_id", "n", "sparsity", "entropy", "th", "entropy_ratio", "degenerate", "entropy_clean",
            "orthogonality"} <= set(frame.columns)
    weights = {name: w for name, w, _, _ in edge_layers}
    for row in frame.itertuples(index=False):
        name = lay.loc[row.layer_id, "name"]
        ref = R.layer_quality(weights[name])
        d = weights[name].shape[2] ** 2
        assert row.n == ref["n"] and row.nonfinite == ref["nonfinite"] and row.zeros == ref["zeros"], name
        assert row.n_clean == ref["n_clean"], name
        for col in ("sparsity", "entropy", "entropy_clean", "orthogonality"):
            got, want = getattr(row, col), ref[col]
            assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=TOL), \
                (name, col, got, want)
        assert row.th == pytest.approx(R.threshold_entropy(ref["n"], lq.TH_PARAMS[d]), abs=1e-12)
        assert row.entropy_ratio == pytest.approx(row.entropy / row.th, rel=1e-12)
        assert row.random == (row.entropy > row.th)
        cut = 0.5 * math.log10(d) / math.log10(9)
        assert row.degenerate == (row.entropy >= row.th - 0.02
                                  or (row.entropy < cut and row.sparsity >= 0.14))
    by = dict(zip(frame["layer_id"].map(lay["name"]), frame.itertuples(index=False), strict=True))
    assert by["identical"].entropy == 0.0 and not by["identical"].random
    assert by["zeros"].sparsity == 1.0 and by["zeros"].entropy == 0.0 and np.isnan(by["zeros"].entropy_clean)
    assert by["nonfinite"].nonfinite == 2 and by["single"].n == 1 and np.isnan(by["single"].orthogonality)


def test_pca_of_the_corpus_matches_reference(edge_corpus: Corpus, edge_layers: Any) -> None:
    run = lq.quality_run(edge_corpus)
    assert run.kernel_sizes == [3, 5, 7]
    for k in (3, 5, 7):
        rows = np.concatenate([w.reshape(-1, k * k) for _, w, _, _ in edge_layers if w.shape[2] == k])
        pca = run.pca(k)
        mean, basis, evr = R.pca(rows)
        assert pca.n == np.isfinite(rows).all(axis=1).sum() and pca.scaled
        np.testing.assert_allclose(pca.mean, mean, atol=TOL)
        np.testing.assert_allclose(pca.evr, evr, atol=TOL)
        gaps = -np.diff(evr)
        for i in np.flatnonzero(gaps[:k * k - 1] > 1e-3)[:3]:  # components whose eigenvalue is well separated
            if i == 0 or gaps[i - 1] > 1e-3:
                np.testing.assert_allclose(pca.basis[i], basis[i], atol=1e-5)
        table = pd.read_csv(run.root / f"pca-k{k}.csv")
        np.testing.assert_allclose(table["evr"].to_numpy()[:-1], pca.evr, rtol=1e-12)
        assert (run.root / f"pca-k{k}.png").stat().st_size > 1000
    unscaled = lq.quality_run(edge_corpus, scale="none")
    rows3 = np.concatenate([w.reshape(-1, 9) for _, w, _, _ in edge_layers if w.shape[2] == 3])
    mean, _, evr = R.pca(rows3, scaled=False)
    np.testing.assert_allclose(unscaled.pca(3).evr, evr, atol=TOL)
    np.testing.assert_allclose(unscaled.pca(3).mean, mean, atol=TOL)


def test_run_directory_and_resume(edge_corpus: Corpus) -> None:
    run = lq.quality_run(edge_corpus, kind="depthwise")
    info = json.loads((run.root / "run.json").read_text())
    assert info["completed"] and info["format"] == lq.QUALITY_FORMAT
    assert info["options"]["kind"] == "depthwise"
    table = run.table
    kinds = edge_corpus.layers.set_index("layer_id").loc[table["layer_id"], "kind"]
    assert (kinds == "depthwise").all() and len(table) == 6
    stamp = (run.root / "run.json").stat().st_mtime_ns
    again = lq.quality_run(edge_corpus, kind="depthwise")  # done: returned as is
    assert again.run_id == run.run_id and (run.root / "run.json").stat().st_mtime_ns == stamp
    assert lq.latest_quality_run(edge_corpus) is not None
    with pytest.raises(ValueError, match="kind must be"):
        lq.quality_run(edge_corpus, kind="dense")
    # recomputing under the same id with other options replaces every output (and no stale figure is left)
    (run.root / "shift-k3-family").mkdir()
    fast = lq.quality_run(edge_corpus, kind="depthwise", run_id=run.run_id, with_orthogonality=False,
                          figures=False)
    assert fast.table["orthogonality"].isna().all()
    assert np.allclose(fast.table["entropy"], table["entropy"], equal_nan=True)
    assert not (run.root / "shift-k3-family").exists() and not list(run.root.glob("*.png"))


def test_threads_and_chunks_do_not_change_results(tmp_path: Path, edge_layers: Any) -> None:
    a = make_corpus(tmp_path / "a", edge_layers, shard_rows=2000)
    results = []
    for threads, chunk in ((1, 1 << 22), (2, 1 << 22), (2, 50), (1, 1)):
        frame = lq.quality(a, threads=threads, chunk_rows=chunk, run_id=f"t{threads}-c{chunk}", figures=False)
        run = lq.load_quality_run(a, f"t{threads}-c{chunk}")
        results.append((frame.sort_values("layer_id").reset_index(drop=True), run.pca(3)))
    base, pca0 = results[0]
    num = [c for c in base.columns if base[c].dtype.kind == "f"]
    for frame, pca in results[1:]:
        exact = [c for c in base.columns if c not in num]
        assert frame[exact].equals(base[exact])
        np.testing.assert_allclose(frame[num].to_numpy(), base[num].to_numpy(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(pca.evr, pca0.evr, rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(pca.mean, pca0.mean, rtol=1e-9, atol=1e-15)


def test_float16_corpus(tmp_path: Path, edge_layers: Any) -> None:
    layers = [(n, w.astype(np.float16), g, k) for n, w, g, k in edge_layers if n in ("dw3", "reg5", "pruned")]
    c = make_corpus(tmp_path / "c", layers, dtype="float16", models=1)
    frame = lq.quality(c, figures=False)
    for row, (_, w, _, _) in zip(frame.sort_values("layer_id").itertuples(index=False), layers, strict=True):
        ref = R.layer_quality(w)
        assert row.entropy == pytest.approx(ref["entropy"], abs=TOL)
        assert row.sparsity == pytest.approx(ref["sparsity"], abs=TOL)


# ---------------------------------------------------------------------------------------------- random and
# trained


@pytest.mark.parametrize("k", [3, 5, 7])
def test_random_init_layers_look_random(k: int) -> None:
    torch = pytest.importorskip("torch")
    shapes = [(4, 16), (8, 8), (16, 8), (16, 16), (32, 16), (3, 64), (32, 32), (64, 32), (64, 64), (128, 96)]
    flags = []
    for seed in range(8):
        torch.manual_seed(seed)
        for c_in, c_out in shapes:
            w = torch.nn.Conv2d(c_in, c_out, k).weight.detach().numpy().reshape(-1, k * k).astype(np.float64)
            h = lq.entropy_from_moments([len(w)], [w.sum(0)], [w.T @ w])[0]
            flags.append(h > lq.threshold_entropy(len(w), k * k))
        for c in (64, 96, 256):  # depthwise: n = c kernels
            w = torch.nn.Conv2d(c, c, k, groups=c).weight.detach().numpy()
            w = w.reshape(-1, k * k).astype(np.float64)
            h = lq.entropy_from_moments([len(w)], [w.sum(0)], [w.T @ w])[0]
            flags.append(h > lq.threshold_entropy(len(w), k * k))
    assert len(flags) == 8 * 13 and np.mean(flags) >= 0.95


@pytest.fixture(scope="module")
def trained_corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    files = [WEIGHTS / "mobilenet_v2_torchvision" / "mobilenet_v2-b0353104.pth",
             WEIGHTS / "ultraface" / "version-RFB-320.pth",
             WEIGHTS / "ppocr_v4_rapidocr" / "ch_PP-OCRv4_det_infer.onnx"]
    if not all(f.is_file() for f in files):
        pytest.skip(f"trained checkpoints not found under {WEIGHTS}")
    from kernelatlas.jobs.extract import extract

    root = tmp_path_factory.mktemp("trained") / "c"
    report = extract(files, root, all_convs=True, progress=False)
    assert report.ok
    return Corpus.open(root)


def test_trained_layers_mostly_not_random(trained_corpus: Corpus) -> None:
    frame = lq.quality(trained_corpus, figures=False)
    big = frame[frame["n"] >= 64]
    assert len(big) >= 40
    assert big["random"].mean() < 0.25


# ---------------------------------------------------------------------------------------------- TH(n) fit


@pytest.mark.parametrize("d", [9, 25, 49])
def test_threshold_fit_reproduces_constants_on_a_small_scale(d: int) -> None:
    """The fit of TH(n) redone with fewer repetitions and n <= 2^8 (seconds) lands on the stored curve: the
    paper's for d = 9, ours for 25 and 49."""
    params, table = lq.fit_threshold(d, max_log2n=8, max_replicates=3, seed=1)
    e = np.linspace(1, 8, 71)
    stored = np.array([R.threshold_entropy(2 ** x, lq.TH_PARAMS[d]) for x in e])
    refit = np.array([R.threshold_entropy(2 ** x, params) for x in e])
    assert np.abs(refit - stored).max() < 0.04
    at_points = np.array([R.threshold_entropy(n, lq.TH_PARAMS[d]) for n in table["n"]])
    assert np.abs(table["min_entropy"] - at_points).max() < 0.045  # the simulated minima lie on the curve


# ---------------------------------------------------------------------------------------------- CNN Filter DB


def build_filterdb(path: Path, seed: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """A CNN Filter DB dataset.h5 (filters (N, 3, 3) float64, pandas meta with the MultiIndex [model_id,
    conv_depth, conv_depth_norm, layer_id] and inclusive filter_ids); values are float32-exact so that the
    float32 corpus holds them unchanged.  Returns (model_id, layer_id, weight [out, in/groups, 3, 3])."""
    rng = np.random.default_rng(seed)
    specs = {11: [(3, 32, "reg"), (32, 32, "dw"), (32, 64, "reg"), (64, 64, "zeros")],
             12: [(8, 16, "reg"), (16, 16, "same"), (16, 32, "sparse")]}
    rows, blocks, layers, offset = [], [], [], 0
    for model_id, convs in specs.items():
        for layer_id, (c_in, c_out, what) in enumerate(convs):
            per = 1 if what in ("dw", "same") else c_in
            w = rng.standard_normal((c_out, per, 3, 3)) * 0.1
            if what == "zeros":
                w[:] = 0.0
            elif what == "same":
                w[:] = w[0]
            elif what == "sparse":
                w[::2] *= 1e-4
            w = w.astype(np.float32).astype(np.float64)
            n = c_out * per
            blocks.append(w.reshape(n, 3, 3))
            rows.append({"model_id": model_id, "conv_depth": layer_id, "conv_depth_norm": layer_id / 3,
                         "layer_id": layer_id, "filter_ids": f"{offset}:{offset + n - 1}",
                         "model": f"net{model_id}", "Name": f"Family{model_id % 2}", "Task": "Classification",
                         "Visual Category": "natural" if model_id == 11 else "medical",
                         "Training-Dataset": "X", "in_channels": c_in, "out_channels": c_out,
                         "layer_depth": layer_id, "producer": "test"})
            layers.append((model_id, layer_id, w))
            offset += n
    with h5py.File(path, "w") as f:
        f.create_dataset("filters", data=np.concatenate(blocks))
    frame = pd.DataFrame(rows).set_index(["model_id", "conv_depth", "conv_depth_norm", "layer_id"])
    frame.to_hdf(path, key="meta", format="table")
    return layers


def test_imported_filterdb_gives_the_metrics_of_the_original_arrays(tmp_path: Path) -> None:
    from kernelatlas.jobs.filterdb import import_filterdb

    originals = build_filterdb(tmp_path / "dataset.h5")
    import_filterdb(tmp_path / "dataset.h5", tmp_path / "c", progress=False)
    c = Corpus.open(tmp_path / "c")
    frame = lq.quality(c, figures=False)
    joined = frame.merge(c.layers, on="layer_id")
    joined = joined.merge(c.models[["model_id", "filterdb_model_id"]], on="model_id")

    assert len(joined) == len(originals)
    for model_id, layer_id, w in originals:
        row = joined[(joined["filterdb_model_id"].astype(int) == model_id)
                     & (joined["filterdb_layer_id"].astype(int) == layer_id)].iloc[0]
        ref = R.layer_quality(w)
        assert row["n"] == ref["n"]
        for col in ("sparsity", "entropy", "entropy_clean", "orthogonality"):
            got, want = row[col], ref[col]
            assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=TOL), (layer_id, col)
    pca = lq.latest_quality_run(c).pca(3)
    mean, _, evr = R.pca(np.concatenate([w.reshape(-1, 9) for _, _, w in originals]))
    np.testing.assert_allclose(pca.evr, evr, atol=TOL)
    np.testing.assert_allclose(pca.mean, mean, atol=TOL)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_quality(tmp_path: Path, edge_layers: Any, capsys: pytest.CaptureFixture[str]) -> None:
    c = make_corpus(tmp_path / "c", edge_layers[:4], models=1)
    assert cli.main(["quality", str(c.root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "degenerate" in out and "quality.parquet" in out
    run = lq.latest_quality_run(c)
    assert (run.root / "quality.parquet").is_file() and (run.root / "pca-k3.png").is_file()
    assert cli.main(["quality", str(tmp_path / "missing"), "--no-progress"]) == 1
    assert "kernelatlas quality: error" in capsys.readouterr().err
