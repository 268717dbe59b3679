"""File helpers shared by every writer: streamed sha256 and atomic replacement (temp file, fsync, rename), so
that a crash never leaves a half-written file under its final name."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SequentialFile", "advise_huge_pages", "advise_readahead", "atomic_write", "atomic_write_bytes", "fsync_dir",
           "npy_header", "sha256_file"]


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def _advise(arr: Any, advice: str, rows: tuple[int, int] | None = None) -> None:
    """madvise(mmap.<advice>) on the mapping behind a read-only memmap (np.load(mmap_mode="r")): all of it, or
    the pages holding rows [a, b).  A hint: silently skipped where the array has no mapping, the platform lacks
    the advice, or the kernel refuses it."""
    mm = getattr(arr, "_mmap", None)
    flag = getattr(mmap, advice, None)
    if mm is None or flag is None or not hasattr(mm, "madvise"):
        return
    try:
        if rows is None:
            mm.madvise(flag)
            return
        a, b = rows
        if b <= a:
            return
        base = arr.offset % mmap.ALLOCATIONGRANULARITY  # where row 0 lies in the mapping
        lo = base + a * arr.strides[0]
        start = lo - lo % mmap.PAGESIZE
        mm.madvise(flag, start, base + b * arr.strides[0] - start)
    except (OSError, ValueError):
        pass


def advise_huge_pages(arr: Any) -> None:
    """Ask the kernel to back a read-only memmap with 2 MiB page-cache folios mapped by single page-table entries
    (MADV_HUGEPAGE): pages it reads from disk from now on (faults and MADV_WILLNEED readahead alike) are then
    allocated as PMD-size folios.  Without it, readahead fills the page cache with small folios mapped 4 KiB at
    a time, and a pass over a 10^8-kernel corpus spends ~8% of the engine's time in page faults and TLB misses
    (BENCHMARKS.md)."""
    _advise(arr, "MADV_HUGEPAGE")


def advise_readahead(arr: Any, a: int, b: int) -> None:
    """Ask the kernel to start reading rows [a, b) of a memmapped shard into the page cache (MADV_WILLNEED: an
    asynchronous hint, no page touched here), so that on a cold corpus the disk works on the next chunk while
    the engine computes the current one.  On a page-cached corpus it costs a few microseconds."""
    _advise(arr, "MADV_WILLNEED", (a, b))


def npy_header(dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """A version-1.0 .npy header of exactly ``nbytes`` bytes (a multiple of 64) for a C-order array: a fixed
    size lets a writer fill in the row count afterwards, or start the data at a block boundary."""
    dims = f"({int(shape[0])},)" if len(shape) == 1 else "({})".format(", ".join(str(int(n)) for n in shape))
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {dims}, }}"
    pad = nbytes - 10 - len(text) - 1
    if pad < 0 or nbytes % 64:
        raise ValueError(f"a .npy header for shape {shape} does not fit {nbytes} bytes")
    text = text + " " * pad + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_lock_file(path: Path) -> Any:
    """Open (creating) a lock file for reading and writing without following a symlink at ``path``: a folder
    received from someone else may hold a ``.lock`` symlinked to one of the user's files, which a plain open
    would then truncate.  Raises OSError when ``path`` is a symlink or not a regular file."""
    import stat

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.fdopen(fd, "r+")
    except BaseException:
        os.close(fd)
        raise


def acquire_lock(path: Path) -> Any:
    """Open ``path`` (:func:`open_lock_file`) and take an exclusive, non-blocking ``flock`` on it, recording
    this process as the holder; the kernel releases it when the process dies.  Raises BlockingIOError whose
    ``holder`` attribute says who holds it ("pid N"), or OSError when the path is a symlink."""
    fh = open_lock_file(path)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        exc.holder = fh.read().strip() or "another process"  # type: ignore[attr-defined]
        fh.close()
        raise
    except BaseException:
        fh.close()
        raise
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the content to a temp file beside ``path``; it is fsynced and renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


_POOL: dict[int, list[Any]] = {}
_POOL_LOCK = threading.Lock()


def _staging_block(size: int) -> Any:
    """An aligned block, from the pool of released ones when there is one: reusing blocks across files saves
    the page faults of fresh memory, which the engine would otherwise take while writing its outputs."""
    import numpy as np

    with _POOL_LOCK:
        if _POOL.get(size):
            return _POOL[size].pop()
    # 2 MiB-aligned: numpy advises huge pages for allocations this large, and a block on transparent huge pages
    # costs the kernel far less to pin for each O_DIRECT write (measured: the writes' share of a 10^8-kernel
    # assign run fell from ~0.1 s to ~0.02 s)
    huge = 1 << 21
    raw = np.empty(size + huge, np.uint8)
    skip = -raw.ctypes.data % huge
    return raw[skip:skip + size]


def _release_blocks(size: int, blocks: list[Any], keep: int = 12) -> None:
    with _POOL_LOCK:
        pool = _POOL.setdefault(size, [])
        pool.extend(blocks[:max(0, keep - len(pool))])


class SequentialFile:
    """A file written front to back, fast and off the busy CPUs.  Data goes into aligned staging blocks --
    copied by ``write``, or produced in place by the caller through ``reserve`` / ``advance`` (zero-copy: the
    engine writes its outputs straight into the block) -- and a background thread writes full blocks with
    O_DIRECT where the filesystem allows it: the disk DMAs from the block, with no page-cache allocation, copy
    and writeback on the CPUs the engine is using (buffered writes + fsync of the same data cost several times
    more CPU time).  Falls back to buffered writes where O_DIRECT is refused (tmpfs, some network filesystems).
    ``close()`` writes the last block (padded, then truncated to the exact size) and fsyncs; the caller renames
    the file into place.  One writing thread.

    ``offset``: write into an existing file from this byte on (a multiple of ALIGN) instead of creating it: the
    bytes past the end of what is written are left as they are, nothing is truncated, and ``close()`` writes the
    unaligned last few bytes through the page cache and does not fsync (a cluster task writing its rows of a
    shard's output file; the client fsyncs the file once)."""

    ALIGN = 4096

    def __init__(self, path: Path, block: int = 1 << 22, blocks: int = 3, *, offset: int | None = None) -> None:
        if offset is not None and offset % self.ALIGN:
            raise ValueError(f"offset {offset} is not a multiple of {self.ALIGN}")
        self.path = path
        self.size = 0
        self._fill = 0
        self._start = offset
        self._pos = offset or 0  # where the next full block goes (the writing thread's)
        self._error: BaseException | None = None
        self.block = -(-max(block, 2 * self.ALIGN) // self.ALIGN) * self.ALIGN
        flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT | os.O_TRUNC if offset is None else 0)
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:
            self.direct = False
            self._fd = os.open(path, flags, 0o644)
        self._free: queue.Queue[Any] = queue.Queue()  # staging blocks (numpy uint8 views)
        for _ in range(max(2, blocks)):
            self._free.put(_staging_block(self.block))
        self._stage = self._free.get()
        self._full: queue.Queue[tuple[Any, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._io, name=f"write {path.name}", daemon=True)
        self._thread.start()

    @property
    def max_reserve(self) -> int:
        return self.block - self.ALIGN

    def reserve(self, nbytes: int) -> Any:
        """A writable uint8 view of the next ``nbytes`` of the file (at most ``max_reserve``), valid until the
        next call; ``advance(nbytes)`` then appends what was written into it."""
        if nbytes > self.max_reserve:
            raise ValueError(f"reserve({nbytes}) exceeds the staging block ({self.max_reserve} bytes)")
        if self._fill + nbytes > self.block:  # hand the aligned part over, carry the unaligned tail along
            aligned = self._fill - self._fill % self.ALIGN
            nxt = self._free.get()
            self._check()
            nxt[:self._fill - aligned] = self._stage[aligned:self._fill]
            self._full.put((self._stage, aligned))
            self._stage, self._fill = nxt, self._fill - aligned
        return self._stage[self._fill:self._fill + nbytes]

    def advance(self, nbytes: int) -> None:
        self._fill += nbytes
        self.size += nbytes

    def write(self, data: Any) -> None:
        import numpy as np

        src = np.frombuffer(data, np.uint8)
        while len(src):
            n = min(len(src), self.max_reserve)
            self.reserve(n)[:] = src[:n]
            self.advance(n)
            src = src[n:]

    def _check(self) -> None:
        if self._error is not None:
            raise OSError(f"writing {self.path} failed: {self._error}") from self._error

    def _io(self) -> None:
        while (item := self._full.get()) is not None:
            block, nbytes = item
            try:
                if self._error is None:
                    view = memoryview(block[:nbytes])
                    while len(view):
                        n = os.pwrite(self._fd, view, self._pos)
                        view, self._pos = view[n:], self._pos + n
            except BaseException as exc:
                self._error = exc
            self._free.put(block)

    def close(self) -> None:
        """Write the rest, set the exact size and fsync (with ``offset``: write the rest, no truncation or
        fsync)."""
        tail = 0
        if self._fill:
            if self._start is None:
                pad = -self._fill % self.ALIGN if self.direct else 0
                self._stage[self._fill:self._fill + pad] = 0
                self._full.put((self._stage, self._fill + pad))
            else:  # padding would overwrite the next rows: the aligned part direct, the rest buffered below
                tail = self._fill % self.ALIGN if self.direct else 0
                if self._fill - tail:
                    self._full.put((self._stage, self._fill - tail))
        self._full.put(None)
        self._thread.join()
        self._check()
        if self._start is None:
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        elif tail:
            end = self._start + self.size
            fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                view = memoryview(self._stage[self._fill - tail:self._fill])
                while len(view):
                    n = os.pwrite(fd, view, end - len(view))
                    view = view[n:]
            finally:
                os.close(fd)
        os.close(self._fd)
        self._fd = -1
        self._release()

    def _release(self) -> None:
        blocks = []
        while not self._free.empty():
            blocks.append(self._free.get())
        _release_blocks(self.block, blocks)

    def abandon(self) -> None:
        """Stop without completing the file (the caller removes it)."""
        if self._thread.is_alive():
            self._error = self._error or InterruptedError("abandoned")
            self._full.put(None)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
