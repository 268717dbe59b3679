"""A run directory is written by one process at a time, only inside the corpus, only with the options it was
started with, and durably before it is marked complete (issue 12, item 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_runs import make_corpus, make_model, outputs

from kernelatlas.corpus import CorpusError
from kernelatlas.jobs import assign as runs_mod

pytest.importorskip("torch")


@pytest.mark.parametrize("run_id", ["..", "../escape", "/tmp/abs", "a/b", "", ".hidden", "a..b", "x" * 129, "é"])
def test_run_ids_stay_inside_the_corpus(tmp_path, run_id):
    c = make_corpus(tmp_path / "c", n_models=1)
    mdir, _ = make_model(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="not allowed"):
        runs_mod.assign_corpus(c, model=mdir, run_id=run_id, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (c.root / "runs").exists() or not any((c.root / "runs").iterdir())


def test_a_run_id_is_not_reused_with_other_options(tmp_path):
    c = make_corpus(tmp_path / "c", n_models=1)
    mdir, _ = make_model(tmp_path)
    runs_mod.assign_corpus(c, model=mdir, run_id="mine", threshold=0.85, progress=False)
    first = outputs(c, "mine")
    with pytest.raises(CorpusError, match="other options"):
        runs_mod.assign_corpus(c, model=mdir, run_id="mine", threshold=0.9, progress=False)
    assert outputs(c, "mine") == first and json.loads((c.root / "runs/mine/run.json").read_text())["threshold"] == 0.85
    # an interrupted run (no run.json yet) is refused too, not completed with the new options
    (c.root / "runs/mine/run.json").unlink()
    with pytest.raises(CorpusError, match="other options"):
        runs_mod.assign_corpus(c, model=mdir, run_id="mine", threshold=0.9, progress=False)
    # and resumed with its own
    assert runs_mod.assign_corpus(c, model=mdir, run_id="mine", threshold=0.85, progress=False) == "mine"
    assert outputs(c, "mine") == first


def test_a_second_writer_on_the_same_run_is_refused(tmp_path):
    c = make_corpus(tmp_path / "c", n_models=1)
    mdir, _ = make_model(tmp_path)
    run = c.root / "runs" / "busy"
    run.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from kernelatlas.corpus.rundir import RunLock; "
         "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CorpusError, match=rf"being written by pid {holder.pid}"):
            runs_mod.assign_corpus(c, model=mdir, run_id="busy", progress=False)
        assert not (run / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    # the kernel released the dead holder's lock: the run proceeds
    assert runs_mod.assign_corpus(c, model=mdir, run_id="busy", progress=False) == "busy"


def test_symlinks_in_a_received_corpus_are_not_followed(tmp_path):
    c = make_corpus(tmp_path / "c", n_models=1)
    mdir, _ = make_model(tmp_path)
    victim = tmp_path / "precious.txt"
    victim.write_text("user data")
    run = c.root / "runs" / "r1"
    run.mkdir(parents=True)
    (run / ".lock").symlink_to(victim)
    with pytest.raises(CorpusError, match="symlink"):
        runs_mod.assign_corpus(c, model=mdir, run_id="r1", progress=False)
    assert victim.read_text() == "user data"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (c.root / "runs" / "r2").symlink_to(elsewhere)
    with pytest.raises(CorpusError, match="symlink"):
        runs_mod.assign_corpus(c, model=mdir, run_id="r2", progress=False)
    assert not any(elsewhere.iterdir())


def test_the_run_is_durable_before_it_is_marked_complete(tmp_path, monkeypatch):
    c = make_corpus(tmp_path / "c", n_models=1)
    mdir, _ = make_model(tmp_path)
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append("fsync " + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 2)[-1])
        real_fsync(fd)

    real_replace = os.replace

    def replace(a, b):
        events.append(f"rename {os.path.basename(b)}")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    rid = runs_mod.assign_corpus(c, model=mdir, progress=False)
    commit = events.index("rename run.json")
    before = events[:commit]
    assert "fsync .assign_layers.parquet.tmp" in before[:before.index("rename assign_layers.parquet")]
    assert f"fsync {rid}" in before[before.index("rename assign_layers.parquet"):]   # the run folder
    assert "fsync k3" in before and "fsync .run.json.tmp" in before
    assert events[commit + 1:] == [f"fsync {rid}"]


def test_a_symlinked_corpus_lock_is_not_followed(tmp_path):
    from kernelatlas.corpus import CorpusWriter

    c = make_corpus(tmp_path / "c", n_models=1)
    victim = tmp_path / "precious.txt"
    victim.write_text("user data")
    (c.root / ".lock").unlink()
    (c.root / ".lock").symlink_to(victim)
    with pytest.raises(CorpusError, match="symlink"):
        CorpusWriter(c.root)
    assert victim.read_text() == "user data"


def test_a_shard_whose_dtype_or_byte_order_differs_from_the_manifest_is_refused(tmp_path):
    import numpy as np

    c = make_corpus(tmp_path / "c", n_models=1)
    shard = c.shards(3)[0]
    rows = np.load(c.root / shard)
    np.save(c.root / shard, rows.astype(">f4"))  # same values, other byte order
    with pytest.raises(CorpusError, match=r"holds >f4 kernels, the manifest says <f4"):
        c.shard_array(shard)


def test_a_symlinked_shard_is_refused(tmp_path):
    c = make_corpus(tmp_path / "c", n_models=1)
    shard = c.root / c.shards(3)[0]
    elsewhere = tmp_path / "elsewhere.npy"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere)
    with pytest.raises(CorpusError, match="symlink"):
        c.shard_array(c.shards(3)[0])


def test_overlapping_layer_spans_are_refused_not_misaligned(tmp_path):
    import pandas as pd

    from kernelatlas.corpus import Corpus

    c = make_corpus(tmp_path / "c", n_models=1)
    mdir, _ = make_model(tmp_path)
    layers = pd.read_parquet(c.root / "layers.parquet")
    dw = layers.index[(layers["kind"] == "depthwise") & (layers["rows"] > 0)]
    layers.loc[dw[1], "row_start"] -= 10  # the second depthwise layer now starts inside the first
    layers.to_parquet(c.root / "layers.parquet")
    with pytest.raises(CorpusError, match="overlapping rows"):
        runs_mod.assign_corpus(Corpus.open(c.root), model=mdir, progress=False)
