"""CNN Filter DB dataset.h5 import / export (kernelatlas.corpus.loaders.filterdb).

Every test builds its dataset.h5 in tmp_path in the exact format of reference/README.md section B (``filters``
(N, 3, 3) float64; ``meta`` written by pandas ``to_hdf`` with the MultiIndex [model_id, conv_depth,
conv_depth_norm, layer_id] and inclusive ``filter_ids``), in both of pandas' HDF formats, and checks the
import against the arrays it wrote.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest

from kernelatlas import cli
from kernelatlas.corpus import Corpus, CorpusWriter
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel
from kernelatlas.corpus.loaders.filterdb import (
    FilterDBError,
    PickleRefused,
    filterdb_identity,
    inspect_filterdb,
    layer_arrays,
    read_meta,
    restricted_loads,
)
from kernelatlas.jobs.filterdb import export_filterdb, import_filterdb

FORMATS = ("table", "fixed")

# (in_channels, out_channels, n filters, expected (c_out, c_in_per_group, groups, kind))
LAYER_SPECS = {
    "regular": (2, 3, 6, (3, 2, 1, "regular")),
    "depthwise": (4, 4, 4, (4, 1, 4, "depthwise")),
    "depthwise_x2": (2, 4, 4, (4, 1, 2, "depthwise")),
    "grouped": (4, 4, 8, (4, 2, 2, "grouped")),
    "inconsistent": (3, 5, 7, (7, 1, 1, "regular")),  # out_channels does not divide n: fallback + warning
    "stem": (1, 2, 2, (2, 1, 1, "regular")),           # a conv on a 1-channel input is regular
}

# model_id -> (model-level columns, [(layer spec, conv_depth, zero filters?)]); model 7's filters come first in
# the file, conv_depths have gaps (non-3x3 convs of the original net) and conv_depth_norm uses a denominator
# that cannot be recomputed from the stored layers.
MODELS = {
    7: ({"model": "resnet_x_imagenet_11", "Name": "ResNet-X", "Task": "Classification",
         "Visual Category": "natural", "Training-Dataset": "ImageNet1k", "producer": "pytorch 1.9",
         "op_set": "11", "Paper": "https://example.org/paper"},
        [("stem", 0, False), ("regular", 2, True), ("depthwise", 3, False), ("grouped", 5, False)]),
    3: ({"model": "tinynet_mnist_9", "Name": "TinyNet", "Task": "Classification", "Visual Category": "digits",
         "Training-Dataset": "MNIST", "producer": "pytorch 1.7", "op_set": "9", "Paper": np.nan},
        [("depthwise_x2", 0, True), ("inconsistent", 1, False), ("regular", 4, False)]),
}
DEPTH_DENOM = 7  # conv_depth_norm = conv_depth / 7 (the original nets had 8 conv depths)


def build_dataset(path: Path, *, fmt: str = "table", gap: int = 5, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Write a small CNN Filter DB file; returns (meta frame as written, filters float64 [N, 3, 3])."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    blocks: list[np.ndarray] = []
    offset = 0
    for model_id, (model_cols, layers) in MODELS.items():
        for layer_id, (spec, depth, zeros) in enumerate(layers):
            in_ch, out_ch, n, _ = LAYER_SPECS[spec]
            filters = rng.standard_normal((n, 3, 3)) * 0.1
            if zeros:
                filters[::2] = 0.0
            blocks.append(filters)
            rows.append({"model_id": model_id, "conv_depth": depth, "conv_depth_norm": depth / DEPTH_DENOM,
                         "layer_id": layer_id, "filter_ids": f"{offset}:{offset + n - 1}", **model_cols,
                         "in_channels": in_ch, "out_channels": out_ch, "layer_depth": 10 * depth + 1})
            offset += n
        blocks.append(rng.standard_normal((gap, 3, 3)))  # filters no row points to
        offset += gap
    filters = np.concatenate(blocks)
    frame = pd.DataFrame(rows).set_index(["model_id", "conv_depth", "conv_depth_norm", "layer_id"])
    with h5py.File(path, "w") as f:
        f.create_dataset("filters", data=filters)
    frame.to_hdf(path, key="meta", format=fmt)
    return frame, filters


def manifest_bytes(corpus: Path) -> bytes | None:
    p = corpus / "manifest.json"
    return p.read_bytes() if p.exists() else None


def corpus_rows(corpus: Corpus, layer: Any) -> np.ndarray:
    return np.asarray(corpus.shard_array(layer.shard)[layer.row_start:layer.row_start + layer.rows])


# ---------------------------------------------------------------------------------------------- reading meta


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_meta_matches_pandas(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "dataset.h5"
    frame, _ = build_dataset(path, fmt=fmt)
    ours = read_meta(path)
    assert list(ours.index.names) == ["model_id", "conv_depth", "conv_depth_norm", "layer_id"]
    # pandas itself is trusted here: this file was written by the test
    pd.testing.assert_frame_equal(ours, pd.read_hdf(path, "meta"), check_dtype=False)
    pd.testing.assert_frame_equal(ours, frame, check_dtype=False)


def test_read_meta_object_block_and_numpy1_pickle(tmp_path: Path) -> None:
    """A pandas-1.x style file: several object columns in one 2-D pickled block, NaNs among the strings, and a
    pickle that names numpy.core.multiarray (numpy 1.x) rather than numpy._core."""
    path = tmp_path / "dataset.h5"
    frame, _ = build_dataset(path, fmt="fixed")
    frame = frame.astype({c: object for c in frame.columns if frame[c].dtype != np.int64})
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("filters", data=np.zeros((60, 3, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PerformanceWarning: the object column holding NaN
        frame.to_hdf(path, key="meta", format="fixed")
    with h5py.File(path, "r+") as f:
        meta = f["meta"]
        blocks = [k for k in meta if k.endswith("_values") and meta[k].attrs["CLASS"] == b"VLARRAY"]
        assert blocks
        for key in blocks:
            blob = np.asarray(meta[key][0], np.uint8).tobytes()
            value = pickle.loads(blob)  # written by this test a moment ago
            old = pickle.dumps(value, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            assert b"numpy.core.multiarray" in old
            attrs = dict(meta[key].attrs)
            del meta[key]
            ds = meta.create_dataset(key, shape=(1,), dtype=h5py.vlen_dtype(np.uint8))
            ds[0] = np.frombuffer(old, np.uint8)
            for k, v in attrs.items():
                ds.attrs[k] = v
    ours = read_meta(path)
    pd.testing.assert_frame_equal(ours, frame, check_dtype=False)
    assert ours["Paper"].isna().sum() == len(MODELS[3][1])


def test_read_meta_csv_bytes(tmp_path: Path) -> None:
    """The early release stored meta as the bytes of a CSV file."""
    path = tmp_path / "dataset.h5"
    frame, filters = build_dataset(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("filters", data=filters)
        f.create_dataset("meta", data=np.frombuffer(frame.reset_index().to_csv(index=False).encode(), np.uint8))
    layout = inspect_filterdb(path)
    assert layout.n_layers == len(frame)
    assert list(layout.models) == [7, 3]


# ---------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_import_every_kernel_and_column(tmp_path: Path, fmt: str, dtype: str) -> None:
    path = tmp_path / "dataset.h5"
    frame, filters = build_dataset(path, fmt=fmt)
    report = import_filterdb(path, tmp_path / "corpus", progress=False, dtype=dtype)
    assert len(report.added) == 2 and report.skipped == []
    assert report.unreferenced == 10
    assert len(report.warnings) == 1 and "model_id 3 layer 1" in report.warnings[0]
    corpus = Corpus.open(tmp_path / "corpus")
    assert corpus.dtype == np.dtype(dtype)
    models, layers = corpus.models, corpus.layers
    assert list(models["filterdb_model_id"]) == ["7", "3"]  # file order (first filter), not id order

    meta = frame.reset_index()
    assert len(layers) == len(meta)
    for i, layer in enumerate(layers.itertuples(index=False)):
        row = meta.iloc[i]
        start, end = (int(v) for v in row["filter_ids"].split(":"))
        spec = next(s for s, v in LAYER_SPECS.items() if v[:3] == (row["in_channels"], row["out_channels"],
                                                                    end - start + 1))
        c_out, cipg, groups, kind = LAYER_SPECS[spec][3]
        original = filters[start:end + 1].reshape(-1, 9)
        np.testing.assert_array_equal(corpus_rows(corpus, layer), original.astype(dtype))
        assert (layer.kh, layer.kw) == (3, 3)
        assert (layer.c_out, layer.c_in_per_group, layer.groups, layer.kind) == (c_out, cipg, groups, kind)
        assert layer.kind_inferred
        assert layer.depth == row["conv_depth"]
        assert layer.depth_norm == row["conv_depth_norm"]  # exactly the file's value, not recomputed
        assert layer.rows == layer.n_kernels == end - start + 1
        assert layer.n_zero == int((~original.any(axis=1)).sum())
        assert layer.n_nonfinite == 0
        assert layer.filterdb_layer_id == str(row["layer_id"])
        assert layer.layer_depth == str(row["layer_depth"])
        assert layer.name == f"layer{row['layer_id']}"
        assert not layer.bn_folded
        assert models.loc[models["model_id"] == layer.model_id, "filterdb_model_id"].item() == str(row["model_id"])

    for model in models.itertuples(index=False):
        cols, fdb_layers = MODELS[int(model.filterdb_model_id)]
        assert model.name == cols["model"]
        assert model.family == cols["Name"]
        assert model.task == cols["Task"]
        assert model.category == cols["Visual Category"]
        assert model.dataset == cols["Training-Dataset"]
        assert model.producer == cols["producer"]
        assert model.op_set == cols["op_set"]
        assert model.paper == ("" if isinstance(cols["Paper"], float) else cols["Paper"])
        assert model.format == "filterdb"
        assert model.source_path == str(path)
        assert model.sha256 == f"{filterdb_identity(path)}:{model.filterdb_model_id}"
        assert model.n_layers == len(fdb_layers)
        assert model.n_kernels == sum(LAYER_SPECS[s][2] for s, _, _ in fdb_layers)
    for col in ("in_channels", "out_channels", "layer_depth", "filter_ids", "conv_depth"):
        assert col not in models.columns


def test_layer_arrays_match_file_and_import_order(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    _, filters = build_dataset(path)
    import_filterdb(path, tmp_path / "corpus", progress=False)
    corpus = Corpus.open(tmp_path / "corpus")
    models = corpus.models.set_index("model_id")
    pairs = list(layer_arrays(path))
    assert len(pairs) == len(corpus.layers)
    for (layer, original), row in zip(pairs, corpus.layers.itertuples(index=False), strict=True):
        assert original.dtype == np.float64 and original.shape == (layer.n, 9)
        np.testing.assert_array_equal(original, filters[layer.start:layer.stop].reshape(-1, 9))
        assert models.loc[row.model_id, "filterdb_model_id"] == str(layer.model_id)
        assert row.filterdb_layer_id == str(layer.layer_id)
        np.testing.assert_array_equal(corpus_rows(corpus, row), original.astype(np.float32))
    only = list(layer_arrays(path, model_id=3))
    assert [layer.model_id for layer, _ in only] == [3, 3, 3]


def test_small_chunks_give_the_same_corpus(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    build_dataset(path)
    import_filterdb(path, tmp_path / "a", progress=False)
    import_filterdb(path, tmp_path / "b", progress=False, chunk_rows=3)
    a, b = Corpus.open(tmp_path / "a"), Corpus.open(tmp_path / "b")
    np.testing.assert_array_equal(a.shard_array(a.shards(3)[0]), b.shard_array(b.shards(3)[0]))
    pd.testing.assert_frame_equal(a.layers, b.layers)


def test_rerun_skips_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kernelatlas.jobs import filterdb

    path = tmp_path / "dataset.h5"
    build_dataset(path)
    corpus = tmp_path / "corpus"
    # crash while reading the second model, after the first was committed (commit_rows=1: after each model)
    real = filterdb._LazyFilters.__array__

    def failing(self: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        if self.layer.model_id == 3:
            raise FilterDBError("simulated read failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(filterdb._LazyFilters, "__array__", failing)
    with pytest.raises(FilterDBError, match="simulated"):
        import_filterdb(path, corpus, progress=False, commit_rows=1)
    assert list(Corpus.open(corpus).models["filterdb_model_id"]) == ["7"]
    monkeypatch.setattr(filterdb._LazyFilters, "__array__", real)

    report = import_filterdb(path, corpus, progress=False, commit_rows=1)
    assert report.skipped == [7] and [r["filterdb_model_id"] for r in report.added] == ["3"]
    c = Corpus.open(corpus)
    assert list(c.models["filterdb_model_id"]) == ["7", "3"]
    assert len(c.layers) == 7 and c.manifest["shards"][-1]["rows"] + c.manifest["shards"][0]["rows"] == \
        sum(LAYER_SPECS[s][2] for m in MODELS.values() for s, _, _ in m[1])

    before = manifest_bytes(corpus)
    again = import_filterdb(path, corpus, progress=False)
    assert again.added == [] and again.skipped == [7, 3]
    assert manifest_bytes(corpus) == before


def test_identity_modes(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    build_dataset(path)
    import hashlib

    assert filterdb_identity(path, "file") == hashlib.sha256(path.read_bytes()).hexdigest()
    fast = filterdb_identity(path, "meta")
    assert fast == filterdb_identity(path) and len(fast) == 64
    other = tmp_path / "other.h5"
    build_dataset(other, seed=1)  # same table, other filters: the sampled rows differ
    assert filterdb_identity(other) != fast
    report = import_filterdb(path, tmp_path / "corpus", progress=False, identity="file")
    assert report.identity.startswith("file:")
    with pytest.raises(ValueError, match="identity"):
        filterdb_identity(path, "quick")


# ---------------------------------------------------------------------------------------------- bad input


def _expect_refused(path: Path, tmp_path: Path, match: str) -> None:
    """Import must fail naming the file, leave an existing corpus byte-identical and create no new one."""
    good = tmp_path / "good.h5"
    build_dataset(good)
    existing = tmp_path / "existing"
    import_filterdb(good, existing, progress=False)
    before = manifest_bytes(existing)
    listing = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    for target in (existing, tmp_path / "fresh"):
        with pytest.raises(FilterDBError, match=match) as info:
            import_filterdb(path, target, progress=False)
        assert str(path) in str(info.value)
    assert manifest_bytes(existing) == before
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == listing
    assert not (tmp_path / "fresh").exists()


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    path.write_bytes(os.urandom(4096))
    _expect_refused(path, tmp_path, "not a readable HDF5 file")


def test_truncated(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    build_dataset(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    _expect_refused(path, tmp_path, "truncated")


def test_unwritten_chunks(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    _, filters = build_dataset(path)
    with h5py.File(path, "r+") as f:
        del f["filters"]
        ds = f.create_dataset("filters", shape=filters.shape, dtype="f8", chunks=(4, 3, 3))
        ds[:8] = filters[:8]
    _expect_refused(path, tmp_path, "never written")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad, match", [
    ("50:70", "outside /filters"),
    ("9:3", "reversed"),
    ("-1:3", "outside"),
    ("3-5", "not 'start:end'"),
    ("OVERLAP", "overlapping"),
])
def test_bad_filter_ids(tmp_path: Path, fmt: str, bad: str, match: str) -> None:
    path = tmp_path / "dataset.h5"
    frame, filters = build_dataset(path, fmt=fmt)
    frame = frame.copy()
    ids = frame["filter_ids"].tolist()
    ids[2] = ids[1].split(":")[0] + ":" + ids[2].split(":")[1] if bad == "OVERLAP" else bad
    frame["filter_ids"] = ids
    with h5py.File(path, "w") as f:
        f.create_dataset("filters", data=filters)
    frame.to_hdf(path, key="meta", format=fmt)
    _expect_refused(path, tmp_path, match)


def test_filters_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "dataset.h5"
    _, filters = build_dataset(path)
    with h5py.File(path, "r+") as f:
        del f["filters"]
        f.create_dataset("filters", data=filters.reshape(-1, 3, 3)[:, :2, :])
    _expect_refused(path, tmp_path, rf"shape \({len(filters)}, 2, 3\), expected \(N, 3, 3\)")


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["fixed-block", "table-attr", "fixed-name"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, where: str) -> None:
    path = tmp_path / "dataset.h5"
    marker = tmp_path / "pwned"
    build_dataset(path, fmt="table" if where == "table-attr" else "fixed")
    payload = pickle.dumps(_Evil(marker), protocol=0)
    assert payload.endswith(b".")  # what PyTables takes for a pickled attribute
    with h5py.File(path, "r+") as f:
        meta = f["meta"]
        if where == "table-attr":
            meta.attrs["non_index_axes"] = np.bytes_(payload)
        elif where == "fixed-name":
            meta["axis1_level0"].attrs["name"] = np.bytes_(payload)
        else:
            key = next(k for k in meta if k.endswith("_values") and meta[k].attrs["CLASS"] == b"VLARRAY")
            attrs = dict(meta[key].attrs)
            del meta[key]
            ds = meta.create_dataset(key, shape=(1,), dtype=h5py.vlen_dtype(np.uint8))
            ds[0] = np.frombuffer(pickle.dumps(_Evil(marker), protocol=5), np.uint8)
            for k, v in attrs.items():
                ds.attrs[k] = v
    with pytest.raises(PickleRefused, match="system"):
        read_meta(path)
    _expect_refused(path, tmp_path, r"refuses to load it")
    assert not marker.exists()


def test_restricted_loads_admits_plain_data_only() -> None:
    data = np.array(["a", np.nan, 3], dtype=object)
    for protocol in (0, 2, 4, 5):
        out = restricted_loads(pickle.dumps(data, protocol=protocol), where="x")
        assert out[0] == "a" and out[1] != out[1] and out[2] == 3
        np.testing.assert_array_equal(restricted_loads(pickle.dumps(np.arange(5.0), protocol=protocol), where="x"),
                                      np.arange(5.0))
    assert restricted_loads(pickle.dumps([(1, ["a", "b"])], protocol=0), where="x") == [(1, ["a", "b"])]
    assert restricted_loads(pickle.dumps(pd.NA), where="x") is pd.NA
    for evil in (pickle.dumps(eval), pickle.dumps(os.system), pickle.dumps(pd.Timestamp(0)),
                 b"cbuiltins\ngetattr\n(cbuiltins\nobject\nS'__subclasses__'\ntR."):
        with pytest.raises(PickleRefused, match="refuses"):
            restricted_loads(evil, where="x")
    with pytest.raises(FilterDBError, match="cannot decode"):
        restricted_loads(b"\x80\x05garbage", where="x")


# ---------------------------------------------------------------------------------------------- export


def _layer(name: str, shape: tuple[int, int, int, int], groups: int, kind: str, order: float, rng: Any,
           *, inferred: bool = False, bn_folded: bool = False, zero: bool = False, nan: bool = False) -> ConvLayer:
    weight = rng.standard_normal(shape).astype(np.float32)
    if zero:
        weight[::2] = 0
    if nan:
        weight[0, 0, 0, 0] = np.nan
    return ConvLayer(name=name, weight=weight, groups=groups, kind=kind, kind_inferred=inferred, order=order,
                     bn_folded=bn_folded)


def _source_corpus(root: Path) -> Corpus:
    rng = np.random.default_rng(5)
    a = LoadedModel(source_path="a.onnx", format="onnx", layers=[
        _layer("stem", (8, 3, 3, 3), 1, "regular", 0, rng, bn_folded=True),
        _layer("dw1", (8, 1, 3, 3), 8, "depthwise", 1, rng, zero=True),
        _layer("dw5", (8, 1, 5, 5), 8, "depthwise", 2, rng),            # not 3x3: not exported
        _layer("g1", (8, 2, 3, 3), 4, "grouped", 3, rng, nan=True),
        _layer("dw2", (16, 1, 3, 3), 8, "depthwise", 4, rng, inferred=True),
    ])
    b = LoadedModel(source_path="b.pth", format="torch", weight_set="params_ema", layers=[
        _layer("features.0", (4, 1, 3, 3), 4, "depthwise", 0, rng),
        _layer("features.1", (5, 4, 3, 3), 1, "regular", 1, rng),
    ])
    with CorpusWriter(root) as writer:
        writer.add_model(a, sha256="a" * 64, all_convs=True,
                         meta={"task": "detection", "category": "faces", "dataset": "WIDER", "family": "Blaze",
                               "licence": "Apache-2.0"})
        writer.add_model(b, sha256="b" * 64, all_convs=True, meta={"task": "classification", "op_set": "13"})
    return Corpus.open(root)


LAYER_COMPARE = ["name", "kind", "kind_inferred", "kh", "kw", "c_out", "c_in_per_group", "groups", "depth",
                 "depth_norm", "bn_folded", "rows", "n_kernels", "n_zero", "n_nonfinite"]
MODEL_COMPARE = ["name", "family", "task", "category", "dataset", "weight_set"]


def test_round_trip_corpus_export_import(tmp_path: Path) -> None:
    src = _source_corpus(tmp_path / "src")
    h5 = tmp_path / "out" / "dataset.h5"
    report = export_filterdb(src.root, h5, progress=False)
    assert (report.models, report.layers, report.skipped_layers) == (2, 6, 1)
    import_filterdb(h5, tmp_path / "back", progress=False)
    back = Corpus.open(tmp_path / "back")

    exported = src.layers[(src.layers["kh"] == 3)].reset_index(drop=True)
    assert report.filters == int(exported["rows"].sum())
    pd.testing.assert_frame_equal(back.layers[LAYER_COMPARE], exported[LAYER_COMPARE])
    for old, new in zip(exported.itertuples(index=False), back.layers.itertuples(index=False), strict=True):
        np.testing.assert_array_equal(corpus_rows(back, new), corpus_rows(src, old))  # NaN included
    pd.testing.assert_frame_equal(back.models[MODEL_COMPARE], src.models[MODEL_COMPARE])
    assert list(back.models["n_kernels"]) == [int(r) for r in exported.groupby("model_id")["rows"].sum()]
    assert back.models["licence"].tolist() == ["Apache-2.0", ""]
    assert back.models["op_set"].tolist() == ["", "13"]

    # and exporting the import again gives the same file content
    h5b = tmp_path / "again.h5"
    export_filterdb(back.root, h5b, progress=False)
    with h5py.File(h5, "r") as f1, h5py.File(h5b, "r") as f2:
        np.testing.assert_array_equal(f1["filters"][...], f2["filters"][...])
    m1, m2 = read_meta(h5), read_meta(h5b)
    pd.testing.assert_frame_equal(m1.drop(columns=["producer"]), m2.drop(columns=["producer"]),
                                  check_dtype=False)


def test_export_is_readable_as_cnn_filter_db(tmp_path: Path) -> None:
    """What the CNN Filter DB notebooks do: h5py for filters, pandas.read_hdf for meta, inclusive ranges."""
    src = _source_corpus(tmp_path / "src")
    h5 = tmp_path / "dataset.h5"
    export_filterdb(src.root, h5, progress=False)
    assert not list(tmp_path.glob(".dataset.h5.*"))  # no temp file left
    with h5py.File(h5, "r") as f:
        filters = f["filters"][...]
        assert filters.dtype == np.float64 and filters.shape[1:] == (3, 3)
    meta = pd.read_hdf(h5, "meta")
    assert list(meta.index.names) == ["model_id", "conv_depth", "conv_depth_norm", "layer_id"]
    for col in ("filter_ids", "model", "Name", "Task", "Visual Category", "Training-Dataset", "in_channels",
                "out_channels", "layer_depth", "producer"):
        assert col in meta.columns
    layers = src.layers[src.layers["kh"] == 3].reset_index(drop=True)
    covered = 0
    for i, (key, row) in enumerate(meta.iterrows()):
        ids = np.arange(int(row["filter_ids"].split(":")[0]), 1 + int(row["filter_ids"].split(":")[1]))
        layer = layers.iloc[i]
        np.testing.assert_array_equal(filters[ids].reshape(-1, 9),
                                      corpus_rows(src, layer).astype(np.float64))
        assert key[1] == layer["depth"] and key[2] == layer["depth_norm"]
        assert row["out_channels"] == layer["c_out"]
        assert row["in_channels"] == layer["c_in_per_group"] * layer["groups"]
        covered += len(ids)
    assert covered == len(filters)
    assert meta.loc[0, "Task"].iloc[0] == "detection" and meta.loc[1, "Task"].iloc[0] == "classification"


def test_export_kinds_and_errors(tmp_path: Path) -> None:
    src = _source_corpus(tmp_path / "src")
    h5 = tmp_path / "dw.h5"
    report = export_filterdb(src.root, h5, kinds=["depthwise"], progress=False)
    assert report.layers == 3
    assert set(read_meta(h5)["groups"]) == {4, 8}
    with pytest.raises(ValueError, match="unknown kind"):
        export_filterdb(src.root, h5, kinds=["pointwise"], progress=False)
    empty = tmp_path / "empty"
    with CorpusWriter(empty) as writer:
        writer.add_model(LoadedModel("c.pth", "torch", [
            _layer("c", (2, 2, 5, 5), 1, "regular", 0, np.random.default_rng(0))]), sha256="c" * 64)
    target = tmp_path / "none.h5"
    with pytest.raises(FilterDBError, match="no stored 3x3 kernels"):
        export_filterdb(empty, target, progress=False)
    assert not target.exists() and not list(tmp_path.glob(".none.h5.*"))
    # an existing file is replaced only by a complete one
    before = h5.read_bytes()
    with pytest.raises(FilterDBError):
        export_filterdb(empty, h5, progress=False)
    assert h5.read_bytes() == before


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_import_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dataset.h5"
    build_dataset(path)
    corpus = tmp_path / "corpus"
    assert cli.main(["import-filterdb", str(path), "--out", str(corpus), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "added 2 model(s)" in out.out and "model_id 3 layer 1" in out.err
    assert cli.main(["import-filterdb", str(path), "--out", str(corpus), "--no-progress"]) == 0
    assert "skipped 2" in capsys.readouterr().out
    h5 = tmp_path / "back.h5"
    assert cli.main(["export-filterdb", str(corpus), "--out", str(h5), "--no-progress"]) == 0
    assert "7 layers" in capsys.readouterr().out
    assert cli.main(["export-filterdb", str(corpus), "--out", str(h5), "--kind", "grouped", "--no-progress"]) == 0
    assert len(read_meta(h5)) == 1
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"nope")
    assert cli.main(["import-filterdb", str(bad), "--out", str(corpus), "--no-progress"]) == 1
    assert str(bad) in capsys.readouterr().err
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["n_models"] == 2
