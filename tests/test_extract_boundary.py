"""One odd file never aborts `extract` (issue 12, item 4): whatever its loader or the reading of its tensors
raises -- RecursionError from absurd nesting, ValueError from pieces that do not fit -- fails that file alone,
nothing it had half-written reaches the corpus, and the other files are extracted; Ctrl-C still stops."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from kernelatlas.corpus import Corpus
from kernelatlas.jobs.extract import extract

torch = pytest.importorskip("torch")


def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.pth"
    torch.manual_seed(0)
    torch.save({"dw.weight": torch.randn(16, 1, 3, 3)}, path)
    return path


def deep_safetensors(tmp_path: Path, parts: int = 3000) -> Path:
    """A valid safetensors file whose one tensor key has ``parts`` dotted parts."""
    key = ".".join(["m"] * parts) + ".weight"
    data = np.zeros((4, 1, 3, 3), np.float32).tobytes()
    header = json.dumps({key: {"dtype": "F32", "shape": [4, 1, 3, 3], "data_offsets": [0, len(data)]}}).encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def half_broken(tmp_path: Path) -> Path:
    """A readable conv first, then a weight-normalised conv whose g and v do not broadcast."""
    path = tmp_path / "broken.pth"
    torch.save({"a.weight": torch.randn(32, 1, 3, 3), "b.weight_g": torch.randn(7, 1, 1, 1),
                "b.weight_v": torch.randn(8, 1, 3, 3)}, path)
    return path


def test_a_hostile_file_fails_alone(tmp_path):
    files = [deep_safetensors(tmp_path), half_broken(tmp_path), good_file(tmp_path)]
    report = extract([str(f) for f in files], tmp_path / "corpus", progress=False)
    failed = {Path(p).name: why for p, why in report.failed}
    assert set(failed) == {"deep.safetensors", "broken.pth"}, failed
    assert "RecursionError" in failed["deep.safetensors"] and "ValueError" in failed["broken.pth"]
    assert [Path(r["source_path"]).name for r in report.added] == ["good.pth"]
    corpus = Corpus.open(tmp_path / "corpus")
    names = set(corpus.models["name"])
    assert "broken" not in names and "good" in names
    # nothing of the broken file's first layer reached the shards: rows stored == rows of the layers table
    stored = sum(int(s["rows"]) for s in corpus.manifest["shards"])
    assert stored == int(corpus.layers["rows"].sum())
    good = corpus.layers[corpus.layers["model_id"] == int(corpus.models.set_index("name").loc["good", "model_id"])]
    row = good.iloc[0]
    kernels = np.asarray(corpus.shard_array(row.shard)[row.row_start:row.row_start + row.rows])
    torch.manual_seed(0)
    np.testing.assert_array_equal(kernels, torch.randn(16, 1, 3, 3).numpy().reshape(16, 9))


def test_recursion_in_a_loader_is_a_per_file_failure(tmp_path, monkeypatch):
    from kernelatlas.jobs import extract as extract_mod

    real = extract_mod.load_file

    def load(path):
        if path.name == "deep.pth":
            def nest(n):
                return nest(n + 1)
            nest(0)
        return real(path)

    deep = tmp_path / "deep.pth"
    deep.write_bytes(good_file(tmp_path).read_bytes() + b"x")  # another sha256
    monkeypatch.setattr(extract_mod, "load_file", load)
    report = extract([str(deep), str(tmp_path / "good.pth")], tmp_path / "corpus", progress=False)
    assert [Path(p).name for p, _ in report.failed] == ["deep.pth"]
    assert "RecursionError" in report.failed[0][1]
    assert [Path(r["source_path"]).name for r in report.added] == ["good.pth"]


def test_interrupt_still_stops_and_keeps_what_was_committed(tmp_path, monkeypatch):
    from kernelatlas.jobs import extract as extract_mod

    extract([str(good_file(tmp_path))], tmp_path / "corpus", progress=False)
    before = (tmp_path / "corpus" / "manifest.json").read_bytes()

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_mod, "load_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract([str(half_broken(tmp_path))], tmp_path / "corpus", progress=False)
    assert (tmp_path / "corpus" / "manifest.json").read_bytes() == before
    assert list(Corpus.open(tmp_path / "corpus").models["name"]) == ["good"]


def test_a_failed_model_leaves_the_shard_as_it_was(tmp_path):
    """The writer rewinds a model that fails half-way, also across a shard boundary."""
    from kernelatlas.corpus import CorpusWriter
    from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel

    class Exploding(ConvLayer):
        def kernels(self):
            raise ValueError("pieces do not fit")

    rng = np.random.default_rng(0)
    first = rng.standard_normal((100, 1, 3, 3)).astype(np.float32)
    with CorpusWriter(tmp_path / "c", shard_rows=150) as writer:
        writer.add_model(LoadedModel("/a.pth", "torch", [ConvLayer("dw", first, 100, "depthwise", False, 0.0)]),
                         sha256="a")
        layers = [ConvLayer("dw0", rng.standard_normal((80, 1, 3, 3)).astype(np.float32), 80, "depthwise", False,
                            0.0),
                  ConvLayer("dw1", rng.standard_normal((90, 1, 3, 3)).astype(np.float32), 90, "depthwise", False,
                            1.0),
                  Exploding("dw2", first, 100, "depthwise", False, 2.0)]
        with pytest.raises(ValueError, match="do not fit"):
            writer.add_model(LoadedModel("/b.pth", "torch", layers), sha256="b")
        second = rng.standard_normal((60, 1, 3, 3)).astype(np.float32)
        writer.add_model(LoadedModel("/c.pth", "torch", [ConvLayer("dw", second, 60, "depthwise", False, 0.0)]),
                         sha256="c")
    corpus = Corpus.open(tmp_path / "c")
    assert list(corpus.models["name"]) == ["a", "c"] and len(corpus.layers) == 2
    rows = np.concatenate([np.asarray(corpus.shard_array(s)) for s in corpus.shards(3)])
    np.testing.assert_array_equal(rows, np.concatenate([first, second]).reshape(-1, 9))
    assert [p.name for p in (tmp_path / "c" / "k3").iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------- item 9


def basicsr_checkpoint(tmp_path: Path, drift: bool) -> Path:
    """BasicSR-style {'params': sd, 'params_ema': sd_ema}: six shared convs; with ``drift`` one module renamed
    between the two sets (upsampler.0 in one, upsampler.conv3 in the other), as in real releases."""
    torch.manual_seed(1)
    shapes = {f"body.{i}.dw.weight": (24, 1, 3, 3) for i in range(5)} | {"upsampler.0.weight": (12, 24, 3, 3)}
    plain = {k: torch.randn(*s) for k, s in shapes.items()}
    ema = {k: v + 0.01 for k, v in plain.items()}
    if drift:
        ema["upsampler.conv3.weight"] = ema.pop("upsampler.0.weight")
    path = tmp_path / ("drift.pth" if drift else "same.pth")
    torch.save({"params": plain, "params_ema": ema}, path)
    return path


@pytest.mark.parametrize("drift", [False, True])
def test_a_weight_set_pair_is_one_model_whatever_its_keys_drift(tmp_path, drift):
    from kernelatlas.corpus.loaders import torch_checkpoint

    model = torch_checkpoint.load(basicsr_checkpoint(tmp_path, drift))
    assert model.weight_set == "params_ema"
    names = sorted(layer.name for layer in model.layers)
    assert names == sorted([f"body.{i}.dw.weight" for i in range(5)]
                           + ["upsampler.conv3.weight" if drift else "upsampler.0.weight"])
    np.testing.assert_allclose(model.layers[0].weight, (torch.manual_seed(1), torch.randn(24, 1, 3, 3) + 0.01)[1]
                               .numpy(), rtol=0, atol=1e-6)
    notes = [w for w in model.warnings if "one network whose conv keys differ" in w]
    if drift:
        assert len(notes) == 1 and "upsampler.conv3.weight" in notes[0] and "upsampler.0.weight" in notes[0]
    else:
        assert notes == []


def test_two_different_networks_beside_an_ema_name_are_both_kept(tmp_path):
    from kernelatlas.corpus.loaders import torch_checkpoint

    path = tmp_path / "two.pth"
    torch.save({"g": {"a.weight": torch.randn(8, 1, 3, 3), "b.weight": torch.randn(8, 8, 3, 3)},
                "g_ema": {"x.weight": torch.randn(16, 1, 5, 5), "y.weight": torch.randn(4, 4, 1, 1)}}, path)
    model = torch_checkpoint.load(path)
    assert len(model.layers) == 4 and model.weight_set == ""


# ---------------------------------------------------------------------------------------------- item 11


def onnx_with_external_data(folder: Path, seed: int) -> Path:
    """A one-conv ONNX model (depthwise 3x3) whose weight lives in weights.bin beside it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True)
    w = np.random.default_rng(seed).standard_normal((8, 1, 3, 3)).astype(np.float32)
    init = numpy_helper.from_array(w, "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=8, kernel_shape=[3, 3])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = folder / "net.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


def test_a_model_identity_covers_its_external_data(tmp_path):
    a = onnx_with_external_data(tmp_path / "a", seed=0)
    b = onnx_with_external_data(tmp_path / "b", seed=1)
    assert a.read_bytes() == b.read_bytes()  # the .onnx files are identical; only weights.bin differs
    report = extract([str(a), str(b)], tmp_path / "corpus", progress=False)
    assert len(report.added) == 2 and report.skipped == []
    corpus = Corpus.open(tmp_path / "corpus")
    rows = np.asarray(corpus.shard_array(corpus.shards(3)[0]))
    np.testing.assert_array_equal(rows[:8], np.random.default_rng(0).standard_normal((8, 9)).astype(np.float32))
    np.testing.assert_array_equal(rows[8:], np.random.default_rng(1).standard_normal((8, 9)).astype(np.float32))
    # the same pair again: both already present
    again = extract([str(a), str(b)], tmp_path / "corpus", progress=False)
    assert again.added == [] and len(again.skipped) == 2
