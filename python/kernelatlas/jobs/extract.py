"""`kernelatlas extract`: checkpoints (files, folders, ``zoo:NAME``) -> the corpus.

Each input file is hashed (sha256, streamed), skipped if the corpus already holds it, read by its loader and
streamed into the corpus writer; commits happen every ``commit_rows`` kernels or ``commit_seconds`` and at the
end, so an interrupted run keeps everything committed and a rerun completes the rest.  A file that cannot be
read is reported (naming it and the reason) and the others are still extracted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas._files import sha256_file
from kernelatlas.corpus import CorpusWriter
from kernelatlas.corpus.loaders import LoaderError, is_checkpoint, load_file, source_files
from kernelatlas.corpus.loaders.architectures import load_with_architecture

_CORPUS_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # errors of the corpus's filesystem, not of a file

__all__ = ["ExtractReport", "expand_sources", "extract", "extract_module", "sha256_file", "source_identity"]


@dataclass
class ExtractReport:
    added: list[dict[str, Any]] = field(default_factory=list)      # model rows added
    skipped: list[str] = field(default_factory=list)               # already in the corpus
    failed: list[tuple[str, str]] = field(default_factory=list)    # (file, reason)
    empty: list[str] = field(default_factory=list)                 # read, but held no conv layer
    empty_folders: list[str] = field(default_factory=list)         # folders holding no checkpoint file
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every input was read (some may have held no convs)."""
        return not self.failed


LIST_SUFFIXES = (".txt", ".csv")  # a source file with one of these is a list of sources


def expand_sources(sources: Iterable[str | os.PathLike[str]], *, cache: Path | None = None,
                   empty_folders: list[str] | None = None, failed: list[tuple[str, str]] | None = None,
                   source_meta: dict[Path, dict[str, str]] | None = None, progress: bool = True) -> list[Path]:
    """Files as given, folders searched recursively for known checkpoint suffixes (sorted), ``zoo:NAME``
    resolved through the zoo cache (pulling the entry if needed; a Hub list such as ``zoo:paper`` gives its
    ``hf:`` entries), ``hf:ORG/NAME[@REV]`` resolved through huggingface_hub (kernelatlas.hub), and lists: a
    ``.txt`` file of sources, one per line (``#`` comments), or a ``.csv`` file with a ``source`` column whose
    other columns are metadata of that source.  Folders without any checkpoint are appended to
    ``empty_folders``; a Hub model that cannot be resolved goes to ``failed`` as (source, reason) (raised when
    ``failed`` is None); ``source_meta`` gets the metadata of each file that has some (Hub facts, list columns)."""
    from kernelatlas.hub import HubError, is_hub_spec
    from kernelatlas.hub import resolve as resolve_hub

    files: list[Path] = []
    meta_of: dict[Path, dict[str, str]] = {}

    def add(path: Path, meta: Mapping[str, str]) -> None:
        files.append(path)
        if meta:
            meta_of.setdefault(path, {}).update(meta)

    def expand(src: str, meta: Mapping[str, str], depth: int) -> None:
        if depth > 8:
            raise ValueError(f"{src}: lists nested more than 8 deep (a list that names itself?)")
        if src.startswith("zoo:"):
            from kernelatlas.jobs import zoo

            name = src[4:]
            if zoo.is_hub_list(name):
                for entry, entry_meta in zoo.hub_list(name):
                    expand(entry, {**entry_meta, **meta}, depth + 1)
                return
            for f in zoo.pull(name, cache=cache):
                add(f, meta)
            return
        if is_hub_spec(src):
            try:
                model = resolve_hub(src, progress=progress)
            except (HubError, ValueError) as exc:
                if failed is None:
                    raise
                failed.append((src, str(exc)))
                return
            name = model.repo.split("/", 1)[1]
            add(model.path, {"name": name, **model.meta, **meta})
            return
        p = Path(src)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_checkpoint(f))
            if not found and empty_folders is not None:
                empty_folders.append(str(p))
            for f in found:
                add(f, meta)
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            for entry, entry_meta in read_source_list(p):
                expand(entry, {**entry_meta, **meta}, depth + 1)
        else:
            add(p, meta)

    for src in sources:
        expand(str(src), {}, 0)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
            if source_meta is not None and f in meta_of:
                source_meta[f] = meta_of[f]
    return unique


def read_source_list(path: Path) -> list[tuple[str, dict[str, str]]]:
    """The entries of a source list: (source, metadata).  Relative paths are taken relative to the list's
    folder; ``hf:`` and ``zoo:`` entries as they are."""
    import csv

    def place(entry: str) -> str:
        if entry.startswith(("hf:", "zoo:")) or Path(entry).is_absolute():
            return entry
        return str(path.parent / entry)

    out: list[tuple[str, dict[str, str]]] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "source" not in reader.fieldnames:
                raise ValueError(f"{path}: a source list in CSV needs a 'source' column (other columns: metadata "
                                 "such as family, dataset, task)")
            for row in reader:
                source = (row.pop("source") or "").strip()
                if source and not source.startswith("#"):
                    out.append((place(source), {k: v.strip() for k, v in row.items() if k and v and v.strip()}))
        return out
    for line in path.read_text().splitlines():
        entry = line.split("#", 1)[0].strip() if not line.strip().startswith("hf:") else line.strip()
        if entry and not entry.startswith("#"):
            out.append((place(entry), {}))
    return out


def source_identity(path: Path) -> str:
    """The sha256 a model is keyed by: of the file itself, or -- when loading it reads other files too (ONNX
    external data, safetensors shards) -- of the file's sha256 and each other file's name and sha256, so the
    identity covers every byte its kernels come from."""
    digest = sha256_file(path)
    others = source_files(path)
    if not others:
        return digest
    h = hashlib.sha256(f"kernelatlas-source:{digest}".encode())
    for other in others:
        h.update(f"\n{other.name}:{sha256_file(other)}".encode())
    return h.hexdigest()


def extract(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    sizes: Sequence[int] = (3, 5, 7),
    all_convs: bool = False,
    dtype: str = "float32",
    meta: Mapping[str, str] | None = None,
    progress: bool = True,
    commit_rows: int = 1 << 24,
    commit_seconds: float = 60.0,
    zoo_cache: Path | None = None,
    arch: str | None = None,
    fold_bn: bool = False,
    cluster: Any = None,
    client: Any = None,
) -> ExtractReport:
    """Extract every conv layer of every input into the corpus at ``out`` (created if absent).

    ``arch``: read every file as weights of that architecture (``timm:NAME``, ``torchvision:NAME``,
    ``python:MODULE:CALLABLE``; see loaders/architectures.py): exact groups, and ``fold_bn`` folds BatchNorm.

    ``cluster`` / ``client`` (kernelatlas.cluster): the files are read by the workers of a Dask cluster, each
    writing its model's kernels as shard files in the corpus's staging area; this process commits them into the
    corpus in the order of the inputs (renames and table rows: no kernel bytes pass through it or the
    scheduler), so model and layer ids, tables and kernels are those of an in-process run.  The corpus must be
    on a filesystem every worker mounts at the same path; so must the input files."""
    from tqdm import tqdm

    from kernelatlas.cluster import session

    report = ExtractReport()
    source_meta: dict[Path, dict[str, str]] = {}
    files = expand_sources(sources, cache=zoo_cache, empty_folders=report.empty_folders, failed=report.failed,
                           source_meta=source_meta, progress=progress)
    with CorpusWriter(out, dtype=dtype, commit_rows=commit_rows, commit_seconds=commit_seconds) as writer, \
            session(cluster, client) as cl:
        bar = tqdm(files, desc="extract", unit="file", disable=not progress, file=sys.stderr)
        if cl is not None:
            _extract_on_cluster(cl, files, writer, report, bar=bar, sizes=sizes, all_convs=all_convs, meta=meta,
                                arch=arch, fold_bn=fold_bn, source_meta=source_meta)
            bar.close()
            return report
        for path in bar:
            bar.set_postfix_str(path.name[-40:])
            try:
                digest = _identity(path, arch, fold_bn)
            except Exception as exc:
                report.failed.append((str(path), _failure(path, exc, reading_identity=True)))
                continue
            if writer.has_model(digest):
                report.skipped.append(str(path))
                continue
            # one error boundary per file: whatever a loader or the reading of its tensors raises (a
            # LoaderError, or a RecursionError / ValueError / MemoryError from a hostile file) fails this file
            # alone -- add_model rewinds what it had written -- while KeyboardInterrupt and SystemExit still stop
            try:
                model = load_file(path) if arch is None else load_with_architecture(path, arch, fold_bn=fold_bn)
                kernels = sum(layer.c_out * layer.c_in_per_group for layer in model.layers)
                with tqdm(total=kernels, desc=f"  {path.name[-30:]}", unit="kernel", unit_scale=True, leave=False,
                          disable=not progress or kernels < 1_000_000, file=sys.stderr) as inner:
                    row = writer.add_model(model, sha256=digest, sizes=sizes, all_convs=all_convs,
                                           meta={**source_meta.get(path, {}), **(meta or {})},
                                           on_layer=inner.update)
            except Exception as exc:
                report.failed.append((str(path), _failure(path, exc)))
                continue
            report.warnings.extend(model.warnings)
            if not model.layers:
                report.empty.append(str(path))
            report.added.append(row)
            writer.maybe_commit()
        bar.close()
    return report


def _identity(path: Path, arch: str | None, fold_bn: bool) -> str:
    """The sha256 a file's model is keyed by in the corpus (the file's identity, and the architecture it is read
    through)."""
    digest = source_identity(path)
    if arch is not None:  # the same file read through an architecture is another corpus model
        digest = hashlib.sha256(f"{digest}:arch={arch}:fold_bn={fold_bn}".encode()).hexdigest()
    return digest


def _failure(path: Path, exc: Exception, *, reading_identity: bool = False) -> str:
    """Why a file failed, for the report; re-raises errors of the corpus's own filesystem (a full disk), which
    stop the extract (nothing past the last commit is kept)."""
    if isinstance(exc, LoaderError):
        return str(exc)
    if isinstance(exc, OSError):
        if reading_identity:
            return f"cannot read: {exc.strerror or exc}"
        if exc.errno in _CORPUS_FULL:
            raise exc
        return f"{path}: cannot be read ({exc})"
    return f"{path}: cannot be read ({type(exc).__name__}: {str(exc)[:300] or 'no detail'})"


def _stage_task(path: str, staging: str, prefix: str, sizes: Sequence[int], all_convs: bool, dtype: str,
                meta: Mapping[str, str] | None, arch: str | None, fold_bn: bool,
                known: frozenset[str]) -> dict[str, Any]:
    """One cluster task (runs on a worker): read one checkpoint and stage its kernels (store.stage_model).
    Returns what the client needs to commit it, or why it failed."""
    from kernelatlas.corpus.store import stage_model

    file = Path(path)
    try:
        digest = _identity(file, arch, fold_bn)
    except FileNotFoundError as exc:
        import socket

        return {"status": "failed", "reason": _failure(file, exc, reading_identity=True)
                + f" (on worker host {socket.gethostname()}: inputs must be on a filesystem every worker mounts)"}
    except Exception as exc:
        return {"status": "failed", "reason": _failure(file, exc, reading_identity=True)}
    if digest in known:
        return {"status": "skipped"}
    try:
        model = load_file(file) if arch is None else load_with_architecture(file, arch, fold_bn=fold_bn)
        staged = stage_model(model, Path(staging), prefix, sha256=digest, dtype=dtype, sizes=sizes,
                             all_convs=all_convs, meta=meta)
    except Exception as exc:
        return {"status": "failed", "reason": _failure(file, exc)}
    return {"status": "added", "staged": staged, "warnings": list(model.warnings), "empty": not model.layers}


def _extract_on_cluster(cl: Any, files: list[Path], writer: CorpusWriter, report: ExtractReport, *, bar: Any,
                        sizes: Sequence[int], all_convs: bool, meta: Mapping[str, str] | None, arch: str | None,
                        fold_bn: bool, source_meta: Mapping[Path, Mapping[str, str]]) -> None:
    """Read the files on the cluster; commit their staged kernels in input order as the results come in."""
    import shutil
    import uuid

    cl.check_shared(writer.root)
    cl.announce("extract")
    staging = writer.staging_area() / uuid.uuid4().hex
    staging.mkdir()
    try:
        known = writer.known_models()
        tasks = [(str(path.absolute()), str(staging.resolve()), f"{i:06d}",
                  tuple(sizes), all_convs, writer.dtype.name, {**source_meta.get(path, {}), **(meta or {})} or None,
                  arch, fold_bn, known)
                 for i, path in enumerate(files)]
        order = files
        done: dict[int, dict[str, Any]] = {}
        applied = 0
        for i, result in cl.map(_stage_task, tasks, bar=bar, key="extract"):
            done[i] = result
            while applied in done:  # commit in input order, whatever order the tasks finish in
                _apply_staged(writer, report, order[applied], done.pop(applied))
                applied += 1
        writer.commit()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging.parent.rmdir()  # the staging area, unless another job's files are in it


def _apply_staged(writer: CorpusWriter, report: ExtractReport, path: Path, result: dict[str, Any]) -> None:
    status = result["status"]
    if status == "failed":
        report.failed.append((str(path), result["reason"]))
        return
    if status == "skipped":
        report.skipped.append(str(path))
        return
    staged = result["staged"]
    if writer.has_model(staged.row["sha256"]):  # the same model given twice in this job
        for entry in staged.files.values():
            Path(entry["file"]).unlink(missing_ok=True)
        report.skipped.append(str(path))
        return
    report.added.append(writer.add_staged(staged))
    report.warnings.extend(result["warnings"])
    if result["empty"]:
        report.empty.append(str(path))
    writer.maybe_commit()


def extract_module(
    module: Any,
    out: str | os.PathLike[str],
    *,
    name: str,
    fold_bn: bool = False,
    example_input: Any = None,
    sizes: Sequence[int] = (3, 5, 7),
    all_convs: bool = False,
    dtype: str = "float32",
    meta: Mapping[str, str] | None = None,
) -> dict[str, Any] | None:
    """Extract a live ``torch.nn.Module`` (groups, stride and dilation known exactly; ``fold_bn`` folds
    BatchNorm into the convs it follows, as ONNX exports and CNN Filter DB do).  The model is keyed by the
    sha256 of its conv weights and the options, so adding the same module twice adds it once.  Returns the
    model row, or None when the corpus already holds it."""
    from kernelatlas.corpus.loaders.torch_module import load_module

    model = load_module(module, name=name, fold_bn=fold_bn, example_input=example_input)
    h = hashlib.sha256(f"module:{name}:fold_bn={fold_bn}".encode())
    for layer in model.layers:
        h.update(layer.name.encode())
        h.update(np.ascontiguousarray(layer.weight).tobytes())
    digest = h.hexdigest()
    with CorpusWriter(out, dtype=dtype) as writer:
        if writer.has_model(digest):
            return None
        return writer.add_model(model, sha256=digest, sizes=sizes, all_convs=all_convs, meta=meta)
