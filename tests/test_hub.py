"""Hugging Face Hub sources (kernelatlas.hub, issue 15) without network: a Hub cache laid out as huggingface_hub
lays it out (blobs named by their hash, snapshots/COMMIT/FILE symlinks into them, refs/main) is built here with
generated checkpoints, and the real huggingface_hub client resolves ``hf:`` sources from it with
HF_HUB_OFFLINE=1 -- `kernelatlas extract hf:...`, ``@REVISION``, a list mixing hf: entries and files with metadata,
the .bin fallback, and a missing model (named, the others still extracted, exit status 1).  Also the packaged
``zoo:paper`` list is checked: unique well-formed repo ids, complete metadata."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("huggingface_hub")

from kernelatlas.corpus import Corpus
from kernelatlas.jobs import zoo

COMMIT_A = "a" * 40
COMMIT_B = "b" * 39 + "c"


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"stem.weight": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
            "blocks.0.dw.weight": rng.standard_normal((32, 1, 3, 3)).astype(np.float32),
            "blocks.0.pw.weight": rng.standard_normal((64, 32, 1, 1)).astype(np.float32),
            "blocks.1.dw.weight": rng.standard_normal((64, 1, 7, 7)).astype(np.float32)}


def _put(repo_dir: Path, commit: str, name: str, data: bytes) -> str:
    """One file of one commit, stored as huggingface_hub stores it: the blob under its hash, a relative symlink
    from the snapshot.  Returns the sha256 of the data."""
    sha = hashlib.sha256(data).hexdigest()
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs" / sha).write_bytes(data)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (snap / name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return sha


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors)


@pytest.fixture
def hub_cache(tmp_path: Path) -> dict[str, object]:
    """hf:acme/dwnet (main = COMMIT_A; COMMIT_B another revision), hf:acme/binonly (pytorch_model.bin only, no
    config), and the env that points huggingface_hub at it, offline."""
    import torch

    cache = tmp_path / "hub"
    facts: dict[str, object] = {"cache": cache}
    repo = cache / "models--acme--dwnet"
    config = json.dumps({"architecture": "dwnet_tiny", "num_classes": 10,
                         "pretrained_cfg": {"tag": "toy_in1k"}}).encode()
    facts["sha_a"] = _put(repo, COMMIT_A, "model.safetensors", _safetensors_bytes(_weights(0)))
    _put(repo, COMMIT_A, "config.json", config)
    facts["sha_b"] = _put(repo, COMMIT_B, "model.safetensors", _safetensors_bytes(_weights(1)))
    _put(repo, COMMIT_B, "config.json", config)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    binrepo = cache / "models--acme--binonly"
    buf = tmp_path / "state.bin"
    torch.save({k: torch.from_numpy(v) for k, v in _weights(2).items()}, buf)
    facts["sha_bin"] = _put(binrepo, COMMIT_A, "pytorch_model.bin", buf.read_bytes())
    (binrepo / "refs").mkdir()
    (binrepo / "refs" / "main").write_text(COMMIT_A)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    facts["env"] = env
    return facts


def _extract(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernelatlas.cli", "extract", *args, "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_extract_from_the_hub_cache_records_where_each_model_came_from(hub_cache, tmp_path):
    env = hub_cache["env"]
    out = _extract(["hf:acme/dwnet", f"hf:acme/dwnet@{COMMIT_B}", "hf:acme/binonly", "--out",
                    str(tmp_path / "c")], env)
    assert out.returncode == 0, out.stderr
    models = Corpus.open(tmp_path / "c").models.set_index("sha256")
    a, b, binonly = models.loc[hub_cache["sha_a"]], models.loc[hub_cache["sha_b"]], models.loc[hub_cache["sha_bin"]]
    assert (a["hf_repo"], a["hf_revision"], a["hf_file"]) == ("acme/dwnet", COMMIT_A, "model.safetensors")
    assert (b["hf_repo"], b["hf_revision"]) == ("acme/dwnet", COMMIT_B)  # @REVISION: that commit's file
    assert (a["family"], a["dataset"], a["task"], a["name"]) == ("dwnet_tiny", "toy_in1k", "classification", "dwnet")
    # no safetensors: pytorch_model.bin, read weights-only; no config.json: no family
    assert (binonly["hf_file"], binonly["family"]) == ("pytorch_model.bin", "")
    c = Corpus.open(tmp_path / "c")
    assert sorted(c.kernel_sizes) == [3, 7]
    layers = c.layers[c.layers["model_id"] == int(a["model_id"])]
    dw = layers[layers["kind"] == "depthwise"]
    assert sorted(zip(dw["kh"].tolist(), dw["c_out"].tolist(), strict=True)) == [(3, 32), (7, 64)]
    assert layers["kind_inferred"].all()  # a state_dict: depthwise by shape
    # rerun: every model already there
    again = _extract(["hf:acme/dwnet", "--out", str(tmp_path / "c")], env)
    assert again.returncode == 0 and "skipped 1 already present" in again.stdout


def test_a_list_mixing_hub_models_and_files_with_a_missing_model(hub_cache, tmp_path):
    """A CSV list: Hub entries and a local file, metadata columns; one Hub model the cache does not hold: its
    line names it, the others are extracted, the exit status is 1."""
    from safetensors.numpy import save_file

    local = tmp_path / "ckpt" / "local_dw.safetensors"
    local.parent.mkdir()
    save_file(_weights(3), str(local))
    listing = tmp_path / "models.csv"
    listing.write_text("source,family,dataset\n"
                       "hf:acme/dwnet,DWNet,toyset\n"
                       "ckpt/local_dw.safetensors,Local,\n"
                       "hf:acme/not-there,Ghost,none\n")
    out = _extract([str(listing), "--out", str(tmp_path / "c")], hub_cache["env"])
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "hf:acme/not-there" in errors[0] and "local Hub cache" in errors[0]
    models = Corpus.open(tmp_path / "c").models
    assert len(models) == 2
    hub_row = models[models["hf_repo"] == "acme/dwnet"].iloc[0]
    assert (hub_row["family"], hub_row["dataset"]) == ("DWNet", "toyset")  # the list's columns win over config.json
    local_row = models[models["hf_repo"] == ""].iloc[0]
    assert local_row["family"] == "Local" and local_row["source_path"].endswith("local_dw.safetensors")


def test_hub_models_beside_a_folder_of_files_on_the_command_line(hub_cache, tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "mine"
    folder.mkdir()
    save_file(_weights(4), str(folder / "a.safetensors"))
    save_file(_weights(5), str(folder / "b.safetensors"))
    out = _extract(["hf:acme/dwnet", str(folder), "hf:acme/gone@main", "--out", str(tmp_path / "c")],
                   hub_cache["env"])
    assert out.returncode == 1 and "hf:acme/gone@main" in out.stderr
    models = Corpus.open(tmp_path / "c").models
    assert list(models["hf_repo"]) == ["acme/dwnet", "", ""]  # in the order given, the folder's files sorted
    assert [Path(p).name for p in models["source_path"]][1:] == ["a.safetensors", "b.safetensors"]


def test_hub_specs_are_checked_before_any_lookup(tmp_path):
    from kernelatlas.hub import parse_spec

    assert parse_spec("hf:timm/convnext_tiny.fb_in1k") == ("timm/convnext_tiny.fb_in1k", None)
    assert parse_spec("hf:org/name@v1.0") == ("org/name", "v1.0")
    for bad in ("hf:noslash", "hf:a/b/c", "hf:../x", "hf:org/na me", "hf:org/name@../main"):
        with pytest.raises(ValueError, match="hf:"):
            parse_spec(bad)


def test_the_paper_list_is_well_formed():
    problems = zoo.validate_hub_lists(json.loads(
        (Path(zoo.__file__).parent / zoo.HUB_LISTS_FILE).read_text()))
    assert problems == []
    entries = zoo.hub_list("paper")
    sources = [s for s, _ in entries]
    assert len(sources) == len(set(sources)) >= 20
    families = {m["family"] for _, m in entries}
    assert {"ConvNeXt", "ConvNeXtV2", "EfficientNet", "MobileNetV3", "ConvMixer"} <= families
    assert {m["size"] for _, m in entries if m["family"] == "EfficientNet"} == {f"b{i}" for i in range(8)}
    assert all(m["dataset"] for _, m in entries)
    # the validator does catch what it checks
    broken = {"schema": 1, "lists": {"x": {"entries": [{"source": "hf:a/b", "family": "F", "size": "s"},
                                                       {"source": "hf:a/b", "family": "F", "size": "s",
                                                        "dataset": "d"},
                                                       {"source": "timm/c", "family": "F", "size": "s",
                                                        "dataset": "d"}]}}}
    found = " | ".join(zoo.validate_hub_lists(broken))
    assert "has no dataset" in found and "listed twice" in found and "hf:ORG/NAME" in found


def test_zoo_list_and_pull_show_the_hub_lists(hub_cache):
    env = hub_cache["env"]
    listing = subprocess.run([sys.executable, "-m", "kernelatlas.cli", "zoo", "list"], capture_output=True,
                             text=True, env=env, timeout=120)
    assert listing.returncode == 0
    assert "list paper (Hugging Face Hub, " in listing.stdout
    assert "hf:timm/convnext_tiny.fb_in1k  [ConvNeXt tiny, imagenet-1k]" in listing.stdout
    assert "cached" not in listing.stdout.split("list paper", 1)[1]  # nothing of it in this cache
    pull = subprocess.run([sys.executable, "-m", "kernelatlas.cli", "zoo", "pull", "paper"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert pull.returncode == 1  # offline, nothing cached: every model named, none downloaded
    named = [line for line in pull.stderr.splitlines() if line.startswith("error: hf:timm/")]
    assert len(named) == len(zoo.hub_list("paper"))


def test_run_models_replaces_the_default_zoo():
    from kernelatlas.cli import _run_zoo, build_parser

    parse = build_parser().parse_args
    assert _run_zoo(parse(["run", "--models", "zoo:paper", "--out", "x"])) == []
    assert parse(["run", "--models", "zoo:paper", "--out", "x"]).models == ["zoo:paper"]
    assert _run_zoo(parse(["run", "--out", "x"])) == ["default"]
    assert _run_zoo(parse(["run", "--models", "a.csv", "--zoo", "default", "--out", "x"])) == ["default"]
