"""kernelatlas._files: the .npy header of fixed size and SequentialFile (aligned staging blocks written by a
background thread, O_DIRECT where the filesystem takes it, buffered otherwise): the bytes on disk are exactly
what was written, whatever the mix of write() and reserve()/advance() and wherever the block edges fall."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kernelatlas import _files
from kernelatlas._files import SequentialFile, npy_header


@pytest.mark.parametrize("shape", [(0,), (1,), (1000,), (5, 9), (3, 7, 7)])
@pytest.mark.parametrize("nbytes", [128, 4096])
def test_npy_header_loads_with_numpy(tmp_path, shape, nbytes):
    data = np.arange(int(np.prod(shape)), dtype=np.float32)
    path = tmp_path / "a.npy"
    header = npy_header("<f4", shape, nbytes)
    assert len(header) == nbytes
    path.write_bytes(header + data.tobytes())
    got = np.load(path)
    assert got.shape == shape and got.dtype == np.float32
    np.testing.assert_array_equal(got.ravel(), data)
    assert np.load(path, mmap_mode="r").offset == nbytes


def test_npy_header_for_billions_of_rows_fits():
    assert len(npy_header("<i2", (1_460_000_000_000,), 128)) == 128


def test_npy_header_rejects_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        npy_header("<f4", (10, 10), 32)
    with pytest.raises(ValueError):
        npy_header("<f4", (10,), 100)  # not a multiple of 64


def _ops(rng, total):
    """A random mix of write() sizes and reserve()/advance() sizes summing to ``total`` bytes."""
    done = 0
    while done < total:
        n = int(min(total - done, rng.choice([1, 3, 4095, 4096, 4097, 10_000, 70_000, 200_000])))
        yield bool(rng.integers(2)), n
        done += n


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("seed", range(4))
def test_sequential_file_writes_exact_bytes(tmp_path, monkeypatch, direct, seed):
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    rng = np.random.default_rng(seed)
    total = int(rng.integers(0, 3_000_000))
    expect = rng.integers(0, 256, total, dtype=np.uint8)
    f = SequentialFile(tmp_path / "out.bin", block=1 << 16, blocks=2)  # small blocks: many block edges
    pos = 0
    for use_reserve, n in _ops(rng, total):
        if use_reserve and n <= f.max_reserve:
            view = f.reserve(n)
            view[:] = expect[pos:pos + n]
            f.advance(n)
        else:
            f.write(expect[pos:pos + n].tobytes())
        pos += n
    f.close()
    assert f.size == total
    assert (tmp_path / "out.bin").read_bytes() == expect.tobytes()


def test_sequential_file_falls_back_when_o_direct_is_refused(tmp_path, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    f = SequentialFile(tmp_path / "out.bin")
    assert not f.direct
    f.write(b"x" * 5000)
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 5000


def test_sequential_file_reports_write_errors(tmp_path, monkeypatch):
    f = SequentialFile(tmp_path / "out.bin", block=1 << 14, blocks=2)

    def full_disk(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):  # the I/O thread's failure surfaces on a later write or on close
            f.write(b"y" * 10_000)
        f.close()
    f.abandon()


@pytest.mark.parametrize("end", [3 * 4096, 3 * 4096 + 1234, 5000])
def test_sequential_file_writes_a_range_of_an_existing_file(tmp_path, end):
    """offset=: a cluster task's rows of a shared output file -- from an aligned offset to ``end`` (the file's
    end may be unaligned), through the staging blocks and the reserve/advance path; bytes before and after the
    range stay as they were, the file keeps its size, and the offset must be aligned."""
    path = tmp_path / "part.bin"
    before = np.random.default_rng(0).integers(0, 255, 4096 + end + 777, dtype=np.uint8)
    path.write_bytes(before.tobytes())
    data = np.random.default_rng(1).integers(0, 255, end, dtype=np.uint8)
    f = SequentialFile(path, block=1 << 13, blocks=2, offset=4096)
    f.write(data[:1000].tobytes())
    view = f.reserve(min(3000, end - 1000))
    view[:] = data[1000:1000 + len(view)]
    f.advance(len(view))
    f.write(data[1000 + len(view):].tobytes())
    f.close()
    after = np.frombuffer(path.read_bytes(), np.uint8)
    assert len(after) == len(before)
    assert np.array_equal(after[:4096], before[:4096]) and np.array_equal(after[4096 + end:], before[4096 + end:])
    assert np.array_equal(after[4096:4096 + end], data)
    with pytest.raises(ValueError, match="not a multiple"):
        SequentialFile(path, offset=100)


def test_reserve_larger_than_a_block_is_refused(tmp_path):
    f = SequentialFile(tmp_path / "out.bin", block=1 << 14)
    with pytest.raises(ValueError, match="exceeds the staging block"):
        f.reserve(f.max_reserve + 1)
    f.abandon()


def test_staging_blocks_are_reused(tmp_path):
    f = SequentialFile(tmp_path / "a.bin", block=1 << 15, blocks=2)
    f.write(b"z" * 100_000)
    f.close()
    pooled = {b.ctypes.data for b in _files._POOL.get(f.block, [])}
    assert pooled
    g = SequentialFile(tmp_path / "b.bin", block=1 << 15, blocks=2)
    assert g._stage.ctypes.data in pooled
    g.abandon()


def _vm_flags(path) -> list[str]:
    """The VmFlags of this process's mapping of ``path`` (/proc/self/smaps)."""
    from pathlib import Path

    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(" " + str(path)):
            for flags in lines[i + 1:]:
                if flags.startswith("VmFlags:"):
                    return flags.split()[1:]
    raise AssertionError(f"{path} is not mapped")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_corpus_shards_are_mapped_with_huge_page_advice(tmp_path):
    """Corpus.shard_array advises MADV_HUGEPAGE ('hg' in the mapping's VmFlags), so that pages read from disk
    come as 2 MiB folios; a plain np.load memmap does not carry the flag."""
    from kernelatlas.corpus import Corpus, CorpusWriter
    from kernelatlas.corpus.loaders.base import ConvLayer, LoadedModel

    weight = np.random.default_rng(0).standard_normal((5000, 1, 3, 3)).astype(np.float32)
    with CorpusWriter(tmp_path / "c") as w:
        w.add_model(LoadedModel("m.pth", "torch", [ConvLayer("dw", weight, 5000, "depthwise", False, 0.0)]), sha256="m")
    c = Corpus.open(tmp_path / "c")
    shard = c.shards(3)[0]
    plain = np.load(c.root / shard, mmap_mode="r")
    assert "hg" not in _vm_flags((c.root / shard).resolve())
    del plain
    arr = c.shard_array(shard)
    assert "hg" in _vm_flags((c.root / shard).resolve())
    np.testing.assert_array_equal(arr, weight.reshape(5000, 9))
