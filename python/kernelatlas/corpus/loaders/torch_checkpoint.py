"""PyTorch checkpoint files (.pth .pt .bin .ckpt) and safetensors files (single or sharded) -> LoadedModel.

A checkpoint is untrusted input.  Torch files are read only with ``torch.load(..., weights_only=True)``
(memory mapped when the file is in the zip format), so a pickle that names any Python callable
(``os.system``, a model class, ``argparse.Namespace`` ...) is refused before anything runs; safetensors files
hold no code at all and are read through the ``safetensors`` package with the numpy framework (no torch
needed), after their header has been checked against the file's real size.

What a file holds is a *bare state_dict* (possibly wrapped), so the loader has to guess what the network was:

* Every 4-D tensor whose key ends in ``weight`` is taken as a conv weight ``[c_out, c_in_per_group, kh, kw]``
  (1-D BatchNorm weights, 2-D Linear weights, 3-D / 5-D conv weights are not 2-D conv weights; running stats
  and ``num_batches_tracked`` do not end in ``weight``).  Weights re-parametrised by ``weight_norm`` (legacy
  ``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``) or ``spectral_norm`` (legacy
  ``weight_orig``/``weight_u``/``weight_v`` or the parametrisation's ``original``/``0._u``/``0._v``) are
  recombined into the weight the network computes with.
* A ``[C*m, 1, kh, kw]`` weight is taken as depthwise (DESIGN.md): ``groups = c_out`` is our best guess (the
  channel multiplier m is not recorded in a state_dict), ``kind_inferred = True``.  It can be wrong: a regular
  conv on a 1-channel input (a grayscale stem) and a transposed conv with one output channel look the same.
* Every other 4-D weight is taken as regular (``groups = 1``, ``kind_inferred = True``).  A grouped conv
  (``1 < groups < c_in``) *cannot* be told from a bare state_dict -- its weight
  ``[c_out, c_in/groups, kh, kw]`` looks like a regular conv on fewer channels; its kernels are still the
  right kernels.  A ConvTranspose2d
  weight is ``[c_in, c_out/groups, kh, kw]``: its kernels are read correctly, with c_in and c_out swapped.
* ``order`` is the tensor's index in the file (the state_dict's insertion order, which torch keeps in module
  order).  Safetensors headers are sorted by name, so there the order is the *natural-sort* rank of the name
  ("blocks.2" before "blocks.10"): a good proxy for depth within a module list, not across differently named
  modules.

Wrappers are walked, not special-cased one by one: any nesting of dicts and lists is flattened into dotted
key paths (``params_ema.fea_conv.weight``), optimiser / scheduler state at the top level is ignored, and the
common leading components that are wrapper names (``state_dict``, ``model``, ``params``, ``module`` of
DistributedDataParallel ...) are stripped from the layer names.  When the file holds several weight sets of
one network -- sibling subtrees with the same conv keys and shapes, one of which is an EMA / SWA set
(``params``/``params_ema``, ``model``/``model_ema``, ``state_dict``/``state_dict_ema``, ``g``/``g_ema``
...) -- exactly one is taken: the EMA one, unless ``weight_set`` names another; ``LoadedModel.weight_set``
says which (its full key path) and ``meta["weight_sets"]`` lists the alternatives.  Two same-shaped sets with
no EMA among them (CycleGAN's two generators) are two networks and both are kept.  A known pair of names (an
averaged set and the same name without its ema/swa token: ``params``/``params_ema``, ``g``/``g_ema`` ...) is
one network even when its keys drifted between the two sets -- real releases rename a module in one of them
(``upsampler.0`` vs ``upsampler.conv3``) -- as long as at least half of the smaller set's conv weights match by
key and shape; a warning then names the keys that differ.

Dtypes: float32 and float16 are kept as stored, bfloat16 / float64 become float32, torch-quantised tensors
are dequantised with their own scale; integer tensors (quantised without a scale we can see) and fp8 are
skipped with a warning.  NaN/Inf weights are kept (the engine labels such kernels -1 and counts them) with a
warning naming the layer.
"""

from __future__ import annotations

import json
import math
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel, LoaderError, classify_kind, safe_torch_load

__all__ = ["load", "load_safetensors"]

# Top-level keys that hold training state, not a network's weights (Lightning, timm, BasicSR, mmcv ...).
_TRAINING_STATE = re.compile(
    r"^(optim|optimizers?|optimizer_states?|optimizer_state_dict|opt|scheduler|schedulers|lr_schedulers?|"
    r"scaler|grad_scaler|amp|loops)$",
    re.IGNORECASE,
)
# Leading key components that only wrap a network's state_dict; stripped from layer names when every conv
# key starts with them.  ("model." is also Lightning's attribute name for the wrapped network: same thing.)
_WRAPPERS = frozenset({
    "state_dict", "model", "models", "params", "params_ema", "ema", "net", "network", "module", "model_ema",
    "state_dict_ema", "ema_state_dict", "model_state_dict", "model_state", "ema_model", "weights", "shadow",
})
_AVERAGED_TOKENS = frozenset({"ema", "swa"})  # names of an averaged (usually the evaluated) weight set
_TWIN_OVERLAP = 0.5  # a named pair of weight sets is one network when this share of conv weights match

# safetensors dtype code -> (numpy dtype, bytes per element); BF16 has no numpy dtype (decoded by hand)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)$")
_FLOATS_KEPT = ("float32", "float16")
_FLOATS_WIDENED = ("bfloat16", "float64")


@dataclass
class _Tensor:
    """One tensor of a checkpoint, read lazily.  ``parts``: its key path (nested dict keys, then the dotted
    components of the innermost key); ``read()`` gives its values as a numpy float array (float32/float16)
    or raises ``_Unreadable`` for a dtype that is not a float weight."""

    parts: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    read: Callable[[], np.ndarray]
    index: float  # position in the file (insertion order, or natural-sort rank for safetensors)
    reparam: str = ""

    @property
    def key(self) -> str:
        return ".".join(self.parts)

    @property
    def is_conv(self) -> bool:
        return len(self.shape) == 4 and bool(self.parts) and self.parts[-1].endswith("weight")


class _Unreadable(Exception):
    """A weight whose dtype we do not turn into floats (the message says why)."""


# ----------------------------------------------------------------------------------------------- entry points


def load(path: str | Path, *, weight_set: str | None = None) -> LoadedModel:
    """Read a torch checkpoint (.pth .pt .bin .ckpt; safetensors and ``*.index.json`` are passed on to
    :func:`load_safetensors`) into a :class:`LoadedModel` of its 2-D conv weights.

    ``weight_set``: the dotted key path of the weight set to take (``"params"``, ``"model"``,
    ``"state_dict.model_ema"`` ...) when the file holds several; by default the EMA set is preferred.
    Raises :class:`LoaderError` naming the file for anything that is not a plain-tensor checkpoint; a pickle
    that would import or call Python code is refused, never executed.
    """
    p = Path(path)
    if p.is_dir() or p.name.lower().endswith(".index.json"):
        return load_safetensors(p, weight_set=weight_set)
    _check_file(p)
    if p.suffix.lower() == ".safetensors" or _sniff(p) == "safetensors":
        return load_safetensors(p, weight_set=weight_set)
    tensors, info = _torch_tensors(p)
    meta = {"checkpoint": info} if info else {}
    return _assemble(p, "torch", tensors, weight_set, meta)


def load_safetensors(path: str | Path, *, weight_set: str | None = None) -> LoadedModel:
    """Read a safetensors checkpoint into a :class:`LoadedModel`: one file, a sharded set given by its
    ``*.safetensors.index.json`` (``weight_map``: tensor name -> shard file), by any one of its
    ``NAME-0000k-of-0000n.safetensors`` shards (all n must be present), or by the directory holding it.

    Every shard's header is checked against the file's size before a byte of data is read, so a header that
    lies (sizes or offsets past the end of the file) is a :class:`LoaderError`, not a huge allocation.
    Index files may also point at torch ``.bin`` shards (``pytorch_model.bin.index.json``).
    """
    p = Path(path)
    shards, source = _resolve_shards(p)
    tensors: list[_Tensor] = []
    seen: dict[str, Path] = {}
    file_meta: dict[str, Any] = {}
    torch_shards = 0
    for shard in shards:
        _check_file(shard)
        if shard.suffix.lower() != ".safetensors" and _sniff(shard) != "safetensors":
            shard_tensors, _ = _torch_tensors(shard)
            torch_shards += 1
            for t in shard_tensors:  # file order, shard after shard
                t.index += len(tensors)
        else:
            shard_tensors, st_meta = _safetensors_tensors(shard)
            if st_meta:
                file_meta.setdefault("safetensors_metadata", st_meta)
        for t in shard_tensors:
            if t.key in seen:
                raise LoaderError(f"{source}: tensor {t.key!r} is in two shards ({seen[t.key].name} and "
                                  f"{shard.name}); the set is inconsistent, re-download it")
            seen[t.key] = shard
        tensors.extend(shard_tensors)
    if source.name.lower().endswith(".index.json"):
        _check_weight_map(source, seen)
    if torch_shards < len(shards):
        # safetensors sorts its header by name: natural-sort rank is the best order we have (module docstring)
        for rank, t in enumerate(sorted(tensors, key=lambda t: _natural_key(t.key))):
            t.index = float(rank)
    if len(shards) > 1:
        file_meta["shards"] = [s.name for s in shards]
    fmt = "torch" if torch_shards == len(shards) else "safetensors"
    return _assemble(source, fmt, tensors, weight_set, file_meta)


# ------------------------------------------------------------------------------------------------ torch files


def _check_file(p: Path) -> None:
    if not p.exists():
        raise LoaderError(f"{p}: no such file")
    if not p.is_file():
        raise LoaderError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise LoaderError(f"{p}: the file is empty; re-download or re-save the checkpoint")


def _sniff(p: Path) -> str:
    """'zip' (torch's default format), 'safetensors', or 'pickle' (torch's legacy format, or anything
    else)."""
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n <= size - 8:
            return "safetensors"
    return "pickle"


def _torch_tensors(p: Path) -> tuple[list[_Tensor], dict[str, Any]]:
    """Load a torch file without executing code; flatten it into tensors (+ top-level scalars as info)."""
    import torch

    kind = _sniff(p)
    if kind == "zip" and _is_torchscript(p):
        raise LoaderError(
            f"{p}: a TorchScript archive; kernelatlas does not run TorchScript code.  If you trust the file, "
            f"load it with torch.jit.load and pass the module to "
            f"kernelatlas.corpus.loaders.torch_module.load_module, or save its state_dict() with torch.save"
        )
    if kind == "pickle":
        _prescan_legacy(p)
    try:
        # torch warns about pickle protocols, TypedStorage ...: noise for our users, not their problem
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = safe_torch_load(p, mmap=(kind == "zip"))
    except LoaderError:
        raise
    except Exception as e:
        raise LoaderError(_torch_load_message(p, e)) from None
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 200):
                info[str(k)] = v  # epoch, arch ... for the user's record
    tensors = [
        _Tensor(parts, tuple(t.shape), _torch_dtype(t), _torch_reader(t), float(i))
        for i, (parts, t) in enumerate(_walk(obj, (), torch.Tensor))
    ]
    return tensors, info


# Torch's legacy (non-zip) format is five pickles in a row -- the magic number, the protocol version, sys_info,
# the object (whose tensors name their storages by persistent ids), the storage keys -- then the storages' raw
# bytes.  torch unpickles them straight from the file object, so a length in the file is allocated before
# anything compares it with the file: a string that claims 4 GiB is read(4 GiB) (BufferedReader allocates the
# whole request up front), and a persistent id's element count becomes torch.UntypedStorage(numel * itemsize)
# before the storage's bytes are read (finding F5, docs/security-fuzz.md).  _prescan_legacy walks the pickles
# with pickletools (it builds nothing) through a reader that never hands out more than the file holds, and
# refuses storages larger than the file.
_LEGACY_PICKLES = ("the magic number", "the protocol version", "sys_info", "the object", "the storage keys")
_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                     "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "QInt8": 1, "QUInt8": 1,
                     "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1}
_INT_OPS = {"INT", "LONG", "BININT", "BININT1", "BININT2", "LONG1", "LONG4"}
_STRING_OPS = {"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BINSTRING", "SHORT_BINSTRING",
               "STRING", "GLOBAL"}


class _FileBound:
    """A binary file whose read(n) returns at most what is left of it, without allocating n first."""

    def __init__(self, f: Any, size: int) -> None:
        self._f, self._size = f, size

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._f.tell()
        return self._f.read(left if n < 0 else max(0, min(n, left)))

    def readline(self) -> bytes:
        return self._f.readline()

    def tell(self) -> int:
        return self._f.tell()


def _prescan_legacy(p: Path) -> None:
    """Raise LoaderError unless the first five pickles of a legacy torch file are whole (no length runs past
    the end) and every storage they declare fits in the file.  Reads only the pickles, never the storages."""
    size = p.stat().st_size
    with p.open("rb") as f:
        reader = _FileBound(f, size)
        for which in _LEGACY_PICKLES:
            # MARK frames: the ints and names pushed since each open MARK; a persistent id is the tuple the last
            # TUPLE closed (('storage', torch.FloatStorage, key, location, numel, view_metadata))
            frames: list[tuple[list[int], list[str]]] = []
            closed: tuple[list[int], list[str]] = ([], [])
            try:
                for op, arg, _ in pickletools.genops(reader):  # type: ignore[arg-type]  # read() is all genops uses
                    if op.name == "MARK":
                        frames.append(([], []))
                    elif frames and op.name in _INT_OPS and isinstance(arg, int):
                        frames[-1][0].append(arg)
                    elif frames and op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
                        frames[-1][1].append(arg if isinstance(arg, str) else arg.decode("latin-1"))
                    elif op.name == "TUPLE" and frames:
                        closed = frames.pop()
                        if frames:  # a nested tuple (view_metadata) belongs to the outer one too
                            frames[-1][0].extend(closed[0])
                            frames[-1][1].extend(closed[1])
                    elif op.name in ("BINPERSID", "PERSID"):
                        _check_storage_id(p, closed, size)
            except LoaderError:  # from _check_storage_id (a LoaderError is a ValueError)
                raise
            except ValueError as e:
                # pickletools: a length past the end (refused here), or an unknown opcode / no STOP, where torch
                # stops too and says better what the file is (e.g. a plain pickle that names os.system)
                if re.match(r"expected \d+ bytes", str(e)):
                    raise LoaderError(f"{p}: not a readable torch checkpoint (legacy format, {which}: {e}); the "
                                      f"file is damaged or crafted") from None
                return


def _check_storage_id(p: Path, persistent_id: tuple[list[int], list[str]], size: int) -> None:
    ints, names = persistent_id
    itemsize = max((n for name in names for key, n in _STORAGE_ITEMSIZE.items()
                    if name.rsplit(" ", 1)[-1].rsplit(".", 1)[-1] == f"{key}Storage"), default=1)
    for value in ints:
        if value < 0 or value * itemsize > size:
            raise LoaderError(f"{p}: not a readable torch checkpoint (legacy format): a storage claims {value} "
                              f"elements of {itemsize} byte(s), more than the file's {size} bytes hold; the file is "
                              f"damaged or crafted")


def _is_torchscript(p: Path) -> bool:
    try:
        with zipfile.ZipFile(p) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, NotImplementedError, ValueError):
        return False  # torch.load will say what is wrong with it


def _torch_load_message(p: Path, e: Exception) -> str:
    text = str(e)
    if "Weights only load failed" in text:
        target = re.search(r"GLOBAL ([\w.]+)", text)
        if target:
            return (
                f"{p}: refused: the file pickles the Python object {target.group(1)}, which a full unpickle "
                f"would import or call; it was NOT executed (kernelatlas reads torch files with "
                f"weights_only=True).  If you trust the file, load it yourself and pass the network to "
                f"kernelatlas (torch_module.load_module), or re-save model.state_dict()"
            )
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", text)
        why = reason.group(1) if reason else "not a plain-tensor pickle"
        return (f"{p}: refused: not a plain-tensor torch checkpoint ({why}); nothing in it was executed.  "
                f"It may be damaged, not a torch file, or use pickle features kernelatlas does not load")
    if isinstance(e, EOFError) or "unexpected EOF" in text or "failed finding central directory" in text:
        first = text.split(". ")[0].rstrip(".")  # torch goes on for several sentences of advice
        return f"{p}: the file is truncated or damaged ({first or 'unexpected end of file'}); re-download it"
    first = text.splitlines()[0] if text else ""
    return f"{p}: not a readable torch checkpoint ({type(e).__name__}: {first})"


def _walk(obj: Any, parts: tuple[str, ...], leaf: type) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, tensor) for every tensor in a nest of dicts / lists; dotted keys are split into parts;
    top-level training state (optimiser, scheduler ...) is skipped."""
    if isinstance(obj, leaf):
        yield parts, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            key = str(k)
            if not parts and _TRAINING_STATE.match(key):
                continue
            yield from _walk(v, parts + tuple(key.split(".")), leaf)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, parts + (str(i),), leaf)


def _torch_dtype(t: Any) -> str:
    if t.is_quantized:
        return "quantized"
    return str(t.dtype).removeprefix("torch.")


def _torch_reader(t: Any) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        import torch

        x = t.detach()
        if x.is_quantized:
            return x.dequantize().float().numpy()
        name = str(x.dtype).removeprefix("torch.")
        if name in _FLOATS_KEPT:
            return x.numpy()
        if name in _FLOATS_WIDENED:
            return x.to(torch.float32).numpy()
        raise _Unreadable(_unreadable_reason(name))

    return read


def _unreadable_reason(dtype: str) -> str:
    if dtype.startswith(("int", "uint")):
        return (f"stored as {dtype} (quantised without a scale kernelatlas can see); skipped -- extract a "
                f"float export of this model instead")
    return f"stored as {dtype}, not a float dtype kernelatlas reads; skipped"


# ------------------------------------------------------------------------------------------------ safetensors


def _resolve_shards(p: Path) -> tuple[list[Path], Path]:
    """The shard files of a (possibly sharded) safetensors checkpoint, and the path that names the set."""
    if p.is_dir():
        index = sorted(p.glob("*.index.json"))
        singles = sorted(p.glob("*.safetensors"))
        if index:
            return _resolve_shards(index[0])
        if len(singles) == 1:
            return [singles[0]], singles[0]
        if singles and _SHARD.match(singles[0].name):
            return _resolve_shards(singles[0])
        raise LoaderError(f"{p}: a directory without a *.safetensors.index.json or a single *.safetensors "
                          f"file")
    if p.name.lower().endswith(".index.json"):
        _check_file(p)
        try:
            index = json.loads(p.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to shard file names")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise LoaderError(f"{p}: not a shard index ({type(e).__name__}: {str(e)[:200]}); expected JSON with "
                              f"a 'weight_map' object") from None
        names = list(dict.fromkeys(weight_map.values()))
        shards = [p.parent / n for n in names]
        for s in shards:
            if Path(s.name).name != s.name or s.parent != p.parent:  # no paths out of the directory
                raise LoaderError(f"{p}: shard name {s.name!r} is not a plain file name")
        try:
            missing = [s.name for s in shards if not s.is_file()]
        except OSError as e:  # e.g. a shard name too long for the filesystem
            raise LoaderError(f"{p}: a shard name of the index cannot be a file here ({e.strerror})") from None
        if missing:
            raise LoaderError(f"{p}: shard file(s) missing next to the index: {', '.join(m[:80] for m in missing)}")
        return shards, p
    m = _SHARD.match(p.name)
    if m and p.suffix.lower() == ".safetensors":
        width, n = len(m["i"]), int(m["n"])
        shards = [p.parent / f"{m['stem']}-{i:0{width}d}-of-{m['n']}.{m['ext']}" for i in range(1, n + 1)]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise LoaderError(f"{p}: shard {int(m['i'])} of a {n}-shard set; missing: {', '.join(missing)}")
        return shards, p
    return [p], p


def _check_weight_map(index: Path, found: dict[str, Path]) -> None:
    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    for name, shard in weight_map.items():
        where = found.get(name)
        if where is None or where.name != shard:
            got = f"found in {where.name}" if where else "in no shard"
            raise LoaderError(f"{index}: the index puts tensor {name!r} in {shard}, but it is {got}; "
                              f"the set is inconsistent, re-download it")


def _read_st_header(p: Path) -> tuple[dict[str, dict], int, dict[str, str]]:
    """Parse and validate a safetensors header; returns ({name: entry}, offset of the data, metadata)."""
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoaderError(f"{p}: too short for a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise LoaderError(f"{p}: the safetensors header claims {n} bytes but the file holds {size} "
                              f"bytes; the file is truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise LoaderError(f"{p}: unreadable safetensors header ({type(e).__name__}: {str(e)[:200]})") from None
    meta = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, entry in header.items():
        where = f"{p}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise LoaderError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise LoaderError(f"{where}: unknown dtype {str(dtype)[:80]!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise LoaderError(f"{where}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise LoaderError(f"{where}: bad data_offsets {offsets!r}")
        begin, end = offsets
        need = math.prod(shape) * _ST_DTYPES[dtype][1]  # Python ints: no overflow on a lying shape
        if not 0 <= begin <= end <= data_size:
            raise LoaderError(f"{where}: data_offsets {offsets} run past the end of the file's "
                              f"{data_size} data bytes; the file is truncated or its header is wrong")
        if end - begin != need:
            raise LoaderError(f"{where}: shape {shape} {dtype} needs {need} bytes but data_offsets give "
                              f"{end - begin}; the header is wrong")
    return header, 8 + n, meta if isinstance(meta, dict) else {}


def _safetensors_tensors(p: Path) -> tuple[list[_Tensor], dict[str, str]]:
    header, data_start, meta = _read_st_header(p)
    try:
        from safetensors import safe_open

        handle = safe_open(str(p), framework="numpy")  # the package validates the whole file once more
    except Exception as e:
        raise LoaderError(f"{p}: not a readable safetensors file ({e})") from None
    tensors = []
    for i, (name, entry) in enumerate(header.items()):
        shape = tuple(entry["shape"])
        dtype = _ST_DTYPES[entry["dtype"]][0]
        reader = _st_reader(p, handle, name, entry, data_start)
        tensors.append(_Tensor(tuple(name.split(".")), shape, dtype, reader, float(i)))
    return tensors, meta


def _st_reader(p: Path, handle: Any, name: str, entry: dict, data_start: int) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        dtype = _ST_DTYPES[entry["dtype"]][0]
        shape = tuple(entry["shape"])
        if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 stored bits to float32's top half
            begin, end = entry["data_offsets"]
            bits = np.fromfile(p, dtype="<u2", count=(end - begin) // 2, offset=data_start + begin)
            return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        if dtype not in _FLOATS_KEPT and dtype != "float64":
            raise _Unreadable(_unreadable_reason(dtype))
        x = handle.get_tensor(name)
        return x.astype(np.float32) if x.dtype == np.float64 else x

    return read


def _natural_key(key: str) -> list:
    return [(0, int(tok), "") if tok.isdigit() else (1, 0, tok) for tok in re.split(r"(\d+)", key) if tok]


# --------------------------------------------------------------------------------------------------- assembly


def _assemble(path: Path, fmt: str, tensors: list[_Tensor], weight_set: str | None,
              meta: dict[str, Any]) -> LoadedModel:
    """Pick one weight set, recombine re-parametrised weights, and turn the conv weights into ConvLayers."""
    chosen = ""
    if weight_set:
        want = tuple(weight_set.split("."))
        subset = [t for t in tensors if t.parts[: len(want)] == want]
        if not subset:
            tops = sorted({t.parts[0] for t in tensors if t.parts})
            raise LoaderError(f"{path}: no weight set {weight_set!r} in the file; its top-level keys are: "
                              f"{', '.join(tops[:20]) or '(none)'}")
        tensors, chosen = subset, weight_set
    tensors, choices, drift = _prefer_averaged(tensors)
    if choices:  # (inside a requested set too: its full key path is the more precise answer)
        meta["weight_sets"] = [".".join(m) for _, members in choices for m in members]
        chosen = ",".join(".".join(keep) for keep, _ in choices)
    tensors = _recombine(tensors)
    for position, t in enumerate(sorted(tensors, key=lambda t: t.index)):
        t.index = float(position)  # order = index in the weight set taken, not in the whole file

    convs = [t for t in tensors if t.is_conv]
    strip = _wrapper_depth(convs, {c for keep, _ in choices for c in keep} | set(chosen.split(".")))
    layers: list[ConvLayer] = []
    warns: list[str] = [f"{path}: {note}" for note in drift]
    for t in convs:
        name = ".".join(t.parts[strip:])
        if 0 in t.shape:
            warns.append(f"{path}: layer {name}: empty weight {list(t.shape)}; skipped")
            continue
        try:
            weight = t.read()
        except _Unreadable as e:
            warns.append(f"{path}: layer {name}: {e}")
            continue
        c_out, c_in = int(t.shape[0]), int(t.shape[1])
        groups = c_out if c_in == 1 else 1  # [C*m, 1, kh, kw] -> depthwise; see the module docstring
        bad = int((~np.isfinite(weight.reshape(c_out * c_in, -1)).all(axis=1)).sum())
        if bad:
            warns.append(f"{path}: layer {name}: {bad} of {c_out * c_in} kernels hold NaN/Inf (kept; the "
                         f"engine labels them -1)")
        extra: dict[str, Any] = {"key": t.key, "stored_dtype": t.dtype}
        if t.reparam:
            extra["reparametrization"] = t.reparam
        layers.append(ConvLayer(name=name, weight=weight, groups=groups,
                                kind=classify_kind(c_out, c_in, groups), kind_inferred=True, order=t.index,
                                extra=extra))
    layers.sort(key=lambda layer: layer.order)  # stable: file order where the orders tie
    return LoadedModel(source_path=str(path), format=fmt, layers=layers, weight_set=chosen, meta=meta,
                       warnings=warns)


def _tokens(component: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", component)}


def _is_averaged(component: str) -> bool:
    return bool(_tokens(component) & _AVERAGED_TOKENS)


def _signature(tensors: list[_Tensor], depth: int) -> tuple:
    """The conv keys (below ``depth``, DDP's leading ``module`` dropped) and shapes of a subtree."""
    sig = []
    for t in tensors:
        if t.is_conv:
            rel = t.parts[depth:]
            while rel and rel[0] == "module":
                rel = rel[1:]
            sig.append((rel, t.shape))
    return tuple(sorted(sig))


def _base_name(component: str) -> str | None:
    """The name of the plain twin of an averaged set: params_ema -> params, ema_model -> model, g_ema -> g,
    modelEMA -> model; None when nothing is left."""
    base = re.sub(r"(?i)(^|[_.-])(ema|swa)(?=$|[_.-])", r"\1", component)
    base = re.sub(r"(EMA|SWA)$", "", base)
    base = re.sub(r"[_.-]{2,}", "_", base).strip("_.-")
    return base if base and base != component else None


def _prefer_averaged(tensors: list[_Tensor]) -> tuple[list[_Tensor], list[tuple[tuple, list[tuple]]], list[str]]:
    """Drop the non-averaged twins of an EMA/SWA weight set (module docstring).  Returns the kept tensors, the
    choices made: (kept path, [paths of the alternatives, kept one included]), and one note per named pair
    whose keys drifted."""
    dropped: set[int] = set()
    choices: list[tuple[tuple, list[tuple]]] = []
    drift: list[str] = []

    def visit(members: list[int], depth: int, prefix: tuple[str, ...]) -> None:
        groups: dict[str, list[int]] = {}
        for i in members:
            if len(tensors[i].parts) > depth + 1:
                groups.setdefault(tensors[i].parts[depth], []).append(i)
        if len(groups) > 1 and any(_is_averaged(c) for c in groups):
            by_sig: dict[tuple, list[str]] = {}
            for c, idx in groups.items():
                sig = _signature([tensors[i] for i in idx], depth + 1)
                if sig:
                    by_sig.setdefault(sig, []).append(c)
            for twins in by_sig.values():
                if len(twins) > 1 and any(_is_averaged(c) for c in twins):
                    keep = next(c for c in twins if _is_averaged(c))
                    choices.append((prefix + (keep,), [prefix + (c,) for c in twins]))
                    for c in twins:
                        if c != keep:
                            dropped.update(groups.pop(c))
            # named pairs whose keys drifted: params_ema beside params, g_ema beside g ...
            for avg in [c for c in groups if _is_averaged(c)]:
                base = _base_name(avg)
                if base is None or base not in groups or avg not in groups:
                    continue
                a = dict(_signature([tensors[i] for i in groups[avg]], depth + 1))
                b = dict(_signature([tensors[i] for i in groups[base]], depth + 1))
                same = sum(1 for key, shape in a.items() if b.get(key) == shape)
                if not a or not b or same < _TWIN_OVERLAP * min(len(a), len(b)):
                    continue  # too different to be one network's two weight sets: both are kept
                only_avg = sorted(".".join(k) for k in a if b.get(k) != a[k])
                only_base = sorted(".".join(k) for k in b if a.get(k) != b[k])
                choices.append((prefix + (avg,), [prefix + (avg,), prefix + (base,)]))
                dropped.update(groups.pop(base))
                where = ".".join(prefix + (avg,))
                drift.append(f"weight sets {where} and {'.'.join(prefix + (base,))} are one network whose conv "
                             f"keys differ ({len(only_avg)} only in {avg}: {', '.join(only_avg[:4]) or '-'}; "
                             f"{len(only_base)} only in {base}: {', '.join(only_base[:4]) or '-'}); took {where}")
        for c, idx in groups.items():
            visit(idx, depth + 1, prefix + (c,))

    visit(list(range(len(tensors))), 0, ())
    return [t for i, t in enumerate(tensors) if i not in dropped], choices, drift


def _wrapper_depth(convs: list[_Tensor], chosen: set[str]) -> int:
    """How many leading key components all conv keys share that are wrapper names (or the chosen set)."""
    if not convs:
        return 0
    depth = 0
    first = convs[0].parts
    while depth < len(first) - 1:
        c = first[depth]
        if not all(len(t.parts) > depth + 1 and t.parts[depth] == c for t in convs):
            break
        if c not in _WRAPPERS and c not in chosen:
            break
        depth += 1
    return depth


def _recombine(tensors: list[_Tensor]) -> list[_Tensor]:
    """Replace weight_norm / spectral_norm pieces by the weight the network computes with (lazily)."""
    by_key = {t.key: t for t in tensors}
    used: set[str] = set()
    added: list[_Tensor] = []
    for t in tensors:
        k = t.key
        if k.endswith(".weight_g") or k == "weight_g":  # legacy torch.nn.utils.weight_norm
            base = k[: -len("weight_g")]
            v = by_key.get(base + "weight_v")
            if v is not None and len(v.shape) == 4:
                added.append(_weight_norm(t, v, base + "weight", min(t.index, v.index)))
                used.update({t.key, v.key})
        elif k.endswith(".weight_orig") or k == "weight_orig":  # legacy torch.nn.utils.spectral_norm
            base = k[: -len("weight_orig")]
            u, v = by_key.get(base + "weight_u"), by_key.get(base + "weight_v")
            if u is not None and v is not None and len(t.shape) == 4:
                added.append(_spectral_norm(t, u, v, base + "weight"))
                used.update({t.key, u.key, v.key})
        elif k.endswith("parametrizations.weight.original0"):  # torch.nn.utils.parametrizations.weight_norm
            base = k[: -len("parametrizations.weight.original0")]
            v = by_key.get(base + "parametrizations.weight.original1")
            if v is not None and len(v.shape) == 4:
                added.append(_weight_norm(t, v, base + "weight", min(t.index, v.index)))
                used.update({t.key, v.key})
        elif k.endswith("parametrizations.weight.original"):  # parametrizations.spectral_norm (or custom)
            base = k[: -len("parametrizations.weight.original")]
            u = by_key.get(base + "parametrizations.weight.0._u")
            v = by_key.get(base + "parametrizations.weight.0._v")
            if len(t.shape) == 4:
                if u is not None and v is not None:
                    added.append(_spectral_norm(t, u, v, base + "weight"))
                    used.update({t.key, u.key, v.key})
                else:  # a parametrisation whose code is not in the file: the stored original is all we have
                    added.append(_Tensor(tuple((base + "weight").split(".")), t.shape, t.dtype, t.read,
                                         t.index, "unknown parametrization: stored original taken"))
                    used.add(t.key)
    if not added:
        return tensors
    replaced = used | {a.key for a in added}
    kept = [t for t in tensors if t.key not in replaced]
    return sorted(kept + added, key=lambda t: t.index)


def _weight_norm(g: _Tensor, v: _Tensor, key: str, index: float) -> _Tensor:
    def read() -> np.ndarray:
        gv, vv = g.read().astype(np.float64), v.read().astype(np.float64)
        gv = gv.reshape(gv.shape + (1,) * (vv.ndim - gv.ndim)) if gv.ndim < vv.ndim else gv
        # weight_norm(dim=d) keeps g's size along d and 1 elsewhere: the norm runs over the size-1 axes
        axes = tuple(a for a in range(vv.ndim) if gv.shape[a] == 1)
        norm = np.sqrt((vv * vv).sum(axis=axes, keepdims=True))
        return (gv * vv / norm).astype(np.float32)

    return _Tensor(tuple(key.split(".")), v.shape, v.dtype, read, index, "weight_norm")


def _spectral_norm(orig: _Tensor, u: _Tensor, v: _Tensor, key: str) -> _Tensor:
    def read() -> np.ndarray:
        w = orig.read().astype(np.float64)
        uu, vv = u.read().astype(np.float64).ravel(), v.read().astype(np.float64).ravel()
        mat = w.reshape(w.shape[0], -1)
        if uu.size != mat.shape[0] or vv.size != mat.shape[1]:  # dim=1 (a transposed conv), as torch does
            mat = np.moveaxis(w, 1, 0).reshape(w.shape[1], -1)
        if uu.size != mat.shape[0] or vv.size != mat.shape[1]:
            raise _Unreadable(f"spectral_norm vectors u {uu.size} / v {vv.size} do not fit the weight "
                              f"{list(w.shape)}; skipped")
        sigma = float(uu @ mat @ vv)
        return (w / sigma).astype(np.float32)

    return _Tensor(tuple(key.split(".")), orig.shape, orig.dtype, read, orig.index, "spectral_norm")
