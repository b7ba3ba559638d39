"""The hand-over between a decoder and a native fast path (codec.PumpedDecoder), without the native code.

A stand-in for each native side, written from the wire layout (DESIGN.md section 4), consumes what the
real one would (the pump: PAGE|CONTINUE / ZERO|CONTINUE records of the current block, receiving more as
it goes; the request server: REQ_PAGES(_ID) messages) and stops at anything else.  Driven as the
destination's receive loop and the source's request thread drive the real ones, over streams fed whole,
byte by byte, in odd pieces and with trailing bytes, every item must come out once, in order, from one
side or the other, and the stream offset must end where the bytes end (commit fb7d9fe lost bytes here).
"""
from __future__ import annotations

import random
import struct

import pytest

from postcopy_cli.codec import (BlockInfo, Blocks, Eof, Header, PostcopyAdvise, PumpedDecoder, RamEnd, RamPage,
                                RamFlag, RamSectionEncoder, RamZero, ReqPagesId, ReturnPathDecoder, Shut, StreamDecoder,
                                encode, encode_rp)
from postcopy_cli.codec.messages import Pong, ReqPages
from postcopy_cli.errors import ProtocolError

TP = 4096
SMALL = BlockInfo("pc.ram", 64 * TP, TP)
HUGE = BlockInfo("huge", 4 * 0x200000, 0x200000)
_BE64 = struct.Struct(">Q")
PAGE_CONT = int(RamFlag.PAGE | RamFlag.CONTINUE)   # the two records the native pump takes
ZERO_CONT = int(RamFlag.ZERO | RamFlag.CONTINUE)


def _stream(trailing: bytes = b"") -> tuple[bytes, list]:
    """A main stream with RAM sections mixing both blocks, and the items a plain decoder yields for it."""
    enc = RamSectionEncoder()
    parts = [encode(Header()), encode(Blocks((SMALL, HUGE))), encode(PostcopyAdvise(0x200000, TP))]
    for sec in range(3):
        parts.append(enc.begin())
        for i in range(20):
            if sec == 1 and 8 <= i < 12:   # a run of the huge-page block in the middle of a section
                parts.append(enc.page("huge", 0x200000 + (i - 8) * TP, bytes([i, sec, 0xee]) * (TP // 3) + b"h"))
            elif i % 5 == 3:
                parts.append(enc.zero("pc.ram", (sec * 20 + i) * TP % SMALL.length))
            else:
                parts.append(enc.page("pc.ram", (sec * 20 + i) * TP % SMALL.length, bytes([i, sec]) * (TP // 2)))
        parts.append(enc.end())
    parts.append(encode(Eof()))
    stream = b"".join(parts)
    ref = StreamDecoder()
    ref.feed(stream)
    return stream + trailing, [_key(e) for e in ref.events()]


def _key(ev):
    if type(ev) is RamPage:
        return ("page", ev.block, ev.offset, bytes(ev.data))
    if type(ev) is RamZero:
        return ("zero", ev.block, ev.offset)
    return ev


class _Peer:
    """The bytes still to arrive, handed out in pieces of at most ``piece`` bytes."""

    def __init__(self, data: bytes, piece: int | None):
        self.data = data
        self.pos = 0
        self.piece = piece or len(data)
        self.rng = random.Random(len(data) ^ self.piece)

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data) - self.pos, self.piece if self.piece > 1 else 1)
        if self.piece > 1 and self.piece != len(self.data):
            n = min(n, self.rng.randint(1, self.piece))   # odd pieces
        view[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def _fake_pump(pd: PumpedDecoder, peer: _Peer, out: list) -> int:
    """What native/dest_pump.c does with the lent bytes: consume whole PAGE|CONTINUE and ZERO|CONTINUE
    records of the current block, receive more into buffer[span end:] as they run out, stop at anything
    else or when the peer has nothing more for now.  Returns (bytes consumed, stopped at an item)."""
    buf, span, block = pd.buffer, pd.span, pd.block
    length = SMALL.length if block == "pc.ram" else HUGE.length
    consumed = 0
    while True:
        start, end = span
        while end - start >= 8:
            v = _BE64.unpack_from(buf, start)[0]
            flags, off = v & 0xFFF, v & ~0xFFF
            if off >= length or flags not in (PAGE_CONT, ZERO_CONT):
                return consumed, True   # for the codec (PC_PUMP_STOP)
            size = 8 + (TP if flags == PAGE_CONT else 1)
            if end - start < size:
                break
            if flags == ZERO_CONT and buf[start + 8]:
                return consumed, True   # a nonzero fill byte: the codec names the error
            out.append(("page", block, off, bytes(buf[start + 8:start + size])) if flags == PAGE_CONT
                       else ("zero", block, off))
            start += size
            consumed += size
            span[0] = start
        if start == end:
            span[0] = span[1] = start = end = 0
        elif len(buf) - end < 8 + TP + 256:
            buf[:end - start] = buf[start:end]
            span[0], span[1] = start, end = 0, end - start
        n = peer.recv_into(buf[end:])
        if n == 0:
            return consumed, False   # the real pump would time out or see EOF here
        span[1] = end + n


def _receive_loop(stream: bytes, piece: int | None, capacity: int):
    """dest/channel.py's receive loop with the stand-in pump: returns what came out, in order."""
    pd = PumpedDecoder(StreamDecoder(), capacity)
    peer = _Peer(stream, piece)
    out: list = []
    counts = {"pumped": 0, "lends": 0}
    while not pd.decoder.finished:
        if pd.lent:
            before = len(out)
            consumed, stopped = _fake_pump(pd, peer, out)
            pd.take_back(consumed, stopped=stopped)
            counts["pumped"] += len(out) - before
        elif not pd.receive(peer.recv_into):
            break
        for ev in pd.events():
            out.append(_key(ev))
            if type(ev) is RamPage and ev.block == "pc.ram":
                break   # as the channel does: the rest of the section may go the fast way
            if type(ev) is Eof:
                return out, pd, counts, peer
        if pd.block == "pc.ram" and pd.lend() is not None:   # the pump takes target-page blocks only
            counts["lends"] += 1
    return out, pd, counts, peer


@pytest.mark.parametrize("piece,capacity", [(None, 1 << 20), (1, 1 << 20), (1, 2 * (8 + TP) + 300),
                                            (3000, 1 << 20), (9000, 2 * (8 + TP) + 300), (70000, 1 << 16)],
                         ids=["whole", "byte-by-byte", "byte-by-byte-small-buffer", "pieces", "pieces-small-buffer",
                              "large-pieces"])
def test_stream_hand_over_loses_and_repeats_nothing(piece, capacity):
    stream, want = _stream()
    got, pd, counts, _ = _receive_loop(stream, piece, capacity)
    assert got == want
    assert pd.decoder.finished and pd.decoder.offset == len(stream) and pd.undecoded == 0
    assert counts["pumped"] > 0 and counts["lends"] > 0   # the hand-over really happened


@pytest.mark.parametrize("piece", [None, 1, 5000])
def test_stream_trailing_bytes_after_eof_are_an_error_at_their_offset(piece):
    stream, want = _stream(trailing=b"\x01\x02\x03")
    got, pd, _, peer = _receive_loop(stream, piece, 1 << 20)
    assert got == want
    while pd.receive(peer.recv_into):   # whatever followed EOF reaches the decoder
        pass
    assert pd.undecoded == 3
    with pytest.raises(ProtocolError, match="data after EOF") as e:
        pd.decoder.next_event()
    assert e.value.offset == len(stream) - 3


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 100, 4103])
def test_stream_cut_inside_a_record_keeps_every_byte(cut):
    """A stream that stops inside a CONTINUE record: its bytes are lent, taken back and lent again,
    never dropped; offset + undecoded is always what arrived."""
    stream, _ = _stream()
    first = stream.index(b"\x02", len(encode(Header())) + len(encode(Blocks((SMALL, HUGE)))))  # first RAM section
    # the end of the section's second record (the first CONTINUE one) plus `cut` bytes of the next
    upto = first + 1 + 8 + 1 + len("pc.ram") + TP + 8 + TP + cut
    pd = PumpedDecoder(StreamDecoder(), 1 << 20)
    peer = _Peer(stream[:upto], None)
    out: list = []
    pd.receive(peer.recv_into)
    for ev in pd.events():
        if type(ev) is RamPage:
            break
    assert pd.lend() == upto - pd.decoder.offset
    consumed, stopped = _fake_pump(pd, peer, out)
    assert not stopped
    pd.take_back(consumed)
    assert len(out) == 1                      # the CONTINUE page
    assert pd.decoder.offset + pd.undecoded == upto
    assert pd.lend() == pd.undecoded == upto - pd.decoder.offset
    assert bytes(pd.buffer[pd.span[0]:pd.span[1]]) == stream[pd.decoder.offset:upto]
    pd.take_back(0)
    assert pd.decoder.offset + pd.decoder.buffered == upto
    pd.feed(stream[upto:])   # the rest arrives: the decoder goes on from the kept bytes
    keys = [_key(e) for e in pd.events()]
    _, want = _stream()
    assert keys[-1] == Eof() and pd.decoder.offset == len(stream)
    assert keys == want[want.index(out[0]) + 1:]


def test_nothing_may_touch_lent_bytes():
    """fb7d9fe: bytes moved into the receive buffer, then overwritten by the next receive. Now refused."""
    stream, _ = _stream()
    pd = PumpedDecoder(StreamDecoder(), 1 << 20)
    pd.receive(_Peer(stream[:30000], None).recv_into)
    for ev in pd.events():
        if type(ev) is RamPage:
            break
    assert pd.lend() is not None
    for call in (lambda: pd.receive(lambda v: 0), lambda: pd.feed(b"x"), lambda: pd.events(), pd.lend):
        with pytest.raises(RuntimeError, match="lent"):
            call()
    pd.take_back(0)
    with pytest.raises(RuntimeError, match="without lend"):
        pd.take_back(0)


def test_lend_refuses_outside_a_ram_section_and_beyond_the_buffer():
    stream, _ = _stream()
    pd = PumpedDecoder(StreamDecoder(), 8 + TP)
    pd.feed(stream[:20])
    list(pd.events())
    assert pd.block is None and pd.lend() is None and not pd.lent   # before any RAM section
    pd.feed(stream[20:40000])
    for ev in pd.events():
        if type(ev) is RamPage:
            break
    assert pd.block == "pc.ram"
    held = pd.decoder.buffered
    assert held > len(pd.buffer)
    assert pd.lend() is None and not pd.lent and pd.decoder.buffered == held   # nothing moved


# ---- the return path: the request server's hand-over ------------------------------------------------
RP_BLOCKS = [SMALL, BlockInfo("vga", 16 * TP, TP)]


def _rp_stream() -> tuple[bytes, list]:
    msgs = [ReqPagesId("pc.ram", 0, TP), ReqPages(TP, 2 * TP), Pong(7), ReqPages(8 * TP, TP),
            ReqPagesId("vga", 3 * TP, TP), ReqPages(0, TP), Shut(0), ReqPagesId("pc.ram", 5 * TP, TP),
            ReqPages(6 * TP, TP), Pong(8)]
    data = b"".join(encode_rp(m) for m in msgs)
    ref = ReturnPathDecoder(RP_BLOCKS)
    ref.feed(data)
    return data, list(ref.events())


def _fake_server(pd: PumpedDecoder, peer: _Peer, out: list, rlen: int, block: str | None):
    """What native/source.c does: parse REQ_PAGES(_ID) at the start of rbuf[0, rlen), receive more after
    them, stop at anything else.  Bytes lent to it are an item the codec could not finish: it receives
    before it parses them (its need_more).  Returns (consumed, rlen, block)."""
    buf = pd.buffer
    consumed = 0
    if rlen:
        n = peer.recv_into(buf[rlen:])
        if n == 0:
            return consumed, rlen, block
        rlen += n
    while True:
        pos = 0
        for_codec = False
        while rlen - pos >= 4:
            kind, length = struct.unpack_from(">HH", buf, pos)
            if kind not in (3, 4) or (kind == 4 and block is None):
                for_codec = True
                break
            if rlen - pos < 4 + length:
                break
            start, size = struct.unpack_from(">QI", buf, pos + 4)
            if kind == 3:
                block = bytes(buf[pos + 17:pos + 4 + length]).decode()
            out.append(ReqPagesId(block, start, size))
            pos += 4 + length
        buf[:rlen - pos] = buf[pos:rlen]
        rlen -= pos
        consumed += pos
        if for_codec:
            return consumed, rlen, block   # PC_SERVE_CODEC
        n = peer.recv_into(buf[rlen:])
        if n == 0:
            return consumed, rlen, block   # (the real one waits; the test's peer has no more)
        rlen += n


@pytest.mark.parametrize("piece", [None, 1, 2, 13, 40])
def test_return_path_hand_over_loses_and_repeats_nothing(piece):
    data, want = _rp_stream()
    pd = PumpedDecoder(ReturnPathDecoder(RP_BLOCKS), 64)
    peer = _Peer(data, piece)
    pd.receive(peer.recv_into)     # the streaming thread read some before the server started
    out = [ev for ev in pd.events()]
    while True:
        block = pd.block
        n = pd.lend()
        assert n is not None
        consumed, rlen, block = _fake_server(pd, peer, out, n, block)
        pd.take_back(consumed, end=rlen, block=block)
        out += list(pd.events())
        if peer.pos == len(data) and pd.undecoded == 0:
            break
    assert out == want
    assert pd.decoder.offset == len(data)


def test_return_path_block_goes_both_ways():
    """REQ_PAGES refers to the block of the last REQ_PAGES_ID, wherever that one was decoded."""
    pd = PumpedDecoder(ReturnPathDecoder(RP_BLOCKS), 64)
    pd.feed(encode_rp(ReqPagesId("vga", 0, TP)))
    assert list(pd.events()) == [ReqPagesId("vga", 0, TP)]
    assert pd.block == "vga"
    assert pd.lend() == 0
    first, served = len(encode_rp(ReqPagesId("vga", 0, TP))), len(encode_rp(ReqPagesId("pc.ram", 0, TP)))
    pd.take_back(served, end=0, block="pc.ram")   # the server decoded a REQ_PAGES_ID for pc.ram
    assert pd.block == "pc.ram" and pd.decoder.offset == first + served
    pd.feed(encode_rp(ReqPages(TP, TP)))
    assert list(pd.events()) == [ReqPagesId("pc.ram", TP, TP)]
    pd.lend()
    pd.take_back(0, end=0, block=None)
    pd.feed(encode_rp(ReqPages(TP, TP)))
    with pytest.raises(ProtocolError, match="REQ_PAGES before any REQ_PAGES_ID"):
        list(pd.events())


def test_return_path_trailing_partial_message_stays():
    data, want = _rp_stream()
    tail = encode_rp(Pong(9))[:5]
    pd = PumpedDecoder(ReturnPathDecoder(RP_BLOCKS), 64)
    peer = _Peer(data + tail, 7)
    out: list = []
    while peer.pos < len(peer.data):
        n = pd.lend()
        consumed, rlen, block = _fake_server(pd, peer, out, n, pd.block)
        pd.take_back(consumed, end=rlen, block=block)
        out += list(pd.events())
    assert out == want
    assert pd.decoder.offset == len(data) and pd.undecoded == len(tail)
    assert pd.lend() == len(tail) and bytes(pd.buffer[:len(tail)]) == tail
