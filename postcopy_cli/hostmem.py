"""Small host-memory helpers: mappings that know their address, memfds, hugetlbfs, madvise.

A :class:`Mapping` wraps :class:`mmap.mmap` and remembers the virtual address
of its first byte, which is what userfaultfd ioctls take.  It owns the mmap and,
for memfd mappings, the memfd; :meth:`Mapping.close` (or the context manager)
releases both and is safe to call twice.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

# Linux values that the mmap module does not export everywhere.
MAP_HUGETLB = 0x40000
MFD_CLOEXEC = getattr(os, "MFD_CLOEXEC", 0x0001)
MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 0x0004)

MADV_DONTNEED = mmap.MADV_DONTNEED
MADV_REMOVE = mmap.MADV_REMOVE
MADV_HUGEPAGE = mmap.MADV_HUGEPAGE
MADV_NOHUGEPAGE = mmap.MADV_NOHUGEPAGE

_libc = ctypes.CDLL(None, use_errno=True)


def page_size() -> int:
    """The host's base page size in bytes."""
    return mmap.PAGESIZE


def meminfo() -> dict[str, int]:
    """/proc/meminfo as {key: value}; values in kB where the file says kB, else counts."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key.strip()] = int(parts[0])
    except OSError:
        pass
    return out


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
        from ._native import ffi  # read-only buffers (bytes)

        p = ffi.from_buffer(buffer)
        addr = int(ffi.cast("uintptr_t", p))
        ffi.release(p)
        return addr
    addr = ctypes.addressof(c)
    del c  # drop the export so the owner (e.g. an mmap) can still be closed
    return addr


class Mapping:
    """An mmap with its address; owns an optional backing fd (memfd)."""

    def __init__(self, mm: mmap.mmap, length: int, *, fd: int = -1, kind: str = "anonymous"):
        self.mmap = mm
        self.length = length
        self.fd = fd
        self.kind = kind
        self.addr = address_of(mm)

    def __len__(self) -> int:
        return self.length

    @property
    def closed(self) -> bool:
        return self.mmap is None

    def view(self) -> memoryview:
        """A writable memoryview of the whole mapping (release it before close)."""
        return memoryview(self.mmap)

    def madvise(self, advice: int, start: int = 0, length: int | None = None) -> None:
        """madvise(2) on [start, start+length) relative to the mapping."""
        self.mmap.madvise(advice, start, self.length - start if length is None else length)

    def close(self) -> None:
        if self.mmap is not None:
            mm, self.mmap = self.mmap, None
            mm.close()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<Mapping {self.kind} {self.addr:#x}+{self.length:#x}>"


def anonymous(length: int, *, shared: bool = False, huge: bool = False) -> Mapping:
    """An anonymous mapping (private by default; ``huge`` uses MAP_HUGETLB, i.e. hugetlbfs)."""
    flags = (mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE) | (MAP_HUGETLB if huge else 0)
    mm = mmap.mmap(-1, length, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return Mapping(mm, length, kind="hugetlb" if huge else ("shared" if shared else "anonymous"))


def memfd(length: int, name: str = "postcopy", *, huge: bool = False) -> Mapping:
    """A memfd of ``length`` bytes mapped MAP_SHARED (shmem, or hugetlbfs with ``huge``)."""
    fd = os.memfd_create(name, MFD_CLOEXEC | (MFD_HUGETLB if huge else 0))
    try:
        os.ftruncate(fd, length)
        mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return Mapping(mm, length, fd=fd, kind="memfd-hugetlb" if huge else "memfd")


def hugetlb(length: int | None = None, *, shared: bool = False) -> Mapping:
    """A hugetlbfs-backed mapping of ``length`` bytes (default: one default-size huge page).

    ``shared`` uses a hugetlb memfd, otherwise MAP_HUGETLB anonymous memory.
    Raises OSError(ENOMEM) when no huge page is available.
    """
    size = default_hugepage_size()
    if not size:
        raise OSError(errno.ENOTSUP, "hugetlbfs: no default huge page size on this host")
    length = size if length is None else length
    return memfd(length, "postcopy-huge", huge=True) if shared else anonymous(length, huge=True)


def munlockall() -> None:
    """munlockall(2); raises OSError on failure."""
    if _libc.munlockall() != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munlockall: {os.strerror(err)}")


def mlockall(current: bool = True, future: bool = False) -> None:
    """mlockall(2) with MCL_CURRENT / MCL_FUTURE; raises OSError on failure."""
    flags = (1 if current else 0) | (2 if future else 0)
    if _libc.mlockall(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mlockall: {os.strerror(err)}")


def locked_kib() -> int:
    """VmLck of this process in KiB (memory locked by mlock/mlockall)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0
