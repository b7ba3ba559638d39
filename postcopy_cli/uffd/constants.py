"""userfaultfd ABI values as enum flags with the kernel's names.

Source: include/uapi/linux/userfaultfd.h.  Features up to MOVE (1 << 16) are
listed even where the build machine's headers are older; the values are ABI.
"""
from __future__ import annotations

import enum

# UFFD_API: the only API version the kernel has ever had.
UFFD_API = 0xAA

# struct uffd_msg is 32 bytes (u8 event, 7 reserved bytes, 24-byte union).
UFFD_MSG_SIZE = 32


class Feature(enum.IntFlag):
    """uffdio_api.features bits (UFFD_FEATURE_*)."""

    PAGEFAULT_FLAG_WP = 1 << 0
    EVENT_FORK = 1 << 1
    EVENT_REMAP = 1 << 2
    EVENT_REMOVE = 1 << 3
    MISSING_HUGETLBFS = 1 << 4
    MISSING_SHMEM = 1 << 5
    EVENT_UNMAP = 1 << 6
    SIGBUS = 1 << 7
    THREAD_ID = 1 << 8
    MINOR_HUGETLBFS = 1 << 9
    MINOR_SHMEM = 1 << 10
    EXACT_ADDRESS = 1 << 11
    WP_HUGETLBFS_SHMEM = 1 << 12
    WP_UNPOPULATED = 1 << 13
    POISON = 1 << 14
    WP_ASYNC = 1 << 15
    MOVE = 1 << 16


class Ioctl(enum.IntFlag):
    """Bits of uffdio_api.ioctls / uffdio_register.ioctls: 1 << _UFFDIO_* number."""

    REGISTER = 1 << 0x00
    UNREGISTER = 1 << 0x01
    API = 1 << 0x3F
    WAKE = 1 << 0x02
    COPY = 1 << 0x03
    ZEROPAGE = 1 << 0x04
    MOVE = 1 << 0x05
    WRITEPROTECT = 1 << 0x06
    CONTINUE = 1 << 0x07
    POISON = 1 << 0x08


class RegisterMode(enum.IntFlag):
    """uffdio_register.mode (UFFDIO_REGISTER_MODE_*)."""

    MISSING = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


class Event(enum.IntEnum):
    """uffd_msg.event (UFFD_EVENT_*)."""

    PAGEFAULT = 0x12
    FORK = 0x13
    REMAP = 0x14
    REMOVE = 0x15
    UNMAP = 0x16


class PagefaultFlag(enum.IntFlag):
    """uffd_msg.arg.pagefault.flags (UFFD_PAGEFAULT_FLAG_*)."""

    WRITE = 1 << 0
    WP = 1 << 1
    MINOR = 1 << 2


def flag_names(flags: enum.IntFlag) -> list[str]:
    """Names of the set bits, lowest first; unknown bits as hex."""
    cls = type(flags)
    value = int(flags)
    names = [m.name for m in cls if m.value & value and m.name]
    names.sort(key=lambda n: cls[n].value)
    unknown = value & ~sum(m.value for m in cls)
    if unknown:
        names.append(hex(unknown))
    return names
