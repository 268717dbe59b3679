"""Corpus-scale assignment (kernelatlas.jobs.assign): outputs per shard equal the in-memory engine, rows of other kinds
get -2, per-layer shares, resumption after an interruption gives identical files, 1 and 2 threads agree
bit for bit, prototype mode, and Corpus.run joins results to layers and models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import kernelatlas as ka
from kernelatlas.corpus import Corpus, CorpusError, CorpusWriter, rundir
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
from kernelatlas.jobs import assign as runs_mod

torch = pytest.importorskip("torch")
MASTER_KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "master_key_filters_7x7.txt"


def make_corpus(root, k=3, n_models=3, seed=0):
    rng = np.random.default_rng(seed)
    with CorpusWriter(root, shard_rows=3000) as w:
        for m in range(n_models):
            layers = []
            for i in range(4):
                if i % 2 == 0:
                    weight = rng.standard_normal((512 + 64 * i, 1, k, k)).astype(np.float32)
                    weight[:5] = 0.0
                    layers.append(ConvLayer(f"dw{i}", weight, len(weight), "depthwise", False, float(i)))
                else:
                    weight = rng.standard_normal((32, 16, k, k)).astype(np.float32)
                    layers.append(ConvLayer(f"conv{i}", weight, 1, "regular", False, float(i)))
            w.add_model(LoadedModel(f"/m/model{m}.pth", "torch", layers), sha256=f"{seed}-{m}", all_convs=True)
    return Corpus.open(root)


def make_model(tmp_path, d=9):
    from torch import nn

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
    dec = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, d))
    model = ka.Autoencoder.from_torch(enc, dec)
    x = np.random.default_rng(5).standard_normal((4096, d)).astype(np.float32)
    q = np.nanquantile(model.encode(x), [0.0, 0.3, 0.6, 1.0]).astype(float)
    model = model.with_clusters([(0.0, q[1]), (q[1], q[2]), (q[2], 1.0)], ["a", "b", "c"])
    out = tmp_path / "model"
    model.save(out)
    return out, model


def outputs(c, rid, k=3):
    root = c.root / "runs" / rid / f"k{k}"
    return {f.name: f.read_bytes() for f in sorted(root.glob("*.npy"))}


def test_run_matches_engine_and_layers(tmp_path):
    c = make_corpus(tmp_path / "c")
    mdir, model = make_model(tmp_path)
    rid = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False)
    res = c.run(rid)
    assert res.info["completed"] and res.info["mode"] == "autoencoder" and res.clusters == ["a", "b", "c"]
    lay = c.layers
    for shard in c.shards(3):
        arr = c.shard_array(shard)
        labels, scores, codes = res.labels(shard), res.scores(shard), res.codes(shard)
        assert len(labels) == len(arr)
        sl = lay[lay["shard"] == shard]
        for _, row in sl.iterrows():
            a, b = row["row_start"], row["row_start"] + row["rows"]
            if row["kind"] == "depthwise":
                want = ka.assign(np.ascontiguousarray(arr[a:b]), model, threshold=0.3)
                np.testing.assert_array_equal(labels[a:b], want[0])
                np.testing.assert_array_equal(scores[a:b], want[1])
                np.testing.assert_array_equal(codes[a:b], want[2])
            else:
                assert (labels[a:b] == -2).all() and np.isnan(scores[a:b]).all()
    per = res.layers
    assert set(per["kind"]) == {"depthwise"} and len(per) == 6
    row = per.iloc[0]
    assert row["kernels"] == row["rows"] and row["live"] == row["rows"] - 5
    shares = per[["share_a", "share_b", "share_c"]].sum(axis=1)
    np.testing.assert_allclose(shares, per["assigned_share"])
    assert "model_name" in per.columns and per["model_name"].iloc[0] == "model0"


def test_rerun_returns_same_run_and_resumes_identically(tmp_path, monkeypatch):
    c = make_corpus(tmp_path / "c")
    mdir, _ = make_model(tmp_path)
    rid = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False)
    complete = outputs(c, rid)
    assert runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False) == rid
    # interrupt a fresh run of the same command after its first shard
    shutil.rmtree(c.root / "runs")
    calls = {"n": 0}
    real_commit = runs_mod._ShardOutput.commit

    def failing_commit(self):
        real_commit(self)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs_mod._ShardOutput, "commit", failing_commit)
    with pytest.raises(KeyboardInterrupt):
        runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False)
    assert not (c.root / "runs" / rid / "run.json").exists()
    assert len(list((c.root / "runs" / rid / "k3").glob("labels-*.npy"))) == 1
    monkeypatch.setattr(runs_mod._ShardOutput, "commit", real_commit)
    assert runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False) == rid
    assert outputs(c, rid) == complete
    assert not list((c.root / "runs" / rid).rglob("*.tmp"))


def test_failure_inside_a_shard_leaves_no_partial_outputs(tmp_path, monkeypatch):
    """An error while a shard is being computed (here: the engine raising on the second chunk) removes that
    shard's temp files and commits nothing for it; the rerun completes with the same outputs as a clean run."""
    c = make_corpus(tmp_path / "c")
    mdir, _ = make_model(tmp_path)
    clean = outputs(c, runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False, run_id="clean"))
    real_assign = ka.assign
    calls = {"n": 0}

    def failing_assign(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated")
        return real_assign(*args, **kwargs)

    monkeypatch.setattr(ka, "assign", failing_assign)
    with pytest.raises(MemoryError):
        runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False, run_id="again", chunk_rows=300)
    run_dir = c.root / "runs" / "again"
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("labels-*.npy"))
    monkeypatch.setattr(ka, "assign", real_assign)
    runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False, run_id="again", chunk_rows=300)
    assert outputs(c, "again") == clean


def test_threads_give_identical_outputs(tmp_path):
    c = make_corpus(tmp_path / "c", n_models=4)
    mdir, _ = make_model(tmp_path)
    r1 = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, threads=1, run_id="t1", progress=False)
    r2 = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, threads=2, run_id="t2", progress=False)
    assert outputs(c, r1) == outputs(c, r2)


def test_kind_all_and_regular(tmp_path):
    c = make_corpus(tmp_path / "c")
    mdir, _ = make_model(tmp_path)
    rid = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, kind="all", progress=False)
    res = c.run(rid)
    assert all((res.labels(s) >= -1).all() for s in c.shards(3))
    reg = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, kind="regular", progress=False)
    assert set(c.run(reg).layers["kind"]) == {"regular"}
    assert len({rid, reg}) == 2


@pytest.mark.skipif(not MASTER_KEYS.is_file(), reason="../shared/reference/master_key_filters_7x7.txt not present")
def test_prototype_mode_recovers_planted_filters(tmp_path):
    # The 8 master key filters: T. Lindeberg, Z. Babaiee, P. Kiasari (JMIV 2026), CC BY 4.0, read from
    # ../shared/reference (never copied into the project).
    protos, names = runs_mod.load_prototypes(MASTER_KEYS)
    assert protos.shape == (8, 7, 7) and len(names) == 8
    rng = np.random.default_rng(3)
    src = rng.integers(0, 8, 4000)
    kernels = (rng.uniform(0.5, 2.0, (4000, 1, 1)) * protos[src] + rng.normal(0, 0.05, (4000, 1, 1))
               + rng.normal(0, 0.02 * np.abs(protos[src]).max(axis=(1, 2))[:, None, None], (4000, 7, 7)))
    root = tmp_path / "c7"
    with CorpusWriter(root) as w:
        w.add_model(LoadedModel("/m/planted.pth", "torch",
                                [ConvLayer("dw", kernels.astype(np.float32)[:, None], 4000, "depthwise", False, 0.0)]),
                    sha256="planted")
    c = Corpus.open(root)
    rid = runs_mod.assign_corpus(c, prototypes=MASTER_KEYS, threshold=0.8, progress=False)
    labels = c.run(rid).labels(c.shards(7)[0])
    assert (labels == src).mean() >= 0.99
    info = json.loads((root / "runs" / rid / "run.json").read_text())
    assert info["mode"] == "prototypes" and len(info["clusters"]) == 8


def test_errors_name_the_fix(tmp_path):
    c = make_corpus(tmp_path / "c")
    mdir, _ = make_model(tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        runs_mod.assign_corpus(c, progress=False)
    with pytest.raises(ValueError, match="kind"):
        runs_mod.assign_corpus(c, model=mdir, kind="bogus", progress=False)
    with pytest.raises(Exception, match="no completed run"):
        c.run()


def test_precision_of_a_corpus_run(tmp_path):
    """--precision: a run id of its own (fp32 runs keep theirs), the engine's outputs for that precision, and the
    refusals that name the fix."""
    c = make_corpus(tmp_path / "c")
    mdir, model = make_model(tmp_path)
    fp32 = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False)
    assert fp32 == runs_mod.run_id_for(c, {"mode": "autoencoder", "model": runs_mod._model_digest(mdir),
                                           "threshold": 0.3, "kind": "depthwise", "min_abs": 0.0, "decoder": "auto"})
    with pytest.raises(ValueError, match="precision='tf32' is the GPU's tensor-core path"):
        runs_mod.assign_corpus(c, model=mdir, threshold=0.3, precision="tf32", device="cpu", progress=False)
    with pytest.raises(ValueError, match="prototype runs are fp32"):
        runs_mod.assign_corpus(c, prototypes=np.eye(9, dtype=np.float32).reshape(9, 3, 3)[:2], threshold=0.3,
                               precision="bf16", progress=False)
    with pytest.raises(ValueError, match="precision must be 'fp32', 'bf16' or 'tf32'"):
        runs_mod.assign_corpus(c, model=mdir, threshold=0.3, precision="fp16", progress=False)
    if not ka.build_info().get("bf16"):
        with pytest.raises(ValueError, match="precision='bf16' is not available"):
            runs_mod.assign_corpus(c, model=mdir, threshold=0.3, precision="bf16", progress=False)
        return
    bf16 = runs_mod.assign_corpus(c, model=mdir, threshold=0.3, precision="bf16", progress=False)
    assert bf16 != fp32 and c.run(bf16).info["options"]["precision"] == "bf16"
    for shard in c.shards(3):
        arr = np.ascontiguousarray(c.shard_array(shard))
        want = ka.assign(arr, model, threshold=0.3, precision="bf16")[0]
        depthwise = c.run(bf16).labels(shard) != -2
        np.testing.assert_array_equal(c.run(bf16).labels(shard)[depthwise], want[depthwise])
        exact = c.run(fp32).labels(shard)
        assert np.mean(c.run(bf16).labels(shard)[depthwise] == exact[depthwise]) >= 0.999


def test_assign_cli_takes_precision(tmp_path, capsys):
    from kernelatlas import cli

    c = make_corpus(tmp_path / "c")
    mdir, _ = make_model(tmp_path)
    base = ["assign", str(c.root), "--model", str(mdir), "--threshold", "0.3", "--no-progress"]
    assert cli.main([*base, "--precision", "tf32", "--device", "cpu"]) == 1
    assert "precision='tf32' is the GPU's tensor-core path" in capsys.readouterr().err
    assert not list(c.root.glob("runs/*/run.json"))  # refused before anything was written
    if ka.build_info().get("bf16"):
        assert cli.main([*base, "--precision", "bf16"]) == 0
        (run_json,) = (c.root / "runs").glob("*/run.json")
        assert json.loads(run_json.read_text())["options"]["precision"] == "bf16"


@pytest.mark.parametrize(("row_bytes", "rows"), [(18, 1 << 22), (36, 1 << 22), (100, (256 << 20) // 100),
                                                 (196, (256 << 20) // 196), (1 << 40, 1 << 16), (0, 1 << 22)])
def test_default_chunk_rows(row_bytes, rows):
    assert runs_mod.default_chunk_rows(row_bytes) == rows


def test_chunk_size_changes_no_output(tmp_path):
    c = make_corpus(tmp_path / "c")
    mdir, _ = make_model(tmp_path)
    runs = [outputs(c, runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False, run_id=f"r{n}",
                                              chunk_rows=n)) for n in (None, 1, 97)]
    assert len(runs[0]) == 3 * len(c.shards(3))
    assert runs[1] == runs[0] and runs[2] == runs[0]  # byte for byte
    with pytest.raises(ValueError, match="chunk_rows"):
        runs_mod.assign_corpus(c, model=mdir, threshold=0.3, progress=False, run_id="bad", chunk_rows=0)


# ---------------------------------------------------------------------------------------------- run directories


def fake_run(corpus_root: Path, rid: str, **info) -> Path:
    path = corpus_root / "runs" / rid
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"completed": True, "kernel_size": 3, **info}))
    return path


def test_latest_run_is_by_time_not_by_string(tmp_path):
    """"created" strings with different UTC offsets sort wrongly as text: 10:00+01:00 is 09:00 UTC, earlier than
    09:30+00:00.  Other verbs' runs, unfinished runs and unreadable run.json files are never the latest."""
    fake_run(tmp_path, "a", created="2026-01-01T10:00:00+0100")
    fake_run(tmp_path, "b", created="2026-01-01T09:30:00+0000")
    fake_run(tmp_path, "q", created="2026-01-02T00:00:00+0000", format=rundir.QUALITY_FORMAT)
    fake_run(tmp_path, "c", created="2026-01-03T00:00:00+0000", completed=False)
    (fake_run(tmp_path, "d", created="2026-01-04T00:00:00+0000") / "run.json").write_text("{not json")
    fake_run(tmp_path, "e", created="yesterday", kernel_size=5)
    fake_run(tmp_path, "f", created="2020-01-01T00:00:00", kernel_size=5)  # naive: taken as UTC
    runs = rundir.scan(tmp_path)
    assert [r.run_id for r in runs] == ["a", "b", "c", "d", "e", "f"] + ["q"]
    assert {k: r.run_id for k, r in rundir.latest(runs, key=lambda r: r.kernel_size).items()} == {3: "b", 5: "f"}
    assert rundir.latest(runs, format=rundir.QUALITY_FORMAT)[None].run_id == "q"
    assert rundir.read(tmp_path, "d").problem.startswith("unreadable")


def test_corpus_run_on_a_run_of_another_verb_names_it(tmp_path):
    from kernelatlas.jobs.quality import load_quality_run, quality_run

    c = make_corpus(tmp_path / "c")
    quality_run(c, run_id="q1", figures=False)
    with pytest.raises(rundir.RunError, match=r"is a quality run .*kernelatlas quality.*not an assign run"):
        c.run("q1")
    with pytest.raises(CorpusError, match="has no completed run: run `kernelatlas assign` first"):
        c.run()  # the quality run is not an assign run
    out, _ = make_model(tmp_path)
    rid = runs_mod.assign_corpus(c, model=out, threshold=0.5, run_id="a1")
    assert c.run().run_id == rid == "a1" and c.run(kernel_size=3).run_id == "a1"
    with pytest.raises(rundir.RunError, match="is an assign run"):
        load_quality_run(c, "a1")
    with pytest.raises(rundir.RunError, match="no such run; the runs of this corpus are: a1, q1"):
        c.run("nope")
    (c.root / "runs" / "half").mkdir()
    with pytest.raises(rundir.RunError, match="still being written or was interrupted"):
        c.run("half")


def test_quality_runs_are_written_like_assign_runs(tmp_path):
    """The quality job writes through the same run-directory rules as assign: an id cannot leave CORPUS/runs,
    a symlinked run folder is refused, and a run being written is locked against a second writer."""
    from kernelatlas.jobs.quality import quality_run

    c = make_corpus(tmp_path / "c")
    with pytest.raises(ValueError, match=r"run id '\.\./evil' is not allowed"):
        quality_run(c, run_id="../evil", figures=False)
    assert not (tmp_path / "evil").exists()
    (c.root / "runs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (c.root / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CorpusError, match="is a symlink"):
        quality_run(c, run_id="linked", figures=False)
    held = c.root / "runs" / "busy"
    held.mkdir()
    with rundir.RunLock(held), pytest.raises(CorpusError, match="is being written by pid"):
        quality_run(c, run_id="busy", figures=False)
    assert quality_run(c, run_id="busy", figures=False).info["completed"] is True
