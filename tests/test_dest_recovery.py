"""Post-copy recovery on the destination (issue 10, DESIGN.md sections 4 and 9), against a hand-written source.

serve-dest runs for real; the source is this test, on real loopback TCP connections, so every byte of the
resume handshake is the test's to choose and to check: the cut, the RESUME section, RECV_BITMAP, RESUME_ACK,
the requests sent again, and what is refused.  Where an attached program is used, its touching thread runs in
native code and must wait (in handle_userfault) through the pause and then read the right bytes.
"""
from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from postcopy_cli import codec
from conftest import PROC_TIMEOUT, write_image
from test_failure_memory import HANG, Prog, _wait_for

PAGE = 4096
MID = bytes(range(0x10, 0x20))


def rst_close(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the link broke."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class Source:
    """One connection of the hand-written source to serve-dest; ``block`` is the migrated block."""

    def __init__(self, port: int, block: codec.BlockInfo, data: bytes):
        self.block, self.data = block, data
        self.conn = socket.create_connection(("127.0.0.1", port), timeout=PROC_TIMEOUT)
        self.rp = codec.ReturnPathDecoder([block])
        self.ram = codec.RamSectionEncoder()
        self.events: list = []

    def send(self, *messages) -> None:
        self.conn.sendall(b"".join(m if isinstance(m, bytes) else codec.encode(m) for m in messages))

    def start(self, *, mid: bytes = MID, preempt: int = 0) -> None:
        """The preamble with an ID section, LISTEN and RUN."""
        self.send(codec.Header(), codec.Blocks((self.block,)), codec.MigrationId(mid, preempt), codec.OpenReturnPath(),
                  codec.PostcopyAdvise(self.block.page_size, PAGE), codec.PostcopyListen(), codec.PostcopyRun())

    def resume(self, *, mid: bytes = MID) -> None:
        """A resumed main stream: header, RESUME, RECV_BITMAP, POSTCOPY_RESUME."""
        self.send(codec.Header(), codec.Resume(mid), codec.RecvBitmapRequest(self.block.name), codec.PostcopyResume())

    def pages(self, indexes, *, end: bool = True) -> None:
        self.conn.sendall(self.ram.begin() + b"".join(
            self.ram.page(self.block.name, i * PAGE, self.data[i * PAGE:(i + 1) * PAGE]) for i in indexes) +
            (self.ram.end() if end else b""))

    def read_until(self, cond, what: str) -> list:
        """Return-path events until ``cond(events)``; fails at EOF naming ``what``."""
        while not cond(self.events):
            chunk = self.conn.recv(1 << 16)
            assert chunk, f"serve-dest closed the connection before {what}; got {self.events}"
            self.rp.feed(chunk)
            self.events += list(self.rp.events())
        return self.events

    def bitmap_pages(self) -> set[int]:
        """Pages the destination has, from its RECV_BITMAP (little-endian, one bit per target page)."""
        bm = next(e for e in self.events if isinstance(e, codec.RecvBitmap)).bitmap
        return {i for i in range(self.block.length // PAGE) if bm[i // 8] >> (i % 8) & 1}

    def requested(self) -> list[int]:
        return [e.start // PAGE for e in self.events if isinstance(e, codec.ReqPagesId)]

    def finish(self) -> None:
        """EOF, then SHUT 0; closes, as a source does once it has SHUT (serve-dest waits for that close:
        without it, it cannot tell a delivered SHUT from one a broken link lost)."""
        self.send(codec.Eof())
        self.read_until(lambda evs: any(isinstance(e, codec.Shut) for e in evs), "SHUT")
        assert [e.status for e in self.events if isinstance(e, codec.Shut)] == [0]
        self.conn.close()

    def close(self) -> None:
        self.conn.close()


def running_source(sd, block: codec.BlockInfo, data: bytes, pages: int) -> "Source":
    """A source past RUN that sent ``pages`` pages and got a page request back (the program faults)."""
    src = Source(sd.port, block, data)
    src.start()
    src.pages(range(pages))
    src.read_until(lambda evs: src.requested(), "a request")
    return src


def running_with_preempt(serve_dest, n: int):
    """serve-dest (own memory, ``n`` pages) and a source past RUN that announced a preempt channel (not
    connected yet): (serve-dest, block, data, source)."""
    sd, block, data = own_memory(serve_dest, n)
    src = Source(sd.port, block, data)
    src.start(preempt=1)
    src.send(codec.Ping(1))
    src.read_until(has(codec.Pong), "PONG")
    return sd, block, data, src


def refused(conn: socket.socket) -> bool:
    """serve-dest closed ``conn`` without sending a byte (a close with our bytes unread is a reset)."""
    try:
        return conn.recv(100) == b""
    except ConnectionResetError:
        return True


def own_memory(serve_dest, n: int):
    """serve-dest receiving ``n`` pages into its own memory: (serve-dest, the block, the source's data)."""
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", f"mem={n * PAGE}")
    return sd, codec.BlockInfo("mem", n * PAGE, PAGE), os.urandom(n * PAGE)


def has(kind):
    return lambda evs: any(isinstance(e, kind) for e in evs)


@pytest.fixture
def attached(tmp_path, serve_dest):
    """serve-dest with an attached program (Prog: touches every page in order after RUN, verifying each)."""
    started = []

    def start(pages: int, *extra: str):
        image = tmp_path / "img"
        data = write_image(image, pages * PAGE, seed=11, zero_runs=())
        usock = str(tmp_path / "u.sock")
        sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", usock, "--timeout", "30", *extra)
        prog = Prog(usock, str(image), pages * PAGE)
        started.append(prog)
        return sd, prog, codec.BlockInfo("mem", pages * PAGE, PAGE), data

    yield start
    for p in started:
        p.kill()


def test_a_cut_pauses_and_the_program_waits_then_reads_the_right_bytes(attached):
    """The program faults on a page the source never answers; the link breaks; its thread waits through the
    pause; the resumed stream gets the bitmap of what arrived, RESUME_ACK, then the request again (naming
    its block), and the program reads every page right."""
    n = 64
    sd, prog, block, data = attached(n)
    src = Source(sd.port, block, data)
    src.start()
    src.pages(range(10))
    # the program touches page 10 next: its request comes, and is never answered on this connection
    src.read_until(lambda evs: 10 in [e.start // PAGE for e in evs if isinstance(e, codec.ReqPagesId)],
                   "the request for page 10")
    rst_close(src.conn)
    _wait_for(lambda: any(e.get("event") == "paused" for e in prog.events()), "the program is told paused")
    _wait_for(prog.blocked, "the program's thread waits on page 10")
    assert prog.pages() == 10 and not [l for l in prog.lines if l.endswith(" bad")]

    again = Source(sd.port, block, data)
    again.resume()
    again.read_until(has(codec.ResumeAck), "RESUME_ACK")
    assert again.bitmap_pages() == set(range(10))
    assert again.events[:2] == [codec.RecvBitmap("mem", again.events[0].bitmap), codec.ResumeAck(1)]
    # the outstanding request, sent again after RESUME_ACK; the first request on a connection names its block
    # (this fresh decoder refuses a REQ_PAGES before any REQ_PAGES_ID)
    again.read_until(lambda evs: again.requested(), "the request sent again")
    assert again.requested()[0] == 10
    again.pages(range(10, n))
    again.finish()
    rc, out, err = sd.wait()
    assert rc == 0, err
    _wait_for(lambda: "DONE" in prog.lines, "the program touched every page")
    assert prog.pages() == n and not [l for l in prog.lines if l.endswith(" bad")]
    events = [e["event"] for e in prog.events()]
    assert events == ["run", "paused", "resumed", "complete"], events
    import json
    stats = json.loads(out.splitlines()[-1])
    assert stats["postcopy-recoveries"] == 1 and len(stats["postcopy-recovery-ms"]) == 1
    assert stats["postcopy-rerequests"] >= 1
    assert "post-copy paused" in err and "post-copy resumed" in err


def test_refusals_leave_the_paused_migration_waiting(attached):
    """A RESUME with a wrong id, garbage, a fresh stream and a RESUME cut mid-handshake are each refused (or
    fail) on their own connection with a warning; the right source then resumes."""
    n = 32
    sd, prog, block, data = attached(n)
    src = running_source(sd, block, data, 4)
    rst_close(src.conn)
    _wait_for(lambda: any(e.get("event") == "paused" for e in prog.events()), "paused")

    wrong = Source(sd.port, block, data)
    wrong.resume(mid=bytes(16 * [7]))
    assert refused(wrong.conn), "a wrong id is refused before any byte of the return path"
    garbage = socket.create_connection(("127.0.0.1", sd.port), timeout=PROC_TIMEOUT)
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert refused(garbage)
    fresh = Source(sd.port, block, data)
    fresh.start()
    assert refused(fresh.conn)
    # the right id, then the connection breaks after the bitmap, before POSTCOPY_RESUME
    half = Source(sd.port, block, data)
    half.send(codec.Header(), codec.Resume(MID), codec.RecvBitmapRequest("mem"))
    half.read_until(has(codec.RecvBitmap), "RECV_BITMAP")
    rst_close(half.conn)
    assert prog.blocked()

    good = Source(sd.port, block, data)
    good.resume()
    good.read_until(has(codec.ResumeAck), "RESUME_ACK")
    good.pages(sorted(set(range(n)) - good.bitmap_pages()))
    good.finish()
    rc, out, err = sd.wait()
    assert rc == 0, err
    warnings = [l for l in err.splitlines() if "WARNING" in l]
    assert any("names another migration id" in w for w in warnings), err
    assert any("PREEMPT (0x20) or RESUME (0x21)" in w and "0x01" in w for w in warnings), err
    assert any("the resumed stream failed" in w for w in warnings), err
    assert sum("refused an extra connection" in w for w in warnings) == 3, err
    _wait_for(lambda: "DONE" in prog.lines, "the program touched every page")
    assert not [l for l in prog.lines if l.endswith(" bad")]
    for s in (wrong, fresh):
        s.close()
    garbage.close()


def test_half_open_the_source_resumes_before_the_destination_noticed(attached):
    """The old connection is still open (the destination saw no failure): a RESUME with the right id drops it."""
    n = 32
    sd, prog, block, data = attached(n)
    old = running_source(sd, block, data, 8)
    new = Source(sd.port, block, data)
    new.resume()
    new.read_until(has(codec.ResumeAck), "RESUME_ACK")
    assert new.bitmap_pages() == set(range(8))
    old.conn.settimeout(HANG)
    try:
        rest = old.conn.recv(1 << 16)
        while rest:
            rest = old.conn.recv(1 << 16)
    except ConnectionResetError:
        pass   # dropped: EOF or a reset, never more requests
    new.pages(range(8, n))
    new.finish()
    rc, out, err = sd.wait()
    assert rc == 0, err
    assert "the source resumed on a new connection" in err, err
    _wait_for(lambda: "DONE" in prog.lines, "the program touched every page")
    assert not [l for l in prog.lines if l.endswith(" bad")]
    old.close()


def test_recover_timeout_ends_the_pause_with_exit_4(attached):
    n = 32
    sd, prog, block, data = attached(n, "--recover-timeout", "1")
    src = running_source(sd, block, data, 4)
    rst_close(src.conn)
    rc, out, err = sd.wait()
    assert rc == 4, err
    assert "stayed paused for" in err and "--recover-timeout 1" in err, err
    assert "28 of 32 pages never arrived" in err and "must be stopped" in err, err
    _wait_for(lambda: any(e.get("event") == "failed" for e in prog.events()), "the program is told failed")
    assert prog.blocked() and not [l for l in prog.lines if l.endswith(" bad")]


@pytest.mark.parametrize("case", ["recover-timeout-0", "before-listen", "no-migration-id"])
def test_no_pause_where_nothing_can_resume(serve_dest, case):
    """--recover-timeout 0 (today's behaviour), a break before LISTEN (the source cannot have sent RUN: its
    program still runs there) and a source without an ID section (nothing to resume by): exit 4 at once."""
    n = 16
    block = codec.BlockInfo("mem", n * PAGE, PAGE)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", f"mem={n * PAGE}",
                    *(["--recover-timeout", "0"] if case == "recover-timeout-0" else []))
    src = Source(sd.port, block, os.urandom(n * PAGE))
    if case == "before-listen":
        src.send(codec.Header(), codec.Blocks((block,)), codec.MigrationId(MID, 0), codec.OpenReturnPath(),
                 codec.PostcopyAdvise(PAGE, PAGE))
    elif case == "no-migration-id":
        src.send(codec.Header(), codec.Blocks((block,)), codec.OpenReturnPath(), codec.PostcopyAdvise(PAGE, PAGE),
                 codec.PostcopyListen(), codec.PostcopyRun())
    else:
        src.start()
    src.pages(range(3))
    src.send(codec.Ping(1))
    src.read_until(has(codec.Pong), "PONG")   # every byte before it was taken
    rst_close(src.conn)
    rc, out, err = sd.wait(timeout=HANG)
    assert rc == 4, err
    assert "paused" not in err, err


def test_a_break_while_listening_pauses_and_the_resume_runs_the_program(attached):
    """The connection breaks after LISTEN with RUN lost on the way (a reset drops what the receiver has not
    read): the source, which sent RUN, resumes; the program is told to run then, with the STATE bytes."""
    n = 16
    sd, prog, block, data = attached(n)
    src = Source(sd.port, block, data)
    src.send(codec.Header(), codec.Blocks((block,)), codec.MigrationId(MID, 0), codec.OpenReturnPath(),
             codec.PostcopyAdvise(PAGE, PAGE), codec.State(b"dev"), codec.PostcopyListen(), codec.Ping(1))
    src.read_until(has(codec.Pong), "PONG")
    rst_close(src.conn)
    time.sleep(0.3)   # (not a timing assertion: the program must not be told to run in any case)
    assert not any(e.get("event") == "run" for e in prog.events()), prog.events()
    again = Source(sd.port, block, data)
    again.resume()
    again.read_until(has(codec.ResumeAck), "RESUME_ACK")
    again.pages(range(n))
    again.finish()
    rc, out, err = sd.wait()
    assert rc == 0, err
    _wait_for(lambda: "DONE" in prog.lines, "the program touched every page")
    runs = [e for e in prog.events() if e.get("event") == "run"]
    assert len(runs) == 1 and runs[0]["state"] == "ZGV2", prog.events()   # base64 of b"dev"
    assert not [l for l in prog.lines if l.endswith(" bad")]


def test_resume_refused_before_run(serve_dest):
    """A RESUME while the migration only listens is refused on its own; the migration goes on."""
    n = 16
    sd, block, data = own_memory(serve_dest, n)
    src = Source(sd.port, block, data)
    src.send(codec.Header(), codec.Blocks((block,)), codec.MigrationId(MID, 0), codec.OpenReturnPath(),
             codec.PostcopyAdvise(PAGE, PAGE), codec.PostcopyListen(), codec.Ping(1))
    src.read_until(has(codec.Pong), "PONG")
    early = Source(sd.port, block, data)
    early.resume()
    assert refused(early.conn)
    src.send(codec.PostcopyRun())
    src.pages(range(n))
    src.finish()
    rc, out, err = sd.wait()
    assert rc == 0, err
    assert "RESUME while the migration is listening" in err, err
    early.close()


def test_preempt_channel_cut_alone_pauses_and_resumes(serve_dest):
    """A break of the preempt channel alone pauses the migration too: both channels are dropped, the resumed
    stream brings it to the end, and a new preempt channel is adopted after RESUME_ACK."""
    n = 32
    sd, block, data = own_memory(serve_dest, n)
    src = Source(sd.port, block, data)
    src.start(preempt=1)
    pre = socket.create_connection(("127.0.0.1", sd.port), timeout=PROC_TIMEOUT)
    pre.sendall(codec.encode(codec.Header()) + codec.encode(codec.PreemptChannel(MID)) +
                src.ram.begin() + src.ram.page("mem", 0, data[:PAGE]) + src.ram.end())
    src.pages(range(1, 6))
    src.send(codec.Ping(2))
    src.read_until(has(codec.Pong), "PONG")
    rst_close(pre)
    # the destination ends the main stream too
    src.conn.settimeout(HANG)
    try:
        while src.conn.recv(1 << 16):
            pass
    except ConnectionResetError:
        pass
    again = Source(sd.port, block, data)
    again.resume()
    again.read_until(has(codec.ResumeAck), "RESUME_ACK")
    have = again.bitmap_pages()
    assert set(range(1, 6)) <= have
    pre2 = socket.create_connection(("127.0.0.1", sd.port), timeout=PROC_TIMEOUT)
    missing = sorted(set(range(n)) - have)
    pre2.sendall(codec.encode(codec.Header()) + codec.encode(codec.PreemptChannel(MID)) + again.ram.begin() +
                 again.ram.page("mem", missing[0] * PAGE, data[missing[0] * PAGE:(missing[0] + 1) * PAGE]) +
                 again.ram.end() + codec.encode(codec.Eof()))
    again.ram = codec.RamSectionEncoder()
    again.pages(missing[1:])
    again.finish()
    rc, out, err = sd.wait()
    assert rc == 0, err
    assert "refused an extra connection" not in err, err
    src.close()
    pre2.close()


def test_a_stale_preempt_channel_from_before_the_pause_is_refused(serve_dest):
    """A preempt channel of the broken connection that completes its header only after the resume (it was
    still on its way) is refused; the one the source opens after RESUME_ACK is adopted."""
    n = 16
    sd, block, data, src = running_with_preempt(serve_dest, n)
    stale = socket.create_connection(("127.0.0.1", sd.port), timeout=PROC_TIMEOUT)
    head = codec.encode(codec.Header()) + codec.encode(codec.PreemptChannel(MID))
    stale.sendall(head[:10])          # its offer waits for the rest
    time.sleep(0.2)                   # (not a timing assertion: only lets the offer begin before the break)
    rst_close(src.conn)
    again = Source(sd.port, block, data)
    again.resume()
    again.read_until(has(codec.ResumeAck), "RESUME_ACK")
    stale.sendall(head[10:] + again.ram.begin() + again.ram.page("mem", 0, data[:PAGE]) + again.ram.end())
    assert refused(stale)
    fresh = socket.create_connection(("127.0.0.1", sd.port), timeout=PROC_TIMEOUT)
    enc = codec.RamSectionEncoder()
    fresh.sendall(head + enc.begin() + enc.page("mem", 0, data[:PAGE]) + enc.end() + codec.encode(codec.Eof()))
    again.pages(range(1, n))
    again.finish()
    rc, out, err = sd.wait()
    assert rc == 0, err
    assert "preempt channel of a connection that broke" in err, err
    assert err.count("refused an extra connection") == 1, err
    fresh.close()


def test_shut_lost_with_the_last_connection_is_told_again(serve_dest):
    """Every page is in, but the connection breaks right after EOF (SHUT 0 lost with it): serve-dest waits
    for the source to come back and answers its resume with SHUT 0, instead of leaving it to retry."""
    n = 8
    sd, block, data = own_memory(serve_dest, n)
    src = Source(sd.port, block, data)
    src.start()
    src.pages(range(n))
    src.send(codec.Ping(1))
    src.read_until(has(codec.Pong), "PONG")   # serve-dest has taken every page
    src.send(codec.Eof())
    rst_close(src.conn)
    again = Source(sd.port, block, data)
    again.resume()
    again.read_until(has(codec.Shut), "SHUT")
    assert again.events == [codec.Shut(0)], again.events
    rc, out, err = sd.wait()
    assert rc == 0, err
    import json
    assert json.loads(out.splitlines()[-1])["pages"]["received"] == n


def test_a_preempt_channel_protocol_error_still_tells_the_source(serve_dest):
    """A malformed record on the preempt channel ends the migration (exit 3, no pause: it is not a broken
    link), and the source still reads SHUT 1 on the main connection, so it does not try to resume."""
    n = 16
    sd, block, data, src = running_with_preempt(serve_dest, n)
    pre = socket.create_connection(("127.0.0.1", sd.port), timeout=PROC_TIMEOUT)
    pre.sendall(codec.encode(codec.Header()) + codec.encode(codec.PreemptChannel(MID)) + b"\x02" +
                (PAGE | 0x40 | 0x08).to_bytes(8, "big"))   # unknown flag 0x40
    src.read_until(has(codec.Shut), "SHUT")
    assert [e for e in src.events if isinstance(e, codec.Shut)] == [codec.Shut(1)]
    rc, out, err = sd.wait()
    assert rc == 3, err
    assert "protocol error" in err and "paused" not in err, err
    pre.close()


def test_a_resumed_connection_that_breaks_while_the_requests_go_out_stays_paused(tmp_path, monkeypatch):
    """The resumed connection breaks right as serve-dest sends the outstanding requests on it (a barrier
    in the call that sends them: the source side is reset and serve-dest's socket has seen it before the
    real call runs, so the kernel fails the write).  That is the source connection failing again: the
    migration stays paused (it had ended serve-dest with exit 1, seen in CI), and the next resume is sent
    the outstanding request again (the requests must be held back once more, not taken as sent)."""
    import select

    import postcopy_cli.dest.engine as engine
    from test_end_races import _InProcessServe

    n = 64
    image = tmp_path / "img"
    data = write_image(image, n * PAGE, seed=11, zero_runs=())
    serve = _InProcessServe(tmp_path)
    prog = Prog(str(serve.uffd_sock), str(image), n * PAGE)
    block = codec.BlockInfo("mem", n * PAGE, PAGE)
    real = engine.lib
    armed: list = []   # the source whose connection breaks at the next resume's requests

    class BreakingLib:
        def __getattr__(self, name):
            return getattr(real, name)

        def pc_dest_set_phase(self, native, phase):
            if armed and phase == real.PC_PHASE_RUNNING:
                rst_close(armed.pop().conn)
                p = select.poll()
                p.register(serve.server.dest._conn.fileno(), select.POLLERR | select.POLLHUP)
                assert p.poll(PROC_TIMEOUT * 1000), "serve-dest's socket never saw the reset"
            return real.pc_dest_set_phase(native, phase)

    monkeypatch.setattr(engine, "lib", BreakingLib())
    try:
        src = Source(serve.server.bound.port, block, data)
        src.start()
        src.pages(range(10))
        src.read_until(lambda evs: 10 in src.requested(), "the request for page 10")
        rst_close(src.conn)
        _wait_for(lambda: any(e.get("event") == "paused" for e in prog.events()), "the program is told paused")
        _wait_for(prog.blocked, "the program's thread waits on page 10")

        broken = Source(serve.server.bound.port, block, data)
        armed.append(broken)
        broken.resume()
        _wait_for(lambda: not armed, "the resume reached the outstanding requests")

        again = Source(serve.server.bound.port, block, data)
        again.resume()
        again.read_until(has(codec.ResumeAck), "RESUME_ACK")
        again.read_until(lambda evs: again.requested(), "the outstanding request sent again")
        assert again.requested()[0] == 10
        again.pages(range(10, n))
        again.finish()
        serve.join()
        assert serve.error is None, f"serve-dest failed: {serve.error!r}"
        assert serve.result.complete
        _wait_for(lambda: "DONE" in prog.lines, "the program touched every page")
        assert prog.pages() == n and not [line for line in prog.lines if line.endswith(" bad")]
    finally:
        prog.kill()
