"""The run-directory model: what every job that writes under ``CORPUS/runs/`` leaves there, and the one rule
for which run is the latest.

A run directory is ``CORPUS/runs/RUN_ID/``; its ``run.json`` is written last (atomically), so a directory
without one is a run still being written or interrupted (rerunning the same command resumes it).  Two verbs
write run directories, told apart by run.json's ``format``:

    kernelatlas-run           `kernelatlas assign`   (kK/labels|scores|codes-NNNNNN.npy, assign_layers.parquet)
    kernelatlas-quality-run   `kernelatlas quality`  (quality.parquet, pca-kK.npz; shift-kK-BY/ inside)

:func:`scan` lists the run directories, :func:`latest` picks the latest completed run of one format per key
(by run.json's ``created``, then the file's mtime, then the id), :func:`require` opens one run of a given
format or raises :class:`RunError` naming the file and the fix, and :class:`AssignRun` is a completed assign
run joined to the corpus (``Corpus.run``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kernelatlas.corpus.errors import CorpusError

if TYPE_CHECKING:
    from kernelatlas.corpus.store import Corpus

__all__ = [
    "ASSIGN_FORMAT",
    "QUALITY_FORMAT",
    "AssignRun",
    "RunDir",
    "RunError",
    "RunLock",
    "check",
    "check_run_id",
    "latest",
    "output_path",
    "read",
    "require",
    "run_ids",
    "scan",
    "writable_run_dir",
]

ASSIGN_FORMAT = "kernelatlas-run"
QUALITY_FORMAT = "kernelatlas-quality-run"
VERBS = {ASSIGN_FORMAT: "assign", QUALITY_FORMAT: "quality"}

class RunError(CorpusError, ValueError):
    """A run directory that cannot be used as asked; the message names the file and what to do."""


@dataclass(frozen=True)
class RunDir:
    """One folder under CORPUS/runs/: its run.json (None when missing or unreadable, with ``problem`` saying
    which)."""

    path: Path
    info: dict[str, Any] | None
    problem: str | None = None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def spec_path(self) -> Path:
        return self.path / "run.json"

    @property
    def format(self) -> str | None:
        """run.json's format (runs written before formats existed are assign runs); None without run.json."""
        return None if self.info is None else str(self.info.get("format", ASSIGN_FORMAT))

    @property
    def verb(self) -> str:
        """The command that writes this kind of run ("assign", "quality"), or "?"."""
        return VERBS.get(self.format or "", "?")

    @property
    def completed(self) -> bool:
        return self.info is not None and self.info.get("completed") is True

    @property
    def created(self) -> str:
        return "" if self.info is None else str(self.info.get("created", ""))

    @property
    def kernel_size(self) -> int | None:
        value = None if self.info is None else self.info.get("kernel_size")
        try:
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return None

    @property
    def kind(self) -> str:
        return "depthwise" if self.info is None else str(self.info.get("kind", "depthwise"))

    @property
    def models(self) -> tuple[int, ...] | None:
        """The models an assign run was restricted to (a per-model autoencoder's run), else None."""
        value = None if self.info is None else self.info.get("models")
        return tuple(int(m) for m in value) if value else None

    @property
    def options(self) -> dict[str, Any]:
        value = None if self.info is None else self.info.get("options")
        return value if isinstance(value, dict) else {}

    def files(self) -> list[Path]:
        """Every file of the run, run.json included, sorted."""
        return sorted(p for p in self.path.rglob("*") if p.is_file() and p.name != ".lock")

    def order_key(self) -> tuple[float, float, str]:
        """Order of runs: run.json's "created" (ISO 8601; naive times taken as UTC; unparseable ones first), then
        run.json's mtime ("created" has whole seconds), then the id."""
        try:
            mtime = self.spec_path.stat().st_mtime
        except OSError:
            mtime = 0.0
        try:
            stamp = _dt.datetime.fromisoformat(self.created.replace("Z", "+00:00"))
        except ValueError:
            return -math.inf, mtime, self.run_id
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=_dt.timezone.utc)
        return stamp.timestamp(), mtime, self.run_id


def runs_root(corpus_root: str | Path) -> Path:
    return Path(corpus_root) / "runs"


def run_ids(corpus_root: str | Path) -> list[str]:
    """The ids of every run directory (completed or not), sorted."""
    runs = runs_root(corpus_root)
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir() if p.is_dir() and not p.name.startswith("."))


def read(corpus_root: str | Path, run_id: str) -> RunDir:
    """The run directory CORPUS/runs/RUN_ID as it is (see :func:`require` for one that must be usable)."""
    path = runs_root(corpus_root) / run_id
    spec = path / "run.json"
    if not spec.is_file():
        return RunDir(path, None, "missing")
    try:
        info = json.loads(spec.read_text())
    except (OSError, ValueError) as exc:
        return RunDir(path, None, f"unreadable ({exc})")
    if not isinstance(info, dict):
        return RunDir(path, None, "not a JSON object")
    return RunDir(path, info)


def scan(corpus_root: str | Path) -> list[RunDir]:
    """Every run directory of the corpus, by id."""
    return [read(corpus_root, rid) for rid in run_ids(corpus_root)]


def latest(runs: Iterable[RunDir], *, format: str = ASSIGN_FORMAT,
           key: Callable[[RunDir], Hashable] = lambda run: None) -> dict[Any, RunDir]:
    """The latest completed run of ``format`` per ``key(run)`` (default: one overall, under the key None), by
    :meth:`RunDir.order_key`."""
    best: dict[Any, RunDir] = {}
    for run in runs:
        if not run.completed or run.format != format:
            continue
        k = key(run)
        if k not in best or run.order_key() > best[k].order_key():
            best[k] = run
    return best


def require(corpus_root: str | Path, run_id: str, format: str = ASSIGN_FORMAT) -> RunDir:
    """CORPUS/runs/RUN_ID as a completed run of ``format``, or :class:`RunError` naming the file and the fix:
    missing (with the corpus's run ids), interrupted, unreadable, of another verb, or not completed."""
    return check(read(corpus_root, run_id), format)


def check(run: RunDir, format: str = ASSIGN_FORMAT) -> RunDir:
    """``run`` (as :func:`read` or :func:`scan` found it) if it is a completed run of ``format``, else the
    :class:`RunError` of :func:`require`."""
    verb = VERBS.get(format, format)
    if run.info is None:
        if run.problem != "missing":
            raise RunError(f"{run.spec_path} is {run.problem}: rerun `kernelatlas {verb}` to rewrite it")
        if run.path.is_dir():
            hint = f"the run is still being written or was interrupted: rerun the same `kernelatlas {verb}` command " \
                   "to resume it"
        else:
            others = run_ids(run.path.parent.parent)
            hint = f"no such run; the runs of this corpus are: {', '.join(others) or 'none'}"
        raise RunError(f"{run.spec_path} not found: {hint}")
    if run.format != format:
        raise RunError(f"{run.path} is {_a(run.verb)} run (run.json format {run.format!r}, written by `kernelatlas "
                       f"{run.verb}`), not {_a(verb)} run: name a run that `kernelatlas {verb}` wrote")
    if not run.completed:
        raise RunError(f"{run.spec_path}: run {run.run_id} is not completed (\"completed\": "
                       f"{run.info.get('completed')!r}): rerun the same `kernelatlas {verb}` command to finish it")
    return run


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


class AssignRun:
    """A completed assign run joined to the corpus: ``layers`` is assign_layers.parquet joined with the corpus's
    layers and models tables; ``labels(shard)``, ``scores(shard)``, ``codes(shard)`` are memmaps in the
    shard's row order."""

    def __init__(self, corpus: Corpus, run_id: str, *, found: RunDir | None = None) -> None:
        """The completed assign run ``run_id`` (``found``: as :func:`scan` already read it)."""
        run = require(corpus.root, run_id, ASSIGN_FORMAT) if found is None else check(found, ASSIGN_FORMAT)
        self.corpus = corpus
        self.root = run.path
        self.info: dict[str, Any] = run.info  # type: ignore[assignment]
        self.run_id = run_id
        try:
            self.kernel_size = int(self.info["kernel_size"])
        except (KeyError, TypeError, ValueError):
            raise RunError(f"{run.spec_path} has no integer kernel_size: it was not written by `kernelatlas "
                           "assign`") from None

    @classmethod
    def latest(cls, corpus: Corpus, kernel_size: int | None = None) -> AssignRun:
        """The latest completed assign run (of ``kernel_size`` when given, else of the largest size run)."""
        best = latest(scan(corpus.root), key=lambda r: r.kernel_size)
        if not best:
            raise RunError(f"{corpus.root} has no completed run: run `kernelatlas assign` first")
        if kernel_size is not None and kernel_size not in best:
            raise RunError(f"{corpus.root} has no completed run for {kernel_size}x{kernel_size} kernels")
        k = kernel_size if kernel_size is not None else max(s for s in best if s is not None)
        return cls(corpus, best[k].run_id, found=best[k])

    @property
    def clusters(self) -> list[str]:
        return [c["name"] for c in self.info["clusters"]]

    @property
    def layers(self) -> Any:
        import pandas as pd

        per = pd.read_parquet(self.root / "assign_layers.parquet")
        lay = self.corpus.layers.merge(per, on="layer_id", how="inner")
        models = self.corpus.models.add_prefix("model_").rename(columns={"model_model_id": "model_id"})
        return lay.merge(models, on="model_id", how="left")

    def output(self, shard: str, what: str) -> Path:
        """runs/RUN_ID/kK/{labels,scores,codes}-NNNNNN.npy of the corpus shard kK/shard-NNNNNN.npy."""
        return output_path(self.root, self.kernel_size, shard, what)

    def labels(self, shard: str) -> np.ndarray:
        return self._memmap(shard, "labels")

    def scores(self, shard: str) -> np.ndarray:
        return self._memmap(shard, "scores")

    def codes(self, shard: str) -> np.ndarray:
        return self._memmap(shard, "codes")

    def _memmap(self, shard: str, what: str) -> np.ndarray:
        arr: np.ndarray = np.load(self.output(shard, what), mmap_mode="r")
        return arr


def output_path(run_path: Path, kernel_size: int, shard: str, what: str) -> Path:
    """Where an assign run keeps ``what`` (labels, scores, codes) of the corpus shard kK/shard-NNNNNN.npy."""
    m = re.fullmatch(r"shard-(\d+)\.npy", Path(shard).name)
    if m is None:
        raise RunError(f"{run_path / 'run.json'}: shard {shard!r} is not named kK/shard-NNNNNN.npy")
    return run_path / f"k{kernel_size}" / f"{what}-{m.group(1)}.npy"


# ---------------------------------------------------------------------------------------------- writing

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LOCK = ".lock"


def check_run_id(run_id: str) -> str:
    """A run id is a folder name inside CORPUS/runs: letters, digits, '_', '-', '.' (not first), no '..'."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ValueError(f"run id {run_id!r} is not allowed: use 1-128 letters, digits, '_', '-' or '.' (not "
                         "first, no '..'), so the run stays a folder inside CORPUS/runs")
    return run_id


def writable_run_dir(corpus_root: str | Path, run_id: str) -> Path:
    """CORPUS/runs/RUN_ID for a job to write into (not created here), refusing an id that leaves the folder and
    symlinked runs/ or run folders (they would send writes elsewhere)."""
    runs = runs_root(corpus_root)
    root = runs / check_run_id(run_id)
    for path in (runs, root):
        if path.is_symlink():
            raise CorpusError(f"{path} is a symlink: kernelatlas writes runs only into real folders inside the "
                              "corpus; replace it with a folder")
    return root


class RunLock:
    """An exclusive flock on CORPUS/runs/RUN_ID/.lock, taken on construction, for as long as a run is written
    (released by the kernel if the process dies): a second job on the same run id is refused instead of
    interleaving."""

    def __init__(self, root: Path, *, verb: str = "assign") -> None:
        from kernelatlas._files import acquire_lock

        path = root / LOCK
        try:
            self.fh = acquire_lock(path)
        except BlockingIOError as exc:
            raise CorpusError(f"run {root.name} is being written by {getattr(exc, 'holder', 'another process')} "
                              f"(lock {path}): wait for it to finish, or give this `kernelatlas {verb}` another "
                              "--run") from None
        except OSError as exc:
            raise CorpusError(f"cannot open the run lock {path} ({exc}): remove it if it is a symlink") from None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()
