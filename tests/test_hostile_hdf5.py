"""Hostile HDF5 inputs (issue 12, items 1, 2, 5 and the HDF5 part of 6): checkpoints and CNN Filter DB files
come from strangers, so loading one must never corrupt memory, read another local file, hang or allocate
without bound -- a bad file ends in a clear per-file error naming the dataset and the problem.

Every hostile file is built here at run time with h5py (no binary fixtures) and fed to the real entry points:
``kernelatlas.jobs.extract.extract`` (what ``kernelatlas extract`` runs) for Keras files and
``kernelatlas.jobs.filterdb.import_filterdb`` (what ``kernelatlas import-filterdb`` runs) for CNN Filter DB
files.  Whatever could crash the interpreter (item 1), hang (item 5) or allocate too much (item 6) runs in a
subprocess with a timeout and an address-space limit, so a regression fails the test instead of pytest.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
from test_filterdb import build_dataset

from kernelatlas.corpus.loaders import keras_model
from kernelatlas.corpus.loaders.base import LoaderError
from kernelatlas.corpus.loaders.filterdb import FilterDBError, read_meta, restricted_loads
from kernelatlas.jobs.extract import extract
from kernelatlas.jobs.filterdb import import_filterdb

KSHAPE = (3, 3, 4, 8)  # a Keras Conv2D kernel [kh, kw, c_in, c_out]
WORD = b"SECR"  # the "secret" file repeats it: any float32 view of its bytes, in any order, shows WORD * 3


# ---------------------------------------------------------------------------------------------- helpers


def secret_raw(tmp_path: Path, n_bytes: int) -> Path:
    """A local file the hostile checkpoint tries to copy into the corpus."""
    path = tmp_path / "secret.bin"
    path.write_bytes(WORD * (n_bytes // len(WORD)))
    return path


def secret_h5(tmp_path: Path, shape: tuple[int, ...], dtype: str) -> Path:
    """A local HDF5 file (dataset ``data`` holding the secret bytes) for external links and virtual datasets."""
    path = tmp_path / "secret.h5"
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.frombuffer(WORD * (n // len(WORD)), dtype).reshape(shape))
    return path


def assert_no_secret(root: Path, *patterns: bytes) -> None:
    patterns = patterns or (WORD * 3,)
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            for pattern in patterns:
                assert pattern not in data, f"secret bytes reached {p}"


def kernel(seed: int = 0, shape: tuple[int, ...] = KSHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


MakeKernel = Callable[[h5py.Group, str], None]


def plain_kernel(group: h5py.Group, name: str) -> None:
    group.create_dataset(name, data=kernel())


def conv_config(names: list[str]) -> dict[str, Any]:
    return {"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "Conv2D", "config": {"name": n, "groups": 1}} for n in names]}}


def write_keras2(path: Path, make: MakeKernel = plain_kernel, *, layer_names: list[str] | None = None) -> Path:
    """A Keras 2 ``.h5`` (model_weights + model_config) with one Conv2D ``conv``."""
    layer_names = layer_names or ["conv"]
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array([n.encode() for n in layer_names])
        root.attrs["keras_version"] = b"2.13.1"
        f.attrs["model_config"] = json.dumps(conv_config(sorted(set(layer_names))))
        for name in sorted(set(layer_names)):
            group = root.create_group(name)
            group.attrs["weight_names"] = np.array([f"{name}/kernel:0".encode()])
            make(group.create_group(name), "kernel:0")
    return path


def write_keras3_weights(path: Path, make: MakeKernel = plain_kernel) -> Path:
    """A bare Keras 3 ``.weights.h5``: layers/conv2d/vars/0 is the kernel."""
    with h5py.File(path, "w") as f:
        group = f.create_group("layers/conv2d/vars")
        make(group, "0")
        group.create_dataset("1", data=np.zeros(KSHAPE[-1], np.float32))
    return path


def write_keras3_zip(path: Path, make: MakeKernel = plain_kernel, *, config: dict | None = None,
                     compression: int = zipfile.ZIP_STORED, weights: Path | None = None, pad: int = 0) -> Path:
    """A Keras 3 ``.keras`` archive (config.json + model.weights.h5) with one Conv2D ``conv``."""
    if weights is None:
        weights = write_keras3_weights(path.with_name(path.name + ".member.h5"), make)
    data = weights.read_bytes() + b"\0" * pad  # HDF5 ignores bytes past its end of allocation
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("config.json", json.dumps(config or conv_config(["conv"])))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.6.0"}))
        archive.writestr("model.weights.h5", data)
    return path


KERAS_WRITERS = {
    "keras2.h5": write_keras2,
    "bare.weights.h5": write_keras3_weights,
    "model.keras": write_keras3_zip,
}


def extract_failure(path: Path, corpus: Path) -> str:
    """Run ``kernelatlas extract`` on one file; it must fail that file alone, cleanly.  Returns the reason."""
    report = extract([path], corpus, progress=False)
    assert report.added == [], "the hostile file was extracted"
    assert len(report.failed) == 1, report
    failed_path, reason = report.failed[0]
    assert failed_path == str(path)
    assert str(path) in reason
    assert "cannot be read (" not in reason, f"not a loader error but an escaped exception: {reason}"
    return reason


def filterdb_failure(path: Path, corpus: Path) -> str:
    """Run ``kernelatlas import-filterdb``: a FilterDBError naming the file, and no corpus created."""
    with pytest.raises(FilterDBError) as info:
        import_filterdb(path, corpus, progress=False)
    assert str(path) in str(info.value)
    assert not corpus.exists()
    return str(info.value)


RUNNER = textwrap.dedent("""
    import json, resource, sys
    kind, src, out, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if headroom:
        # the limit is headroom above what the interpreter already maps: under ASan (scripts/sanitize.sh) the
        # shadow memory alone maps terabytes, so an absolute limit would refuse the interpreter its start
        with open("/proc/self/status") as fh:
            size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
    result = {}
    try:
        if kind == "extract":
            from kernelatlas.jobs.extract import extract
            report = extract([src], out, progress=False)
            result = {"added": len(report.added), "failed": [r for _, r in report.failed]}
        elif kind == "import-filterdb":
            from kernelatlas.jobs.filterdb import import_filterdb
            report = import_filterdb(src, out, progress=False)
            result = {"added": len(report.added), "failed": []}
        else:
            import pickle
            from kernelatlas.corpus.loaders.filterdb import restricted_loads
            with open(src, "rb") as fh:
                value = restricted_loads(fh.read(), where="payload")
            result = {"added": 1, "failed": [], "value": repr(value)[:200]}
    except Exception as exc:
        result = {"added": 0, "failed": [f"{type(exc).__name__}: {exc}"], "type": type(exc).__name__}
    print("RESULT " + json.dumps(result))
""")


def run_isolated(kind: str, src: Path, out: Path, *, timeout: float = 120, headroom: int = 0) -> dict[str, Any]:
    """Run one entry point in a fresh interpreter: a crash or a hang fails the test, not pytest."""
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER, kind, str(src), str(out), str(headroom)],
                              check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{kind} {src.name} still running after {timeout:.0f} s (a hang)")
    assert proc.returncode == 0, (f"{kind} {src.name} died with exit status {proc.returncode} "
                                  f"(a negative status is a signal: -11 = segfault)\n{proc.stderr[-2000:]}")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(line[len("RESULT "):])


# ---------------------------------------------------------------------------------------------- legit files


@pytest.mark.parametrize("kind", sorted(KERAS_WRITERS))
def test_legit_hand_built_keras_files_load(kind: str, tmp_path: Path) -> None:
    """The builders below make files the loader reads; only the hostile twist makes them fail."""
    path = KERAS_WRITERS[kind](tmp_path / kind)
    (layer,) = keras_model.load(path).layers
    np.testing.assert_array_equal(layer.weight, kernel().transpose(3, 2, 0, 1))
    report = extract([path], tmp_path / "corpus", progress=False)
    assert len(report.added) == 1 and report.failed == []


def test_legit_deflated_keras_member_loads(tmp_path: Path) -> None:
    path = write_keras3_zip(tmp_path / "m.keras", compression=zipfile.ZIP_DEFLATED, pad=1 << 20)
    (layer,) = keras_model.load(path).layers
    np.testing.assert_array_equal(layer.weight, kernel().transpose(3, 2, 0, 1))


# ---------------------------------------------------------------------------------------------- item 1


class _Raw:
    """Pickles as ``func(*args)`` followed by a BUILD of ``state`` (what numpy's own reduce produces)."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


def _multiarray(name: str) -> Any:
    return getattr(np._core.multiarray if hasattr(np, "_core") else np.core.multiarray, name)


def void_with_object_field(flags: int = 0) -> _Raw:
    """dtype('V8') rebuilt by BUILD into a struct whose field f0 is a PyObject* -- with flags 0 numpy never
    checks the array's bytes, so they are dereferenced as an object pointer (0x5243455352434553)."""
    fields = {"f0": (np.dtype("O"), 0)}
    return _Raw(np.dtype, ("V8", False, True), (3, "|", None, ("f0",), fields, 8, 1, flags))


def hostile_pickles() -> dict[str, bytes]:
    reconstruct, scalar = _multiarray("_reconstruct"), _multiarray("scalar")
    evil = {
        "void-object-array": _Raw(reconstruct, (np.ndarray, (0,), b"b"),
                                  (1, (2,), void_with_object_field(), False, WORD * 4)),
        "void-object-scalar": _Raw(scalar, (void_with_object_field(), WORD * 2)),
        "subarray-dtype": _Raw(reconstruct, (np.ndarray, (0,), b"b"),
                               (1, (1,), _Raw(np.dtype, ("V8", False, True),
                                              (3, "|", (np.dtype("O"), (1,)), None, None, 8, 1, 0)),
                                False, WORD * 2)),
        "plain-dtype-rebuilt-with-fields": _Raw(reconstruct, (np.ndarray, (0,), b"b"),
                                                (1, (2,), _Raw(np.dtype, ("f8", False, True),
                                                               (3, "<", None, ("f0",), {"f0": (np.dtype("O"), 0)},
                                                                8, 1, 0)), False, WORD * 4)),
        "object-dtype-raw-bytes": _Raw(reconstruct, (np.ndarray, (0,), b"b"),
                                       (1, (2,), np.dtype("O"), False, WORD * 4)),
        "float-array-short-data": _Raw(reconstruct, (np.ndarray, (0,), b"b"),
                                       (1, (1 << 40,), np.dtype("f8"), False, WORD * 2)),
    }
    return {name: pickle.dumps(obj, protocol=2) for name, obj in evil.items()}


@pytest.mark.parametrize("name", sorted(hostile_pickles()))
def test_crafted_numpy_pickles_are_refused_without_crashing(name: str, tmp_path: Path) -> None:
    payload = tmp_path / f"{name}.pickle"
    payload.write_bytes(hostile_pickles()[name])
    result = run_isolated("pickle", payload, tmp_path / "unused", headroom=4 << 30)
    assert result["added"] == 0, f"the crafted pickle was accepted: {result}"
    (reason,) = result["failed"]
    assert reason.startswith(("PickleRefused", "FilterDBError")), reason
    assert "payload" in reason


def test_build_never_touches_shared_objects() -> None:
    """BUILD on pd.NA (or on a numpy scalar) would set attributes on a process-wide singleton."""
    na_build = b"\x80\x02cpandas\nNA\n}X\x04\x00\x00\x00evilK\x01sb."
    with pytest.raises(FilterDBError):
        restricted_loads(na_build, where="x")
    assert not hasattr(pd.NA, "evil")


def test_legit_numpy_pickles_still_load() -> None:
    values = [np.arange(6, dtype=">i4").reshape(2, 3), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              np.array([True, False]), np.array(["ab", "c"]), np.array([b"x", b"yz"]), np.float32(1.5),
              np.array(["a", None, 2.5, np.nan], dtype=object).reshape(2, 2), np.int64(7), np.complex64(1j),
              np.asfortranarray(np.array([["a", "b", "c"], ["d", "e", "f"]], dtype=object)),
              [np.dtype("f8"), np.dtype("<U3"), {"k": np.arange(3, dtype=np.uint16)}]]
    for protocol in (0, 2, 4, 5):
        for value in values:
            out = restricted_loads(pickle.dumps(value, protocol=protocol), where="x")
            if isinstance(value, np.ndarray):
                assert type(out) is np.ndarray and out.dtype == value.dtype and out.shape == value.shape
                assert out.tolist() == value.tolist() or value.dtype == object
            elif isinstance(value, list):
                assert out[0] == value[0] and out[1] == value[1]
                np.testing.assert_array_equal(out[2]["k"], value[2]["k"])
            else:
                assert type(out) is type(value) and out == value


def _replace_block_pickle(path: Path, payload: bytes) -> None:
    """Swap the first pickled object block of a pandas "fixed" meta table for ``payload``."""
    with h5py.File(path, "r+") as f:
        meta = f["meta"]
        key = next(k for k in meta if k.endswith("_values") and meta[k].attrs["CLASS"] == b"VLARRAY")
        attrs = dict(meta[key].attrs)
        del meta[key]
        ds = meta.create_dataset(key, shape=(1,), dtype=h5py.vlen_dtype(np.uint8))
        ds[0] = np.frombuffer(payload, np.uint8)
        for k, v in attrs.items():
            ds.attrs[k] = v


def test_filterdb_meta_with_a_crafted_dtype_build(tmp_path: Path) -> None:
    """Item 1 end to end: the object block of a real-format meta table is a pickled array whose dtype BUILD
    makes numpy read file bytes as object pointers.  Before the fix this segfaulted ``import-filterdb``."""
    path = tmp_path / "dataset.h5"
    frame, _ = build_dataset(path, fmt="fixed")
    n_rows = len(frame)
    reconstruct = _multiarray("_reconstruct")
    evil = _Raw(reconstruct, (np.ndarray, (0,), b"b"),
                (1, (n_rows,), void_with_object_field(), False, WORD * 2 * n_rows))
    _replace_block_pickle(path, pickle.dumps(evil, protocol=2))
    result = run_isolated("import-filterdb", path, tmp_path / "corpus", headroom=4 << 30)
    assert result["added"] == 0
    (reason,) = result["failed"]
    assert reason.startswith("PickleRefused") and str(path) in reason and "dtype" in reason, reason
    assert not (tmp_path / "corpus").exists()


# ---------------------------------------------------------------------------------------------- item 2


def _external(secret: Path) -> MakeKernel:
    nbytes = int(np.prod(KSHAPE)) * 4

    def make(group: h5py.Group, name: str) -> None:
        group.create_dataset(name, shape=KSHAPE, dtype="<f4", external=[(str(secret), 0, nbytes)])
    return make


def _virtual(secret: Path) -> MakeKernel:
    def make(group: h5py.Group, name: str) -> None:
        layout = h5py.VirtualLayout(shape=KSHAPE, dtype="<f4")
        layout[...] = h5py.VirtualSource(str(secret), "data", shape=KSHAPE)
        group.create_virtual_dataset(name, layout)
    return make


def _external_link(secret: Path) -> MakeKernel:
    def make(group: h5py.Group, name: str) -> None:
        group[name] = h5py.ExternalLink(str(secret), "/data")
    return make


def _soft_link_out(secret: Path) -> MakeKernel:
    """A soft link whose target leaves the file through an external link."""
    def make(group: h5py.Group, name: str) -> None:
        group.file["outside"] = h5py.ExternalLink(str(secret), "/")
        group[name] = h5py.SoftLink("/outside/data")
    return make


HOSTILE_STORAGE = {
    "external-storage": ("raw", _external, "external"),
    "virtual-dataset": ("h5", _virtual, "virtual"),
    "external-link": ("h5", _external_link, "external link"),
    "soft-link-leaving-the-file": ("h5", _soft_link_out, "link"),
}


@pytest.mark.parametrize("kind", sorted(KERAS_WRITERS))
@pytest.mark.parametrize("variant", sorted(HOSTILE_STORAGE))
def test_keras_never_reads_other_local_files(kind: str, variant: str, tmp_path: Path) -> None:
    source, factory, words = HOSTILE_STORAGE[variant]
    secret = (secret_raw(tmp_path, int(np.prod(KSHAPE)) * 4) if source == "raw"
              else secret_h5(tmp_path, KSHAPE, "<f4"))
    path = KERAS_WRITERS[kind](tmp_path / kind, factory(secret))
    reason = extract_failure(path, tmp_path / "corpus")
    assert words in reason.lower(), reason
    assert_no_secret(tmp_path / "corpus")


def _filterdb_with_filters(tmp_path: Path, make: Callable[[h5py.File, tuple[int, ...]], None]) -> Path:
    path = tmp_path / "dataset.h5"
    _, filters = build_dataset(path, fmt="table")
    with h5py.File(path, "r+") as f:
        del f["filters"]
        make(f, filters.shape)
    return path


@pytest.mark.parametrize("variant", sorted(HOSTILE_STORAGE))
def test_filterdb_never_reads_other_local_files(variant: str, tmp_path: Path) -> None:
    source, _, words = HOSTILE_STORAGE[variant]
    _, filters = build_dataset(tmp_path / "probe.h5")
    shape = filters.shape
    secret = (secret_raw(tmp_path, int(np.prod(shape)) * 8) if source == "raw"
              else secret_h5(tmp_path, shape, "<f8"))

    def make(f: h5py.File, shape: tuple[int, ...]) -> None:
        if variant == "external-storage":
            f.create_dataset("filters", shape=shape, dtype="<f8",
                             external=[(str(secret), 0, int(np.prod(shape)) * 8)])
        elif variant == "virtual-dataset":
            layout = h5py.VirtualLayout(shape=shape, dtype="<f8")
            layout[...] = h5py.VirtualSource(str(secret), "data", shape=shape)
            f.create_virtual_dataset("filters", layout)
        elif variant == "external-link":
            f["filters"] = h5py.ExternalLink(str(secret), "/data")
        else:
            f["outside"] = h5py.ExternalLink(str(secret), "/")
            f["filters"] = h5py.SoftLink("/outside/data")

    path = _filterdb_with_filters(tmp_path, make)
    reason = filterdb_failure(path, tmp_path / "corpus")
    assert words in reason.lower() and "filters" in reason, reason


def test_filterdb_meta_from_an_external_file(tmp_path: Path) -> None:
    """The early release's CSV-bytes meta, stored in a local file: before the fix its rows (and a column of
    secrets) became corpus metadata."""
    path = tmp_path / "dataset.h5"
    frame, filters = build_dataset(path)
    table = frame.reset_index()
    table["token"] = (WORD * 8).decode()
    secret = tmp_path / "secret.csv"
    secret.write_bytes(table.to_csv(index=False).encode())
    size = secret.stat().st_size
    with h5py.File(path, "w") as f:
        f.create_dataset("filters", data=filters)
        f.create_dataset("meta", shape=(size,), dtype=np.uint8, external=[(str(secret), 0, size)])
    reason = filterdb_failure(path, tmp_path / "corpus")
    assert "external" in reason and "meta" in reason, reason


# ---------------------------------------------------------------------------------------------- item 5


def _cycle_weights(path: Path, link: str) -> Path:
    write_keras3_weights(path)
    with h5py.File(path, "r+") as f:
        f.create_group("layers/block/layers")
        f["layers/block/layers/loop"] = (f["layers/block"] if link == "hard" else h5py.SoftLink("/layers/block"))
    return path


@pytest.mark.parametrize("link", ["hard", "soft"])
def test_keras_group_cycle_fails_instead_of_hanging(link: str, tmp_path: Path) -> None:
    path = _cycle_weights(tmp_path / "cycle.weights.h5", link)
    result = run_isolated("extract", path, tmp_path / "corpus", timeout=60)
    assert result["added"] == 0
    (reason,) = result["failed"]
    assert str(path) in reason and "cannot be read (" not in reason, reason
    assert ("cycle" if link == "hard" else "soft link") in reason, reason


def test_keras_group_cycle_in_a_keras_archive(tmp_path: Path) -> None:
    weights = _cycle_weights(tmp_path / "member.h5", "hard")
    path = write_keras3_zip(tmp_path / "cycle.keras", weights=weights)
    result = run_isolated("extract", path, tmp_path / "corpus", timeout=60)
    (reason,) = result["failed"]
    assert "cycle" in reason and "model.weights.h5" in reason, reason


def test_keras_nesting_depth_is_capped(tmp_path: Path) -> None:
    path = write_keras3_weights(tmp_path / "deep.weights.h5")
    with h5py.File(path, "r+") as f:
        f.create_group("/".join(["layers", *["g"] * 400]))
    result = run_isolated("extract", path, tmp_path / "corpus", timeout=60)
    (reason,) = result["failed"]
    assert "deep" in reason, reason


def test_filterdb_group_cycle(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    build_dataset(path, fmt="fixed")
    with h5py.File(path, "r+") as f:
        f["meta/loop"] = f["/"]
    result = run_isolated("import-filterdb", path, tmp_path / "corpus", timeout=60)
    (reason,) = result["failed"]
    assert reason.startswith("FilterDBError") and "cycle" in reason, reason


# ---------------------------------------------------------------------------------------------- item 6


def test_filterdb_shape_attribute_is_not_trusted(tmp_path: Path) -> None:
    """pandas marks an empty array with a ``shape`` attribute; a huge one made the reader allocate it."""
    path = tmp_path / "dataset.h5"
    build_dataset(path, fmt="fixed")
    with h5py.File(path, "r+") as f:
        f["meta/axis0"].attrs["shape"] = np.array([1 << 33], np.int64)
    result = run_isolated("import-filterdb", path, tmp_path / "corpus", headroom=3 << 30)
    (reason,) = result["failed"]
    assert reason.startswith("FilterDBError") and "shape" in reason and "axis0" in reason, reason


def test_filterdb_unwritten_chunks_with_a_fill_value(tmp_path: Path) -> None:
    """A tiny file declaring a million filters, one chunk written, the rest 'stored' as a non-zero fill value:
    before the fix it imported as if the file held them."""
    path = tmp_path / "dataset.h5"
    _, filters = build_dataset(path)
    with h5py.File(path, "r+") as f:
        del f["filters"]
        ds = f.create_dataset("filters", shape=(len(filters) + (1 << 20), 3, 3), dtype="<f8",
                              chunks=(1024, 3, 3), fillvalue=0.25)
        ds[:len(filters)] = filters
    assert path.stat().st_size < 1 << 20
    reason = filterdb_failure(path, tmp_path / "corpus")
    assert "never written" in reason and "fill value" in reason, reason


@pytest.mark.parametrize("kind", sorted(KERAS_WRITERS))
def test_keras_kernel_of_unwritten_chunks(kind: str, tmp_path: Path) -> None:
    def make(group: h5py.Group, name: str) -> None:
        group.create_dataset(name, shape=(3, 3, 256, 4096), dtype="<f4", chunks=(3, 3, 16, 16), fillvalue=1.0)

    path = KERAS_WRITERS[kind](tmp_path / kind, make)
    reason = extract_failure(path, tmp_path / "corpus")
    assert "never written" in reason and "fill value" in reason, reason


def test_keras_zip_bomb_member(tmp_path: Path) -> None:
    """model.weights.h5 bzip2-compressed from 32 MiB to a few KiB: refused from its declared sizes, before
    anything is extracted."""
    path = write_keras3_zip(tmp_path / "bomb.keras", compression=zipfile.ZIP_BZIP2, pad=32 << 20)
    assert path.stat().st_size < 64 << 10
    reason = extract_failure(path, tmp_path / "corpus")
    assert "model.weights.h5" in reason and "compress" in reason, reason


def test_keras_member_size_lie(tmp_path: Path) -> None:
    """A central directory that declares fewer bytes than the deflated stream holds."""
    path = write_keras3_zip(tmp_path / "lie.keras", compression=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    # patch the uncompressed size in the central directory entry of the member
    name = b"model.weights.h5"
    central = data.rfind(b"PK\x01\x02", 0, data.rfind(name))
    data[central + 24:central + 28] = (info.file_size // 2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    extract_failure(path, tmp_path / "corpus")


def test_keras_tensor_hard_linked_into_many_layers(tmp_path: Path) -> None:
    """One dataset under 40 layers' names: before the fix it was copied 40 times."""
    names = [f"conv{i}" for i in range(40)]

    def make(group: h5py.Group, name: str) -> None:
        root = group.file
        first = root.get("model_weights/conv0/conv0/kernel:0")
        if first is None:
            group.create_dataset(name, data=kernel())
        else:
            group[name] = first

    path = write_keras2(tmp_path / "shared.h5", make, layer_names=names)
    reason = extract_failure(path, tmp_path / "corpus")
    assert "hard link" in reason and "kernel:0" in reason, reason


def test_keras2_layer_listed_many_times(tmp_path: Path) -> None:
    path = write_keras2(tmp_path / "again.h5", layer_names=["conv"] * 40)
    reason = extract_failure(path, tmp_path / "corpus")
    assert "already read" in reason, reason


def test_keras3_config_naming_one_group_many_times(tmp_path: Path) -> None:
    weights = write_keras3_weights(tmp_path / "member.h5")
    with h5py.File(weights, "r+") as f:
        f["layers/conv2d/vars"].attrs["name"] = "conv"
    path = write_keras3_zip(tmp_path / "again.keras", weights=weights, config=conv_config(["conv"] * 40))
    reason = extract_failure(path, tmp_path / "corpus")
    assert "already read" in reason, reason


def test_filterdb_dataset_under_two_names(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    build_dataset(path)
    with h5py.File(path, "r+") as f:
        f["meta/copy_of_filters"] = f["filters"]
    reason = filterdb_failure(path, tmp_path / "corpus")
    assert "hard link" in reason, reason


def test_read_meta_checks_too(tmp_path: Path) -> None:
    """read_meta (the Python API) runs the same structure checks as import."""
    path = tmp_path / "dataset.h5"
    build_dataset(path)
    with h5py.File(path, "r+") as f:
        f["meta/outside"] = h5py.ExternalLink(str(tmp_path / "nowhere.h5"), "/")
    with pytest.raises(FilterDBError, match="external link"):
        read_meta(path)


def test_loader_errors_are_loader_errors(tmp_path: Path) -> None:
    secret = secret_raw(tmp_path, int(np.prod(KSHAPE)) * 4)
    path = write_keras3_weights(tmp_path / "x.weights.h5", _external(secret))
    with pytest.raises(LoaderError, match="layers/conv2d/vars/0"):
        keras_model.load(path)
