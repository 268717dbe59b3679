"""Corpus jobs on a Dask cluster (kernelatlas.cluster, issue 14): a real LocalCluster of 2 worker processes
gives byte-identical outputs to the in-process runs -- assign, quality, shift and extract, on the real checkpoints
of ../shared/weights and on a generated corpus of millions of kernels whose shards span many tasks -- also when
a worker is SIGKILLed mid-run; an unreachable scheduler and a worker that cannot see the corpus fail fast with
errors naming the address / the path and the worker; without a cluster no Dask module is imported."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from test_runs import make_model

from kernelatlas.cluster import Cluster, ClusterError, connect, engine_threads, resolve
from kernelatlas.corpus import Corpus, CorpusWriter
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
from kernelatlas.jobs.assign import _task_pieces, assign_corpus
from kernelatlas.jobs.extract import extract
from kernelatlas.jobs.quality import quality_run
from kernelatlas.jobs.shift import shift_result

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
REAL = ("mobilenet_v2_torchvision", "efficientnet_lite0", "ultraface", "mediapipe_tflite")


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cluster():
    """One LocalCluster (2 worker processes) for the module; the SIGKILL test uses its own."""
    with connect("local:2") as cl:
        yield cl


def run_files(root: Path) -> dict[str, bytes]:
    """Every output file of a corpus's runs (not run.json / options.json, which record times and commands)."""
    out = {}
    for f in sorted((root / "runs").rglob("*")):
        if f.is_file() and f.name not in ("run.json", "options.json", "shift.json") and f.suffix != ".png" \
                and not f.name.startswith("."):
            out[f.relative_to(root / "runs").as_posix()] = f.read_bytes()
    return out


def assert_same_files(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    assert a and a.keys() == b.keys(), sorted(set(a) ^ set(b))
    differ = [name for name in a if a[name] != b[name]]
    assert not differ, f"files differ: {differ}"


def big_corpus(root: Path, *, rows: int = 3_000_000, shard_rows: int = 1_200_000, seed: int = 0) -> Corpus:
    """A generated 3x3 corpus of ~``rows`` kernels: depthwise layers with regular layers between them (rows of
    another kind inside the shards), dead and non-finite kernels, shards of ~``shard_rows`` rows."""
    rng = np.random.default_rng(seed)
    made = 0
    m = 0
    with CorpusWriter(root, shard_rows=shard_rows) as w:
        while made < rows:
            layers = []
            for i in range(6):
                if i % 3 == 2:
                    weight = rng.standard_normal((96, 64, 3, 3), dtype=np.float32)
                    layers.append(ConvLayer(f"conv{i}", weight, 1, "regular", False, float(i)))
                else:
                    n = int(rng.integers(3_000, 12_000))
                    weight = rng.standard_normal((n, 1, 3, 3), dtype=np.float32)
                    weight[: n // 50] = 0.0
                    weight[n // 50, 0, 1, 1] = np.nan
                    layers.append(ConvLayer(f"dw{i}", weight, n, "depthwise", False, float(i)))
                made += layers[-1].weight.shape[0] * layers[-1].weight.shape[1]
            w.add_model(LoadedModel(f"/m/gen{m}.pth", "torch", layers), sha256=f"gen-{seed}-{m}", all_convs=True)
            m += 1
    return Corpus.open(root)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    c = big_corpus(root / "corpus")
    model_dir, _ = make_model(root)
    return c, model_dir


# ---------------------------------------------------------------------------------------------- the task plan


def test_task_pieces_tile_the_shard_with_bounded_aligned_work():
    runs = [(10, 30), (30, 95), (120, 121)]
    for align in (1, 4):
        pieces = _task_pieces(200, runs, 25, align=align)
        assert pieces[0][0] == 0 and pieces[-1][1] == 200
        assert all(a < b for a, b in pieces) and all(p[1] == q[0] for p, q in itertools.pairwise(pieces))
        assert all(lo % align == 0 for lo, _ in pieces)  # every output file's part starts block-aligned
        for lo, hi in pieces:
            work = sum(max(0, min(b, hi) - max(a, lo)) for a, b in runs)
            assert work < 25 + align
    assert _task_pieces(0, [], 10) == []
    assert _task_pieces(7, [], 10) == [(0, 7)]  # a shard with nothing to assign: one task writes its fill values
    big = _task_pieces(10_000_000, [(3, 9_000_001)], 1 << 20)
    assert all(lo % 2048 == 0 for lo, _ in big) and len(big) == 9  # the default alignment: 4 KiB of int16 labels


# ---------------------------------------------------------------------------------------------- same bytes


def test_generated_corpus_assign_quality_shift_identical(cluster, big, tmp_path):
    c, model_dir = big
    assert max(s["rows"] for s in c.manifest["shards"]) > 1_000_000 and c.summary()  # shards > one task
    rid = assign_corpus(c, model=model_dir, progress=False)
    # orthogonality (a c_out x c_out Gram per layer in numpy, the slow part here) is compared on real layers
    q = quality_run(c, chunk_rows=1 << 18, figures=False, with_orthogonality=False)
    shift_result(c, "model", quality_run_id=q.run_id, chunk_rows=1 << 18, figures=False)
    shift_result(c, "depth", quality_run_id=q.run_id, chunk_rows=1 << 18, figures=False)
    here = run_files(c.root)
    shutil.rmtree(c.root / "runs")
    try:
        # tasks of 2^18 rows: each shard is shared by several workers
        rid2 = assign_corpus(c, model=model_dir, progress=False, cluster=cluster, task_rows=1 << 18)
        q2 = quality_run(c, chunk_rows=1 << 18, figures=False, with_orthogonality=False, cluster=cluster)
        shift_result(c, "model", quality_run_id=q2.run_id, chunk_rows=1 << 18, figures=False, cluster=cluster)
        shift_result(c, "depth", quality_run_id=q2.run_id, chunk_rows=1 << 18, figures=False, cluster=cluster)
        assert (rid2, q2.run_id) == (rid, q.run_id)  # the run id does not depend on where it ran
        assert_same_files(here, run_files(c.root))
        # another task size, prototype mode: still the same bytes
        protos = np.random.default_rng(3).standard_normal((5, 3, 3)).astype(np.float32)
        np.save(tmp_path / "protos.npy", protos)
        p1 = assign_corpus(c, prototypes=tmp_path / "protos.npy", threshold=0.7, progress=False)
        first = run_files(c.root)
        shutil.rmtree(c.root / "runs" / p1)
        assign_corpus(c, prototypes=tmp_path / "protos.npy", threshold=0.7, progress=False, cluster=cluster,
                      task_rows=300_001)
        assert_same_files(first, run_files(c.root))
    finally:
        shutil.rmtree(c.root / "runs", ignore_errors=True)


def test_resume_on_the_cluster_redoes_only_what_is_missing(cluster, big):
    """A client that died mid-run leaves some shards committed (labels files) and no run.json: the rerun,
    in-process or on the cluster, computes only the rest, and the files are those of an uninterrupted run."""
    c, model_dir = big
    rid = assign_corpus(c, model=model_dir, progress=False)
    whole = run_files(c.root)
    run = c.root / "runs" / rid
    (run / "run.json").unlink()
    (run / "assign_layers.parquet").unlink()
    kept = sorted((run / "k3").glob("labels-*.npy"))[0]
    stamp = kept.stat().st_mtime_ns
    for f in (run / "k3").glob("*.npy"):
        if f.name.split("-")[1] != kept.name.split("-")[1]:
            f.unlink()
    try:
        assign_corpus(c, model=model_dir, progress=False, cluster=cluster, task_rows=1 << 19)
        assert kept.stat().st_mtime_ns == stamp  # the committed shard was not redone
        assert_same_files(whole, run_files(c.root))
    finally:
        shutil.rmtree(c.root / "runs", ignore_errors=True)


@pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"{WEIGHTS} (the shared checkpoints) not present")
def test_real_checkpoints_extract_then_every_job_identical(cluster, tmp_path):
    """../shared/weights: extract on the cluster commits the same models, layers and kernels as in-process (in the
    input order; one shard per model and kernel size, moved in from the workers' staging area), and assign /
    quality / shift over either corpus give identical files."""
    sources = [str(WEIGHTS / d) for d in REAL]
    r1 = extract(sources, tmp_path / "a", progress=False)
    r2 = extract(sources, tmp_path / "b", progress=False, cluster=cluster)
    assert r1.added and r1.ok and r2.ok
    assert [r["sha256"] for r in r1.added] == [r["sha256"] for r in r2.added]
    assert (r1.skipped, r1.empty, r1.warnings) == (r2.skipped, r2.empty, r2.warnings)
    a, b = Corpus.open(tmp_path / "a"), Corpus.open(tmp_path / "b")
    assert a.models.equals(b.models)
    cols = [col for col in a.layers.columns if col not in ("shard", "row_start")]
    assert a.layers[cols].equals(b.layers[cols])
    for la, lb in zip(a.layers.itertuples(), b.layers.itertuples(), strict=True):
        if la.rows:
            xa = a.shard_array(la.shard)[la.row_start:la.row_start + la.rows]
            xb = b.shard_array(lb.shard)[lb.row_start:lb.row_start + lb.rows]
            assert xa.tobytes() == xb.tobytes(), la.name
    assert not (tmp_path / "b" / ".staging").exists()  # the staging area is cleaned up
    # rerunning skips every file, on the cluster too
    again = extract(sources, tmp_path / "b", progress=False, cluster=cluster)
    assert not again.added and len(again.skipped) == len(r2.added)
    # the jobs over the corpus extracted on the cluster, by the cluster and in-process: the same bytes (per-shard
    # files are named by shard, and the two corpora shard differently, so compare within corpus b)
    model_dir, _ = make_model(tmp_path)
    assign_corpus(b, model=model_dir, progress=False)
    q = quality_run(b, figures=False)
    shift_result(b, "model", quality_run_id=q.run_id, figures=False)
    here = run_files(b.root)
    shutil.rmtree(b.root / "runs")
    assign_corpus(b, model=model_dir, progress=False, cluster=cluster, task_rows=50_000)
    q2 = quality_run(b, figures=False, cluster=cluster)
    shift_result(b, "model", quality_run_id=q2.run_id, figures=False, cluster=cluster)
    assert_same_files(here, run_files(b.root))
    # and the per-layer results equal corpus a's, computed in-process
    qa = quality_run(a, figures=False)
    ta = qa.table.drop(columns=["layer_id"]).reset_index(drop=True)
    tb = q2.table.drop(columns=["layer_id"]).reset_index(drop=True)
    assert ta.equals(tb)


def test_extract_failures_are_reported_in_input_order(cluster, tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    missing = tmp_path / "gone.safetensors"
    inputs = [str(bad), str(WEIGHTS / "ultraface"), str(missing)] if WEIGHTS.is_dir() else [str(bad), str(missing)]
    r1 = extract(inputs, tmp_path / "a", progress=False)
    r2 = extract(inputs, tmp_path / "b", progress=False, cluster=cluster)
    assert [p for p, _ in r1.failed] == [p for p, _ in r2.failed] == [str(bad), str(missing)]
    assert r2.failed[0][1] == r1.failed[0][1]
    assert "cannot read" in r2.failed[1][1] and "worker host" in r2.failed[1][1]
    assert [r["sha256"] for r in r1.added] == [r["sha256"] for r in r2.added]


# ---------------------------------------------------------------------------------------------- faults


@pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"{WEIGHTS} (the shared checkpoints) not present")
def test_extract_commit_that_fails_leaves_the_last_commit(cluster, tmp_path, monkeypatch):
    """The client dies between moving the workers' staged shards in and writing the manifest (here: the tables
    cannot be written): the corpus is what the last commit left, and the next extract removes the orphans (and
    the staging area) and gives the same corpus as an uninterrupted one."""
    from kernelatlas.corpus import store

    first = [str(WEIGHTS / "ultraface")]
    both = [*first, str(WEIGHTS / "mobilenet_v2_torchvision")]
    extract(first, tmp_path / "c", progress=False, cluster=cluster)
    before = Corpus.open(tmp_path / "c").manifest

    def broken(path, frame):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_table", broken)
    with pytest.raises(OSError, match="No space left"):
        extract(both, tmp_path / "c", progress=False, cluster=cluster)
    monkeypatch.undo()
    after = Corpus.open(tmp_path / "c")
    assert after.manifest == before and len(after.models) == before["n_models"]
    listed = {sh["path"] for sh in before["shards"]}
    orphans = [p for p in (tmp_path / "c").glob("k*/shard-*.npy") if p.relative_to(tmp_path / "c").as_posix()
               not in listed]
    assert orphans  # the moved-in shards of the failed commit, not listed anywhere
    report = extract(both, tmp_path / "c", progress=False, cluster=cluster)
    assert len(report.added) == 1 and len(report.skipped) == 1
    listed = {sh["path"] for sh in Corpus.open(tmp_path / "c").manifest["shards"]}
    on_disk = {p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").glob("k*/*")}
    assert on_disk == listed  # no orphan left behind
    assert not (tmp_path / "c" / ".staging").exists()
    whole = extract(both, tmp_path / "d", progress=False, cluster=cluster)
    a, b = Corpus.open(tmp_path / "c"), Corpus.open(tmp_path / "d")
    assert [r["sha256"] for r in whole.added] == list(a.models["sha256"])
    assert a.layers.drop(columns=["shard"]).equals(b.layers.drop(columns=["shard"]))


def test_a_worker_killed_mid_assign_is_survived(big, tmp_path):
    """SIGKILL one worker process while tasks run: the scheduler runs its tasks again elsewhere (the nanny
    restarts the worker) and the files are those of the in-process run."""
    c, model_dir = big
    rid = assign_corpus(c, model=model_dir, progress=False)
    whole = run_files(c.root)
    shutil.rmtree(c.root / "runs")
    killed: dict[str, object] = {}
    try:
        with connect("local:2") as cl:
            pids = cl.client.run(os.getpid)
            result: dict[str, object] = {}

            def work() -> None:
                try:
                    result["rid"] = assign_corpus(c, model=model_dir, progress=False, cluster=cl, task_rows=1 << 14)
                except BaseException as exc:  # reported below
                    result["error"] = exc

            thread = threading.Thread(target=work)
            thread.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed:
                busy = {addr for addr, tasks in cl.client.processing().items() if tasks}
                done_any = any((c.root / "runs").rglob("labels-*.npy")) if (c.root / "runs").exists() else False
                if busy and not done_any:
                    addr = sorted(busy)[0]
                    os.kill(pids[addr], signal.SIGKILL)
                    killed["addr"] = addr
                    killed["run_json_then"] = (c.root / "runs" / rid / "run.json").exists()
                time.sleep(0.02)
            thread.join(timeout=300)
            assert killed, "no worker was seen busy before the first shard finished"
            assert killed["run_json_then"] is False  # the kill happened mid-run
            assert "error" not in result, result.get("error")
            assert result["rid"] == rid
            assert pids[killed["addr"]] not in cl.client.run(os.getpid).values()  # it was really gone
        assert_same_files(whole, run_files(c.root))
    finally:
        shutil.rmtree(c.root / "runs", ignore_errors=True)


def test_unreachable_scheduler_fails_fast_naming_the_address():
    with socket_closed_port() as port:
        address = f"tcp://127.0.0.1:{port}"
        start = time.monotonic()
        with pytest.raises(ClusterError, match=rf"cannot reach the Dask scheduler at {address}"):
            connect(address, timeout=3)
        assert time.monotonic() - start < 10


def test_connect_through_a_scheduler_file(cluster, big, tmp_path):
    """What `dask scheduler --scheduler-file` and dask-jobqueue write: a path as the spec connects through it."""
    c, model_dir = big
    path = tmp_path / "scheduler.json"
    cluster.client.write_scheduler_file(str(path))
    try:
        with connect(str(path)) as cl:
            assert cl.local is None and len(cl.workers()) == 2
            assign_corpus(c, model=model_dir, progress=False, cluster=cl, models=[2])
        assert cluster.client.status == "running"  # closing the second client left the cluster up
    finally:
        shutil.rmtree(c.root / "runs", ignore_errors=True)


def test_scheduler_file_that_does_not_exist(tmp_path):
    with pytest.raises(ClusterError, match="no scheduler file at"):
        connect(str(tmp_path / "scheduler.json"))
    with pytest.raises(ClusterError, match="local:N needs"):
        connect("local:zero")


class socket_closed_port:
    """A TCP port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *exc: object) -> None:
        pass


def _unshare_prefix() -> list[str] | None:
    """A command prefix that runs a process in its own mount namespace (to give it a filesystem view of its
    own), or None where this machine cannot."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


def test_a_worker_that_cannot_see_the_corpus_is_named(tmp_path):
    """A worker on 'another host': a process whose mount namespace hides the corpus folder (an empty tmpfs
    mounted over it), as an unshared local disk would.  The job stops at once with an error naming the worker
    and the path, instead of hanging or failing task by task."""
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("this machine cannot make a mount namespace (unshare), which the test needs to hide a folder")
    corpus_dir = tmp_path / "hidden" / "corpus"
    big_corpus(corpus_dir, rows=50_000, shard_rows=50_000)
    scheduler = distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp://", scheduler_port=0,
                                         dashboard_address=":0")
    hidden = tmp_path / "hidden"
    script = (f"mount -t tmpfs none {hidden} && exec {sys.executable} -m distributed.cli.dask_worker "
              f"{scheduler.scheduler_address} --nthreads 1 --no-dashboard --name hidden-worker")
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed in finally
    worker = subprocess.Popen([*prefix, "sh", "-c", script], stdout=log, stderr=subprocess.STDOUT)
    try:
        client = distributed.Client(scheduler)
        try:
            client.wait_for_workers(1, timeout=60)
        except Exception:
            pytest.fail(f"the hidden worker did not start: {(tmp_path / 'worker.log').read_text()[-2000:]}")
        model_dir, _ = make_model(tmp_path)
        start = time.monotonic()
        with pytest.raises(ClusterError) as err:
            assign_corpus(corpus_dir, model=model_dir, progress=False, client=client)
        text = str(err.value)
        assert str(corpus_dir.resolve()) in text and "worker tcp://" in text and "shared filesystem" in text
        assert time.monotonic() - start < 30
        assert not any((corpus_dir / "runs").rglob("labels-*.npy"))
        client.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
        scheduler.close()


# ---------------------------------------------------------------------------------------------- wiring


def test_without_a_cluster_nothing_of_dask_is_imported(tmp_path):
    code = ("import sys, kernelatlas.cluster as c; assert c.resolve() is None; "
            "from kernelatlas.jobs import assign, quality, shift, extract; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))")
    env = {k: v for k, v in os.environ.items() if k != "KERNELATLAS_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_local_workers_that_cannot_start_say_why():
    """Workers are spawned processes that import the main module: code read from stdin (or a script without a
    main guard) cannot be; the error says so instead of Dask's 'Nanny failed to start'."""
    code = "from kernelatlas.cluster import connect\nconnect('local:1')\n"
    out = subprocess.run([sys.executable], input=code, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ClusterError: local:1: the local worker processes did not start" in out.stderr
    assert "if __name__" in out.stderr


def test_environment_variable_names_the_default_cluster(monkeypatch):
    monkeypatch.setenv("KERNELATLAS_CLUSTER", "local:zero")
    with pytest.raises(ClusterError, match="local:zero"):
        resolve()
    monkeypatch.setenv("KERNELATLAS_CLUSTER", "")
    assert resolve() is None


def test_engine_threads_split_the_cores_among_local_workers(cluster):
    cores = len(os.sched_getaffinity(0))
    per_worker = cluster.client.run(engine_threads)
    assert len(per_worker) == 2 and set(per_worker.values()) == {max(1, cores // 2)}
    assert engine_threads() == 0  # not on a worker: the engine's default


def test_a_caller_client_is_used_and_left_open(cluster, big):
    c, model_dir = big
    wrapped = resolve(client=cluster.client)
    assert isinstance(wrapped, Cluster) and not wrapped.owns_client
    try:
        assign_corpus(c, model=model_dir, progress=False, client=cluster.client, models=[0])
        assert cluster.client.status == "running"
    finally:
        shutil.rmtree(c.root / "runs", ignore_errors=True)


def test_cli_cluster_flag(tmp_path, big):
    c, model_dir = big
    out = subprocess.run([sys.executable, "-m", "kernelatlas.cli", "assign", str(c.root), "--model", str(model_dir),
                          "--models", "1", "--cluster", "local:2", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    try:
        assert out.returncode == 0, out.stderr
        assert "on local:2 (2 workers); dashboard: http" in out.stderr
        bad = subprocess.run([sys.executable, "-m", "kernelatlas.cli", "quality", str(c.root), "--cluster",
                              "tcp://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in bad.stderr
    finally:
        shutil.rmtree(c.root / "runs", ignore_errors=True)


@pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"{WEIGHTS} (the shared checkpoints) not present")
def test_run_on_the_cluster_gives_the_in_process_report(cluster, tmp_path):
    """`kernelatlas run` with a cluster (extract, assign, quality and shift as tasks; training in this process):
    the report's tables equal those of the in-process run -- the corpus is sharded differently, but every layer
    holds the same kernels in the same order, so training sees the same sample."""
    from kernelatlas.jobs.run import run_pipeline

    sources = [str(WEIGHTS / d) for d in ("mobilenet_v2_torchvision", "ultraface")]
    here = run_pipeline(tmp_path / "a", zoo=(), sources=sources, epochs=2, progress=False)
    there = run_pipeline(tmp_path / "b", zoo=(), sources=sources, epochs=2, progress=False, cluster=cluster)
    import pandas as pd

    assert sorted(here["runs"]) == sorted(there["runs"]) and not there["failed"]
    for name in ("coverage.csv", "coverage-totals.csv", "quality-layers.csv", "quality-models.csv"):
        a = pd.read_csv(tmp_path / "a" / "report" / name)
        b = pd.read_csv(tmp_path / "b" / "report" / name)
        # run ids hash the model folder's model.json, which names its corpus's path; shards are laid out
        # per model on the cluster: every other column, figures included, is the same
        same = [col for col in a.columns if col not in ("run_id", "shard", "row_start")]
        assert list(a.columns) == list(b.columns) and len(same) > 5
        pd.testing.assert_frame_equal(a[same], b[same], check_exact=True, obj=name)
