"""Host memory: mappings with known addresses, madvise, and the RAM-block model.

A RAM block (QEMU's RAMBlock) is a named, page-aligned range of guest memory.
Where it lives on this host is a list of segments: (offset in the block,
host address, size) — one per mapped region handed over, or one for memory in
our own process.
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass, field

from .units import parse_size  # noqa: F401  (re-exported)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int

# include/uapi/asm-generic/mman-common.h
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15

HOST_PAGE_SIZE = mmap.PAGESIZE


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2) on our own memory; OSError naming the advice and range on failure."""
    if _libc.madvise(ctypes.c_void_p(addr), length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({addr:#x}, {length:#x}, {advice}): {os.strerror(err)}")


def address_of(buffer) -> int:
    """Start address of a writable buffer (mmap, bytearray)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class AnonymousMapping:
    """A private anonymous mapping of ``size`` bytes that we own (close() unmaps)."""

    def __init__(self, size: int, *, no_thp: bool = True):
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = address_of(self.map)
        if no_thp:
            # postcopy places whole host pages; THP would turn a 4 KiB fault into
            # a 2 MiB one (QEMU turns THP off for postcopy blocks too).
            madvise(self.addr, size, MADV_NOHUGEPAGE)

    def view(self) -> memoryview:
        return memoryview(self.map)

    def close(self) -> None:
        if self.map is not None and not self.map.closed:
            try:
                self.map.close()
            except BufferError:
                # a memoryview is still alive; the mapping goes with the process
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass(frozen=True)
class Segment:
    """``size`` bytes of a block starting at ``offset`` live at host address ``host_addr``."""

    offset: int
    host_addr: int
    size: int


@dataclass
class RamBlock:
    """A named RAM block and where it lives."""

    name: str
    length: int
    page_size: int
    segments: list[Segment] = field(default_factory=list)

    def __post_init__(self):
        self.segments.sort(key=lambda s: s.offset)
        self._starts = [s.offset for s in self.segments]

    @property
    def pages(self) -> int:
        """Number of 4096-byte target pages."""
        return self.length // 4096

    def host_address(self, offset: int) -> int | None:
        """Host address of ``offset`` in the block, or None where nothing is mapped."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        seg = self.segments[i]
        if offset >= seg.offset + seg.size:
            return None
        return seg.host_addr + (offset - seg.offset)

    def unmapped_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of the holes in the block that no segment covers."""
        holes, pos = [], 0
        for s in self.segments:
            if s.offset > pos:
                holes.append((pos, s.offset - pos))
            pos = max(pos, s.offset + s.size)
        if pos < self.length:
            holes.append((pos, self.length - pos))
        return holes


def blocks_from_regions(regions) -> list[RamBlock]:
    """Group handed-over regions (handshake.GuestRegion) into RAM blocks, in order of first appearance."""
    by_name: dict[str, list] = {}
    for r in regions:
        by_name.setdefault(r.block, []).append(r)
    blocks = []
    for name, regs in by_name.items():
        length = max(r.offset + r.size for r in regs)
        blocks.append(RamBlock(name, length, regs[0].page_size,
                               [Segment(r.offset, r.host_addr, r.size) for r in regs]))
    return blocks


__all__ = ["MADV_DONTNEED", "MADV_REMOVE", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE", "HOST_PAGE_SIZE", "madvise",
           "address_of", "AnonymousMapping", "Segment", "RamBlock", "blocks_from_regions", "parse_size"]
