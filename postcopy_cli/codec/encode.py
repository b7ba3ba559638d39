"""Encoding: message objects -> bytes (sans-IO; callers write the bytes)."""
from __future__ import annotations

import struct
from typing import Iterable

from ..errors import LocalProtocolError
from .constants import (MAGIC, MAX_NAME_LENGTH, MIGRATION_ID_LENGTH, MAX_STATE_LENGTH, RECV_BITMAP_ENDING, TARGET_PAGE_SIZE,
                        Command, RamFlag, RpType, Section)
from .messages import (Blocks, Eof, Header, MigrationId, PreemptChannel, Resume, OpenReturnPath, Ping, Pong, PostcopyAdvise, PostcopyListen,
                       PostcopyRamDiscard, PostcopyResume, PostcopyRun, RamEnd, RamPage, RamZero, RecvBitmap,
                       RecvBitmapRequest, ReqPages, ReqPagesId, ResumeAck, Shut, State)

_U8 = struct.Struct(">B")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HEADER = struct.Struct(">II")
_CMD = struct.Struct(">BHH")        # section byte, cmd, len
_RP = struct.Struct(">HH")          # type, len
_BLOCK_TAIL = struct.Struct(">QQ")  # length, page_size
_RANGE = struct.Struct(">QQ")
_REQ = struct.Struct(">QI")

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF


def encode_name(name: str) -> bytes:
    """A block name as its UTF-8 bytes, checked (1..255 bytes, no NUL)."""
    if not isinstance(name, str):
        raise LocalProtocolError(f"block name must be a str, not {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        # undecodable bytes of a command line arrive as lone surrogates (PEP 383)
        raise LocalProtocolError(f"block name {name.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8") \
            from None
    if not 1 <= len(raw) <= MAX_NAME_LENGTH:
        raise LocalProtocolError(f"block name {name!r} must be 1..{MAX_NAME_LENGTH} bytes (is {len(raw)})")
    if b"\0" in raw:
        raise LocalProtocolError(f"block name {name!r} contains a NUL byte")
    return raw


def _uint(value, bits: int, what: str) -> int:
    if not isinstance(value, int) or value < 0 or value >> bits:
        raise LocalProtocolError(f"{what} must be an unsigned {bits}-bit integer, got {value!r}")
    return value


def _migration_id(value) -> bytes:
    if not isinstance(value, (bytes, bytearray)) or len(value) != MIGRATION_ID_LENGTH:
        raise LocalProtocolError(f"a migration id is {MIGRATION_ID_LENGTH} bytes, not {value!r}")
    return bytes(value)


def _command(cmd: Command, payload: bytes = b"") -> bytes:
    if len(payload) > _U16_MAX:
        raise LocalProtocolError(f"command {cmd.name} payload of {len(payload)} bytes does not fit in 16 bits")
    return _CMD.pack(Section.COMMAND, cmd, len(payload)) + payload


def _rp(kind: RpType, payload: bytes) -> bytes:
    if len(payload) > _U16_MAX:
        raise LocalProtocolError(f"return-path {kind.name} payload of {len(payload)} bytes does not fit in 16 bits")
    return _RP.pack(kind, len(payload)) + payload


def encode_discard_payload(block: str, ranges) -> bytes:
    """The POSTCOPY_RAM_DISCARD payload: version 0, name_len, name, 0, then be64 start/length pairs."""
    raw = encode_name(block)
    if not ranges:
        raise LocalProtocolError("a discard command needs at least one range")
    parts = [bytes((0, len(raw))), raw, b"\0"]
    for start, length in ranges:
        _uint(start, 64, "discard start")
        _uint(length, 64, "discard length")
        if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or length == 0:
            raise LocalProtocolError(f"discard range ({start:#x}, {length:#x}) must be non-empty and "
                                     f"aligned to {TARGET_PAGE_SIZE}")
        parts.append(_RANGE.pack(start, length))
    return b"".join(parts)


def encode(msg) -> bytes:
    """Encode one main-stream message (anything but RAM records: use :class:`RamSectionEncoder`)."""
    t = type(msg)
    if t is Header:
        return _HEADER.pack(MAGIC, _uint(msg.version, 32, "version"))
    if t is Blocks:
        if not 1 <= len(msg.blocks) <= _U16_MAX:
            raise LocalProtocolError(f"BLOCKS needs 1..{_U16_MAX} blocks, got {len(msg.blocks)}")
        parts = [bytes((Section.BLOCKS,)), _BE16.pack(len(msg.blocks))]
        seen = set()
        for b in msg.blocks:
            raw = encode_name(b.name)
            if raw in seen:
                raise LocalProtocolError(f"block name {b.name!r} appears twice")
            seen.add(raw)
            ps = _uint(b.page_size, 64, "page size")
            if ps < TARGET_PAGE_SIZE or ps & (ps - 1):
                raise LocalProtocolError(f"block {b.name!r}: page size {ps} is not a power of two >= 4096")
            length = _uint(b.length, 64, "block length")
            if length == 0 or length % ps:
                raise LocalProtocolError(f"block {b.name!r}: length {length} is not a positive multiple of {ps}")
            parts += (_U8.pack(len(raw)), raw, _BLOCK_TAIL.pack(length, ps))
        return b"".join(parts)
    if t is State:
        data = bytes(msg.data)
        if len(data) > MAX_STATE_LENGTH:
            raise LocalProtocolError(f"STATE of {len(data)} bytes exceeds the {MAX_STATE_LENGTH}-byte limit")
        return bytes((Section.STATE,)) + _BE32.pack(len(data)) + data
    if t is MigrationId:
        if msg.preempt_channels not in (0, 1):
            raise LocalProtocolError(f"a source opens 0 or 1 preempt channels, not {msg.preempt_channels!r}")
        return bytes((Section.ID,)) + _migration_id(msg.id) + _U8.pack(msg.preempt_channels)
    if t is PreemptChannel:
        return bytes((Section.PREEMPT,)) + _migration_id(msg.id)
    if t is Resume:
        return bytes((Section.RESUME,)) + _migration_id(msg.id)
    if t is Eof:
        return bytes((Section.EOF,))
    if t is OpenReturnPath:
        return _command(Command.OPEN_RETURN_PATH)
    if t is Ping:
        return _command(Command.PING, _BE32.pack(_uint(msg.value, 32, "ping value")))
    if t is PostcopyAdvise:
        return _command(Command.POSTCOPY_ADVISE,
                        _BE64.pack(_uint(msg.page_size_summary, 64, "page size summary"))
                        + _BE64.pack(_uint(msg.target_page_size, 64, "target page size")))
    if t is PostcopyListen:
        return _command(Command.POSTCOPY_LISTEN)
    if t is PostcopyRun:
        return _command(Command.POSTCOPY_RUN)
    if t is PostcopyRamDiscard:
        return _command(Command.POSTCOPY_RAM_DISCARD, encode_discard_payload(msg.block, msg.ranges))
    if t is PostcopyResume:
        return _command(Command.POSTCOPY_RESUME)
    if t is RecvBitmapRequest:
        raw = encode_name(msg.block)
        return _command(Command.RECV_BITMAP, _U8.pack(len(raw)) + raw)
    if t in (RamPage, RamZero, RamEnd):
        raise LocalProtocolError(f"{t.__name__} is a RAM record: encode it with RamSectionEncoder")
    raise LocalProtocolError(f"cannot encode {msg!r} on the main stream")


def encode_rp(msg) -> bytes:
    """Encode one return-path message (destination -> source)."""
    t = type(msg)
    if t is Shut:
        return _rp(RpType.SHUT, _BE32.pack(_uint(msg.status, 32, "shut status")))
    if t is Pong:
        return _rp(RpType.PONG, _BE32.pack(_uint(msg.value, 32, "pong value")))
    if t is ReqPagesId:
        raw = encode_name(msg.block)
        return _rp(RpType.REQ_PAGES_ID, _REQ.pack(_uint(msg.start, 64, "request start"),
                                                  _uint(msg.length, 32, "request length"))
                   + _U8.pack(len(raw)) + raw)
    if t is ReqPages:
        return _rp(RpType.REQ_PAGES, _REQ.pack(_uint(msg.start, 64, "request start"),
                                               _uint(msg.length, 32, "request length")))
    if t is RecvBitmap:
        raw = encode_name(msg.block)
        bitmap = bytes(msg.bitmap)
        size = (len(bitmap) + 7) & ~7
        return (_rp(RpType.RECV_BITMAP, _U8.pack(len(raw)) + raw) + _BE64.pack(size)
                + bitmap + bytes(size - len(bitmap)) + _BE64.pack(RECV_BITMAP_ENDING))
    if t is ResumeAck:
        return _rp(RpType.RESUME_ACK, _BE32.pack(_uint(msg.value, 32, "resume ack value")))
    raise LocalProtocolError(f"cannot encode {msg!r} on the return path")


class RamSectionEncoder:
    """Builds one RAM section: ``begin()``, records, ``end()``.

    Tracks the block of the previous record so that later records of the same
    block carry CONTINUE instead of the name, as QEMU's ram_save_page does.
    ``record_header`` is cheap (cached name prefixes) so sources can build
    iovecs of header + page data themselves.
    """

    __slots__ = ("_last", "_names")

    def __init__(self) -> None:
        self._last: str | None = None
        self._names: dict[str, bytes] = {}

    def begin(self) -> bytes:
        self._last = None
        return b"\x02"

    def record_header(self, block: str, offset: int, flags: RamFlag) -> bytes:
        if offset & 0xFFF or not 0 <= offset <= _U64_MAX:
            raise LocalProtocolError(f"RAM record offset {offset:#x} is not a multiple of {TARGET_PAGE_SIZE}")
        flags = int(flags)
        if flags & ~0x3A or not flags & 0x0A or (flags & 0x0A) == 0x0A:
            raise LocalProtocolError(f"RAM record needs exactly one of PAGE/ZERO (flags {flags:#x})")
        if block == self._last:
            return _BE64.pack(offset | flags | 0x20)
        name = self._names.get(block)
        if name is None:
            raw = encode_name(block)
            name = self._names[block] = _U8.pack(len(raw)) + raw
        self._last = block
        return _BE64.pack(offset | (flags & ~0x20)) + name

    def page(self, block: str, offset: int, data) -> bytes:
        if len(data) != TARGET_PAGE_SIZE:
            raise LocalProtocolError(f"a PAGE record carries {TARGET_PAGE_SIZE} bytes, not {len(data)}")
        return self.record_header(block, offset, RamFlag.PAGE) + bytes(data)

    def zero(self, block: str, offset: int) -> bytes:
        return self.record_header(block, offset, RamFlag.ZERO) + b"\x00"

    def end(self) -> bytes:
        self._last = None
        return b"\x00\x00\x00\x00\x00\x00\x00\x10"


def encode_ram_section(records: Iterable) -> bytes:
    """A whole RAM section (section byte, records, EOS) from RamPage/RamZero objects (a final RamEnd is optional)."""
    enc = RamSectionEncoder()
    parts = [enc.begin()]
    for r in records:
        t = type(r)
        if t is RamPage:
            parts.append(enc.page(r.block, r.offset, r.data))
        elif t is RamZero:
            parts.append(enc.zero(r.block, r.offset))
        elif t is RamEnd:
            break
        else:
            raise LocalProtocolError(f"{t.__name__} is not a RAM record")
    parts.append(enc.end())
    return b"".join(parts)
