"""Shared fixtures for the engine tests: the instruction-set path and thread count every kernel is run under,
random torch autoencoders (fixed seeds) and the batches of kernels they are tested on.

Helpers are handed out as session-scoped factory fixtures (not imported from this file), and models and
batches are cached by their arguments so that a combination of ISA x threads reuses one reference.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
import pytest
import torch
from reference import run_stack
from torch import nn

import kernelatlas
from kernelatlas import Autoencoder

ISAS = ("scalar", "avx2", "avx512")
SUPPORTED_ISAS = tuple(kernelatlas.build_info()["isa_supported"])
DEFAULT_HIDDEN = (64, 32)  # d -> 64 -> 32 -> 1 -> 32 -> 64 -> d


def activate_isa(name: str) -> str | None:
    """set_isa(name), skipping the test when this CPU cannot run that path; returns the previous setting."""
    if name not in SUPPORTED_ISAS:
        pytest.skip(f"this CPU cannot run the {name} path (supported: {', '.join(SUPPORTED_ISAS)})")
    return kernelatlas.set_isa(name)


@pytest.fixture
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """The instruction-set path a test runs under (set_isa, restored afterwards); parametrised over every
    ISA by ``pytest_generate_tests`` below, the ones this CPU lacks skipped with the reason."""
    previous = activate_isa(request.param)
    assert kernelatlas._core.active_isa() == request.param
    try:
        yield request.param
    finally:
        kernelatlas.set_isa(previous)


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> int:
    """The OpenMP thread count (1 and 2, parametrised by ``pytest_generate_tests``).  Two threads reach the
    parallel path only from 4096 rows on: below that the engine runs serially whatever it is asked."""
    return request.param


# The matrix every kernel is compared with its reference on: rows that break tiling (0, 1, a partial tile,
# one short of / exactly / one past the AVX-512 and AVX2 tile of 96 rows, one row past 16 scalar tiles of 64,
# exactly the 4096 rows from which the parallel path runs -- 64 whole 64-row tiles, a partial last 96-row
# one -- and a large odd count) x kernel sizes x input dtypes x ISAs.
MATRIX_ROWS = (0, 1, 7, 95, 96, 97, 1025, 4096, 100003)
MATRIX_DIMS = (9, 25, 49)
MATRIX_DTYPES = (np.float32, np.float16)
LARGE_ROWS = 100003
THREADS = (1, 2)
# The scalar path is ~50x slower than the SIMD ones: it gets two of the six large (d, dtype) cases, which
# keeps the suite within its time budget and still runs every ISA on a large, multi-threaded input.
SCALAR_LARGE_CASES = {(9, "float32"), (49, "float16")}


def _parametrized_by_mark(metafunc: pytest.Metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking ``isa`` runs on every ISA and one taking ``threads`` on 1 and 2 threads; one that also
    takes ``rows``, ``d`` and ``dtype`` runs on the matrix above, parametrised jointly so that the large
    scalar cases can be thinned out and so that each batch is run under every ISA and thread count in a row
    (its reference is computed once)."""
    names = set(metafunc.fixturenames)
    want_isa = "isa" in names and not _parametrized_by_mark(metafunc, "isa")
    want_threads = "threads" in names and not _parametrized_by_mark(metafunc, "threads")
    matrix = want_isa and {"rows", "d", "dtype"} <= names
    if matrix and not any(_parametrized_by_mark(metafunc, n) for n in ("rows", "d", "dtype")):
        argnames = ["rows", "d", "dtype", "isa"] + (["threads"] if want_threads else [])
        cases = []
        for rows in MATRIX_ROWS:
            for d in MATRIX_DIMS:
                for dtype in MATRIX_DTYPES:
                    dt = np.dtype(dtype).name
                    for name in ISAS:
                        if rows == LARGE_ROWS and name == "scalar" and (d, dt) not in SCALAR_LARGE_CASES:
                            continue
                        for t in THREADS if want_threads else (None,):
                            values = (rows, d, dtype, name) + ((t,) if want_threads else ())
                            case_id = f"{rows}x{d}-{dt}-{name}" + (f"-threads{t}" if want_threads else "")
                            cases.append(pytest.param(*values, id=case_id))
        metafunc.parametrize(argnames, cases, indirect=[n for n in ("isa", "threads") if n in argnames])
        return
    if want_isa:
        metafunc.parametrize("isa", ISAS, indirect=True)
    if want_threads:
        metafunc.parametrize("threads", THREADS, indirect=True, ids=[f"threads{t}" for t in THREADS])


# ---------------------------------------------------------------------------------------------- models

_TORCH_ACT = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "identity": nn.Identity,
}


def _stack(widths: Sequence[int], acts: Sequence[str]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, act in enumerate(acts):
        mods.append(nn.Linear(widths[i], widths[i + 1]))
        if act != "identity":
            mods.append(_TORCH_ACT[act]())
    return nn.Sequential(*mods)


@functools.cache
def torch_autoencoder(
    d: int,
    hidden: tuple[int, ...] = DEFAULT_HIDDEN,
    act: str = "relu",
    code_act: str = "sigmoid",
    decoder_act: str | None = None,
    seed: int = 0,
    gain: float = 1.0,
) -> tuple[nn.Sequential, nn.Sequential]:
    """Random (torch.manual_seed(seed)) encoder d -> hidden... -> 1 (code_act) and decoder 1 -> reversed
    hidden... -> d (no activation on the output), with ``act`` (``decoder_act`` on the decoder if given)
    after every hidden layer; ``gain`` scales every weight (gain > 1 drives the activations into their
    tails).  Cached: do not modify the returned modules."""
    torch.manual_seed(seed)
    enc = _stack((d, *hidden, 1), [act] * len(hidden) + [code_act])
    dec_hidden = tuple(reversed(hidden))
    dec = _stack((1, *dec_hidden, d), [decoder_act or act] * len(dec_hidden) + ["identity"])
    if gain != 1.0:
        with torch.no_grad():
            for mod in [*enc, *dec]:
                if isinstance(mod, nn.Linear):
                    mod.weight.mul_(gain)
    return enc.eval(), dec.eval()


@pytest.fixture(scope="session")
def make_torch_autoencoder():
    """Factory: (encoder, decoder) nn.Sequential, see ``torch_autoencoder``."""
    return torch_autoencoder


@pytest.fixture(scope="session")
def make_autoencoder():
    """Factory: (Autoencoder, encoder, decoder) -- the engine model converted from a random torch one."""

    def build(d: int, *, clusters: Sequence[tuple[float, float]] | None = None, **kwargs) -> tuple:
        enc, dec = torch_autoencoder(d, **kwargs)
        return Autoencoder.from_torch(enc, dec, clusters=clusters), enc, dec

    return build


# ---------------------------------------------------------------------------------------------- kernels


@functools.lru_cache(maxsize=64)
def _kernels(n: int, d: int, dtype: str, seed: int, specials: bool, pattern_model: tuple | None) -> np.ndarray:
    rng = np.random.default_rng([seed, n, d])
    x = rng.standard_normal((n, d)) * rng.uniform(0.05, 2.0, (n, 1)) + rng.normal(0.0, 0.5, (n, 1))
    if pattern_model is not None and n:
        # half the rows: decoded patterns (scaled, shifted, with a little noise), so that many score high
        _, dec = torch_autoencoder(*pattern_model)
        half = np.arange(0, n, 2)
        pat = run_stack(dec, rng.uniform(0.0, 1.0, (len(half), 1)))
        scale = rng.uniform(0.05, 3.0, (len(half), 1))
        noise = rng.uniform(0.0, 0.3, (len(half), 1)) * pat.std(axis=1, keepdims=True)
        x[half] = (pat * scale + rng.normal(0.0, 0.3, (len(half), 1)) + noise * rng.standard_normal(pat.shape))
    if specials and n >= 7:
        x[1] = 0.0  # dead
        x[3] = 0.37  # flat
        x[5, d // 2] = np.nan  # non-finite
        x[6, 0] = np.inf
        if n >= 1025:
            x[1000, -1] = -np.inf
            x[1001] = -2.5
            x[1002] = 0.0
            x[1003, :] = np.nan
    out = x.astype(dtype)
    out.setflags(write=False)  # cached: shared by tests
    return out


@pytest.fixture(scope="session")
def make_kernels():
    """Factory: a read-only batch [n, d] of random kernels (cached by its arguments).

    ``pattern_model``: the arguments of a ``torch_autoencoder`` whose decoded patterns make up every other
    row (so that many rows score high); ``specials``: rows 1, 3, 5, 6 (and 1000..1003 for n >= 1025) are
    dead / flat / non-finite kernels.
    """

    def build(
        n: int, d: int, dtype=np.float32, *, seed: int = 0, specials: bool = True, pattern_model: tuple | None = None
    ) -> np.ndarray:
        return _kernels(n, d, np.dtype(dtype).name, seed, specials, pattern_model)

    return build
