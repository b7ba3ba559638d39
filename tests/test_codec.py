"""The wire codec: one table of (message, exact bytes) drives encode and decode; then one test per refusal."""
from __future__ import annotations

import struct

import pytest

from postcopy_cli.codec import (MAGIC, NEED_DATA, RECV_BITMAP_ENDING, BlockInfo, Blocks, Command, Eof, Header,
                                MigrationId, PreemptChannel, Resume,
                                OpenReturnPath, Ping, Pong, PostcopyAdvise, PostcopyListen, PostcopyRamDiscard,
                                PostcopyResume, PostcopyRun, PostcopyState, RamEnd, RamFlag, RamPage,
                                RamSectionEncoder, RamZero, RecvBitmap, RecvBitmapRequest, ReqPages, ReqPagesId,
                                ResumeAck, ReturnPathDecoder, Section, Shut, State, StreamDecoder, encode,
                                encode_ram_section, encode_rp)
from postcopy_cli.errors import LocalProtocolError, ProtocolError

h = bytes.fromhex


def be64(v):
    return struct.pack(">Q", v)


def be32(v):
    return struct.pack(">I", v)


def be16(v):
    return struct.pack(">H", v)


PAGE_A = bytes(range(256)) * 16
PAGE_B = b"\xab" * 4096

BLOCKS = Blocks((BlockInfo("pc.ram", 0x40000, 0x1000), BlockInfo("vga", 0x400000, 0x200000)))

# ---- reference bytes, derived by hand from QEMU's layouts ------------------------------------
HDR = h("50435059" "00000001")
BLK = h("01" "0002"
        "06" "7063 2e72 616d" "0000000000040000" "0000000000001000"
        "03" "766761" "0000000000400000" "0000000000200000")
P = HDR + BLK  # every stream row starts after these
# qemu_savevm_send_postcopy_advise: be64 page-size summary, be64 target page size
ADVISE = h("08" "0003" "0010" "0000000000201000" "0000000000001000")
OPEN_RP = h("08 0001 0000")
LISTEN = h("08 0004 0000")
RUN = h("08 0005 0000")
# qemu_savevm_send_postcopy_ram_discard for "pc.ram", ranges (0x1000,0x2000), (0x10000,0x1000)
DISCARD = h("08" "0006" "0029"
            "00" "06" "7063 2e72 616d" "00"
            "0000000000001000" "0000000000002000"
            "0000000000010000" "0000000000001000")
# A RAM section: named PAGE, CONTINUE PAGE, CONTINUE ZERO, named ZERO (other block), EOS
RAM = (h("02")
       + h("0000000000001008" "06 7063 2e72 616d") + PAGE_A
       + h("0000000000002028") + PAGE_B
       + h("0000000000003022" "00")
       + h("0000000000200002" "03 766761" "00")
       + h("0000000000000010"))
# section 0x04 ID right after BLOCKS: 16-byte migration id, u8 preempt channels
MIG_ID = bytes(range(0xa0, 0xb0))
ID = h("04" "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf" "01")
# a new main connection after a failure: header, section 0x21 RESUME with the migration id
RES = HDR + h("21") + MIG_ID
RAM_EVENTS = [RamPage("pc.ram", 0x1000, PAGE_A), RamPage("pc.ram", 0x2000, PAGE_B), RamZero("pc.ram", 0x3000),
              RamZero("vga", 0x200000), RamEnd()]

# (id, prelude fed and drained first, messages (encode side), exact bytes, decoded events if not the messages)
STREAM_TABLE = [
    ("header", b"", [Header()], HDR, None),
    ("blocks", HDR, [BLOCKS], BLK, None),
    ("open_return_path", P, [OpenReturnPath()], OPEN_RP, None),
    ("ping", P, [Ping(7)], h("08 0002 0004 00000007"), None),
    ("advise", P, [PostcopyAdvise(0x201000, 0x1000)], ADVISE, None),
    ("discard", P + ADVISE, [PostcopyRamDiscard("pc.ram", ((0x1000, 0x2000), (0x10000, 0x1000)))], DISCARD, None),
    ("listen", P + ADVISE, [PostcopyListen()], LISTEN, None),
    ("run", P + ADVISE + LISTEN, [PostcopyRun()], RUN, None),
    ("recv_bitmap_request", P, [RecvBitmapRequest("pc.ram")], h("08 000a 0007 06 7063 2e72 616d"), None),
    ("state", P, [State(b"abc")], h("03 00000003 616263"), None),
    ("state_empty", P, [State(b"")], h("03 00000000"), None),
    ("eof", P, [Eof()], h("10"), None),
    ("ram_section", P, RAM_EVENTS[:-1], RAM, RAM_EVENTS),
    ("ram_section_empty", P, [], h("02 0000000000000010"), [RamEnd()]),
    ("migration_id", P, [MigrationId(MIG_ID, 1)], ID, None),
    ("migration_id_single_channel", P, [MigrationId(bytes(16), 0)], h("04") + bytes(16) + h("00"), None),
    ("open_return_path_after_id", P + ID, [OpenReturnPath()], OPEN_RP, None),
    # a second connection (StreamDecoder(joining=...)): its first section says what it is
    ("joining_preempt", HDR, [PreemptChannel(MIG_ID)], h("20") + MIG_ID, None),
    ("joining_resume", HDR, [Resume(MIG_ID)], h("21") + MIG_ID, None),
    ("joining_resume_recv_bitmap", RES, [RecvBitmapRequest("vga")], h("08 000a 0004 03 766761"), None),
    ("joining_resume_ping", RES, [Ping(9)], h("08 0002 0004 00000009"), None),
    ("joining_resume_postcopy_resume", RES, [PostcopyResume()], h("08 0009 0000"), None),
    ("joining_resume_ram", RES + h("08 0009 0000"), RAM_EVENTS[:-1], RAM, RAM_EVENTS),
    ("joining_resume_eof", RES + h("08 0009 0000"), [Eof()], h("10"), None),
    ("joining_preempt_ram", HDR + h("20") + MIG_ID, RAM_EVENTS[:-1], RAM, RAM_EVENTS),
]

RP_TABLE = [
    ("shut", b"", [Shut(0)], h("0001 0004 00000000"), None),
    ("pong", b"", [Pong(7)], h("0002 0004 00000007"), None),
    ("req_pages_id", b"", [ReqPagesId("pc.ram", 0x2000, 0x1000)],
     h("0003 0013 0000000000002000 00001000 06 7063 2e72 616d"), None),
    ("req_pages", h("0003 0013 0000000000002000 00001000 06 7063 2e72 616d"), [ReqPages(0x3000, 0x1000)],
     h("0004 000c 0000000000003000 00001000"), [ReqPagesId("pc.ram", 0x3000, 0x1000)]),
    ("req_pages_huge", b"", [ReqPagesId("vga", 0x200000, 0x200000)],
     h("0003 0010 0000000000200000 00200000 03 766761"), None),
    # pc.ram has 64 target pages: size 8, bitmap LE, then the trailer (outside the message length)
    ("recv_bitmap", b"", [RecvBitmap("pc.ram", h("0f000000000000 80"))],
     h("0005 0007 06 7063 2e72 616d" "0000000000000008" "0f00000000000080" "0123456789abcdef"), None),
    ("resume_ack", b"", [ResumeAck()], h("0006 0004 00000001"), None),
]


def _copy(ev):
    return RamPage(ev.block, ev.offset, bytes(ev.data)) if isinstance(ev, RamPage) else ev


def _drain(dec):
    out = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            return out
        out.append(_copy(ev))


def _drain_until_error(dec):
    got = []
    with pytest.raises(ProtocolError, match="data after EOF"):
        while True:
            ev = dec.next_event()
            assert ev is not NEED_DATA
            got.append(_copy(ev))
    return got


def _encode_stream(msgs, data):
    if data[:1] == bytes((Section.RAM,)):
        return encode_ram_section(msgs)
    assert len(msgs) == 1
    return encode(msgs[0])


def _stream_decoder(prelude, name=""):
    """A decoder past ``prelude``; rows named joining_* decode a second connection of BLOCKS' migration."""
    dec = StreamDecoder(joining={b.name: b for b in BLOCKS.blocks}) if name.startswith("joining_") else \
        StreamDecoder()
    dec.feed(prelude)
    _drain(dec)
    assert dec.offset == len(prelude)
    return dec


@pytest.mark.parametrize("name,prelude,msgs,data,decoded", STREAM_TABLE, ids=[r[0] for r in STREAM_TABLE])
class TestStreamTable:
    def test_encode(self, name, prelude, msgs, data, decoded):
        assert _encode_stream(msgs, data) == data

    def test_decode_whole(self, name, prelude, msgs, data, decoded):
        dec = _stream_decoder(prelude, name)
        dec.feed(data)
        assert _drain(dec) == (decoded or msgs)
        assert dec.offset == len(prelude) + len(data)

    def test_decode_events_iterator(self, name, prelude, msgs, data, decoded):
        dec = _stream_decoder(prelude, name)
        dec.feed(data)
        assert [_copy(e) for e in dec.events()] == (decoded or msgs)

    def test_decode_byte_by_byte(self, name, prelude, msgs, data, decoded):
        dec = _stream_decoder(prelude, name)
        got = []
        for i in range(len(data)):
            dec.feed(data[i:i + 1])
            got += _drain(dec)
        assert got == (decoded or msgs)
        assert dec.offset == len(prelude) + len(data)

    def test_decode_trailing(self, name, prelude, msgs, data, decoded):
        dec = _stream_decoder(prelude, name)
        dec.feed(data + b"\x08\x00\x02")  # the start of a PING
        if name.endswith("eof"):  # nothing may follow EOF
            assert _drain_until_error(dec) == msgs
            return
        if name.startswith("joining_preempt"):  # no command may follow on a preempt channel
            got = []
            with pytest.raises(ProtocolError, match="carries only RAM sections"):
                while (ev := dec.next_event()) is not NEED_DATA:
                    got.append(_copy(ev))
            assert got == (decoded or msgs)
            return
        assert _drain(dec) == (decoded or msgs)
        assert dec.next_event() is NEED_DATA
        assert dec.offset == len(prelude) + len(data)
        assert dec.buffered == 3


@pytest.mark.parametrize("name,prelude,msgs,data,decoded", RP_TABLE, ids=[r[0] for r in RP_TABLE])
class TestReturnPathTable:
    def _dec(self, prelude):
        dec = ReturnPathDecoder(BLOCKS.blocks)
        dec.feed(prelude)
        _drain(dec)
        return dec

    def test_encode(self, name, prelude, msgs, data, decoded):
        assert encode_rp(msgs[0]) == data

    def test_decode_whole(self, name, prelude, msgs, data, decoded):
        dec = self._dec(prelude)
        dec.feed(data)
        assert _drain(dec) == (decoded or msgs)
        assert dec.offset == len(prelude) + len(data)

    def test_decode_byte_by_byte(self, name, prelude, msgs, data, decoded):
        dec = self._dec(prelude)
        got = []
        for i in range(len(data)):
            dec.feed(data[i:i + 1])
            got += list(dec.events())
        assert got == (decoded or msgs)

    def test_decode_trailing(self, name, prelude, msgs, data, decoded):
        dec = self._dec(prelude)
        dec.feed(data + h("0001 00"))
        assert _drain(dec) == (decoded or msgs)
        assert dec.next_event() is NEED_DATA
        assert dec.offset == len(prelude) + len(data)


# ---- encoder details -------------------------------------------------------------------------

def test_recv_bitmap_is_padded_to_8_bytes():
    assert encode_rp(RecvBitmap("pc.ram", b"\x01")) == (h("0005 0007 06 7063 2e72 616d 0000000000000008")
                                                        + b"\x01" + bytes(7) + be64(RECV_BITMAP_ENDING))


def test_ram_encoder_record_headers():
    enc = RamSectionEncoder()
    assert enc.begin() == b"\x02"
    assert enc.record_header("pc.ram", 0x1000, RamFlag.PAGE) == h("0000000000001008 06 7063 2e72 616d")
    assert enc.record_header("pc.ram", 0x2000, RamFlag.PAGE) == h("0000000000002028")
    assert enc.record_header("vga", 0, RamFlag.ZERO) == h("0000000000000002 03 766761")
    assert enc.record_header("pc.ram", 0x3000, RamFlag.ZERO) == h("0000000000003002 06 7063 2e72 616d")
    assert enc.end() == h("0000000000000010")
    # a new section names its first block again
    enc.begin()
    assert enc.record_header("pc.ram", 0x1000, RamFlag.PAGE) == h("0000000000001008 06 7063 2e72 616d")


@pytest.mark.parametrize("call", [
    lambda: encode(Blocks((BlockInfo("x" * 256, 4096, 4096),))),
    lambda: encode(Blocks((BlockInfo("", 4096, 4096),))),
    lambda: encode(Blocks((BlockInfo("a\0b", 4096, 4096),))),
    lambda: encode(Blocks((BlockInfo("a", 4096, 4096), BlockInfo("a", 4096, 4096)))),
    lambda: encode(Blocks((BlockInfo("a", 4096, 3000),))),
    lambda: encode(Blocks((BlockInfo("a", 6000, 4096),))),
    lambda: encode(Blocks(())),
    lambda: encode(PostcopyRamDiscard("pc.ram", ())),
    lambda: encode(PostcopyRamDiscard("pc.ram", ((0x1001, 0x1000),))),
    lambda: encode(PostcopyRamDiscard("pc.ram", ((0x1000, 0),))),
    lambda: encode(Ping(1 << 32)),
    lambda: encode(RamPage("pc.ram", 0, PAGE_A)),
    lambda: encode(Shut(0)),
    lambda: encode_rp(Ping(0)),
    lambda: RamSectionEncoder().page("pc.ram", 0x1001, PAGE_A),
    lambda: RamSectionEncoder().page("pc.ram", 0x1000, b"short"),
    lambda: RamSectionEncoder().record_header("pc.ram", 0, RamFlag.PAGE | RamFlag.ZERO),
    lambda: RamSectionEncoder().record_header("pc.ram", 0, RamFlag.EOS),
    lambda: encode(MigrationId(bytes(15), 0)),
    lambda: encode(MigrationId(bytes(16), 2)),
], ids=["name_too_long", "name_empty", "name_nul", "name_twice", "page_size", "length", "no_blocks",
        "discard_no_ranges", "discard_unaligned", "discard_len0", "ping_range", "ram_via_encode", "rp_via_encode",
        "stream_via_encode_rp", "record_unaligned", "page_short", "page_and_zero", "eos_header",
        "id_short", "id_two_channels"])
def test_encode_refuses(call):
    with pytest.raises(LocalProtocolError):
        call()


# ---- decoder behaviour -----------------------------------------------------------------------

def test_state_machine_and_blocks():
    dec = StreamDecoder()
    assert dec.state is PostcopyState.NONE
    dec.feed(P + OPEN_RP + ADVISE)
    _drain(dec)
    assert dec.blocks == {b.name: b for b in BLOCKS.blocks}
    assert dec.state is PostcopyState.ADVISE
    dec.feed(DISCARD + RAM + h("03 00000000") + LISTEN)
    _drain(dec)
    assert dec.state is PostcopyState.LISTENING
    dec.feed(RUN)
    _drain(dec)
    assert dec.state is PostcopyState.RUNNING
    dec.feed(RAM + h("10"))
    evs = _drain(dec)
    assert evs[-1] == Eof() and dec.state is PostcopyState.END and dec.finished


def test_precopy_only_stream_ends_with_eof():
    dec = StreamDecoder()
    dec.feed(P + RAM + h("10"))
    assert _drain(dec)[-1] == Eof()
    assert dec.state is PostcopyState.END


def test_page_data_is_a_memoryview():
    dec = _stream_decoder(P)
    dec.feed(RAM)
    ev = dec.next_event()
    assert isinstance(ev.data, memoryview) and ev.data == PAGE_A


def test_feed_copies_reused_buffers():
    dec = _stream_decoder(P)
    buf = bytearray(RAM[:5000])
    dec.feed(buf)
    buf[:] = bytes(len(buf))
    dec.feed(RAM[5000:])
    assert _drain(dec) == RAM_EVENTS


def test_fast_loop_matches_next_event_on_big_stream():
    enc = RamSectionEncoder()
    parts = [P]
    for sec in range(3):
        parts.append(enc.begin())
        for i in range(64):
            blk = "vga" if i % 17 == 5 else "pc.ram"
            off = (i % 2) * 0x200000 if blk == "vga" else (i * 0x1000) % 0x40000
            if i % 7 == 3:
                parts.append(enc.zero(blk, off))
            else:
                parts.append(enc.page(blk, off, bytes([i, sec]) * 2048))
        parts.append(enc.end())
    stream = b"".join(parts) + h("10")
    a = StreamDecoder()
    b = StreamDecoder()
    got_a, got_b = [], []
    for i in range(0, len(stream), 10007):
        a.feed(stream[i:i + 10007])
        b.feed(stream[i:i + 10007])
        got_a += [_copy(e) for e in a.events()]
        got_b += _drain(b)
    assert got_a == got_b
    assert got_a[-1] == Eof() and len(got_a) == 2 + 3 * 65 + 1


def test_mixing_events_and_next_event():
    dec = _stream_decoder(P)
    dec.feed(RAM)
    it = dec.events()
    first = _copy(next(it))
    second = _copy(dec.next_event())
    rest = [_copy(e) for e in it]
    assert [first, second] + rest == RAM_EVENTS


def test_errors_are_sticky():
    dec = StreamDecoder()
    dec.feed(b"XXXXXXXX")
    with pytest.raises(ProtocolError):
        dec.next_event()
    with pytest.raises(ProtocolError):
        dec.next_event()


def test_return_path_accepts_blocks_iterable_and_runs():
    dec = ReturnPathDecoder(BLOCKS.blocks)
    dec.feed(encode_rp(ReqPagesId("pc.ram", 0x4000, 0x3000)))
    assert _drain(dec) == [ReqPagesId("pc.ram", 0x4000, 0x3000)]


# ---- refusals: main stream -------------------------------------------------------------------

def cmd(c, payload=b""):
    return bytes((8,)) + be16(c) + be16(len(payload)) + payload


def discard_payload(name=b"pc.ram", ranges=((0x1000, 0x1000),), version=0, name_len=None, term=b"\0"):
    n = len(name) if name_len is None else name_len
    return bytes((version, n)) + name + term + b"".join(be64(s) + be64(ln) for s, ln in ranges)


def block_entry(name=b"a", length=0x1000, page_size=0x1000):
    return bytes((len(name),)) + name + be64(length) + be64(page_size)


def rec(v, name=None):
    return be64(v) + (bytes((len(name),)) + name if name is not None else b"")


PR = P + b"\x02"  # inside a RAM section
PA = P + ADVISE
PL = PA + LISTEN
PRUN = PL + RUN
NAMED = rec(0x1008, b"pc.ram") + PAGE_A

# (id, prelude, bad bytes, section, offset (None = len(prelude)), problem text)
STREAM_REFUSALS = [
    ("bad_magic", b"", b"XXXX" + be32(1), "header", 0, "bad magic"),
    ("bad_version", b"", be32(MAGIC) + be32(2), "header", 4, "unsupported version 2"),
    ("unknown_section", P, b"\x07", "stream", None, "unknown section type 0x07"),
    ("blocks_not_first_command", HDR, ADVISE, "COMMAND POSTCOPY_ADVISE", None, "BLOCKS must be the first section"),
    ("blocks_not_first_ram", HDR, RAM, "RAM section", None, "BLOCKS must be the first section"),
    ("blocks_not_first_state", HDR, h("03 00000000"), "STATE section", None, "BLOCKS must be the first section"),
    ("blocks_twice", P, BLK, "BLOCKS section", None, "BLOCKS sent twice"),
    ("block_count_0", HDR, h("01 0000"), "BLOCKS section", None, "block count is 0"),
    ("block_name_len_0", HDR, h("01 0001") + h("00") + be64(4096) + be64(4096), "BLOCKS section", len(HDR) + 3,
     "name length is 0"),
    ("block_name_not_utf8", HDR, h("01 0001") + block_entry(b"\xff"), "BLOCKS section", len(HDR) + 3,
     "not valid UTF-8"),
    ("block_name_nul", HDR, h("01 0001") + block_entry(b"a\0"), "BLOCKS section", len(HDR) + 3, "NUL"),
    ("block_name_twice", HDR, h("01 0002") + block_entry(b"a") + block_entry(b"a"), "BLOCKS section",
     len(HDR) + 3 + 18, "appears twice"),
    ("block_length_0", HDR, h("01 0001") + block_entry(length=0), "BLOCKS section", len(HDR) + 3,
     "not a positive multiple"),
    ("block_length_unaligned", HDR, h("01 0001") + block_entry(length=0x3000, page_size=0x2000), "BLOCKS section",
     len(HDR) + 3, "not a positive multiple"),
    ("block_page_size_not_pow2", HDR, h("01 0001") + block_entry(length=0x6000, page_size=0x3000),
     "BLOCKS section", len(HDR) + 3, "not a power of two"),
    ("block_page_size_small", HDR, h("01 0001") + block_entry(length=0x1000, page_size=0x800), "BLOCKS section",
     len(HDR) + 3, "not a power of two >= 4096"),
    ("ram_unknown_flags", PR, rec(0x1009, b"pc.ram"), "RAM section", None, "unknown RAM record flags 0x1"),
    ("ram_no_kind", PR, rec(0x1000, b"pc.ram"), "RAM section", None, "neither PAGE, ZERO nor EOS"),
    ("ram_page_and_zero", PR, rec(0x100A, b"pc.ram"), "RAM section", None, "both PAGE and ZERO"),
    ("ram_eos_combined", PR, rec(0x18), "RAM section", None, "EOS combined"),
    ("ram_eos_offset", PR, rec(0x1010), "RAM section", None, "EOS record with nonzero offset"),
    ("ram_continue_first", PR, rec(0x1028) + PAGE_A, "RAM section", None, "CONTINUE in the first record"),
    ("ram_continue_first_zero", PR, rec(0x1022) + b"\0", "RAM section", None, "CONTINUE in the first record"),
    ("ram_continue_first_next_section", P + RAM + b"\x02", rec(0x1028) + PAGE_A, "RAM section", None,
     "CONTINUE in the first record"),
    ("ram_offset_beyond_block", PR, rec(0x40008, b"pc.ram"), "RAM section", None, "beyond the end of block"),
    ("ram_offset_beyond_block_continue", PR + NAMED, rec(0x40028) + PAGE_A, "RAM section", None,
     "beyond the end of block 'pc.ram'"),
    ("ram_unknown_block", PR, rec(0x1008, b"nope"), "RAM section", None, "unknown block 'nope'"),
    ("ram_name_len_0", PR, rec(0x1008, b""), "RAM section", None, "name length is 0"),
    ("ram_zero_fill_not_0", PR, rec(0x1002, b"pc.ram") + h("ff"), "RAM section", None,
     "ZERO record for page 0x1000 of block 'pc.ram' has fill byte 0xff (it must be 0)"),
    ("ram_zero_fill_not_0_continue", PR + NAMED, rec(0x2022) + h("01"), "RAM section", None,
     "ZERO record for page 0x2000 of block 'pc.ram' has fill byte 0x01"),
    ("state_too_big", P, b"\x03" + be32(64 * 1024 * 1024 + 1), "STATE section", None, "exceeds"),
    ("state_after_run", PRUN, h("03 00000000"), "STATE section", None, "STATE after POSTCOPY_RUN"),
    ("cmd_unknown", P, cmd(7), "COMMAND section", None, "unknown command 7"),
    ("ping_length", P, cmd(2, b"abc"), "COMMAND PING", None, "payload length 3 (expected 4)"),
    ("advise_length", P, cmd(3, bytes(8)), "COMMAND POSTCOPY_ADVISE", None, "payload length 8 (expected 16)"),
    ("listen_length", PA, cmd(4, b"x"), "COMMAND POSTCOPY_LISTEN", None, "payload length 1 (expected 0)"),
    ("run_length", PL, cmd(5, b"x"), "COMMAND POSTCOPY_RUN", None, "payload length 1 (expected 0)"),
    ("open_rp_length", P, cmd(1, b"x"), "COMMAND OPEN_RETURN_PATH", None, "payload length 1 (expected 0)"),
    ("resume_length", P, cmd(9, b"x"), "COMMAND POSTCOPY_RESUME", None, "payload length 1 (expected 0)"),
    ("resume_without_resume_section", P, cmd(9), "COMMAND POSTCOPY_RESUME", None,
     "did not begin with a RESUME section"),
    ("resume_section_on_main_stream", P, h("21") + MIG_ID, "stream", None, "RESUME section on a stream"),
    ("recv_bitmap_length", P, cmd(10, h("07") + b"pc.ram"), "COMMAND RECV_BITMAP", None,
     "does not match the name length"),
    ("recv_bitmap_unknown", P, cmd(10, h("04") + b"nope"), "COMMAND RECV_BITMAP", None, "unknown block 'nope'"),
    ("discard_version", PA, cmd(6, discard_payload(version=1)), "COMMAND POSTCOPY_RAM_DISCARD", None,
     "unsupported discard version 1"),
    ("discard_name_len", PA, cmd(6, bytes((0, 40)) + b"pc.ram\0"), "COMMAND POSTCOPY_RAM_DISCARD", None,
     "runs beyond"),
    ("discard_no_terminator", PA, cmd(6, discard_payload(term=b"X")), "COMMAND POSTCOPY_RAM_DISCARD", None,
     "0 terminator"),
    ("discard_no_ranges", PA, cmd(6, discard_payload(ranges=())), "COMMAND POSTCOPY_RAM_DISCARD", None,
     "0 bytes of ranges"),
    ("discard_ranges_not_16", PA, cmd(6, discard_payload() + b"x"), "COMMAND POSTCOPY_RAM_DISCARD", None,
     "17 bytes of ranges"),
    ("discard_start_unaligned", PA, cmd(6, discard_payload(ranges=((0x1800, 0x1000),))),
     "COMMAND POSTCOPY_RAM_DISCARD", None, "not aligned"),
    ("discard_length_unaligned", PA, cmd(6, discard_payload(ranges=((0x1000, 0x800),))),
     "COMMAND POSTCOPY_RAM_DISCARD", None, "not aligned"),
    ("discard_length_0", PA, cmd(6, discard_payload(ranges=((0x1000, 0),))), "COMMAND POSTCOPY_RAM_DISCARD", None,
     "length 0"),
    ("discard_beyond_block", PA, cmd(6, discard_payload(ranges=((0x1000, 0x1000), (0x3f000, 0x2000)))),
     "COMMAND POSTCOPY_RAM_DISCARD", None, "beyond the end of block 'pc.ram'"),
    ("discard_unknown_block", PA, cmd(6, discard_payload(name=b"nope")), "COMMAND POSTCOPY_RAM_DISCARD", None,
     "unknown block 'nope'"),
    ("discard_before_advise", P, DISCARD, "COMMAND POSTCOPY_RAM_DISCARD", None, "before POSTCOPY_ADVISE"),
    ("discard_after_listen", PL, DISCARD, "COMMAND POSTCOPY_RAM_DISCARD", None, "after POSTCOPY_LISTEN"),
    ("advise_twice", PA, ADVISE, "COMMAND POSTCOPY_ADVISE", None, "sent twice"),
    ("advise_after_listen", PL, ADVISE, "COMMAND POSTCOPY_ADVISE", None, "after POSTCOPY_LISTEN"),
    ("open_rp_after_listen", PL, OPEN_RP, "COMMAND OPEN_RETURN_PATH", None, "after POSTCOPY_LISTEN"),
    ("listen_before_advise", P, LISTEN, "COMMAND POSTCOPY_LISTEN", None, "before POSTCOPY_ADVISE"),
    ("listen_twice", PL, LISTEN, "COMMAND POSTCOPY_LISTEN", None, "sent twice"),
    ("run_before_listen", PA, RUN, "COMMAND POSTCOPY_RUN", None, "before POSTCOPY_LISTEN"),
    ("run_twice", PRUN, RUN, "COMMAND POSTCOPY_RUN", None, "sent twice"),
    ("id_before_blocks", HDR, ID, "ID section", None, "BLOCKS must be the first section"),
    ("id_not_right_after_blocks", P + OPEN_RP, ID, "ID section", None, "ID must come right after BLOCKS"),
    ("id_after_ram", P + RAM, ID, "ID section", None, "ID must come right after BLOCKS"),
    ("id_twice", P + ID, ID, "ID section", None, "ID sent twice"),
    ("id_two_channels", P, ID[:-1] + h("02"), "ID section", None, "2 preempt channels announced"),
    ("preempt_marker_on_main_stream", P, h("20") + MIG_ID, "stream", None, "preempt channel marker"),
    ("after_eof", P + h("10"), RAM, "stream", None, "data after EOF"),
    ("after_eof_one_byte", P + h("10"), h("10"), "stream", None, "data after EOF"),
]


# a second connection of BLOCKS' migration: (id, prelude, bad bytes, section, offset (None = len(prelude)), problem)
JOINING_REFUSALS = [
    ("joining_blocks_first", HDR, BLK, "joining connection", None,
     "section 0x01 where a second connection's PREEMPT (0x20) or RESUME (0x21) section belongs"),
    ("joining_ram_first", HDR, RAM, "joining connection", None, "section 0x02 where a second connection's"),
    ("preempt_command", HDR + h("20") + MIG_ID, LISTEN, "preempt channel", None,
     "the preempt channel carries only RAM sections and EOF"),
    ("preempt_resume", HDR + h("20") + MIG_ID, h("21") + MIG_ID, "preempt channel", None,
     "carries only RAM sections"),
    ("resume_blocks", RES, BLK, "resumed stream", None,
     "section 0x01: a resumed main stream carries only commands, RAM sections and EOF"),
    ("resume_state", RES, h("03 00000000"), "resumed stream", None, "carries only commands"),
    ("resume_id", RES, ID, "resumed stream", None, "carries only commands"),
    ("resume_twice", RES, h("21") + MIG_ID, "resumed stream", None, "carries only commands"),
    ("resume_ram_before_postcopy_resume", RES, RAM, "resumed stream", None, "RAM section before POSTCOPY_RESUME"),
    ("resume_eof_before_postcopy_resume", RES, h("10"), "EOF section", None, "EOF while the migration is paused"),
    ("resume_run", RES, RUN, "COMMAND POSTCOPY_RUN", None, "POSTCOPY_RUN while the migration is paused"),
    ("resume_discard", RES, DISCARD, "COMMAND POSTCOPY_RAM_DISCARD", None, "while the migration is paused"),
    ("postcopy_resume_twice", RES + cmd(9), cmd(9), "COMMAND POSTCOPY_RESUME", None,
     "POSTCOPY_RESUME while running (sent twice, or without a RESUME section)"),
    ("resume_listen_after", RES + cmd(9), LISTEN, "COMMAND POSTCOPY_LISTEN", None, "POSTCOPY_LISTEN sent twice"),
    ("resume_recv_bitmap_unknown", RES, cmd(10, h("04") + b"nope"), "COMMAND RECV_BITMAP", None,
     "unknown block 'nope'"),
]


@pytest.mark.parametrize("name,prelude,bad,section,offset,problem", STREAM_REFUSALS + JOINING_REFUSALS,
                         ids=[r[0] for r in STREAM_REFUSALS + JOINING_REFUSALS])
def test_stream_refuses(name, prelude, bad, section, offset, problem):
    joining = any(r[0] == name for r in JOINING_REFUSALS)
    assert_refused(lambda: StreamDecoder(joining={b.name: b for b in BLOCKS.blocks}) if joining else StreamDecoder(),
                   prelude, bad, section, offset, problem)


def assert_refused(make_decoder, prelude, bad, section, offset, problem):
    """``bad`` after ``prelude`` is refused, fed whole and byte by byte, with the section, offset and problem."""
    for pieces in ([bad], [bad[i:i + 1] for i in range(len(bad))]):
        dec = make_decoder()
        dec.feed(prelude)
        _drain(dec)
        with pytest.raises(ProtocolError) as ei:
            for p in pieces:
                dec.feed(p)
                _drain(dec)
        e = ei.value
        assert e.section == section
        assert e.offset == (len(prelude) if offset is None else offset)
        assert problem in e.problem
        assert section in str(e) and f"at byte {e.offset}" in str(e)




def test_joining_decoder_says_what_the_connection_is():
    blocks = {b.name: b for b in BLOCKS.blocks}
    pre = StreamDecoder(joining=blocks)
    pre.feed(HDR + h("20") + MIG_ID)
    assert _drain(pre) == [Header(), PreemptChannel(MIG_ID)]
    assert (pre.preempt, pre.resumed) == (True, False)
    res = StreamDecoder(joining=blocks)
    res.feed(RES)
    assert _drain(res) == [Header(), Resume(MIG_ID)]
    assert (res.preempt, res.resumed, res.state) == (False, True, PostcopyState.PAUSED)
    res.feed(cmd(9))
    assert _drain(res) == [PostcopyResume()] and res.state is PostcopyState.RUNNING



def test_absurd_state_length_refused_before_buffering():
    dec = _stream_decoder(P)
    dec.feed(b"\x03" + be32(0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.next_event()


def test_state_at_cap_waits_for_data():
    dec = _stream_decoder(P)
    dec.feed(b"\x03" + be32(64 * 1024 * 1024))
    assert dec.next_event() is NEED_DATA


# ---- refusals: return path -------------------------------------------------------------------

def rp(t, payload):
    return be16(t) + be16(len(payload)) + payload


def req_id(start, length, name=b"pc.ram", n=None):
    return rp(3, be64(start) + be32(length) + bytes((len(name) if n is None else n,)) + name)


REQ0 = req_id(0, 0x1000)

RP_REFUSALS = [
    ("unknown_type", b"", rp(7, b""), "return path", None, "unknown message type 7"),
    ("shut_length", b"", rp(1, b"\0\0"), "return path SHUT", None, "length 2 (expected 4)"),
    ("pong_length", b"", rp(2, b""), "return path PONG", None, "length 0 (expected 4)"),
    ("resume_ack_length", b"", rp(6, bytes(8)), "return path RESUME_ACK", None, "length 8 (expected 4)"),
    ("req_pages_length", b"", rp(4, bytes(8)), "return path REQ_PAGES", None, "length 8 (expected 12)"),
    ("req_id_short", b"", rp(3, bytes(13)), "return path REQ_PAGES_ID", None, "too short"),
    ("req_id_name_len", b"", req_id(0, 0x1000, n=9), "return path REQ_PAGES_ID", None, "does not match"),
    ("req_id_unknown_block", b"", req_id(0, 0x1000, b"nope"), "return path REQ_PAGES_ID", None,
     "unknown block 'nope'"),
    ("req_id_start_unaligned", b"", req_id(0x800, 0x1000), "return path REQ_PAGES_ID", None, "not aligned"),
    ("req_id_start_unaligned_huge", b"", req_id(0x1000, 0x200000, b"vga"), "return path REQ_PAGES_ID", None,
     "not aligned to the page size 0x200000"),
    ("req_id_length_0", b"", req_id(0, 0), "return path REQ_PAGES_ID", None, "not a positive multiple"),
    ("req_id_length_partial", b"", req_id(0, 0x1800), "return path REQ_PAGES_ID", None, "not a positive multiple"),
    ("req_id_length_huge_page", b"", req_id(0, 0x1000, b"vga"), "return path REQ_PAGES_ID", None,
     "not a positive multiple"),
    ("req_id_beyond_block", b"", req_id(0x3f000, 0x2000), "return path REQ_PAGES_ID", None, "beyond the end"),
    ("req_pages_first", b"", rp(4, be64(0) + be32(0x1000)), "return path REQ_PAGES", None,
     "REQ_PAGES before any REQ_PAGES_ID"),
    ("req_pages_beyond_block", REQ0, rp(4, be64(0x40000) + be32(0x1000)), "return path REQ_PAGES", None,
     "beyond the end of block 'pc.ram'"),
    ("req_pages_unaligned", REQ0, rp(4, be64(0x10) + be32(0x1000)), "return path REQ_PAGES", None, "not aligned"),
    ("recv_bitmap_short", b"", rp(5, b"\x00"), "return path RECV_BITMAP", None, "too short"),
    ("recv_bitmap_name_len", b"", rp(5, b"\x09pc.ram"), "return path RECV_BITMAP", None, "does not match"),
    ("recv_bitmap_unknown", b"", rp(5, b"\x04nope"), "return path RECV_BITMAP", None, "unknown block 'nope'"),
    ("recv_bitmap_size", b"", rp(5, b"\x06pc.ram") + be64(16) + bytes(16) + be64(RECV_BITMAP_ENDING),
     "return path RECV_BITMAP", None, "bitmap size 16"),
    ("recv_bitmap_absurd_size", b"", rp(5, b"\x06pc.ram") + be64(1 << 40), "return path RECV_BITMAP", None,
     "bitmap size 1099511627776"),
    ("recv_bitmap_trailer", b"", rp(5, b"\x06pc.ram") + be64(8) + bytes(8) + be64(0x1122334455667788),
     "return path RECV_BITMAP", None, "bad bitmap trailer"),
]


@pytest.mark.parametrize("name,prelude,bad,section,offset,problem", RP_REFUSALS, ids=[r[0] for r in RP_REFUSALS])
def test_return_path_refuses(name, prelude, bad, section, offset, problem):
    assert_refused(lambda: ReturnPathDecoder(BLOCKS.blocks), prelude, bad, section, offset, problem)


def test_constants():
    assert MAGIC == 0x50435059 and Command.RECV_BITMAP == 10 and RamFlag.CONTINUE == 0x20


def test_blocks_section_arriving_in_small_pieces():
    blocks = Blocks(tuple(BlockInfo(f"block-{i}", 4096 * (i + 1), 4096) for i in range(3000)))
    data = HDR + encode(blocks)
    dec = StreamDecoder()
    got = []
    for i in range(0, len(data), 7):
        dec.feed(data[i:i + 7])
        got += _drain(dec)
    assert got == [Header(), blocks]
    assert dec.blocks["block-2999"].length == 3000 * 4096
