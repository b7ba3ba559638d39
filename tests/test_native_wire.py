"""The native wire layouts (native/wire.h) against the codec: the codec's (message, bytes) tables run through the
native encoders and decoders, which must give the same bytes, the same fields, or stop where the codec refuses
(the native code hands everything odd to the codec, which names the error)."""
from __future__ import annotations

import os
import random
import socket
import threading

import pytest

from postcopy_cli.codec import (NEED_DATA, BlockInfo, Blocks, Command, RamFlag, RamPage, RamSectionEncoder, RamZero,
                                ReqPages, ReqPagesId, ReturnPathDecoder, RpType, Section, StreamDecoder, encode)
from test_codec import BLOCKS, NAMED, P, PR, RAM, RP_REFUSALS, RP_TABLE, STREAM_REFUSALS, STREAM_TABLE

try:
    from postcopy_cli._native import ffi, lib
except ImportError:  # pragma: no cover - the native part is built by the install
    pytest.skip("native part not built", allow_module_level=True)

TP = 4096
PC_RAM = BLOCKS.blocks[0]   # pc.ram: 64 target pages
REQUEST_ROWS = [r for r in RP_TABLE if isinstance(r[2][0], (ReqPagesId, ReqPages))]


def test_constants_are_the_codecs():
    assert (lib.PC_RAM_ZERO, lib.PC_RAM_PAGE, lib.PC_RAM_EOS, lib.PC_RAM_CONTINUE) == \
        (RamFlag.ZERO, RamFlag.PAGE, RamFlag.EOS, RamFlag.CONTINUE)
    assert (lib.PC_RP_REQ_PAGES_ID, lib.PC_RP_REQ_PAGES) == (RpType.REQ_PAGES_ID, RpType.REQ_PAGES)
    assert (lib.PC_SECTION_COMMAND, lib.PC_CMD_POSTCOPY_RAM_DISCARD) == (Section.COMMAND, Command.POSTCOPY_RAM_DISCARD)


# ---- page requests ---------------------------------------------------------------------------

def native_request(start, length, name):
    out = ffi.new("uint8_t[]", lib.PC_WIRE_REQ_MAX)
    raw = name.encode() if name is not None else ffi.NULL
    n = lib.pc_wire_req_pages(out, start, length, raw, len(name.encode()) if name is not None else 0)
    return bytes(ffi.buffer(out, n))


def native_decode_request(data):
    buf = ffi.from_buffer(data)
    q = ffi.new("struct pc_wire_req *")
    n = lib.pc_wire_req_decode(buf, len(data), q)
    name = bytes(ffi.buffer(q.name, q.name_len)).decode() if n > 0 and q.name != ffi.NULL else None
    return n, q, name


@pytest.mark.parametrize("name,prelude,msgs,data,decoded", REQUEST_ROWS, ids=[r[0] for r in REQUEST_ROWS])
def test_request_rows(name, prelude, msgs, data, decoded):
    msg = msgs[0]
    assert native_request(msg.start, msg.length, msg.block if isinstance(msg, ReqPagesId) else None) == data
    n, q, got_name = native_decode_request(data)
    assert n == len(data)
    assert (q.start, q.len) == (msg.start, msg.length)
    assert got_name == (msg.block if isinstance(msg, ReqPagesId) else None)
    dec = ReturnPathDecoder(BLOCKS.blocks)
    dec.feed(prelude + data)
    events = list(dec.events())
    (ev,) = events[-1:]
    info = dec.blocks[ev.block]
    assert lib.pc_wire_req_fits(q, info.page_size, info.length) == 1
    # a prefix is "more bytes, please" to both
    for cut in range(len(data)):
        assert native_decode_request(data[:cut])[0] == 0
        part = ReturnPathDecoder(BLOCKS.blocks)
        part.feed(prelude)
        list(part.events())
        part.feed(data[:cut])
        assert part.next_event() is NEED_DATA


class Server:
    """The source's request server (native/source.c) over real sockets, blocks backed by buffers."""

    def __init__(self, blocks):
        self.rp_dest, self.rp_src = socket.socketpair()
        self.out, self.out_peer = socket.socketpair()
        self.quit = os.eventfd(0)
        self.srv = ffi.gc(lib.pc_src_new(self.rp_src.fileno(), self.out.fileno(), self.quit, 0), lib.pc_src_free)
        self.memory, self._keep = [], []
        rng = random.Random(7)
        for b in blocks:
            mem = bytearray(rng.randbytes(b.length))
            to_send = bytearray(b.length // TP)
            ptrs = [ffi.from_buffer(mem), ffi.from_buffer(to_send)]
            self._keep += [mem, to_send, ptrs]
            assert lib.pc_src_add_block(self.srv, b.name.encode(), b.length, b.page_size, ptrs[0], ptrs[1],
                                        ffi.NULL) >= 0
            self.memory.append(bytes(mem))
        self.sent = bytearray()
        self._reader = threading.Thread(target=self._read)
        self._reader.start()

    def _read(self):
        while chunk := self.out_peer.recv(1 << 20):
            self.sent += chunk

    def serve(self, data):
        """Send data on the return path, close it, and serve: (result, consumed, unparsed bytes)."""
        self.rp_dest.sendall(data)
        self.rp_dest.shutdown(socket.SHUT_WR)
        r = lib.pc_src_serve(self.srv)
        return r, self.srv.consumed, bytes(ffi.buffer(self.srv.rbuf, self.srv.rlen))

    def close(self):
        self.out.shutdown(socket.SHUT_WR)
        self._reader.join()
        for s in (self.rp_dest, self.rp_src, self.out, self.out_peer):
            s.close()
        os.close(self.quit)


@pytest.mark.parametrize("name,prelude,msgs,data,decoded", REQUEST_ROWS, ids=[r[0] for r in REQUEST_ROWS])
def test_request_server_answers_table_rows(name, prelude, msgs, data, decoded):
    srv = Server(BLOCKS.blocks)
    try:
        assert srv.serve(prelude + data) == (lib.PC_SERVE_EOF, len(prelude + data), b"")
    finally:
        srv.close()
    rp = ReturnPathDecoder(BLOCKS.blocks)
    rp.feed(prelude + data)
    requests = list(rp.events())
    # what went out is a run of RAM records the codec decodes as exactly the requested pages
    dec = StreamDecoder()
    dec.feed(P + b"\x02" + bytes(srv.sent) + b"\0" * 7 + b"\x10")
    pages = [ev for ev in dec.events() if isinstance(ev, RamPage)]
    want = []
    for q in requests:
        bi = list(BLOCKS.blocks).index(dec.blocks[q.block])
        want += [(q.block, o, srv.memory[bi][o:o + TP]) for o in range(q.start, q.start + q.length, TP)]
    assert [(p.block, p.offset, bytes(p.data)) for p in pages] == want


@pytest.mark.parametrize("name,prelude,bad,section,offset,problem", RP_REFUSALS, ids=[r[0] for r in RP_REFUSALS])
def test_request_server_stops_where_the_codec_refuses(name, prelude, bad, section, offset, problem):
    srv = Server(BLOCKS.blocks)
    try:
        r, consumed, rest = srv.serve(prelude + bad)
    finally:
        srv.close()
    assert (r, consumed) == (lib.PC_SERVE_CODEC, len(prelude))
    assert rest and bad.startswith(rest)


# ---- RAM records -----------------------------------------------------------------------------

def native_header(offset, kind, name):
    out = ffi.new("uint8_t[]", lib.PC_WIRE_RAM_HEADER_MAX)
    raw = name.encode() if name is not None else ffi.NULL
    n = lib.pc_wire_ram_header(out, offset, kind, raw, len(name.encode()) if name is not None else 0)
    return bytes(ffi.buffer(out, n))


def test_ram_headers_match_the_encoder():
    for kind, flag in ((lib.PC_RAM_PAGE, RamFlag.PAGE), (lib.PC_RAM_ZERO, RamFlag.ZERO)):
        for block, offset in (("pc.ram", 0), ("pc.ram", 0x3f000), ("x" * 255, 0xFFFFFFFFFFFFF000)):
            enc = RamSectionEncoder()
            assert native_header(offset, kind, block) == enc.record_header(block, offset, flag)
            assert native_header(offset, kind, None) == enc.record_header(block, offset, flag)


def ram_stream_rows():
    """(id, bytes of RAM records after the first named one) from the stream table"""
    for name, prelude, msgs, data, decoded in STREAM_TABLE:
        if data[:1] == bytes((Section.RAM,)) and msgs:
            first = len(encode_first(msgs[0]))
            yield name, data[1 + first:]


def encode_first(rec):
    enc = RamSectionEncoder()
    return enc.page(rec.block, rec.offset, rec.data) if isinstance(rec, RamPage) else enc.zero(rec.block, rec.offset)


class Dest:
    """The destination's placement (native/dest.c, dest_pump.c) on its own unregistered memory."""

    def __init__(self, blocks):
        self.d = ffi.gc(lib.pc_dest_new(-1, -1, 0), lib.pc_dest_free)
        self.memory, self._keep = [], []
        for b in blocks:
            mem = bytearray(b"\xee") * b.length   # nothing on the wire is 0xee pages
            p = ffi.from_buffer(mem)
            bi = lib.pc_dest_add_block(self.d, b.name.encode(), b.length, b.page_size)
            assert bi >= 0
            assert lib.pc_dest_add_segment(self.d, bi, 0, int(ffi.cast("uintptr_t", p)), b.length) == 0
            self.memory.append(mem)
            self._keep.append(p)

    def ram_fast(self, block, data):
        out = ffi.new("struct pc_ram_fast *")
        lib.pc_dest_ram_fast(self.d, block, ffi.from_buffer(data), len(data), out)
        return out


def codec_records(blocks, prelude_records, data):
    """The records the codec decodes from data, after prelude_records, until NEED_DATA or a non-CONTINUE one."""
    dec = StreamDecoder()
    dec.feed(encode_prelude(blocks) + b"\x02" + prelude_records)
    list(dec.events())
    base = dec.offset
    dec.feed(data)
    got = []
    while True:
        at = dec.offset - base
        if len(data) - at >= 8 and not data[at + 7] & RamFlag.CONTINUE:
            return got, at
        ev = dec.next_event()
        if ev is NEED_DATA:
            return got, at
        got.append((ev.offset, bytes(ev.data) if isinstance(ev, RamPage) else None))


def encode_prelude(blocks):
    from postcopy_cli.codec import Header
    return encode(Header()) + encode(Blocks(tuple(blocks)))


@pytest.mark.parametrize("name,data", list(ram_stream_rows()), ids=[r[0] for r in ram_stream_rows()])
def test_ram_continue_rows(name, data):
    """The table's CONTINUE records decode natively to the codec's fields; the next named record is the codec's."""
    first = next(r for r in STREAM_TABLE if r[0] == name)[2][0]
    got, stop = codec_records(BLOCKS.blocks, encode_first(first), data)
    pos, native = 0, []
    while True:
        off, kind = ffi.new("uint64_t *"), ffi.new("unsigned *")
        n = lib.pc_wire_ram_continue(ffi.from_buffer(data[pos:]), len(data) - pos, PC_RAM.length, off, kind)
        if n <= 0:
            break
        native.append((off[0], data[pos + 8:pos + 8 + TP] if kind[0] == lib.PC_RAM_PAGE else None))
        pos += n
    assert n == lib.PC_WIRE_CODEC and pos == stop
    assert native == got and got
    dest = Dest(BLOCKS.blocks)
    out = dest.ram_fast(0, data)
    assert (out.stop, out.error, out.consumed, out.records) == (1, 0, stop, len(got))
    for off, page in got:
        assert dest.memory[0][off:off + TP] == (page if page is not None else bytes(TP))


STREAM_RAM_REFUSALS = [r for r in STREAM_REFUSALS
                       if r[1] == PR + NAMED or (r[1] == PR and not r[2][7] & RamFlag.CONTINUE)]


@pytest.mark.parametrize("name,prelude,bad,section,offset,problem", STREAM_RAM_REFUSALS,
                         ids=[r[0] for r in STREAM_RAM_REFUSALS])
def test_ram_fast_path_hands_refusals_to_the_codec(name, prelude, bad, section, offset, problem):
    off, kind = ffi.new("uint64_t *"), ffi.new("unsigned *")
    assert lib.pc_wire_ram_continue(ffi.from_buffer(bad), len(bad), PC_RAM.length, off, kind) == lib.PC_WIRE_CODEC
    out = Dest(BLOCKS.blocks).ram_fast(0, bad)
    assert (out.stop, out.error, out.consumed, out.records) == (1, 0, 0, 0)


def random_section(rng, block, npages, count):
    """A RAM section of one block: a named first record, then CONTINUE runs, gaps, repeats and zero pages."""
    enc = RamSectionEncoder()
    parts, expect, page = [], {}, rng.randrange(npages)
    for i in range(count):
        page = page + 1 if rng.random() < 0.8 and page + 1 < npages else rng.randrange(npages)
        if rng.random() < 0.3:
            parts.append(enc.zero(block, page * TP))
            expect[page] = bytes(TP)
        else:
            data = rng.randbytes(TP)
            parts.append(enc.page(block, page * TP, data))
            expect[page] = data
    return parts[0], b"".join(parts[1:]), expect


@pytest.mark.parametrize("seed", range(4))
def test_ram_fast_path_matches_the_codec_on_random_sections(seed):
    rng = random.Random(seed)
    blocks = (BlockInfo("big", 600 * TP, TP),)
    first, rest, expect = random_section(rng, "big", 600, 700)   # runs longer than one native placement
    got, stop = codec_records(blocks, first, rest)
    assert stop == len(rest)
    for cut in (len(rest), len(rest) - 1, len(rest) // 2):
        out = Dest(blocks).ram_fast(0, rest[:cut])
        whole, at = codec_records(blocks, first, rest[:cut])
        assert (out.stop, out.error, out.consumed, out.records) == (0, 0, at, len(whole))
    placed = {}
    for off, page in got:
        placed[off // TP] = page if page is not None else bytes(TP)
    dest = Dest(blocks)
    dest.ram_fast(0, rest)
    for page, data in placed.items():
        assert dest.memory[0][page * TP:(page + 1) * TP] == data
    untouched = set(range(600)) - set(placed)
    assert all(dest.memory[0][p * TP:(p + 1) * TP] == b"\xee" * TP for p in untouched)


@pytest.mark.parametrize("named", [True, False])
def test_send_pages_matches_the_encoder(named):
    rng = random.Random(3)
    npages, offset = 300, 0x5000
    pages = [bytes(TP) if rng.random() < 0.3 else rng.randbytes(TP) for _ in range(npages)]
    data = b"".join(pages)
    a, b = socket.socketpair()
    got = bytearray()
    reader = threading.Thread(target=lambda: [got.extend(c) for c in iter(lambda: b.recv(1 << 20), b"")])
    reader.start()
    zeros = ffi.new("uint64_t *")
    try:
        w = lib.pc_src_send_pages(a.fileno(), ffi.from_buffer(data), offset, npages,
                                  b"pc.ram" if named else ffi.NULL, zeros)
    finally:
        a.shutdown(socket.SHUT_WR)
        reader.join()
        a.close()
        b.close()
    enc = RamSectionEncoder()
    if not named:
        enc.record_header("pc.ram", 0, RamFlag.PAGE)   # the block was named before
    want = b"".join(enc.zero("pc.ram", offset + i * TP) if p == bytes(TP) else enc.page("pc.ram", offset + i * TP, p)
                    for i, p in enumerate(pages))
    assert bytes(got) == want and w == len(want)
    assert zeros[0] == sum(p == bytes(TP) for p in pages)


# ---- POSTCOPY_RAM_DISCARD framing ------------------------------------------------------------

def test_discard_row_matches_the_table():
    (row,) = [r for r in STREAM_TABLE if r[0] == "discard"]
    msg, data = row[2][0], row[3]
    raw = msg.block.encode()
    out = ffi.new("uint8_t[]", 1024)
    head = lib.pc_wire_discard_head(out, raw, len(raw), len(msg.ranges))
    assert head == lib.pc_wire_discard_head_len(len(raw))
    for i, (start, length) in enumerate(msg.ranges):
        lib.pc_wire_discard_range(out + head + 16 * i, start, length)
    assert bytes(ffi.buffer(out, head + 16 * len(msg.ranges))) == data == encode(msg)
