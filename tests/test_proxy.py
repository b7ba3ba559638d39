"""The fault-injecting proxy (tests/proxy.py) itself, with plain loopback sockets.

A fake "server" listens where serve-dest would; the "clients" send the headers of
DESIGN.md section 4 (the return-path messages come from the codec's encoder).
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading

import pytest

from postcopy_cli.codec import encode, encode_rp
from postcopy_cli.codec.messages import Header, RecvBitmap, ResumeAck
from proxy import FaultProxy, ProxyError

IO_TIMEOUT = 10.0
MIGRATION_ID = bytes(range(16))
HEADER = encode(Header())                           # be32 magic, be32 version
MAIN = HEADER + b"\x01" + struct.pack(">H", 0)      # BLOCKS, no blocks
PREEMPT = HEADER + b"\x20" + MIGRATION_ID
RESUME = HEADER + b"\x21" + MIGRATION_ID


class Server:
    """The target: a listening socket; accept() hands out connections in order."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]

    def accept(self, timeout=IO_TIMEOUT) -> socket.socket:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(IO_TIMEOUT)
        return conn

    def pending(self, wait: float) -> bool:
        """Is a connection waiting in the backlog within `wait` seconds?"""
        return bool(select.select([self.sock], [], [], wait)[0])

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture
def proxy(server):
    with FaultProxy(server.address) as p:
        yield p


def connect(proxy: FaultProxy, first: bytes = b"") -> socket.socket:
    c = socket.create_connection(proxy.address, timeout=IO_TIMEOUT)
    if first:
        c.sendall(first)
    return c


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything until the connection ends, and how it ended: "eof" or "reset"."""
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(buf), "reset"
        if not chunk:
            return bytes(buf), "eof"
        buf += chunk


def pair(proxy, server, first=MAIN):
    """A client connected through the proxy and the server's end, past `first`."""
    c = connect(proxy, first)
    s = server.accept()
    assert recv_exact(s, len(first)) == first
    return c, s


def test_forwards_random_bytes_both_ways_exactly(proxy, server):
    up, down = os.urandom(8 << 20), os.urandom(8 << 20)
    c, s = pair(proxy, server)
    # each end sends its 8 MiB while it reads the other's
    senders = [threading.Thread(target=c.sendall, args=(up,)), threading.Thread(target=s.sendall, args=(down,))]
    for t in senders:
        t.start()
    at_server = recv_exact(s, len(up))
    at_client = recv_exact(c, len(down))
    for t in senders:
        t.join(IO_TIMEOUT)
    assert at_server == up
    assert at_client == down
    c.shutdown(socket.SHUT_WR)
    assert read_to_end(s) == (b"", "eof")
    s.close()
    assert read_to_end(c) == (b"", "eof")
    rec = proxy.connections()[0]
    assert rec.kind == "main"
    assert rec.bytes == {"c2s": len(MAIN) + len(up), "s2c": len(down)}
    c.close()


def test_classifies_connections_by_their_first_nine_bytes(proxy, server):
    firsts = {"main": MAIN, "preempt": PREEMPT, "resume": RESUME,
              "other": b"GET / HTTP/1.0\r\n\r\n"}
    clients = []
    for kind, first in firsts.items():
        clients.append(connect(proxy, first))
        proxy.wait_connections(kind, 1)
    # our magic with another version, and a short foreign greeting that waits for an answer
    clients.append(connect(proxy, struct.pack(">II", 0x50435059, 2) + b"\x01"))
    clients.append(connect(proxy, b"hi"))
    proxy.wait_connections("other", 3)
    assert [r.kind for r in proxy.connections()] == ["main", "preempt", "resume", "other", "other", "other"]
    # a held header is forwarded whole once classified
    ends = [server.accept() for _ in clients]
    assert sorted(recv_exact(s, 2) for s in ends)[0] == b"GE"
    for sock in clients + ends:
        sock.close()


@pytest.mark.parametrize("how, ending", [("rst", "reset"), ("fin", "eof")])
def test_cut_ends_both_sides(proxy, server, how, ending):
    c, s = pair(proxy, server)
    c.sendall(b"x" * 1000)
    proxy.wait_bytes("main", "c2s", len(MAIN) + 1000)
    assert proxy.cut(how=how) == 1
    assert read_to_end(s) == (b"x" * 1000, ending)
    assert read_to_end(c) == (b"", ending)
    rec = proxy.connections()[0]
    assert not rec.open and rec.closed_by == "cut"
    assert len(proxy.cuts()) == 1
    c.close(), s.close()


def test_cut_of_one_kind_leaves_the_others(proxy, server):
    cm, sm = pair(proxy, server, MAIN)
    cp, sp = pair(proxy, server, PREEMPT)
    assert proxy.cut("preempt") == 1
    assert read_to_end(sp) == (b"", "reset")
    assert read_to_end(cp) == (b"", "reset")
    cm.sendall(b"ping")
    assert recv_exact(sm, 4) == b"ping"
    sm.sendall(b"pong")
    assert recv_exact(cm, 4) == b"pong"
    assert [(r.kind, r.open) for r in proxy.connections()] == [("main", True), ("preempt", False)]
    assert proxy.cut("resume") == 0 and proxy.cuts() == proxy.cuts()[:1]
    for sock in (cm, sm, cp, sp):
        sock.close()


def test_a_one_sided_cut_leaves_the_other_peer_half_open(proxy, server):
    c, s = pair(proxy, server)
    assert proxy.cut(side="client") == 1
    assert read_to_end(c) == (b"", "reset")
    s.sendall(b"into the void")                  # the server has not noticed: no reset, silence
    assert not select.select([s], [], [], 0.3)[0]
    c2, s2 = pair(proxy, server, RESUME)         # a new connection goes through meanwhile
    assert proxy.cut("main") == 0                # the half-open side is closed, no new cut
    assert read_to_end(s) == (b"", "reset")
    assert len(proxy.cuts()) == 1 and proxy.connections("resume")[0].open
    for sock in (c, s, c2, s2):
        sock.close()


def test_stall_holds_every_byte_until_unstall(proxy, server):
    c, s = pair(proxy, server)
    proxy.stall()
    up, down = os.urandom(300_000), os.urandom(300_000)
    threading.Thread(target=c.sendall, args=(up,), daemon=True).start()
    threading.Thread(target=s.sendall, args=(down,), daemon=True).start()
    c2 = connect(proxy, PREEMPT)
    # silence both ways, and the connection accepted meanwhile is not passed on
    assert not select.select([c, s], [], [], 0.5)[0]
    assert not server.pending(0)
    assert proxy.connections()[0].bytes == {"c2s": len(MAIN), "s2c": 0}
    proxy.unstall()
    assert recv_exact(s, len(up)) == up
    assert recv_exact(c, len(down)) == down
    s2 = server.accept()
    assert recv_exact(s2, len(PREEMPT)) == PREEMPT
    for sock in (c, s, c2, s2):
        sock.close()


def test_cut_after_cuts_at_exactly_that_byte(proxy, server):
    proxy.cut_after("main", "c2s", 100_000)
    c = connect(proxy)
    data = os.urandom(1 << 20)
    threading.Thread(target=lambda: _send_ignoring_reset(c, MAIN + data), daemon=True).start()
    s = server.accept()
    got, ending = read_to_end(s)
    assert (got, ending) == ((MAIN + data)[:100_000], "reset")
    rec = proxy.connections()[0]
    assert rec.closed_by == "cut_after" and rec.bytes["c2s"] == 100_000
    assert len(proxy.cuts()) == 1
    # one shot: the next main connection passes
    c2, s2 = pair(proxy, server)
    c2.sendall(data)
    assert recv_exact(s2, len(data)) == data
    for sock in (c, s, c2, s2):
        sock.close()


def _send_ignoring_reset(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_refuse_next_closes_that_many_connections(proxy, server):
    proxy.refuse_next(2)
    for _ in range(2):
        assert refused(proxy)
    c, s = pair(proxy, server)
    assert [r.closed_by for r in proxy.connections()] == ["refused", "refused", None]
    assert not server.pending(0)        # the refused ones never reached the target
    c.close(), s.close()


def refused(proxy) -> bool:
    """Was a connection to the proxy closed at once (the RST may even beat connect())?"""
    try:
        with socket.create_connection(proxy.address, timeout=IO_TIMEOUT) as c:
            _send_ignoring_reset(c, MAIN)
            return read_to_end(c)[0] == b""
    except ConnectionResetError:
        return True


def bitmaps() -> bytes:
    """RP RECV_BITMAP for two blocks, the first 1 GiB of 4 KiB pages (32 KiB of bitmap)."""
    return (encode_rp(RecvBitmap("mem", os.urandom(32 << 10)))
            + encode_rp(RecvBitmap("b", b"\xff\x01")))


def test_resume_ack_then_a_client_byte_is_a_recovery(proxy, server):
    cm, sm = pair(proxy, server, MAIN)
    assert proxy.cut() == 1
    cr, sr = pair(proxy, server, RESUME)
    bm = bitmaps()
    sr.sendall(bm)
    proxy.wait_bytes("resume", "s2c", len(bm))
    assert recv_exact(cr, len(bm)) == bm
    cr.sendall(b"not yet")                       # before the ACK, client bytes are the handshake
    proxy.wait_bytes("resume", "c2s", len(RESUME) + 7)
    rec = proxy.connections("resume")[0]
    assert rec.resume_ack_at is None and rec.resumed_at is None and rec.rp_error is None
    assert proxy.recoveries() == [None]
    ack = encode_rp(ResumeAck())
    sr.sendall(ack)
    assert recv_exact(cr, len(ack)) == ack
    proxy.wait_bytes("resume", "s2c", len(bm) + len(ack))
    rec = proxy.connections("resume")[0]
    assert rec.resume_ack_at is not None and rec.resumed_at is None
    with pytest.raises(ProxyError, match="1 resumed connection"):
        proxy.wait_resumed(1, timeout=0.2)
    cr.sendall(b"page")
    (rec,) = proxy.wait_resumed(1)
    (cut,) = proxy.cuts()
    assert cut < rec.resume_ack_at < rec.resumed_at
    assert proxy.recoveries() == [pytest.approx(rec.resumed_at - cut)]
    for sock in (cm, sm, cr, sr):
        sock.close()


def test_a_cut_during_the_handshake_recovers_on_the_next_resume(proxy, server):
    cm, sm = pair(proxy, server, MAIN)
    assert proxy.cut() == 1
    proxy.cut_after("resume", "s2c", 1)           # after the first byte of RP RECV_BITMAP
    cr, sr = pair(proxy, server, RESUME)
    bm = bitmaps()
    _send_ignoring_reset(sr, bm + encode_rp(ResumeAck()))
    assert read_to_end(cr) == (bm[:1], "reset")
    cr2, sr2 = pair(proxy, server, RESUME)
    sr2.sendall(bm + encode_rp(ResumeAck()))
    recv_exact(cr2, len(bm) + 8)
    cr2.sendall(b"page")
    proxy.wait_resumed(1)
    first, second = proxy.recoveries()
    assert first > second > 0
    assert [r.closed_by for r in proxy.connections("resume")] == ["cut_after", None]


def test_a_bad_bitmap_end_mark_is_recorded_not_taken_for_an_ack(proxy, server):
    cr, sr = pair(proxy, server, RESUME)
    bad = bitmaps()[:-8] + b"\0" * 8 + encode_rp(ResumeAck())
    sr.sendall(bad)
    recv_exact(cr, len(bad))
    cr.sendall(b"page")
    proxy.wait_bytes("resume", "c2s", len(RESUME) + 4)
    rec = proxy.connections("resume")[0]
    assert "end mark" in rec.rp_error and rec.resume_ack_at is None and rec.resumed_at is None


def test_waits_time_out_with_what_they_waited_for(proxy):
    with pytest.raises(ProxyError, match=r"2 main connection\(s\).*connections: none"):
        proxy.wait_connections("main", 2, timeout=0.1)


def test_close_ends_live_connections_and_refuses_new_ones(server):
    with FaultProxy(server.address) as p:
        c, s = pair(p, server)
    assert read_to_end(s) == (b"", "reset")
    with pytest.raises(OSError):
        socket.create_connection(p.address, timeout=IO_TIMEOUT)
    with pytest.raises(ProxyError, match="closed"):
        p.cut()
    c.close(), s.close()
