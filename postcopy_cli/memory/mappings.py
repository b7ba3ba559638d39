"""Host memory: mappings with known addresses, madvise, huge pages, and the RAM-block model.

A :class:`Mapping` wraps :class:`mmap.mmap` and remembers the virtual address
of its first byte, which is what userfaultfd ioctls take.  It owns the mmap and,
for memfd mappings, the memfd; :meth:`Mapping.close` (or the context manager)
releases both and is safe to call twice.  :class:`AnonymousMapping` is the
private anonymous kind (THP off by default); :func:`memfd` and :func:`hugetlb`
make the shared and huge-page kinds.

A RAM block (QEMU's RAMBlock) is a named, page-aligned range of guest memory.
Where it lives on this host is a list of segments: (offset in the block,
host address, size) — one per mapped region handed over, or one for memory in
our own process.
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import mmap
import os
from dataclasses import dataclass, field

from ..owned import Owned
from ..units import parse_size  # noqa: F401  (re-exported)

# the one handle on the C library, for the calls the os and mmap modules lack
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.restype = ctypes.c_int
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
libc.mincore.restype = ctypes.c_int
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p

# include/uapi/asm-generic/mman-common.h
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15

# Linux values that the mmap module does not export everywhere.
MAP_HUGETLB = 0x40000
MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 0x0001)
MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x0004)

HOST_PAGE_SIZE = mmap.PAGESIZE


def page_size() -> int:
    """The host's base page size in bytes."""
    return HOST_PAGE_SIZE


def _check(r: int, what: str) -> None:
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2) on our own memory; OSError naming the advice and range on failure."""
    _check(libc.madvise(ctypes.c_void_p(addr), length, advice), f"madvise({addr:#x}, {length:#x}, {advice})")


def munlockall() -> None:
    """munlockall(2); raises OSError on failure."""
    _check(libc.munlockall(), "munlockall")


def mlockall(current: bool = True, future: bool = False) -> None:
    """mlockall(2) with MCL_CURRENT / MCL_FUTURE; raises OSError on failure."""
    _check(libc.mlockall((1 if current else 0) | (2 if future else 0)), "mlockall")


def _proc_numbers(path: str, key: str | None = None) -> dict[str, int]:
    """``{key: first number}`` of a /proc file of "Key:  value [kB]" lines (only ``key`` if given).

    {} when the file cannot be read.
    """
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit() and (key is None or k.strip() == key):
                    out[k.strip()] = int(parts[0])
    except OSError:
        pass
    return out


def meminfo() -> dict[str, int]:
    """/proc/meminfo as {key: value}; values in kB where the file says kB, else counts."""
    return _proc_numbers("/proc/meminfo", None)


def locked_kib() -> int:
    """VmLck of this process in KiB (memory locked by mlock/mlockall)."""
    return _proc_numbers("/proc/self/status", "VmLck").get("VmLck", 0)


def unlock_if_locked() -> bool:
    """munlockall(2) when this process holds locked memory; whether it did (then :func:`relock`).

    Post-copy and mlock don't mix: a locked range is populated up front, so it
    never faults; QEMU munlocks for postcopy and locks again after.  Best effort:
    a failure leaves the memory as it was.
    """
    if locked_kib() == 0:
        return False
    try:
        munlockall()
    except OSError:
        pass
    return True


def relock() -> None:
    """mlockall(MCL_CURRENT | MCL_FUTURE) again after :func:`unlock_if_locked` (best effort)."""
    try:
        mlockall(current=True, future=True)
    except OSError:
        pass


def default_hugepage_size() -> int:
    """Default huge page size in bytes (Hugepagesize in /proc/meminfo), 0 when unknown."""
    return meminfo().get("Hugepagesize", 0) * 1024


def free_hugepages() -> int:
    """Default-size huge pages free and not reserved by other mappings."""
    info = meminfo()
    return max(0, info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0))


def address_of(buffer) -> int:
    """Virtual address of the first byte of a buffer (writable buffers via ctypes, else cffi).

    The address is valid only while ``buffer`` is alive and not resized.
    """
    try:
        c = ctypes.c_char.from_buffer(buffer)
    except TypeError:
        from .._native import ffi  # read-only buffers (bytes)

        p = ffi.from_buffer(buffer)
        addr = int(ffi.cast("uintptr_t", p))
        ffi.release(p)
        return addr
    addr = ctypes.addressof(c)
    del c  # drop the export so the owner (e.g. an mmap) can still be closed
    return addr


class Mapping(Owned):
    """An mmap (``.map``) of ``.size`` bytes at ``.addr``; owns an optional backing fd (memfd).

    Build one with :class:`AnonymousMapping`, :func:`anonymous`, :func:`memfd` or :func:`hugetlb`.
    """

    def __init__(self, mm: mmap.mmap, size: int, *, fd: int = -1, kind: str = "anonymous"):
        self.map = mm
        self.size = size
        self.fd = fd
        self.kind = kind
        self.addr = address_of(mm)

    def __len__(self) -> int:
        return self.size

    @property
    def closed(self) -> bool:
        return self.map.closed

    def view(self) -> memoryview:
        """A writable memoryview of the whole mapping (release it before close)."""
        return memoryview(self.map)

    def madvise(self, advice: int, start: int = 0, length: int | None = None) -> None:
        """madvise(2) on [start, start+length) relative to the mapping."""
        madvise(self.addr + start, self.size - start if length is None else length, advice)

    def close(self) -> None:
        """Unmap and close the memfd; safe to call twice."""
        if not self.map.closed:
            try:
                self.map.close()
            except BufferError:
                # a memoryview is still alive; the mapping goes with the process
                pass
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.addr:#x}+{self.size:#x}>"


_RW = mmap.PROT_READ | mmap.PROT_WRITE


def anonymous(size: int, *, shared: bool = False, huge: bool = False) -> Mapping:
    """An anonymous mapping (private by default; ``huge`` uses MAP_HUGETLB, i.e. hugetlbfs)."""
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | mmap.MAP_ANONYMOUS | (MAP_HUGETLB if huge else 0)
    return Mapping(mmap.mmap(-1, size, flags=flags, prot=_RW), size,
                   kind="hugetlb" if huge else ("shared" if shared else "anonymous"))


class AnonymousMapping(Mapping):
    """A private anonymous mapping of ``size`` bytes that we own (close() unmaps)."""

    def __init__(self, size: int, *, no_thp: bool = True):
        super().__init__(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=_RW), size)
        if no_thp:
            # postcopy places whole host pages; THP would turn a 4 KiB fault into
            # a 2 MiB one (QEMU turns THP off for postcopy blocks too).
            self.madvise(MADV_NOHUGEPAGE)


def memfd(size: int, name: str = "postcopy", *, huge: bool = False) -> Mapping:
    """A memfd of ``size`` bytes mapped MAP_SHARED (shmem, or hugetlbfs with ``huge``)."""
    fd = os.memfd_create(name, MFD_CLOEXEC | (MFD_HUGETLB if huge else 0))
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=_RW)
    except BaseException:
        os.close(fd)
        raise
    return Mapping(mm, size, fd=fd, kind="memfd-hugetlb" if huge else "memfd")


def hugetlb(size: int | None = None, *, shared: bool = False) -> Mapping:
    """A hugetlbfs-backed mapping of ``size`` bytes (default: one default-size huge page).

    ``shared`` uses a hugetlb memfd, otherwise MAP_HUGETLB anonymous memory.
    Raises OSError(ENOMEM) when no huge page is available.
    """
    huge = default_hugepage_size()
    if not huge:
        raise OSError(errno.ENOTSUP, "hugetlbfs: no default huge page size on this host")
    size = huge if size is None else size
    return memfd(size, "postcopy-huge", huge=True) if shared else anonymous(size, huge=True)


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
        return self.host_span(offset)[0]

    def host_span(self, offset: int) -> tuple[int | None, int]:
        """(host address of ``offset`` or None, bytes from there on that stay mapped / unmapped alike)."""
        i = bisect.bisect_right(self._starts, offset) - 1
        seg = self.segments[i] if i >= 0 else None
        if seg is None or offset >= seg.offset + seg.size:
            following = self._starts[i + 1] if i + 1 < len(self._starts) else self.length
            return None, following - offset
        return seg.host_addr + (offset - seg.offset), seg.offset + seg.size - offset

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


__all__ = ["MADV_DONTNEED", "MADV_REMOVE", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE", "HOST_PAGE_SIZE", "page_size",
           "madvise", "munlockall", "mlockall", "meminfo", "locked_kib", "unlock_if_locked", "relock",
           "default_hugepage_size", "free_hugepages", "libc", "address_of", "Mapping", "AnonymousMapping",
           "anonymous", "memfd", "hugetlb",
           "Segment", "RamBlock", "blocks_from_regions", "parse_size"]
