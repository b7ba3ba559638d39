"""Decoding: bytes (fed in arbitrary pieces) -> message objects, validating everything.

Sans-IO, in the style of h11: ``feed(data)`` then ``next_event()`` until it
returns :data:`NEED_DATA`.  Every violation raises
:class:`~postcopy_cli.errors.ProtocolError` naming the section, the byte offset
of the offending item in the stream and what was wrong; the error is sticky
(later calls raise it again).

Buffering: fed pieces are kept as immutable ``bytes`` chunks and parsed in
place; an item straddling two pieces is assembled by copying just that item.
Nothing is buffered beyond what was fed, and lengths read from the wire are
checked before the decoder waits for (or assembles) that many bytes.

A native fast path that consumes part of the same stream (the destination's
pump, the source's request server) gets and returns the decoder's bytes and
state only through :class:`~postcopy_cli.codec.pumped.PumpedDecoder`, the one
friend of these internals.
"""
from __future__ import annotations

import struct
from collections import deque
from typing import Iterable, Iterator

from ..errors import ProtocolError
from .constants import (MAGIC, MAX_STATE_LENGTH, MIGRATION_ID_LENGTH, RAM_FLAGS_KNOWN, RECV_BITMAP_ENDING, TARGET_PAGE_SIZE, VERSION,
                        Command, RpType, Section)
from .states import PostcopyState, transition
from .messages import (NO_MIGRATION_ID, BlockInfo, Blocks, Eof, Header, MigrationId, PreemptChannel, Resume, OpenReturnPath, Ping, Pong, PostcopyAdvise,
                       PostcopyListen, PostcopyRamDiscard, PostcopyResume, PostcopyRun, RamEnd, RamPage, RamZero,
                       RecvBitmap, RecvBitmapRequest, ReqPagesId, ResumeAck, Shut, State)


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __bool__(self) -> bool:
        return False


#: Returned by ``next_event()`` when more bytes must be fed before the next event.
NEED_DATA = _NeedData()

_unpack_q = struct.Struct(">Q").unpack_from
_unpack_i = struct.Struct(">I").unpack_from
_unpack_h = struct.Struct(">H").unpack_from
_unpack_ii = struct.Struct(">II").unpack_from
_unpack_qq = struct.Struct(">QQ").unpack_from
_unpack_bhh = struct.Struct(">BHH").unpack_from
_unpack_hh = struct.Struct(">HH").unpack_from
_unpack_qi = struct.Struct(">QI").unpack_from

_new = object.__new__
_set_block = RamPage.block.__set__
_set_offset = RamPage.offset.__set__
_set_data = RamPage.data.__set__


def _ram_page(block: str, offset: int, data) -> RamPage:
    """RamPage(block, offset, data) without the frozen-dataclass __init__ overhead (hot path)."""
    r = _new(RamPage)
    _set_block(r, block)
    _set_offset(r, offset)
    _set_data(r, data)
    return r


_PAGE = 0x08
_ZERO = 0x02
_EOS = 0x10
_CONT = 0x20

# Payload length each command needs (None: variable, checked by its parser).
_CMD_LENGTH = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: 16,
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: None,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: None,
}
_RP_LENGTH = {
    RpType.SHUT: 4,
    RpType.PONG: 4,
    RpType.REQ_PAGES_ID: None,
    RpType.REQ_PAGES: 12,
    RpType.RECV_BITMAP: None,
    RpType.RESUME_ACK: 4,
}


class _Buffered:
    """The buffering shared by both decoders: a current buffer plus pending chunks."""

    def __init__(self) -> None:
        self._buf = b""            # bytes or memoryview of an immutable bytes chunk
        self._mv = memoryview(b"")
        self._pos = 0              # next unread byte of _buf
        self._base = 0             # stream offset of _buf[0]
        self._chunks: deque = deque()
        self._pending = 0          # bytes in _chunks
        self._error: ProtocolError | None = None

    def feed(self, data) -> None:
        """Add bytes received from the peer (any size, including empty)."""
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer
        self._chunks.append(data)
        self._pending += len(data)

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far (the offset of the next item)."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        """Bytes fed but not consumed yet."""
        return len(self._buf) - self._pos + self._pending

    def _ensure(self, n: int) -> bool:
        """Make at least ``n`` unread bytes contiguous in ``_buf``; False if not fed yet."""
        buf = self._buf
        avail = len(buf) - self._pos
        if avail >= n:
            return True
        if avail + self._pending < n:
            return False
        chunks = self._chunks
        self._base += self._pos
        if avail == 0 and len(chunks[0]) >= n:
            # Common case: the next chunk holds the whole item: use it in place.
            new = chunks.popleft()
            self._pending -= len(new)
        else:
            # Assemble exactly the n bytes of this item; the rest of the chunk stays in place.
            parts = [self._mv[self._pos:]] if avail else []
            need = n - avail
            while need:
                c = chunks[0]
                if len(c) <= need:
                    parts.append(c)
                    chunks.popleft()
                    need -= len(c)
                    self._pending -= len(c)
                else:
                    cm = memoryview(c)
                    parts.append(cm[:need])
                    chunks[0] = cm[need:]
                    self._pending -= need
                    need = 0
            new = b"".join(parts)
        self._buf = new
        self._mv = memoryview(new)
        self._pos = 0
        return True

    def _fail(self, problem: str, section: str, offset: int):
        self._error = ProtocolError(problem, section=section, offset=offset)
        raise self._error

    def events(self) -> Iterator:
        """Yield events until the decoder needs more data (each decoder defines ``next_event``)."""
        nxt = self.next_event
        while True:
            ev = nxt()
            if ev is NEED_DATA:
                return
            yield ev


def _check_name(raw: bytes, what: str, fail, offset: int) -> str:
    if b"\0" in raw:
        fail(f"{what} {raw!r} contains a NUL byte", offset)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        fail(f"{what} {raw!r} is not valid UTF-8", offset)


# Stream decoder phases
_P_HEADER, _P_SECTION, _P_RAM, _P_DONE, _P_BLOCKS = range(5)


class StreamDecoder(_Buffered):
    """Decoder of the main stream (source -> destination).

    Events: :class:`Header`, :class:`Blocks`, per RAM section its
    :class:`RamPage`/:class:`RamZero` records then :class:`RamEnd`,
    :class:`State`, the command messages, :class:`Eof`.

    ``RamPage.data`` is a memoryview into the decoder's buffer, valid only until
    the next ``feed()``: copy whatever you keep.
    """

    def __init__(self, *, joining: dict[str, BlockInfo] | None = None) -> None:
        """``joining``: decode a second connection of a migration whose main stream announced these
        blocks: its first section says what it is, PREEMPT (the preempt channel: RAM sections and EOF
        only) or RESUME (a new main stream after a failure: RECV_BITMAP commands, POSTCOPY_RESUME,
        then RAM sections and EOF)."""
        super().__init__()
        self._phase = _P_HEADER
        self.joining = joining is not None
        #: The joining connection's PREEMPT or RESUME event, once decoded.
        self.marker: PreemptChannel | Resume | None = None
        self.blocks: dict[str, BlockInfo] = {}
        self._by_raw: dict[bytes, BlockInfo] = {}
        self.state = PostcopyState.NONE
        self._cur_name: str | None = None  # block of the previous record in this RAM section
        self._cur_len = 0
        #: The main stream's ID section (NO_MIGRATION_ID if the section after BLOCKS is another one);
        #: None until that section has been seen (and on a joining connection).
        self.migration: MigrationId | None = None
        if joining:
            self.blocks = dict(joining)
            self._by_raw = {b.name.encode("utf-8"): b for b in joining.values()}

    @property
    def preempt(self) -> bool:
        """A preempt channel (its PREEMPT section decoded)."""
        return type(self.marker) is PreemptChannel

    @property
    def resumed(self) -> bool:
        """A resumed main stream (its RESUME section decoded)."""
        return type(self.marker) is Resume

    @property
    def finished(self) -> bool:
        """True once EOF has been decoded."""
        return self._phase == _P_DONE

    # -- dispatch ----------------------------------------------------------
    def events(self) -> Iterator:
        """Yield events until the decoder needs more data.

        Runs of PAGE|CONTINUE records are decoded in a tight inner loop.
        """
        nxt = self.next_event
        unpack = _unpack_q
        while True:
            if self._phase == _P_RAM and self._error is None:
                buf = self._buf
                mv = self._mv
                pos = self._pos
                end = len(buf)
                name = self._cur_name
                clen = self._cur_len
                while end - pos >= 4104:
                    v = unpack(buf, pos)[0]
                    if v & 0xFFF != 0x28 or v ^ 0x28 >= clen:
                        break
                    r = _new(RamPage)
                    _set_block(r, name)
                    _set_offset(r, v ^ 0x28)
                    _set_data(r, mv[pos + 8:pos + 4104])
                    pos += 4104
                    self._pos = pos
                    yield r
                    if self._pos != pos or self._buf is not buf:
                        break  # next_event() was called meanwhile: reload
            ev = nxt()
            if ev is NEED_DATA:
                return
            yield ev

    def next_event(self):
        """The next event, or :data:`NEED_DATA`."""
        if self._error is not None:
            raise self._error
        if self._phase == _P_RAM:
            return self._ram_record()
        if self._phase == _P_SECTION:
            return self._section()
        if self._phase == _P_HEADER:
            return self._header()
        if self._phase == _P_BLOCKS:
            return self._block_entries()
        if self.buffered:
            self._fail("data after EOF", "stream", self.offset)
        return NEED_DATA

    def _header(self):
        if not self._ensure(8):
            return NEED_DATA
        magic, version = _unpack_ii(self._buf, self._pos)
        if magic != MAGIC:
            self._fail(f"bad magic {magic:#010x} (expected {MAGIC:#010x})", "header", self.offset)
        if version != VERSION:
            self._fail(f"unsupported version {version} (expected {VERSION})", "header", self.offset + 4)
        self._pos += 8
        self._phase = _P_SECTION
        return Header(version)

    def _section(self):
        if not self._ensure(1):
            return NEED_DATA
        kind = self._buf[self._pos]
        start = self.offset
        if self.joining:
            if self.marker is None:
                return self._joining_marker(kind, start)
            if self.preempt and kind not in (Section.RAM, Section.EOF):
                self._fail(f"section {kind:#04x}: the preempt channel carries only RAM sections and EOF",
                           "preempt channel", start)
            if self.resumed and kind not in (Section.RAM, Section.COMMAND, Section.EOF):
                self._fail(f"section {kind:#04x}: a resumed main stream carries only commands, RAM sections "
                           f"and EOF", "resumed stream", start)
            if self.resumed and kind == Section.RAM and self.state is not PostcopyState.RUNNING:
                self._fail("RAM section before POSTCOPY_RESUME", "resumed stream", start)
        elif kind == Section.PREEMPT:
            self._fail("preempt channel marker on the main stream", "stream", start)
        elif kind == Section.RESUME:
            self._fail("RESUME section on a stream that began with BLOCKS", "stream", start)
        if kind == Section.ID:
            return self._migration_id(start)
        if self.migration is None and self.blocks and not self.joining:
            self.migration = NO_MIGRATION_ID   # no ID section right after BLOCKS
        if kind == Section.RAM:
            self._require_blocks("RAM section", start)
            self._pos += 1
            self._phase = _P_RAM
            self._cur_name = None
            self._cur_len = 0
            return self._ram_record()
        if kind == Section.COMMAND:
            return self._command(start)
        if kind == Section.BLOCKS:
            return self._blocks(start)
        if kind == Section.STATE:
            return self._state(start)
        if kind == Section.EOF:
            self._require_blocks("EOF section", start)
            self.state = self._transition("EOF", "EOF section", start)
            self._pos += 1
            self._phase = _P_DONE
            return Eof()
        self._fail(f"unknown section type {kind:#04x}", "stream", start)

    def _joining_marker(self, kind: int, start: int):
        """The first section of a joining connection: PREEMPT or RESUME, each with the migration id."""
        if kind not in (Section.PREEMPT, Section.RESUME):
            self._fail(f"section {kind:#04x} where a second connection's PREEMPT (0x20) or RESUME (0x21) "
                       f"section belongs", "joining connection", start)
        if not self._ensure(1 + MIGRATION_ID_LENGTH):
            return NEED_DATA
        ident = bytes(self._mv[self._pos + 1:self._pos + 1 + MIGRATION_ID_LENGTH])
        self._pos += 1 + MIGRATION_ID_LENGTH
        if kind == Section.PREEMPT:
            self.marker = PreemptChannel(ident)
        else:
            self.marker = Resume(ident)
            # the migration is paused until this stream's POSTCOPY_RESUME
            self.state = PostcopyState.PAUSED
        return self.marker

    def _require_blocks(self, section: str, start: int) -> None:
        if not self.blocks:
            self._fail("BLOCKS must be the first section", section, start)

    # -- ID ----------------------------------------------------------------
    def _migration_id(self, start: int):
        sec = "ID section"
        self._require_blocks(sec, start)
        if self.migration is not None:
            self._fail("ID sent twice" if self.migration is not NO_MIGRATION_ID else
                       "ID must come right after BLOCKS", sec, start)
        if not self._ensure(2 + MIGRATION_ID_LENGTH):
            return NEED_DATA
        pos = self._pos
        channels = self._buf[pos + 1 + MIGRATION_ID_LENGTH]
        if channels > 1:
            self._fail(f"{channels} preempt channels announced (a source opens 0 or 1)", sec, start)
        self.migration = MigrationId(bytes(self._mv[pos + 1:pos + 1 + MIGRATION_ID_LENGTH]), channels)
        self._pos = pos + 2 + MIGRATION_ID_LENGTH
        return self.migration

    # -- BLOCKS ------------------------------------------------------------
    def _blocks(self, start: int):
        sec = "BLOCKS section"
        if self.blocks:
            self._fail("BLOCKS sent twice", sec, start)
        if not self._ensure(3):
            return NEED_DATA
        (count,) = _unpack_h(self._buf, self._pos + 1)
        if count == 0:
            self._fail("block count is 0", sec, start)
        self._pos += 3
        self._blk_remaining = count
        self._blk_list = []
        self._blk_raw = {}
        self._phase = _P_BLOCKS
        return self._block_entries()

    def _block_entries(self):
        """Parse (and consume) block entries one by one, so a slowly arriving section is never re-joined."""
        sec = "BLOCKS section"
        fail = lambda p, off: self._fail(p, sec, off)  # noqa: E731
        blocks = self._blk_list
        by_raw = self._blk_raw
        while self._blk_remaining:
            entry = self.offset
            if not self._ensure(1):
                return NEED_DATA
            n = self._buf[self._pos]
            if n == 0:
                fail(f"block {len(blocks)}: name length is 0", entry)
            if not self._ensure(1 + n + 16):
                return NEED_DATA
            p = self._pos
            raw = bytes(self._mv[p + 1:p + 1 + n])
            name = _check_name(raw, f"block {len(blocks)}: name", fail, entry)
            if raw in by_raw:
                fail(f"block name {name!r} appears twice", entry)
            length, page_size = _unpack_qq(self._buf, p + 1 + n)
            if page_size < TARGET_PAGE_SIZE or page_size & (page_size - 1):
                fail(f"block {name!r}: page size {page_size} is not a power of two >= {TARGET_PAGE_SIZE}", entry)
            if length == 0 or length % page_size:
                fail(f"block {name!r}: length {length} is not a positive multiple of its page size "
                     f"{page_size}", entry)
            info = BlockInfo(name, length, page_size)
            blocks.append(info)
            by_raw[raw] = info
            self._pos = p + 1 + n + 16
            self._blk_remaining -= 1
        self._phase = _P_SECTION
        self._by_raw = by_raw
        self.blocks = {b.name: b for b in blocks}
        self._blk_list = self._blk_raw = None
        return Blocks(tuple(blocks))

    # -- RAM ---------------------------------------------------------------
    def _ram_record(self):
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < 8:
            if not self._ensure(8):
                return NEED_DATA
            buf = self._buf
            pos = self._pos
        v = _unpack_q(buf, pos)[0]
        flags = v & 0xFFF
        if flags == 0x28:  # PAGE | CONTINUE: the hot path
            off = v ^ 0x28
            if off >= self._cur_len:
                return self._ram_bad(v, pos)
            end = pos + 4104
            if end > len(buf):
                if not self._ensure(4104):
                    return NEED_DATA
                pos = self._pos
                end = pos + 4104
            self._pos = end
            return _ram_page(self._cur_name, off, self._mv[pos + 8:end])
        return self._ram_slow(v, flags, pos)

    def _ram_bad(self, v: int, pos: int):
        return self._ram_slow(v, v & 0xFFF, pos)

    def _ram_slow(self, v: int, flags: int, pos: int):
        sec = "RAM section"
        start = self._base + pos
        fail = lambda p: self._fail(p, sec, start)  # noqa: E731
        if flags & ~RAM_FLAGS_KNOWN:
            fail(f"unknown RAM record flags {flags & ~RAM_FLAGS_KNOWN:#x} (record {v:#018x})")
        if flags & _EOS:
            if flags != _EOS:
                fail(f"EOS combined with other flags (record {v:#018x})")
            if v != _EOS:
                fail(f"EOS record with nonzero offset (record {v:#018x})")
            self._pos = pos + 8
            self._phase = _P_SECTION
            self._cur_name = None
            self._cur_len = 0
            return RamEnd()
        kind = flags & (_PAGE | _ZERO)
        if kind == 0:
            fail(f"RAM record carries neither PAGE, ZERO nor EOS (record {v:#018x})")
        if kind == _PAGE | _ZERO:
            fail(f"RAM record carries both PAGE and ZERO (record {v:#018x})")
        off = v & ~0xFFF
        body = 4096 if kind == _PAGE else 1
        if flags & _CONT:
            if self._cur_name is None:
                fail("CONTINUE in the first record of a RAM section")
            hdr = 8
            name = self._cur_name
            length = self._cur_len
        else:
            if not self._ensure(9):
                return NEED_DATA
            pos = self._pos
            n = self._buf[pos + 8]
            if n == 0:
                fail("RAM record block name length is 0")
            if not self._ensure(9 + n):
                return NEED_DATA
            pos = self._pos
            raw = bytes(self._mv[pos + 9:pos + 9 + n])
            info = self._by_raw.get(raw)
            if info is None:
                fail(f"unknown block {raw.decode('utf-8', 'replace')!r}")
            hdr = 9 + n
            name = info.name
            length = info.length
        if off >= length:
            fail(f"offset {off:#x} is beyond the end of block {name!r} ({length:#x} bytes)")
        if not self._ensure(hdr + body):
            return NEED_DATA
        pos = self._pos
        if kind == _ZERO and self._buf[pos + hdr]:
            fail(f"ZERO record for page {off:#x} of block {name!r} has fill byte {self._buf[pos + hdr]:#04x} "
                 f"(it must be 0)")
        self._cur_name = name
        self._cur_len = length
        self._pos = pos + hdr + body
        if kind == _PAGE:
            return RamPage(name, off, self._mv[pos + hdr:pos + hdr + 4096])
        return RamZero(name, off)

    # -- STATE -------------------------------------------------------------
    def _state(self, start: int):
        sec = "STATE section"
        self._require_blocks(sec, start)
        self._transition("STATE", sec, start)
        if not self._ensure(5):
            return NEED_DATA
        (length,) = _unpack_i(self._buf, self._pos + 1)
        if length > MAX_STATE_LENGTH:
            self._fail(f"STATE length {length} exceeds the {MAX_STATE_LENGTH}-byte limit", sec, start)
        if not self._ensure(5 + length):
            return NEED_DATA
        pos = self._pos
        data = bytes(self._mv[pos + 5:pos + 5 + length])
        self._pos = pos + 5 + length
        return State(data)

    def _transition(self, event: str, section: str, start: int) -> PostcopyState:
        """The state ``event`` leads to (codec.states.TRANSITIONS); a refusal is sticky like every error."""
        try:
            return transition(self.state, event, section=section, offset=start)
        except ProtocolError as e:
            self._error = e
            raise

    # -- COMMAND -----------------------------------------------------------
    def _command(self, start: int):
        if not self._ensure(5):
            return NEED_DATA
        _, cmd, length = _unpack_bhh(self._buf, self._pos)
        try:
            cmd = Command(cmd)
        except ValueError:
            self._fail(f"unknown command {cmd}", "COMMAND section", start)
        sec = f"COMMAND {cmd.name}"
        fail = lambda p: self._fail(p, sec, start)  # noqa: E731
        self._require_blocks(sec, start)
        want = _CMD_LENGTH[cmd]
        if want is not None and length != want:
            fail(f"payload length {length} (expected {want})")
        nxt = self._transition(cmd.name, sec, start)
        if not self._ensure(5 + length):
            return NEED_DATA
        pos = self._pos + 5
        buf = self._buf
        if cmd is Command.POSTCOPY_RAM_DISCARD:
            ev = self._discard(bytes(self._mv[pos:pos + length]), fail)
        elif cmd is Command.PING:
            ev = Ping(_unpack_i(buf, pos)[0])
        elif cmd is Command.POSTCOPY_ADVISE:
            ev = PostcopyAdvise(*_unpack_qq(buf, pos))
        elif cmd is Command.POSTCOPY_LISTEN:
            ev = PostcopyListen()
        elif cmd is Command.POSTCOPY_RUN:
            ev = PostcopyRun()
        elif cmd is Command.OPEN_RETURN_PATH:
            ev = OpenReturnPath()
        elif cmd is Command.POSTCOPY_RESUME:
            ev = PostcopyResume()
        else:  # RECV_BITMAP
            if length < 2 or buf[pos] != length - 1:
                fail(f"payload length {length} does not match the name length")
            ev = RecvBitmapRequest(self._lookup(bytes(self._mv[pos + 1:pos + length]), fail).name)
        self._pos = pos + length
        self.state = nxt
        return ev

    def _lookup(self, raw: bytes, fail) -> BlockInfo:
        info = self._by_raw.get(raw)
        if info is None:
            fail(f"unknown block {raw.decode('utf-8', 'replace')!r}")
        return info

    def _discard(self, p: bytes, fail) -> PostcopyRamDiscard:
        if len(p) < 2:
            fail(f"payload of {len(p)} bytes is too short")
        if p[0] != 0:
            fail(f"unsupported discard version {p[0]} (expected 0)")
        n = p[1]
        if n == 0:
            fail("block name length is 0")
        if 2 + n + 1 > len(p):
            fail(f"name length {n} runs beyond the {len(p)}-byte payload")
        if p[2 + n] != 0:
            fail("block name is not followed by its 0 terminator")
        info = self._lookup(p[2:2 + n], fail)
        rest = len(p) - 3 - n
        if rest <= 0 or rest % 16:
            fail(f"{rest} bytes of ranges is not a positive multiple of 16")
        ranges = []
        for i in range(3 + n, len(p), 16):
            s, ln = _unpack_qq(p, i)
            if s % TARGET_PAGE_SIZE or ln % TARGET_PAGE_SIZE:
                fail(f"range ({s:#x}, {ln:#x}) is not aligned to {TARGET_PAGE_SIZE}")
            if ln == 0:
                fail(f"range at {s:#x} has length 0")
            if s + ln > info.length:
                fail(f"range ({s:#x}, {ln:#x}) goes beyond the end of block {info.name!r} ({info.length:#x} bytes)")
            ranges.append((s, ln))
        return PostcopyRamDiscard(info.name, tuple(ranges))


class ReturnPathDecoder(_Buffered):
    """Decoder of the return path (destination -> source), run by the source.

    Page requests come out as :class:`ReqPagesId` whether sent as REQ_PAGES_ID
    or REQ_PAGES (the block is the one of the previous REQ_PAGES_ID).
    """

    def __init__(self, blocks: dict[str, BlockInfo] | Iterable[BlockInfo]) -> None:
        super().__init__()
        infos = list(blocks.values()) if isinstance(blocks, dict) else list(blocks)
        self.blocks = {b.name: b for b in infos}
        self._by_raw = {b.name.encode("utf-8"): b for b in infos}
        self._last_block: BlockInfo | None = None

    def next_event(self):
        if self._error is not None:
            raise self._error
        if not self._ensure(4):
            return NEED_DATA
        kind, length = _unpack_hh(self._buf, self._pos)
        start = self.offset
        try:
            kind = RpType(kind)
        except ValueError:
            self._fail(f"unknown message type {kind}", "return path", start)
        sec = f"return path {kind.name}"
        fail = lambda p: self._fail(p, sec, start)  # noqa: E731
        want = _RP_LENGTH[kind]
        if want is not None and length != want:
            fail(f"length {length} (expected {want})")
        if kind is RpType.REQ_PAGES_ID and length < 14:
            fail(f"length {length} is too short for REQ_PAGES_ID")
        if kind is RpType.RECV_BITMAP and length < 2:
            fail(f"length {length} is too short for RECV_BITMAP")
        if not self._ensure(4 + length):
            return NEED_DATA
        buf = self._buf
        pos = self._pos + 4
        if kind is RpType.REQ_PAGES_ID or kind is RpType.REQ_PAGES:
            rstart, rlen = _unpack_qi(buf, pos)
            if kind is RpType.REQ_PAGES_ID:
                n = buf[pos + 12]
                if n != length - 13:
                    fail(f"name length {n} does not match the message length {length}")
                raw = bytes(self._mv[pos + 13:pos + length])
                info = self._by_raw.get(raw)
                if info is None:
                    fail(f"unknown block {raw.decode('utf-8', 'replace')!r}")
            else:
                info = self._last_block
                if info is None:
                    fail("REQ_PAGES before any REQ_PAGES_ID")
            ps = info.page_size
            if rstart % ps:
                fail(f"start {rstart:#x} is not aligned to the page size {ps:#x} of block {info.name!r}")
            if rlen == 0 or rlen % ps:
                fail(f"length {rlen:#x} is not a positive multiple of the page size {ps:#x} of block {info.name!r}")
            if rstart + rlen > info.length:
                fail(f"request ({rstart:#x}, {rlen:#x}) goes beyond the end of block {info.name!r} "
                     f"({info.length:#x} bytes)")
            self._last_block = info
            self._pos = pos + length
            return ReqPagesId(info.name, rstart, rlen)
        if kind is RpType.SHUT:
            ev = Shut(_unpack_i(buf, pos)[0])
        elif kind is RpType.PONG:
            ev = Pong(_unpack_i(buf, pos)[0])
        elif kind is RpType.RESUME_ACK:
            ev = ResumeAck(_unpack_i(buf, pos)[0])
        else:  # RECV_BITMAP: name in the message, then size + bitmap + trailer outside its length
            n = buf[pos]
            if n != length - 1:
                fail(f"name length {n} does not match the message length {length}")
            raw = bytes(self._mv[pos + 1:pos + length])
            info = self._by_raw.get(raw)
            if info is None:
                fail(f"unknown block {raw.decode('utf-8', 'replace')!r}")
            if not self._ensure(4 + length + 8):
                return NEED_DATA
            pos = self._pos + 4 + length
            (size,) = _unpack_q(self._buf, pos)
            expect = (info.length // TARGET_PAGE_SIZE + 63) // 64 * 8
            if size != expect:
                fail(f"bitmap size {size} does not match block {info.name!r} (expected {expect})")
            if not self._ensure(4 + length + 8 + size + 8):
                return NEED_DATA
            pos = self._pos + 4 + length + 8
            bitmap = bytes(self._mv[pos:pos + size])
            (ending,) = _unpack_q(self._buf, pos + size)
            if ending != RECV_BITMAP_ENDING:
                fail(f"bad bitmap trailer {ending:#018x} (expected {RECV_BITMAP_ENDING:#018x})")
            self._pos = pos + size + 8
            return RecvBitmap(info.name, bitmap)
        self._pos = pos + length
        return ev
