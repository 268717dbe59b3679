"""Faults with real processes and a real full disk: `assign` killed with SIGKILL at random moments, and
`assign` / `extract` running out of space (ENOSPC) mid-write.

(a) A real process running ``kernelatlas.jobs.assign.assign_corpus`` (a small driver: the CLI's own call, with small
    chunks so that a kill can land between and inside many writes) is killed with SIGKILL at seeded random
    moments, each kill followed by a rerun that is killed again; a last rerun completes.  Every state left by
    a kill must be clean (whole label files only, no completed run.json), and the final outputs must equal
    an uninterrupted run's byte for byte: labels / scores / codes .npy, assign_layers.parquet, options.json,
    run.json apart from its ``created`` time.
(b) ENOSPC during assign: the corpus (its shards written first) lives on a small tmpfs that is then filled
    so that the run's outputs run out of space part-way through a shard.  The run must fail naming the
    problem, leave the committed corpus byte-identical and no run marked complete; after space is freed, a
    rerun completes byte-identically to the uninterrupted run.
(c) ENOSPC during extract at several fill levels (while kernels are appended, while the commit writes its
    tables): the previous manifest stays valid, every shard it lists still matches its sha256, the corpus
    opens and reads; after space is freed a rerun adds the model exactly once.

(b) and (c) mount a tmpfs (``mount -t tmpfs``), which needs root: elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from test_runs import make_model

from kernelatlas.corpus import Corpus, CorpusWriter
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
from kernelatlas.jobs.extract import extract

SHARD_ROWS = 40_000
CHUNK_ROWS = 4096  # kernels per engine call: many writes per shard for a kill to land in
DRIVER = """
import sys, time
from kernelatlas.jobs.assign import assign_corpus
print("READY", flush=True)
t0 = time.monotonic()
rid = assign_corpus(sys.argv[1], model=sys.argv[2], threshold=0.3, progress=False, chunk_rows=int(sys.argv[3]),
                    command="kernelatlas assign (test_faults)")
print("DONE", rid, time.monotonic() - t0, flush=True)
"""


def build_corpus(root: Path) -> Corpus:
    """~240k 3x3 depthwise kernels (and regular layers, labelled -2) in 6 shards."""
    rng = np.random.default_rng(11)
    with CorpusWriter(root, shard_rows=SHARD_ROWS) as w:
        for m in range(4):
            layers = []
            for i in range(4):
                if i % 2 == 0:
                    weight = rng.standard_normal((30_000, 1, 3, 3)).astype(np.float32)
                    weight[:7] = 0.0
                    layers.append(ConvLayer(f"dw{i}", weight, len(weight), "depthwise", False, float(i)))
                else:
                    weight = rng.standard_normal((48, 16, 3, 3)).astype(np.float32)
                    layers.append(ConvLayer(f"conv{i}", weight, 1, "regular", False, float(i)))
            w.add_model(LoadedModel(f"/m/model{m}.pth", "torch", layers), sha256=f"faults-{m}", all_convs=True)
    return Corpus.open(root)


def start_assign(corpus: Path, model: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(corpus), str(model), str(CHUNK_ROWS)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))


def wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.startswith("READY"), (line, proc.stderr.read() if proc.poll() is not None else "")


def run_assign(corpus: Path, model: Path) -> tuple[str, float]:
    proc = start_assign(corpus, model)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    done = out.split("DONE", 1)[1].split()
    return done[0], float(done[1])


def run_outputs(corpus: Path) -> dict[str, object]:
    """Everything a finished run consists of, comparable across runs: the .npy bytes, the per-layer table,
    options.json, and run.json without its ``created`` time."""
    import pandas as pd

    (run,) = [p for p in (corpus / "runs").iterdir() if p.is_dir()]
    out: dict[str, object] = {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(run.glob("k*/*.npy"))}
    out["assign_layers.parquet"] = pd.read_parquet(run / "assign_layers.parquet").to_dict("list")
    out["options.json"] = (run / "options.json").read_bytes()
    info = json.loads((run / "run.json").read_text())
    info.pop("created")
    out["run.json"] = info
    return out


def corpus_state(corpus: Path) -> dict[str, str]:
    """sha256 of the committed corpus: manifest, tables and every shard."""
    files = [corpus / n for n in ("manifest.json", "models.parquet", "layers.parquet")] + sorted(corpus.glob("k*/*"))
    return {str(f.relative_to(corpus)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def check_interrupted(corpus: Path) -> bool:
    """The state a kill or a failure leaves: label files only whole (as long as their shard), a run.json only
    when the run had completed.  Returns whether the run was complete."""
    c = Corpus.open(corpus)
    rows = {s.split("-")[-1]: len(c.shard_array(s)) for s in c.shards(3)}
    runs = corpus / "runs"
    for run in runs.iterdir() if runs.is_dir() else ():
        for f in run.glob("k3/*.npy"):
            arr = np.load(f, mmap_mode="r")
            assert arr.shape == (rows[f.name.split("-")[-1]],), f
        done = run / "run.json"
        if done.exists():
            assert json.loads(done.read_text())["completed"]
            assert len(list(run.glob("k3/labels-*.npy"))) == len(rows)
            return True
    return False


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The corpus (before any run), the model, and an uninterrupted run's outputs and duration."""
    root = tmp_path_factory.mktemp("faults")
    build_corpus(root / "corpus")
    model, _ = make_model(root)
    reference = root / "reference"
    shutil.copytree(root / "corpus", reference)
    rid, seconds = run_assign(reference, model)
    return {"corpus": root / "corpus", "model": model, "rid": rid, "seconds": seconds,
            "outputs": run_outputs(reference)}


def copy_corpus(base: dict, to: Path) -> Path:
    shutil.copytree(base["corpus"], to)
    return to


# ==================================================================================== (a) kill -9


def test_sigkill_assign_at_random_points_then_rerun(base, tmp_path):
    corpus = copy_corpus(base, tmp_path / "corpus")
    rng = random.Random(20251207)
    mid_run = 0
    for _ in range(3):
        proc = start_assign(corpus, base["model"])
        wait_ready(proc)
        time.sleep(rng.uniform(0.05, 0.9) * base["seconds"])
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        if not check_interrupted(corpus):
            mid_run += 1
    assert mid_run >= 1, "no kill landed inside the run"
    rid, _ = run_assign(corpus, base["model"])
    assert rid == base["rid"]
    assert run_outputs(corpus) == base["outputs"]
    assert not list(corpus.rglob("*.tmp"))


# ==================================================================================== ENOSPC


@contextlib.contextmanager
def small_fs(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path`` (root only; skipped where mounting is not permitted)."""
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("ENOSPC tests mount a small tmpfs, which needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the ENOSPC tests need it")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(fs: Path, leave: int) -> Path:
    """Fill the filesystem until ``leave`` bytes are free; returns the filler file."""
    filler = fs / "filler"
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return filler


def test_enospc_mid_shard_during_assign(base, tmp_path):
    size = sum(f.stat().st_size for f in base["corpus"].rglob("*") if f.is_file())
    outputs = sum(len(v) for k, v in base["outputs"].items() if k.endswith(".npy"))
    with small_fs(tmp_path / "fs", size + outputs + (8 << 20)) as fs:
        corpus = copy_corpus(base, fs / "corpus")
        before = corpus_state(corpus)
        filler = fill(fs, outputs // 2 + 12345)  # runs out part-way through a shard's outputs
        proc = start_assign(corpus, base["model"])
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, "assign did not fail on a full disk"
        assert "No space left on device" in err, err[-2000:]
        assert corpus_state(corpus) == before  # the committed corpus is untouched
        assert not check_interrupted(corpus)  # no run marked complete, only whole label files
        (run,) = list((corpus / "runs").iterdir())
        done = len(list(run.glob("k3/labels-*.npy")))
        assert 0 < done < len(Corpus.open(corpus).shards(3)), "the disk did not fill mid-run"
        assert not list(run.rglob("*.tmp")), "the failed shard left its temp files"
        filler.unlink()
        rid, _ = run_assign(corpus, base["model"])
        assert rid == base["rid"] and run_outputs(corpus) == base["outputs"]
        assert corpus_state(corpus) == before


def _safetensors(path: Path, rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {f"block{i}.dw.weight": rng.standard_normal((rows, 1, 3, 3)).astype(np.float32) for i in range(4)}
    safetensors_numpy.save_file(tensors, str(path))
    return tensors


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # finding F9, see below
def test_enospc_during_extract_keeps_the_committed_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _safetensors(src / "first.safetensors", 500, 1)
    second = _safetensors(src / "second.safetensors", 20_000, 2)
    # how many bytes adding the second model takes (shard, then tables and manifest), measured on disk
    probe = tmp_path / "probe"
    extract([src / "first.safetensors"], probe, progress=False)
    size0 = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    extract([src / "second.safetensors"], probe, progress=False)
    shard = max(probe.glob("k3/shard-*.npy"), key=lambda f: f.stat().st_mtime).stat().st_size
    tables = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file()) - size0 - shard
    page = 4096
    levels = {"appending kernels": shard // 2, "writing the shard's end": shard - page,
              "writing the tables": shard + page + max(tables // 3, 1), "(room to spare)": shard + tables + 64 * page}
    outcomes = {}
    with small_fs(tmp_path / "fs", 16 << 20) as fs:
        for what, leave in levels.items():
            corpus = fs / "corpus"
            shutil.rmtree(corpus, ignore_errors=True)
            assert extract([src / "first.safetensors"], corpus, progress=False).added
            before = corpus_state(corpus)
            manifest = (corpus / "manifest.json").read_bytes()
            filler = fill(fs, leave + page)
            try:
                report = extract([src / "second.safetensors"], corpus, progress=False)
                outcome = "added" if report.added else f"failed: {report.failed[0][1]}"
            except OSError as exc:
                outcome = f"raised: {exc}"
            outcomes[what] = outcome
            if outcome != "added":
                assert "No space left on device" in outcome, outcome
                assert (corpus / "manifest.json").read_bytes() == manifest
                assert {k: v for k, v in corpus_state(corpus).items() if k in before} == before
            c = Corpus.open(corpus)  # the committed corpus opens, and every shard matches its sha256
            for entry in c.manifest["shards"]:
                data = (corpus / entry["path"]).read_bytes()
                header = 10 + int.from_bytes(data[8:10], "little")
                assert hashlib.sha256(data[header:]).hexdigest() == entry["sha256"], entry
                assert np.isfinite(np.asarray(c.shard_array(entry["path"]))).all()
            filler.unlink()
            extract([src / "second.safetensors"], corpus, progress=False)  # after freeing space: completes
            c = Corpus.open(corpus)
            assert c.manifest["n_models"] == 2 and c.models["sha256"].is_unique
            layers = c.layers[c.layers["model_id"] == 1]
            for _, row in layers.iterrows():
                got = c.shard_array(row["shard"])[row["row_start"]:row["row_start"] + row["rows"]]
                np.testing.assert_array_equal(got, second[row["name"]].reshape(-1, 9))
            assert not list(corpus.rglob("*.partial"))
    print("ENOSPC during extract:", json.dumps(outcomes, indent=1))
    failed = [o for o in outcomes.values() if o != "added"]
    assert len(failed) >= 2, outcomes  # the disk did fill, at more than one point


def test_enospc_while_appending_is_not_blamed_on_the_checkpoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _safetensors(src / "a.safetensors", 20_000, 3)
    with small_fs(tmp_path / "fs", 4 << 20) as fs:
        extract([src / "a.safetensors"], fs / "warm", progress=False)  # the corpus files exist, then:
        shutil.rmtree(fs / "warm")
        corpus = fs / "corpus"
        extract([], corpus, progress=False)
        fill(fs, 100_000)
        try:
            report = extract([src / "a.safetensors"], corpus, progress=False)
        except OSError as exc:
            assert "No space left" in str(exc)
            return
        assert not any("cannot be read" in reason for _, reason in report.failed), report.failed


def test_a_failed_commit_closes_the_writer(tmp_path):
    import gc

    src = tmp_path / "src"
    src.mkdir()
    _safetensors(src / "a.safetensors", 500, 4)
    _safetensors(src / "b.safetensors", 20_000, 5)
    with small_fs(tmp_path / "fs", 8 << 20) as fs:
        corpus = fs / "corpus"
        extract([src / "a.safetensors"], corpus, progress=False)
        fill(fs, 20_000 * 36 * 4 + 3 * 4096)  # the shard fits, the tables do not
        with pytest.raises(OSError, match="No space left"):
            extract([src / "b.safetensors"], corpus, progress=False)
        gc.collect()  # a writer left open warns here
