"""Running corpus-scale jobs on a Dask cluster (dask.distributed; optional extra ``kernelatlas[distributed]``).

A job that takes ``cluster=`` (assign, quality, shift, extract, run) cuts its work into tasks of bounded size
that read the corpus from the filesystem every worker shares, and combines their results on the client in a
fixed order, so the bytes it writes do not depend on where or in which order the tasks ran (docs: README,
"Beyond one machine").  Without a cluster nothing here is imported and jobs run in-process.

Cluster specs (``--cluster SPEC``, or the KERNELATLAS_CLUSTER environment variable):

* ``local:N``       a LocalCluster of N worker processes on this machine, one task at a time each, the engine
                    using cores / N threads per task;
* ``tcp://HOST:PORT`` (or ``tls://``, ``ws://``...) a running scheduler (``dask scheduler``);
* a path            a scheduler file (what ``dask scheduler --scheduler-file`` and dask-jobqueue write).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ENV", "Cluster", "ClusterError", "connect", "engine_threads", "resolve"]

ENV = "KERNELATLAS_CLUSTER"
WORKER_THREADS_ENV = "KERNELATLAS_WORKER_THREADS"
CONNECT_TIMEOUT = 10.0  # seconds: an unreachable scheduler is reported within this


class ClusterError(RuntimeError):
    """A cluster that cannot be started, reached or used; the message names the address or path and the fix."""


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ClusterError("--cluster needs dask.distributed: pip install 'kernelatlas[distributed]' (on the client "
                           "and on every worker)") from None
    return distributed


@dataclass
class Cluster:
    """A connected Dask client (and the LocalCluster it started, if any).  Use as a context manager: leaving it
    closes what it started and nothing else."""

    client: Any
    spec: str
    local: Any = None  # the LocalCluster started for local:N
    owns_client: bool = True
    _probed: set[str] = field(default_factory=set)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.owns_client:
            with contextlib.suppress(Exception):
                self.client.close()
        if self.local is not None:
            with contextlib.suppress(Exception):
                self.local.close()

    @property
    def dashboard_link(self) -> str | None:
        try:
            return str(self.client.dashboard_link)
        except Exception:
            return None

    def workers(self) -> dict[str, Any]:
        """address -> worker info, as the scheduler reports it."""
        return dict(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def announce(self, what: str) -> None:
        """Print, once per job, where it runs and the dashboard link."""
        from tqdm import tqdm

        n = len(self.workers())
        link = self.dashboard_link
        tqdm.write(f"kernelatlas: {what} on {self.spec} ({n} worker{'s' if n != 1 else ''})"
                   + (f"; dashboard: {link}" if link else ""), file=sys.stderr)

    def check_shared(self, folder: str | os.PathLike[str]) -> None:
        """Every worker must see ``folder`` (the corpus) at the same path with the same contents: a file written
        here is read back on each worker.  Raises ClusterError naming the worker and the path otherwise."""
        root = Path(folder).resolve()
        if str(root) in self._probed:
            return
        if not self.workers():
            raise ClusterError(f"the cluster at {self.spec} has no workers: start some (`dask worker ADDRESS`) "
                               "or wait for them to join")
        token = uuid.uuid4().hex
        probe = root / f".kernelatlas-probe-{token}"
        probe.write_text(token)
        try:
            seen = self.client.run(_probe_path, str(probe), token)
        finally:
            probe.unlink(missing_ok=True)
        bad = {addr: why for addr, why in seen.items() if why}
        if bad:
            addr, why = sorted(bad.items())[0]
            raise ClusterError(f"worker {addr} cannot see the corpus folder {root} ({why}): every worker must mount "
                               f"the corpus at the same path on a shared filesystem"
                               + (f" ({len(bad)} of {len(seen)} workers fail)" if len(bad) > 1 else ""))
        self._probed.add(str(root))

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]], *, weights: Sequence[int] | None = None,
            bar: Any = None, key: str = "kernelatlas") -> Iterator[tuple[int, Any]]:
        """Run ``fn(*task)`` for every task on the cluster; yields (index, result) as tasks finish (any order),
        advancing ``bar`` by the task's weight.  A worker that dies mid-task has its tasks run again elsewhere
        (the scheduler's doing); a task that raises cancels the rest and re-raises here."""
        distributed = _import_distributed()
        futures = [self.client.submit(fn, *task, pure=False, key=f"{key}-{i}-{uuid.uuid4().hex[:8]}")
                   for i, task in enumerate(tasks)]
        index = {f.key: i for i, f in enumerate(futures)}
        try:
            for fut in distributed.as_completed(futures):
                i = index[fut.key]
                result = fut.result()
                if bar is not None:
                    bar.update(weights[i] if weights is not None else 1)
                fut.release()
                yield i, result
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()


def _probe_path(path: str, token: str) -> str:
    """Runs on a worker: '' when ``path`` holds ``token``, else why not."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return f"no such file on host {socket.gethostname()}: not a shared filesystem, or mounted elsewhere"
    except OSError as exc:
        return f"cannot read it on host {socket.gethostname()}: {exc}"
    return "" if text == token else f"another file of that name on host {socket.gethostname()}"


def engine_threads() -> int:
    """Engine threads for a task on this worker: $KERNELATLAS_WORKER_THREADS when set (local:N sets it to cores /
    N; set it on hosts that run several worker processes, e.g. `dask worker --nworkers 4`), else the cores
    divided among the tasks the worker runs at once (its --nthreads).  Outside a worker: 0 (every core)."""
    env = os.environ.get(WORKER_THREADS_ENV, "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return 0
    slots = max(1, int(worker.state.nthreads))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // slots)


def _parse_local(spec: str) -> int:
    text = spec[len("local:"):] if spec.startswith("local:") else ""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ClusterError(f"--cluster {spec}: local:N needs a number of worker processes N >= 1, e.g. local:2")
    return n


def connect(spec: str, *, timeout: float = CONNECT_TIMEOUT) -> Cluster:
    """Start (local:N) or connect to (address, scheduler file) the cluster ``spec`` names."""
    distributed = _import_distributed()
    spec = spec.strip()
    if spec.startswith("local"):
        n = _parse_local(spec)
        # one task per worker process; the engine inside it uses cores / N threads (engine_threads); the
        # dashboard on a free port so that two jobs on one machine do not collide.  No memory limit: a task's
        # resident memory is mostly memory-mapped corpus pages, which Dask's monitor would count and act on
        # (pausing or restarting the worker) although the kernel can drop them at any time.
        # Dask's statistical profiler samples every worker thread each 10 ms; on a machine whose every core runs
        # the engine it cost local:2 ~3% of its throughput (BENCHMARKS.md), so local workers run without it
        import dask

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        try:
            with dask.config.set({"distributed.worker.profile.enabled": False}):
                local = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                                 dashboard_address=":0", silence_logs=40, memory_limit=0,
                                                 env={WORKER_THREADS_ENV: str(max(1, cores // n))})
        except Exception as exc:
            raise ClusterError(f"{spec}: the local worker processes did not start ({exc}).  They are spawned "
                               "and import the main module: a Python script that starts local:N must run its "
                               "code under `if __name__ == \"__main__\":` (and cannot be read from stdin)") from exc
        try:
            client = distributed.Client(local, timeout=timeout)
        except BaseException:
            local.close()
            raise
        return Cluster(client, spec, local=local)
    if "://" in spec:
        address = spec
        kwargs: dict[str, Any] = {"address": address}
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ClusterError(f"--cluster {spec}: not local:N, not an address (tcp://HOST:PORT) and no scheduler "
                               f"file at {path} (start one with `dask scheduler --scheduler-file {path}`)")
        address = f"the scheduler in {path}"
        kwargs = {"scheduler_file": str(path)}
    try:
        client = distributed.Client(timeout=timeout, **kwargs)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within {timeout:g} s ({exc}): is "
                           "`dask scheduler` running there and the port open from this host?") from None
    return Cluster(client, spec)


def resolve(cluster: str | Cluster | None = None, client: Any = None) -> Cluster | None:
    """The cluster a job runs on: ``client`` (a dask.distributed Client of the caller, left open), ``cluster``
    (a spec, or a Cluster returned as it is), else $KERNELATLAS_CLUSTER, else None (in-process).  A Cluster made
    here from a spec is closed by the caller (it is a context manager)."""
    if client is not None:
        return Cluster(client, str((getattr(client, "scheduler", None) and client.scheduler.address) or "client"),
                       owns_client=False)
    if isinstance(cluster, Cluster):
        return cluster  # the caller's: it stays open (and keeps what it has probed)
    spec = cluster if cluster is not None else os.environ.get(ENV) or None
    if not spec or spec in ("none", "in-process"):
        return None
    return connect(spec)


@contextlib.contextmanager
def session(cluster: str | Cluster | None = None, client: Any = None) -> Iterator[Cluster | None]:
    """``with session(cluster, client) as cl:``: cl is None in-process; what was started here is closed after."""
    cl = resolve(cluster, client)
    try:
        yield cl
    finally:
        if cl is not None and cl is not cluster:  # made here (a spec, or a wrapper of the caller's client)
            cl.close()
