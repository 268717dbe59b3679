"""The corpus format and its writer: layout, round trip, idempotence, atomic commits, orphan recovery, the
writer lock, and iter_chunks' zero-copy slices with their layer ids."""

from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest

from kernelatlas.corpus import Corpus, CorpusError, CorpusWriter
from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel


def make_model(seed: int, *, name: str = "m", sizes=((32, 1, 3), (16, 8, 3), (24, 1, 5), (8, 1, 7), (6, 1, 1))) -> LoadedModel:
    rng = np.random.default_rng(seed)
    layers = []
    for i, (c_out, c_in, k) in enumerate(sizes):
        w = rng.standard_normal((c_out, c_in, k, k)).astype(np.float32)
        kind = "depthwise" if c_in == 1 else "regular"
        layers.append(ConvLayer(f"layer{i}", w, c_out if kind == "depthwise" else 1, kind, False, float(i)))
    return LoadedModel(f"/models/{name}.pth", "torch", layers)


def test_round_trip_layout_and_tables(tmp_path):
    root = tmp_path / "corpus"
    m = make_model(0)
    m.layers[0].weight[3] = 0.0
    m.layers[0].weight[4, 0, 1, 1] = np.nan
    with CorpusWriter(root) as w:
        w.add_model(m, sha256="a" * 64, meta={"Task": "classification", "Visual Category": "faces"})
    c = Corpus.open(root)
    assert sorted(p.name for p in root.iterdir()) == [".lock", "k3", "k5", "k7", "layers.parquet", "manifest.json",
                                                       "models.parquet"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["n_models"] == 1 and manifest["n_layers"] == 5
    lay = c.layers
    assert list(lay["kind"]) == ["depthwise", "regular", "depthwise", "depthwise", "depthwise"]
    assert list(lay["rows"]) == [32, 0, 24, 8, 0]          # regular and 1x1 not stored by default
    assert list(lay["n_kernels"]) == [32, 128, 24, 8, 6]
    assert list(lay["depth"]) == [0, 1, 2, 3, 4] and lay["depth_norm"].iloc[-1] == 1.0
    assert lay["n_zero"].iloc[0] == 1 and lay["n_nonfinite"].iloc[0] == 1
    for _, row in lay[lay["rows"] > 0].iterrows():
        arr = c.shard_array(row["shard"])
        got = arr[row["row_start"]:row["row_start"] + row["rows"]]
        np.testing.assert_array_equal(got, m.layers[row["layer_id"]].kernels())
    models = c.models
    assert models["task"].iloc[0] == "classification" and models["visual_category"].iloc[0] == "faces"
    assert models["n_kernels"].iloc[0] == 32 + 128 + 24 + 8 + 6
    # shards are plain .npy files that numpy reads with mmap
    arr = np.load(root / c.shards(3)[0], mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.dtype == np.float32 and arr.shape == (32, 9)


def test_all_convs_and_float16(tmp_path):
    root = tmp_path / "c16"
    with CorpusWriter(root, dtype="float16") as w:
        w.add_model(make_model(1), sha256="b" * 64, all_convs=True, sizes=(3,))
    c = Corpus.open(root)
    assert c.dtype == np.float16
    assert list(c.layers["rows"]) == [32, 128, 0, 0, 0]
    arr = c.shard_array(c.shards(3)[0])
    assert arr.dtype == np.float16 and arr.shape == (160, 9)
    np.testing.assert_array_equal(arr[32:], make_model(1).layers[1].kernels().astype(np.float16))
    with pytest.raises(CorpusError, match="float16"):
        CorpusWriter(root, dtype="float32")


def test_idempotent_and_appending(tmp_path):
    root = tmp_path / "c"
    with CorpusWriter(root) as w:
        w.add_model(make_model(0, name="a"), sha256="a" * 64)
    with CorpusWriter(root) as w:
        assert w.has_model("a" * 64)
        with pytest.raises(CorpusError, match="already"):
            w.add_model(make_model(0, name="a"), sha256="a" * 64)
        w.add_model(make_model(1, name="b"), sha256="b" * 64)
    c = Corpus.open(root)
    assert list(c.models["name"]) == ["a", "b"] and list(c.models["model_id"]) == [0, 1]
    assert c.layers["layer_id"].is_unique and len(c.layers) == 10
    assert len(c.shards(3)) == 2                                  # append-only: a new shard per commit
    first = c.shard_array(c.shards(3)[0])
    np.testing.assert_array_equal(first, make_model(0).layers[0].kernels())


def test_uncommitted_work_is_invisible_and_orphans_removed(tmp_path):
    root = tmp_path / "c"
    with CorpusWriter(root) as w:
        w.add_model(make_model(0), sha256="a" * 64)
    before = (root / "manifest.json").read_bytes()
    w = CorpusWriter(root)
    w.add_model(make_model(1), sha256="b" * 64)          # streams into .partial shards, no commit
    partials = list(root.rglob("*.partial"))
    assert partials
    reader = Corpus.open(root)
    assert len(reader.models) == 1 and reader.manifest["n_models"] == 1
    for pending in w._pending.values():                  # simulate a crash: no commit, no cleanup
        pending.fh.close()
    w._lock_fh.close()
    assert (root / "manifest.json").read_bytes() == before
    # the next writer removes the orphans and sees only the committed model
    with CorpusWriter(root) as w2:
        assert not list(root.rglob("*.partial"))
        assert not w2.has_model("b" * 64)
        w2.add_model(make_model(1), sha256="b" * 64)
    assert len(Corpus.open(root).models) == 2


def test_tables_ahead_of_manifest_are_truncated_by_readers(tmp_path):
    """A crash between the tables' rename and the manifest's leaves longer tables: readers ignore the rows."""
    root = tmp_path / "c"
    with CorpusWriter(root) as w:
        w.add_model(make_model(0), sha256="a" * 64)
    manifest = (root / "manifest.json").read_bytes()
    with CorpusWriter(root) as w:
        w.add_model(make_model(1), sha256="b" * 64)
    (root / "manifest.json").write_bytes(manifest)       # as if the last rename never happened
    c = Corpus.open(root)
    assert len(c.models) == 1 and len(c.layers) == 5
    with CorpusWriter(root) as w:                        # and a writer carries on from the committed state
        assert not w.has_model("b" * 64)
        w.add_model(make_model(1), sha256="b" * 64)
    c = Corpus.open(root)
    assert list(c.models["model_id"]) == [0, 1] and c.layers["layer_id"].tolist() == list(range(10))


def _try_lock(root, queue):
    try:
        CorpusWriter(root).close()
        queue.put("acquired")
    except CorpusError as exc:
        queue.put(str(exc))


def test_one_writer_at_a_time(tmp_path):
    root = tmp_path / "c"
    with CorpusWriter(root):
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_try_lock, args=(root, queue))
        proc.start()
        proc.join(60)
        message = queue.get(timeout=5)
        assert "being written" in message and "pid" in message
    CorpusWriter(root).close()                            # released with the first writer


@pytest.mark.parametrize("rows", [1, 7, 20, 1000])
def test_iter_chunks_zero_copy_with_layer_ids(tmp_path, rows):
    root = tmp_path / "c"
    with CorpusWriter(root, shard_rows=40) as w:          # small shards: layers never span them
        w.add_model(make_model(0, sizes=((32, 1, 3), (16, 8, 3), (24, 1, 3))), sha256="a" * 64, all_convs=True)
    c = Corpus.open(root)
    assert len(c.shards(3)) == 3                          # 32 | 128 | 24 rows
    seen = []
    for chunk in c.iter_chunks(3, rows=rows):
        assert isinstance(chunk.kernels, np.memmap) and len(chunk.kernels) <= rows
        assert chunk.kernels.base is not None             # a view of the shard, not a copy
        ids = chunk.layer_ids
        assert (ids >= 0).all()
        seen.append((chunk.shard, chunk.start, ids))
    total = np.concatenate([ids for _, _, ids in seen])
    assert np.array_equal(np.bincount(total), [32, 128, 24])
    assert len(total) == 184
    only_dw = np.concatenate([ch.layer_ids for ch in c.iter_chunks(3, rows=rows, kind="depthwise")])
    assert np.array_equal(np.unique(only_dw), [0, 2]) and len(only_dw) == 56


def test_open_errors_name_the_fix(tmp_path):
    with pytest.raises(CorpusError, match="not a kernelatlas corpus"):
        Corpus.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="unreadable"):
        Corpus.open(tmp_path)


def test_extract_live_module_with_bn_folding(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    from kernelatlas.jobs.extract import extract_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 5, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    net.eval()
    root = tmp_path / "c"
    row = extract_module(net, root, name="tiny", fold_bn=True, all_convs=True)
    assert row is not None and row["format"] == "module"
    assert extract_module(net, root, name="tiny", fold_bn=True, all_convs=True) is None   # idempotent
    c = Corpus.open(root)
    lay = c.layers
    assert list(lay["kind"]) == ["regular", "depthwise"] and not lay["kind_inferred"].any()
    assert lay["bn_folded"].all() and list(lay["groups"]) == [1, 8]
    dw = lay.iloc[1]
    got = c.shard_array(dw["shard"])[dw["row_start"]:dw["row_start"] + dw["rows"]]
    bn = net[4]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    want = net[3].weight.detach().numpy().reshape(8, 25) * scale[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
