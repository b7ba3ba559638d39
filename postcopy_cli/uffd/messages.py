"""Decoding of struct uffd_msg (pure: bytes in, dataclasses out).

Layout (include/uapi/linux/userfaultfd.h), 32 bytes, native endian:
  u8 event; u8 reserved1; u16 reserved2; u32 reserved3; then a 24-byte union:
  pagefault: u64 flags, u64 address, u32 ptid (UFFD_FEATURE_THREAD_ID)
  fork:      u32 ufd
  remap:     u64 from, u64 to, u64 len
  remove / unmap: u64 start, u64 end
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import UFFD_MSG_SIZE, Event, PagefaultFlag

_HEAD = struct.Struct("=B3xI")
_PAGEFAULT = struct.Struct("=QQI")
_FORK = struct.Struct("=I")
_REMAP = struct.Struct("=QQQ")
_RANGE = struct.Struct("=QQ")


@dataclass(frozen=True, slots=True)
class PagefaultMsg:
    address: int
    flags: PagefaultFlag
    thread_id: int


@dataclass(frozen=True, slots=True)
class ForkMsg:
    ufd: int


@dataclass(frozen=True, slots=True)
class RemapMsg:
    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class RemoveMsg:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnmapMsg:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class UnknownMsg:
    event: int
    raw: bytes


UffdMsg = PagefaultMsg | ForkMsg | RemapMsg | RemoveMsg | UnmapMsg | UnknownMsg


def parse_message(raw: bytes | memoryview, offset: int = 0) -> UffdMsg:
    """Decode one 32-byte uffd_msg starting at ``offset``."""
    if len(raw) - offset < UFFD_MSG_SIZE:
        raise ValueError(f"uffd_msg needs {UFFD_MSG_SIZE} bytes, got {len(raw) - offset}")
    event, _ = _HEAD.unpack_from(raw, offset)
    body = offset + 8
    if event == Event.PAGEFAULT:
        flags, address, ptid = _PAGEFAULT.unpack_from(raw, body)
        return PagefaultMsg(address, PagefaultFlag(flags), ptid)
    if event == Event.FORK:
        return ForkMsg(_FORK.unpack_from(raw, body)[0])
    if event == Event.REMAP:
        return RemapMsg(*_REMAP.unpack_from(raw, body))
    if event == Event.REMOVE:
        return RemoveMsg(*_RANGE.unpack_from(raw, body))
    if event == Event.UNMAP:
        return UnmapMsg(*_RANGE.unpack_from(raw, body))
    return UnknownMsg(event, bytes(raw[offset:offset + UFFD_MSG_SIZE]))


def parse_messages(raw: bytes | memoryview) -> list[UffdMsg]:
    """Decode every whole message in ``raw`` (a read() of the uffd)."""
    if len(raw) % UFFD_MSG_SIZE:
        raise ValueError(f"uffd read of {len(raw)} bytes is not a whole number of messages")
    return [parse_message(raw, off) for off in range(0, len(raw), UFFD_MSG_SIZE)]
