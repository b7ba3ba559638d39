"""serve-dest against a fake source written here with the codec, over real loopback TCP.

Malformed streams end with exit 3 and one stderr line naming the section and the
byte offset; a source that goes away or stalls ends with exit 4; PING, RECV_BITMAP
and usage errors.
"""
from __future__ import annotations

import ctypes
import json
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import PROC_TIMEOUT, postcopy_cmd, single_stderr_line
from postcopy_cli import codec
from postcopy_cli.cli import run as cli_run
from postcopy_cli.errors import PeerDisconnected, ProtocolError
from postcopy_cli.dest.serve import ServeDest, ServeOptions
from postcopy_cli.selftest.harness import kill_and_reap

PAGE = 4096
SIZE = 1 << 20
BLOCK = codec.BlockInfo("mem", SIZE, PAGE)


def page_data(p: int) -> bytes:
    return bytes([(p * 7 + 1) & 0xFF or 1]) * PAGE


def preamble(blocks=(BLOCK,)) -> bytes:
    return (codec.encode(codec.Header()) + codec.encode(codec.Blocks(tuple(blocks))) +
            codec.encode(codec.OpenReturnPath()) + codec.encode(codec.PostcopyAdvise(PAGE, PAGE)))


LISTEN_RUN = codec.encode(codec.PostcopyListen()) + codec.encode(codec.PostcopyRun())


def ram(pages, block="mem") -> bytes:
    enc = codec.RamSectionEncoder()
    return enc.begin() + b"".join(enc.page(block, p * PAGE, page_data(p)) for p in pages) + enc.end()


def connect(sd) -> socket.socket:
    return socket.create_connection(("127.0.0.1", sd.port), timeout=PROC_TIMEOUT)


def start_own(serve_dest, *extra):
    return serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", f"mem={SIZE}", "--json", "--timeout", "20", *extra)


def feed_and_wait(sd, data: bytes):
    """Send ``data`` and keep the connection open: serve-dest must end by itself."""
    conn = connect(sd)
    try:
        conn.sendall(data)
        rc, out, err = sd.wait()
    finally:
        conn.close()
    return rc, out, err


def protocol_line(err: str) -> tuple[str, int]:
    line = single_stderr_line(err)
    m = re.search(r"protocol error in (.+?) at byte (\d+): (.+)", line)
    assert m, line
    return m.group(1), int(m.group(2))


# ---------------------------------------------------------------------------
# 4. malformed streams -> exit 3, one line naming section and offset, no traceback

def _ram_offset_beyond() -> bytes:
    enc = codec.RamSectionEncoder()
    return preamble() + LISTEN_RUN + enc.begin() + enc.page("mem", 0, page_data(0)) + \
        enc.page("mem", SIZE, page_data(1)) + enc.end()


def _discard(ranges) -> bytes:
    return preamble() + codec.encode(codec.PostcopyRamDiscard("mem", tuple(ranges)))


MALFORMED = {
    "bad-magic": (b"XXXX" + struct.pack(">I", 1), "header", 0),
    "bad-version": (struct.pack(">II", codec.MAGIC, 99), "header", 4),
    # BLOCKS mismatches are reported at a byte inside the BLOCKS section (8 .. its end)
    "block-wrong-size": (preamble([codec.BlockInfo("mem", 2 * SIZE, PAGE)]), "BLOCKS", (8, 31)),
    "block-unknown-name": (preamble([codec.BlockInfo("pc.ram", SIZE, PAGE)]), "BLOCKS", (8, 34)),
    "block-extra": (preamble([BLOCK, codec.BlockInfo("extra", SIZE, PAGE)]), "BLOCKS", (8, 53)),
    "ram-offset-beyond-block": (_ram_offset_beyond(), "RAM", None),
    "unknown-command": (preamble() + b"\x08" + struct.pack(">HH", 99, 0), "COMMAND", len(preamble())),
    "discard-outside-block": (_discard([(SIZE - PAGE, 2 * PAGE)]), "DISCARD", len(preamble())),
    "discard-start-beyond": (_discard([(SIZE, PAGE)]), "DISCARD", len(preamble())),
    "run-before-listen": (preamble() + codec.encode(codec.PostcopyRun()), "RUN", len(preamble())),
    "listen-before-advise": (codec.encode(codec.Header()) + codec.encode(codec.Blocks((BLOCK,))) +
                             codec.encode(codec.PostcopyListen()), "LISTEN", None),
    "ram-before-blocks": (codec.encode(codec.Header()) + ram([0]), None, 8),
    "unknown-section": (preamble() + b"\x77" + bytes(16), None, len(preamble())),
    "continue-first-record": (preamble() + b"\x02" + struct.pack(">Q", 0x28) + bytes(PAGE), "RAM",
                              len(preamble()) + 1),
    "page-and-zero-flags": (preamble() + b"\x02" + struct.pack(">QB", 0x0A, 3) + b"mem" + bytes(PAGE), "RAM",
                            len(preamble()) + 1),
    "ram-unknown-block": (preamble() + ram([0], block="nope"), "RAM", len(preamble()) + 1),
    "ram-unknown-flag": (preamble() + b"\x02" + struct.pack(">QB", 0x1108, 3) + b"mem" + bytes(PAGE), "RAM",
                         len(preamble()) + 1),
    "discard-after-listen": (preamble() + codec.encode(codec.PostcopyListen()) +
                             codec.encode(codec.PostcopyRamDiscard("mem", ((0, PAGE),))), "DISCARD",
                             len(preamble()) + 5),
    "advise-wrong-page-size": (codec.encode(codec.Header()) + codec.encode(codec.Blocks((BLOCK,))) +
                               codec.encode(codec.PostcopyAdvise(PAGE, 2 * PAGE)), "ADVISE", None),
    "blocks-twice": (preamble() + codec.encode(codec.Blocks((BLOCK,))), "BLOCKS", None),
    "name-length-zero": (preamble() + b"\x02" + struct.pack(">QB", 0x08, 0) + bytes(PAGE), "RAM", None),
    # the ZERO record's byte must be 0: in a section's first (named) record, and in a CONTINUE
    # record after pages the native pump placed (it hands the record to the codec)
    "zero-fill-not-0": (preamble() + LISTEN_RUN + b"\x02" + struct.pack(">QB", PAGE | 0x02, 3) + b"mem\x5a", "RAM",
                        len(preamble() + LISTEN_RUN) + 1),
    "zero-fill-not-0-continue": (preamble() + LISTEN_RUN + ram(range(8))[:-8] +
                                 struct.pack(">QB", 8 * PAGE | 0x22, 0x5A), "RAM",
                                 len(preamble() + LISTEN_RUN + ram(range(8))[:-8])),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_stream_exit_3(serve_dest, case):
    data, section, offset = MALFORMED[case]
    sd = start_own(serve_dest)
    rc, out, err = feed_and_wait(sd, data)
    assert rc == 3, err
    where, at = protocol_line(err)
    if section:
        assert section.lower() in where.lower(), err
    if isinstance(offset, tuple):
        assert offset[0] <= at <= offset[1], err
    elif offset is not None:
        assert at == offset, err
    # --json: the one document on stdout is the error, with the stats at the failure
    doc = json.loads(out)
    assert doc["error"]["code"] == 3 and doc["error"]["kind"] == "protocol" and "pages" in doc, doc


def receive_in_process(server, stream: bytes):
    """``server`` (a library ServeDest) receives ``stream`` sent by a thread; its complete result."""
    conn = socket.create_connection((server.bound.host, server.bound.port), timeout=PROC_TIMEOUT)
    sender = threading.Thread(target=conn.sendall, args=(stream,))
    sender.start()
    try:
        result = server.run()
        sender.join(PROC_TIMEOUT)
    finally:
        conn.close()
    assert result.complete
    return result


def test_garbage_mid_ram_section_own_memory_library():
    """Pages validly received are in; the bad record's page and everything after stay untouched."""
    server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", ram=[("mem", SIZE)], timeout=20))
    conn = socket.create_connection((server.bound.host, server.bound.port), timeout=PROC_TIMEOUT)
    try:
        enc = codec.RamSectionEncoder()
        good = preamble() + LISTEN_RUN + enc.begin() + b"".join(enc.page("mem", p * PAGE, page_data(p))
                                                                  for p in range(10))
        bad_record = struct.pack(">Q", 10 * PAGE | 0x20 | 0x08 | 0x40) + page_data(10)   # unknown flag 0x40
        after = enc.page("mem", 11 * PAGE, page_data(11)) + enc.end()
        conn.sendall(good + bad_record + after)
        with pytest.raises(ProtocolError) as ei:
            server.run()
        assert ei.value.section and "RAM" in ei.value.section
        assert ei.value.offset == len(good)
        # the engine unregistered on failure: the mapping can be read
        got = ctypes.string_at(server.mappings[0].addr, SIZE)
        for p in range(10):
            assert got[p * PAGE:(p + 1) * PAGE] == page_data(p), p
        assert got[10 * PAGE:] == bytes(SIZE - 10 * PAGE)
        # the source is told: SHUT 1 on the return path
        rp = codec.ReturnPathDecoder([BLOCK])
        conn.settimeout(PROC_TIMEOUT)
        events = []
        while not any(isinstance(e, codec.Shut) for e in events):
            chunk = conn.recv(65536)
            assert chunk, events
            rp.feed(chunk)
            events.extend(rp.events())
        assert [e.status for e in events if isinstance(e, codec.Shut)] == [1]
    finally:
        server.close()


def test_garbage_mid_ram_section_attached_toucher(tmp_path, serve_dest):
    """The attached program is told (it sees missing data and fails) and serve-dest exits 3."""
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json",
                    "--timeout", "20")
    image = tmp_path / "img"
    image.write_bytes(b"".join(page_data(p) for p in range(SIZE // PAGE)))
    toucher = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(SIZE), "--attach",
                                            str(tmp_path / "u.sock"), "--image", str(image), "--json"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        enc = codec.RamSectionEncoder()
        good = preamble() + LISTEN_RUN + enc.begin() + b"".join(enc.page("mem", p * PAGE, page_data(p))
                                                                  for p in range(10))
        garbage = b"\xff" * 64
        rc, out, err = feed_and_wait(sd, good + garbage)
        t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    finally:
        kill_and_reap(toucher)
    assert rc == 3, err
    where, at = protocol_line(err)
    assert "RAM" in where and at == len(good), err
    assert toucher.returncode != 0
    assert "Traceback" not in t_err


# ---------------------------------------------------------------------------
# 5. the source goes away or stalls -> exit 4

def accepted(sd) -> socket.socket:
    """A connection serve-dest has accepted (its PONG says so): from here on, closing it is a
    disconnect (a loopback peer that closes before serve-dest checks its owner is refused)."""
    conn = connect(sd)
    conn.sendall(preamble() + codec.encode(codec.Ping(1)))
    rp = codec.ReturnPathDecoder([BLOCK])
    while not any(isinstance(e, codec.Pong) for e in rp.events()):
        chunk = conn.recv(64)
        assert chunk
        rp.feed(chunk)
    return conn


def test_source_disconnects_mid_stream(serve_dest):
    sd = start_own(serve_dest)
    conn = accepted(sd)
    conn.sendall(LISTEN_RUN + ram(range(20)))
    conn.close()
    rc, out, err = sd.wait()
    assert rc == 4, err
    line = single_stderr_line(err)
    assert "disconnected" in line


def test_source_disconnects_mid_record(serve_dest):
    sd = start_own(serve_dest)
    conn = accepted(sd)
    full = LISTEN_RUN + ram(range(5))
    conn.sendall(full[:-2000])
    conn.close()
    rc, out, err = sd.wait()
    assert rc == 4, err
    single_stderr_line(err)


def test_stalled_source_times_out(serve_dest):
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", f"mem={SIZE}", "--json", "--timeout", "1")
    conn = connect(sd)
    try:
        conn.sendall(codec.encode(codec.Header()))
        rc, out, err = sd.wait()
    finally:
        conn.close()
    assert rc == 4, err
    line = single_stderr_line(err)
    assert "nothing for 1 s" in line, line


def test_eof_before_all_pages(serve_dest):
    sd = start_own(serve_dest)
    rc, out, err = feed_and_wait(sd, preamble() + LISTEN_RUN + ram(range(3)) + codec.encode(codec.Eof()))
    assert rc == 3, err
    where, _ = protocol_line(err)
    assert "EOF" in where


# ---------------------------------------------------------------------------
# 7. PING -> PONG, RECV_BITMAP, then a complete migration

def _read_rp(conn, rp, until):
    events = []
    while not until(events):
        chunk = conn.recv(65536)
        assert chunk, events
        rp.feed(chunk)
        events.extend(rp.events())
    return events


def test_ping_recv_bitmap_and_complete(serve_dest):
    sd = start_own(serve_dest)
    conn = connect(sd)
    rp = codec.ReturnPathDecoder([BLOCK])
    try:
        conn.sendall(preamble() + codec.encode(codec.Ping(0x12345678)))
        ev = _read_rp(conn, rp, lambda e: len(e) >= 1)
        assert ev == [codec.Pong(0x12345678)]

        got = [0, 2, 5, 64, 255]
        conn.sendall(ram(got) + codec.encode(codec.RecvBitmapRequest("mem")))
        ev = _read_rp(conn, rp, lambda e: len(e) >= 1)
        assert len(ev) == 1 and isinstance(ev[0], codec.RecvBitmap) and ev[0].block == "mem"
        bitmap = bytearray(SIZE // PAGE // 8)
        for p in got:
            bitmap[p // 8] |= 1 << (p % 8)
        assert bytes(ev[0].bitmap) == bytes(bitmap)

        rest = [p for p in range(SIZE // PAGE) if p not in got]
        conn.sendall(LISTEN_RUN + codec.encode(codec.Ping(7)) + ram(rest) + codec.encode(codec.Eof()))
        ev = _read_rp(conn, rp, lambda e: any(isinstance(x, codec.Shut) for x in e))
        assert codec.Pong(7) in ev
        assert ev[-1] == codec.Shut(0)
    finally:
        conn.close()
    rc, out, err = sd.wait()
    assert rc == 0, err
    stats = json.loads(out)
    assert stats["pages"]["received"] == stats["pages"]["total"] == SIZE // PAGE
    assert stats["postcopy-requests"] == 0


def assert_return_path(conn, want: bytes) -> None:
    """The next bytes on the return path are exactly ``want``."""
    buf = b""
    while len(buf) < len(want):
        chunk = conn.recv(65536)
        assert chunk, f"serve-dest closed after {len(buf)} of {len(want)} bytes"
        buf += chunk
    assert buf == want


def test_recv_bitmap_raw_bytes(serve_dest):
    """The RECV_BITMAP message byte for byte: type 5, name, be64 size rounded to 8, bitmap LE, trailer."""
    sd = start_own(serve_dest)
    conn = connect(sd)
    try:
        conn.sendall(preamble() + ram([1, 9]) + codec.encode(codec.RecvBitmapRequest("mem")))
        nbytes = SIZE // PAGE // 8
        want = struct.pack(">HHB", 5, 4, 3) + b"mem" + struct.pack(">Q", nbytes)
        bitmap = bytearray(nbytes)
        bitmap[0] = 0b10
        bitmap[1] = 0b10
        want += bytes(bitmap) + struct.pack(">Q", 0x0123456789ABCDEF)
        assert_return_path(conn, want)
    finally:
        conn.close()
    rc, _, err = sd.wait()
    assert rc == 4, err


def test_recv_bitmap_small_block_padded(serve_dest):
    """A 10-page block: 2 bitmap bytes, sent as 8 (size rounded up to 8) with the trailer."""
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", "mem=40K", "--json", "--timeout", "20")
    small = codec.BlockInfo("mem", 10 * PAGE, PAGE)
    conn = connect(sd)
    try:
        conn.sendall(preamble([small]) + ram([0, 9]) + codec.encode(codec.RecvBitmapRequest("mem")))
        want = (struct.pack(">HHB", 5, 4, 3) + b"mem" + struct.pack(">Q", 8) + b"\x01\x02" + bytes(6) +
                struct.pack(">Q", 0x0123456789ABCDEF))
        assert_return_path(conn, want)
    finally:
        conn.close()
    rc, _, err = sd.wait()
    assert rc == 4, err


# ---------------------------------------------------------------------------
# 9. usage errors -> exit 2

@pytest.mark.parametrize("args", [
    ["--listen", "tcp:127.0.0.1:0"],                                                   # neither
    ["--listen", "tcp:127.0.0.1:0", "--ram", "mem=1M", "--uffd-socket", "/tmp/x.sock"],  # both
    ["--listen", "tcp:127.0.0.1:0", "--ram", "mem=lots"],
    ["--listen", "tcp:127.0.0.1:0", "--ram", "mem=1000"],                              # not a page multiple
    ["--listen", "tcp:127.0.0.1:0", "--ram", "=1M"],
    ["--listen", "tcp:127.0.0.1:0", "--ram", "mem=-4096"],
    ["--listen", "carrier-pigeon:home", "--ram", "mem=1M"],
    ["--listen", "tcp:127.0.0.1", "--ram", "mem=1M"],
    ["--listen", "tcp:127.0.0.1:99999", "--ram", "mem=1M"],
    ["--listen", "tcp:0.0.0.0:0", "--ram", "mem=1M"],                                 # no --insecure
])
def test_usage_errors(capsys, args):
    assert cli_run(["serve-dest", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()


def test_usage_errors_subprocess():
    p = subprocess.run(postcopy_cmd("serve-dest", "--listen", "tcp:0.0.0.0:0", "--ram", "mem=1M"),
                       capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert p.returncode == 2
    assert "--insecure" in single_stderr_line(p.stderr)


def test_two_blocks_interleaved_own_memory_library():
    """Records of two blocks interleaved (names only when the block changes), ZERO records,
    placed before LISTEN (pre-copy) and after RUN; every byte checked after run() returns."""
    import random

    sizes = {"a": 256 * 1024, "b.ram": 512 * 1024}
    blocks = [codec.BlockInfo(n, s, PAGE) for n, s in sizes.items()]
    server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", ram=list(sizes.items()), timeout=20))
    rnd = random.Random(3)
    want = {n: bytearray(s) for n, s in sizes.items()}
    todo = [(n, p) for n, s in sizes.items() for p in range(s // PAGE)]
    rnd.shuffle(todo)
    # runs of consecutive pages of one block, so CONTINUE records and block switches both occur
    records = []
    while todo:
        n, p = todo.pop()
        records.append((n, p))
        for q in range(p + 1, p + rnd.randint(0, 6)):
            if (n, q) in todo:
                todo.remove((n, q))
                records.append((n, q))
    enc = codec.RamSectionEncoder()

    def section(recs):
        parts = [enc.begin()]
        for n, p in recs:
            kind = rnd.random()
            if kind < 0.2:
                parts.append(enc.zero(n, p * PAGE))
            else:
                d = rnd.randbytes(PAGE)
                parts.append(enc.page(n, p * PAGE, d))
                want[n][p * PAGE:(p + 1) * PAGE] = d
        parts.append(enc.end())
        return b"".join(parts)

    half = len(records) // 2
    stream = (preamble(blocks) + section(records[:half]) + LISTEN_RUN + section(records[half:]) +
              codec.encode(codec.Eof()))
    try:
        result = receive_in_process(server, stream)
        assert result.stats["pages"]["received"] == sum(sizes.values()) // PAGE
        for m, (n, s) in zip(server.mappings, sizes.items()):
            assert ctypes.string_at(m.addr, s) == bytes(want[n]), n
    finally:
        server.close()


def test_block_switch_cut_by_the_receive_own_memory_library():
    """A RAM section switches blocks, and the bytes arrive cut inside the new block's named record
    (8 bytes and more of it, not all): the pump stops there, the codec needs the rest, so the Python
    side must receive it (the two once handed those bytes back and forth for ever, receiving nothing)."""
    sizes = {"a": 64 * PAGE, "b": 64 * PAGE}
    blocks = [codec.BlockInfo(n, s, PAGE) for n, s in sizes.items()]
    server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", ram=list(sizes.items()), timeout=20))
    enc = codec.RamSectionEncoder()
    a = enc.begin() + b"".join(enc.page("a", p * PAGE, page_data(p)) for p in range(8))
    b = b"".join(enc.page("b", p * PAGE, page_data(100 + p)) for p in range(8)) + enc.end()
    head = preamble(blocks) + LISTEN_RUN + a + b[:12]   # 12 bytes of block b's first (named) record
    tail = b[12:] + ram(range(8, 64), "a") + ram(range(8, 64), "b") + codec.encode(codec.Eof())
    conn = socket.create_connection((server.bound.host, server.bound.port), timeout=PROC_TIMEOUT)

    def send():
        conn.sendall(head)
        time.sleep(0.5)   # serve-dest has taken the head by now (a slower one would just not be cut there)
        conn.sendall(tail)

    sender = threading.Thread(target=send)
    result = []
    runner = threading.Thread(target=lambda: result.append(server.run()), daemon=True)
    sender.start()
    runner.start()
    try:
        runner.join(PROC_TIMEOUT)
        assert result, "serve-dest did not finish the stream"
        assert result[0].complete
        assert ctypes.string_at(server.mappings[1].addr, 8 * PAGE) == b"".join(page_data(100 + p) for p in range(8))
    finally:
        sender.join(PROC_TIMEOUT)
        conn.close()
        if not runner.is_alive():
            server.close()


@pytest.mark.parametrize("resend", ["before-listen", "after-run", "never-resent-then-zero"])
def test_discard_then_resend_own_memory_library(resend):
    """A page sent in pre-copy, then discarded, holds the data sent after the discard (never the stale copy)."""
    server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", ram=[("mem", SIZE)], timeout=20))
    enc = codec.RamSectionEncoder()
    stale, fresh = b"\x11" * PAGE, b"\x22" * PAGE
    pages = SIZE // PAGE
    discard = codec.encode(codec.PostcopyRamDiscard("mem", ((5 * PAGE, 3 * PAGE),)))   # pages 5, 6, 7
    first = enc.begin() + b"".join(enc.page("mem", p * PAGE, stale) for p in range(pages)) + enc.end()
    again = [5, 6, 7]
    resend_sec = enc.begin() + b"".join(
        (enc.page("mem", p * PAGE, fresh) if resend != "never-resent-then-zero" else enc.zero("mem", p * PAGE))
        for p in again) + enc.end()
    if resend == "before-listen":
        stream = preamble() + first + discard + resend_sec + LISTEN_RUN
    else:
        stream = preamble() + first + discard + LISTEN_RUN + resend_sec
    stream += codec.encode(codec.Eof())
    try:
        result = receive_in_process(server, stream)
        got = ctypes.string_at(server.mappings[0].addr, SIZE)
        want_again = fresh if resend != "never-resent-then-zero" else bytes(PAGE)
        for p in range(pages):
            assert got[p * PAGE:(p + 1) * PAGE] == (want_again if p in again else stale), p
    finally:
        server.close()


def test_own_memory_discard_is_one_madvise_per_range(monkeypatch):
    """One DISCARD range over a 16 GiB block drops it with one madvise, not one per page (was 10 s)."""
    import postcopy_cli.dest.engine as dest_mod

    big = 16 << 30
    calls = []
    real = dest_mod.madvise
    monkeypatch.setattr(dest_mod, "madvise", lambda addr, length, advice: (calls.append((addr, length)),
                                                                          real(addr, length, advice))[1])
    server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", ram=[("mem", big)], timeout=20))
    enc = codec.RamSectionEncoder()
    sent = enc.begin() + b"".join(enc.page("mem", p * PAGE, page_data(p)) for p in range(4)) + enc.end()
    stream = (preamble([codec.BlockInfo("mem", big, PAGE)]) + sent +
              codec.encode(codec.PostcopyRamDiscard("mem", ((0, big),))) + codec.encode(codec.Eof()))
    conn = socket.create_connection((server.bound.host, server.bound.port), timeout=PROC_TIMEOUT)
    sender = threading.Thread(target=conn.sendall, args=(stream,))
    sender.start()
    try:
        with pytest.raises(ProtocolError, match="never"):
            server.run()
        sender.join(PROC_TIMEOUT)
        base = server.mappings[0].addr
        assert calls == [(base, big)]
        assert ctypes.string_at(base, 4 * PAGE) == bytes(4 * PAGE)   # the pages sent before it were dropped
    finally:
        server.close()
