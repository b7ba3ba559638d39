"""A fault-injecting loopback TCP proxy for the post-copy recovery tests and benchmark.

``FaultProxy((host, port))`` listens on 127.0.0.1 and forwards every connection it accepts
to the target, both directions, from one selector thread inside the calling process.  The
test thread breaks the link on purpose: ``cut`` (RST or FIN), ``stall``/``unstall``,
``cut_after`` (a one-shot cut once a connection has forwarded N bytes one way) and
``refuse_next``.

Each connection is classified from the first 9 bytes its client sends (DESIGN.md section 4:
be32 magic 0x50435059, be32 version 1, u8 section): BLOCKS 0x01 "main", PREEMPT 0x20
"preempt", RESUME 0x21 "resume", anything else "other".  Until then its client's bytes are
held, so a ``cut_after`` counts from the first byte exactly.  On a "resume" connection the
destination's bytes are parsed as return-path messages (be16 type, be16 len, payload) up to
RESUME_ACK (type 6): RP RECV_BITMAP (type 5) comes first, QEMU's layout: its framed payload
is the block name (u8 n + name) and the bitmap follows outside the framing (be64 size,
size bytes, be64 end mark 0x0123456789abcdef).  The first client byte forwarded after the
RESUME_ACK is "pages flowing again": ``recoveries()`` measures each cut up to it.

Times are ``time.monotonic()`` seconds.
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import os
import selectors
import socket
import struct
import termios
import threading
import time

MAGIC = 0x50435059
VERSION = 1
KIND_OF_SECTION = {0x01: "main", 0x20: "preempt", 0x21: "resume"}
KINDS = ("main", "preempt", "resume", "other")
DIRECTIONS = ("c2s", "s2c")
HEADER_BYTES = 9                      # be32 magic, be32 version, u8 section
_PREFIX = struct.pack(">II", MAGIC, VERSION)
RP_RECV_BITMAP = 5
RP_RESUME_ACK = 6
RECV_BITMAP_ENDING = 0x0123456789ABCDEF
CHUNK = 1 << 20
COMMAND_TIMEOUT = 10.0


class ProxyError(AssertionError):
    """A wait of the proxy timed out, or the proxy's thread is gone."""


@dataclasses.dataclass
class Connection:
    """What the proxy saw of one accepted connection (a snapshot when read from outside)."""
    index: int
    accepted_at: float
    kind: str | None = None            # None until the client's first 9 bytes are in
    bytes: dict = dataclasses.field(default_factory=lambda: {"c2s": 0, "s2c": 0})
    open: bool = True
    closed_at: float | None = None
    closed_by: str | None = None       # "cut", "cut_after", "refused", "client", "server", "proxy"
    resume_ack_at: float | None = None     # RESUME_ACK's last byte forwarded to the client
    resumed_at: float | None = None        # first client->server byte forwarded after it
    rp_error: str | None = None        # the return path did not parse (the record stops there)


class _ResumeParser:
    """Follows the return path of a "resume" connection up to RESUME_ACK."""

    def __init__(self):
        self.buf = bytearray()
        self.need = 4                  # bytes wanted in buf for the current step
        self.skip = 0                  # bytes to pass over unread (a bitmap, a payload)
        self.step = "rp header"
        self.name_len = 0
        self.acked = False
        self.error: str | None = None

    def feed(self, data: memoryview) -> bool:
        """Takes the bytes forwarded to the client; True once RESUME_ACK is complete."""
        pos, end = 0, len(data)
        while pos < end and not self.acked and self.error is None:
            if self.skip:
                n = min(self.skip, end - pos)
                self.skip -= n
                pos += n
                if self.skip == 0 and self.step == "bitmap":
                    self.step, self.need = "end mark", 8
                continue
            n = min(self.need - len(self.buf), end - pos)
            self.buf += data[pos:pos + n]
            pos += n
            if len(self.buf) == self.need:
                self._step()
        return self.acked

    def _step(self):
        buf = bytes(self.buf)
        self.buf.clear()
        if self.step == "rp header":
            kind, length = struct.unpack(">HH", buf)
            if kind == RP_RESUME_ACK:
                self.step, self.need = "resume ack", 4
            elif kind == RP_RECV_BITMAP:
                self.step, self.need, self.name_len = "bitmap name", length, 0
            else:                      # another message before the ACK: passed over
                self.step, self.need, self.skip = "rp header", 4, length
        elif self.step == "resume ack":
            self.acked = True
        elif self.step == "bitmap name":
            n = buf[0] if buf else 0
            if len(buf) == 1 + n:      # QEMU's layout: the bitmap follows the framed name
                self.step, self.need = "bitmap size", 8
            else:                      # a bitmap inside the framed payload
                self.step, self.need = "rp header", 4
        elif self.step == "bitmap size":
            (size,) = struct.unpack(">Q", buf)
            if size:
                self.step, self.skip, self.need = "bitmap", size, 8
            else:
                self.step, self.need = "end mark", 8
        elif self.step == "end mark":
            (mark,) = struct.unpack(">Q", buf)
            if mark != RECV_BITMAP_ENDING:
                self.error = f"RP RECV_BITMAP end mark {mark:#018x}, expected {RECV_BITMAP_ENDING:#018x}"
            self.step, self.need = "rp header", 4


class _Direction:
    """One way of a connection: bytes read from `src`, not yet written to `dst`."""

    def __init__(self, name: str, src: socket.socket, dst: socket.socket | None):
        self.name, self.src, self.dst = name, src, dst
        self.pending = bytearray()
        self.eof = False               # src said FIN; dst gets it once pending is written
        self.shut = False              # FIN passed on to dst
        self.limit: int | None = None  # cut_after: cut once this many bytes went this way
        self.hold = False              # hold_after: at the limit, stop forwarding instead of cutting
        self.holding = False           # the limit is reached and this way is held


class _Link:
    """The live sockets of one connection (inside the proxy thread only)."""

    def __init__(self, rec: Connection, client: socket.socket):
        self.rec = rec
        self.client = client
        self.server: socket.socket | None = None
        self.c2s = _Direction("c2s", client, None)
        self.s2c: _Direction | None = None
        self.peek = bytearray()        # the client's first bytes, held until classified
        self.parser: _ResumeParser | None = None
        self.cutting = False           # cut_after fired: the RST waits for the send queues
        self.cut_deadline = 0.0


def _abort(sock: socket.socket | None):
    """Close with SO_LINGER 0: the kernel sends RST and drops what is queued."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """Loopback TCP proxy to ``target`` that breaks its connections on demand."""

    def __init__(self, target: tuple[str, int], port: int = 0, *, connect_timeout: float = 5.0):
        self.target = (target[0], int(target[1]))
        self.connect_timeout = connect_timeout
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()[:2]
        self.port = self.address[1]
        self.uri = f"tcp:127.0.0.1:{self.port}"

        self._cond = threading.Condition()    # guards the records below; notified on every change
        self._records: list[Connection] = []
        self._cuts: list[float] = []
        self._refuse = 0
        self._armed: list[tuple[str, str, int, bool]] = []
        self._stalled = False
        self._failed: BaseException | None = None

        self._links: dict[int, _Link] = {}    # proxy thread only, by record index
        self._draining: set[socket.socket] = set()
        self._cutting: list[_Link] = []
        self._orphans: list[tuple[str | None, socket.socket]] = []   # half-open sides left by cut(side=)
        self._calls: collections.deque = collections.deque()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._listener, selectors.EVENT_READ, ("accept", None))
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"FaultProxy:{self.port}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ context manager, close

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the thread and closes every socket (RST on live connections)."""
        if self._closing:
            return
        self._closing = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise ProxyError(f"proxy thread did not stop within {timeout} s")
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ faults

    def cut(self, kind: str | None = None, how: str = "rst", side: str = "both") -> int:
        """Closes the open connections (of `kind`, else all): ``how="rst"`` aborts
        (SO_LINGER 0: the peers read ECONNRESET), ``how="fin"`` shuts them down cleanly
        (the peers read EOF).  ``side="client"`` or ``"server"`` closes that side only and
        leaves the other one open and silent (half-open: that peer has not noticed), until
        a later ``cut`` of the same kind or the proxy's close.  Records the time of the cut
        if one closed; returns how many closed."""
        if kind is not None and kind not in KINDS:
            raise ValueError(f"kind {kind!r}: one of {KINDS}")
        if how not in ("rst", "fin"):
            raise ValueError(f"how {how!r}: 'rst' or 'fin'")
        if side not in ("both", "client", "server"):
            raise ValueError(f"side {side!r}: 'both', 'client' or 'server'")

        def do():
            now = time.monotonic()
            for k, sock in [o for o in self._orphans if kind is None or o[0] == kind]:
                self._orphans.remove((k, sock))
                _abort(sock)
            hit = [ln for ln in self._links.values() if kind is None or ln.rec.kind == kind]
            for ln in hit:
                self._close_link(ln, "cut", how, now, side)
            if hit:
                self._cuts.append(now)
            return len(hit)
        return self._call(do)

    def stall(self) -> None:
        """Stops forwarding both ways without closing anything: the peers see silence.
        Connections accepted meanwhile are held (not connected to the target yet)."""
        def do():
            self._stalled = True
            for ln in list(self._links.values()):
                self._interest(ln)
        self._call(do)

    def unstall(self) -> None:
        """Forwards again; whatever was queued meanwhile passes, nothing lost."""
        def do():
            self._stalled = False
            for ln in list(self._links.values()):
                if ln.server is None:
                    self._connect(ln)
                else:
                    self._pump_all(ln)
        self._call(do)

    def cut_after(self, kind: str, direction: str, nbytes: int) -> None:
        """Arms a one-shot RST cut of the next connection of `kind` (one classified after
        this call) once exactly `nbytes` went `direction` ("c2s" or "s2c") through it."""
        self._arm(kind, direction, nbytes, hold=False)

    def hold_after(self, kind: str, direction: str, nbytes: int) -> None:
        """Arms a one-shot hold of the next connection of `kind`: once exactly `nbytes` went
        `direction` through it, nothing more goes that way (the rest waits unread; the other
        way flows on) until a ``cut``."""
        self._arm(kind, direction, nbytes, hold=True)

    def _arm(self, kind: str, direction: str, nbytes: int, *, hold: bool) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: one of {KINDS}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: one of {DIRECTIONS}")
        if nbytes < 0:
            raise ValueError(f"nbytes {nbytes} < 0")
        self._call(lambda: self._armed.append((kind, direction, int(nbytes), hold)))

    def refuse_next(self, n: int = 1) -> None:
        """Closes (RST) the next `n` connections as soon as they are accepted."""
        def do():
            self._refuse += int(n)
        self._call(do)

    # ------------------------------------------------------------------ what happened

    def connections(self, kind: str | None = None) -> list[Connection]:
        """Snapshots of the connection records (of `kind`, else all), in accept order."""
        with self._cond:
            return [dataclasses.replace(r, bytes=dict(r.bytes)) for r in self._records
                    if kind is None or r.kind == kind]

    def cuts(self) -> list[float]:
        """Times of the cuts (``cut`` that closed something, and ``cut_after`` firing)."""
        with self._cond:
            return list(self._cuts)

    def recoveries(self) -> list[float | None]:
        """Per cut: seconds from it to pages flowing again, i.e. the first client->server
        byte after RESUME_ACK on the first "resume" connection accepted after the cut that
        got that far; None if none did.  A cut during a handshake is also part of the
        recovery of the cut before it."""
        with self._cond:
            resumed = [r for r in self._records if r.kind == "resume" and r.resumed_at is not None]
            out = []
            for t in self._cuts:
                later = [r.resumed_at for r in resumed if r.accepted_at >= t]
                out.append(min(later) - t if later else None)
            return out

    # ------------------------------------------------------------------ waiting

    def _wait(self, what: str, pred, timeout: float):
        with self._cond:
            ok = self._cond.wait_for(lambda: pred() or self._failed is not None or self._closing, timeout)
            if self._failed is not None:
                raise ProxyError(f"proxy thread failed while waiting for {what}: {self._failed!r}")
            if not ok or not pred():
                raise ProxyError(f"timed out after {timeout} s waiting for {what}; connections: "
                                 f"{self._summary()}")
            return pred()

    def wait_connections(self, kind: str, n: int, timeout: float = 10.0) -> list[Connection]:
        """Waits until `n` connections of `kind` were accepted (in all); returns them."""
        self._wait(f"{n} {kind} connection(s)",
                   lambda: sum(r.kind == kind for r in self._records) >= n, timeout)
        return self.connections(kind)

    def wait_bytes(self, kind: str, direction: str, nbytes: int, timeout: float = 10.0) -> Connection:
        """Waits until the newest open connection of `kind` forwarded `nbytes` `direction`."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: one of {DIRECTIONS}")

        def live():
            rs = [r for r in self._records if r.kind == kind and r.open]
            return rs[-1] if rs and rs[-1].bytes[direction] >= nbytes else None
        rec = self._wait(f"{nbytes} bytes {direction} on the live {kind} connection", live, timeout)
        return dataclasses.replace(rec, bytes=dict(rec.bytes))

    def wait_resumed(self, count: int, timeout: float = 30.0) -> list[Connection]:
        """Waits until `count` "resume" connections have seen RESUME_ACK and then a client
        byte (pages flowing again); returns them."""
        self._wait(f"{count} resumed connection(s)",
                   lambda: sum(r.kind == "resume" and r.resumed_at is not None for r in self._records) >= count,
                   timeout)
        return [r for r in self.connections("resume") if r.resumed_at is not None]

    def _summary(self) -> str:
        return "; ".join(f"#{r.index} {r.kind} {'open' if r.open else 'closed/' + str(r.closed_by)} "
                         f"c2s={r.bytes['c2s']} s2c={r.bytes['s2c']}"
                         + (" acked" if r.resume_ack_at else "") + (" resumed" if r.resumed_at else "")
                         for r in self._records) or "none"

    # ------------------------------------------------------------------ the proxy thread

    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _call(self, fn):
        """Runs fn in the proxy thread (every socket is touched there only); returns its result."""
        if self._closing or not self._thread.is_alive():
            raise ProxyError("the proxy is closed" if self._closing else f"the proxy thread died: {self._failed!r}")
        done = threading.Event()
        box: list = []
        self._calls.append((fn, done, box))
        self._wake()
        if not done.wait(COMMAND_TIMEOUT):
            raise ProxyError(f"proxy thread did not run a command within {COMMAND_TIMEOUT} s")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def _run(self):
        try:
            while not self._closing:
                events = self._sel.select(0.001 if self._cutting else 1.0)
                with self._cond:
                    if self._cutting:
                        self._finish_cuts()
                    for key, mask in events:
                        what, ln = key.data
                        if what == "accept":
                            self._accept()
                        elif what == "wake":
                            try:
                                while os.read(self._wake_r, 4096):
                                    pass
                            except BlockingIOError:
                                pass
                        elif what == "drain":
                            self._drain(key.fileobj)
                        elif ln.rec.open:
                            self._pump_all(ln)
                    while self._calls:
                        fn, done, box = self._calls.popleft()
                        try:
                            box.append(fn())
                        except BaseException as e:  # noqa: BLE001 - handed to the caller
                            box.append(e)
                        done.set()
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - reported to every waiter
            with self._cond:
                self._failed = e
                self._cond.notify_all()
        finally:
            with self._cond:
                now = time.monotonic()
                for ln in list(self._links.values()):
                    self._close_link(ln, "proxy", "rst", now)
                for s in list(self._draining):
                    self._sel.unregister(s)
                    s.close()
                self._draining.clear()
                for _, sock in self._orphans:
                    _abort(sock)
                self._orphans.clear()
                self._listener.close()
                while self._calls:
                    fn, done, box = self._calls.popleft()
                    box.append(ProxyError("the proxy closed"))
                    done.set()
                self._cond.notify_all()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    return
                raise
            now = time.monotonic()
            rec = Connection(index=len(self._records), accepted_at=now)
            self._records.append(rec)
            if self._refuse > 0:
                self._refuse -= 1
                rec.open, rec.closed_at, rec.closed_by = False, now, "refused"
                _abort(client)
                continue
            client.setblocking(False)
            _tune(client)
            ln = _Link(rec, client)
            self._links[rec.index] = ln
            if not self._stalled:
                self._connect(ln)
            self._interest(ln)

    def _connect(self, ln: _Link):
        try:
            server = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            self._close_link(ln, "server", "rst", time.monotonic())
            return
        server.setblocking(False)
        _tune(server)
        ln.server = server
        ln.c2s.dst = server
        ln.s2c = _Direction("s2c", server, ln.client)
        self._sel.register(server, selectors.EVENT_READ, ("link", ln))
        self._pump_all(ln)

    def _interest(self, ln: _Link):
        """Registers what each socket of `ln` waits for: reading while its way has nothing
        pending (and not stalled), writing while the way into it has."""
        if not ln.rec.open or ln.cutting:
            return
        for sock in (ln.client, ln.server):
            if sock is None:
                continue
            mask = 0
            if not self._stalled and ln.server is not None:
                out = ln.c2s if sock is ln.client else ln.s2c
                into = ln.s2c if sock is ln.client else ln.c2s
                if not out.pending and not out.eof and not out.holding:
                    mask |= selectors.EVENT_READ
                if into.pending:
                    mask |= selectors.EVENT_WRITE
            key = self._sel.get_map().get(sock)
            if not mask:            # a selector cannot wait for nothing: out of it meanwhile
                if key is not None:
                    self._sel.unregister(sock)
            elif key is None:
                self._sel.register(sock, mask, ("link", ln))
            elif key.events != mask:
                self._sel.modify(sock, mask, key.data)

    def _pump_all(self, ln: _Link):
        """Moves what can move, both ways, then re-arms the sockets."""
        if ln.cutting:
            return
        if self._stalled or ln.server is None:
            self._interest(ln)
            return
        for d in (ln.c2s, ln.s2c):
            if not ln.rec.open:
                return
            self._pump(ln, d)
        if ln.rec.open:
            self._finish_if_done(ln)
        if ln.rec.open:
            self._interest(ln)

    def _pump(self, ln: _Link, d: _Direction):
        rec = ln.rec
        while rec.open and not self._stalled:
            if d.pending:
                try:
                    n = d.dst.send(d.pending)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self._close_link(ln, "client" if d.dst is ln.client else "server", "rst", time.monotonic())
                    return
                self._forwarded(ln, d, memoryview(d.pending)[:n])
                del d.pending[:n]
                continue
            if d.limit is not None and rec.bytes[d.name] >= d.limit:
                if d.hold:
                    d.holding = True
                else:
                    self._cut_when_sent(ln)
                return
            if d.eof:
                if not d.shut:
                    d.shut = True
                    try:
                        d.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                return
            unclassified = d is ln.c2s and rec.kind is None
            want = CHUNK
            if d.limit is not None:
                want = d.limit - rec.bytes[d.name]
            if unclassified:
                want = HEADER_BYTES - len(ln.peek)
            try:
                data = d.src.recv(want)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_link(ln, "client" if d.src is ln.client else "server", "rst", time.monotonic())
                return
            if not data:
                d.eof = True
                if unclassified:
                    self._classify(ln, final=True)
                    d.pending += ln.peek
                continue
            if not unclassified:
                d.pending += data
                continue
            ln.peek += data
            if self._classify(ln, final=False):
                d.pending += ln.peek
                if d.limit is not None:       # nothing went this way yet
                    del d.pending[d.limit:]

    def _cut_when_sent(self, ln: _Link):
        """cut_after's cut: stop forwarding, then abort once the kernel has delivered what
        was forwarded (an RST drops a send queue that is not empty yet)."""
        ln.cutting = True
        ln.cut_deadline = time.monotonic() + 1.0
        for sock in (ln.client, ln.server):
            if sock is not None and sock in self._sel.get_map():
                self._sel.unregister(sock)
        self._cutting.append(ln)

    def _finish_cuts(self):
        now = time.monotonic()
        for ln in list(self._cutting):
            if ln.rec.open and now < ln.cut_deadline and any(
                    _unsent(s) for s in (ln.client, ln.server) if s is not None):
                continue
            self._cutting.remove(ln)
            if ln.rec.open:
                self._close_link(ln, "cut_after", "rst", now)
                self._cuts.append(now)

    def _classify(self, ln: _Link, final: bool) -> bool:
        """Names the connection once its first 9 client bytes are in (or cannot be ours)."""
        p = bytes(ln.peek)
        if len(p) >= HEADER_BYTES:
            kind = KIND_OF_SECTION.get(p[8], "other") if p[:8] == _PREFIX else "other"
        elif p != _PREFIX[:len(p)] or final:
            kind = "other"
        else:
            return False
        ln.rec.kind = kind
        if kind == "resume":
            ln.parser = _ResumeParser()
        for i, (k, direction, nbytes, hold) in enumerate(self._armed):
            if k == kind:
                del self._armed[i]
                d = ln.c2s if direction == "c2s" else ln.s2c
                d.limit, d.hold = nbytes, hold
                break
        return True

    def _forwarded(self, ln: _Link, d: _Direction, sent: memoryview):
        rec = ln.rec
        rec.bytes[d.name] += len(sent)
        if ln.parser is None or not sent:
            return
        if d.name == "s2c" and rec.resume_ack_at is None:
            if ln.parser.feed(sent):
                rec.resume_ack_at = time.monotonic()
            elif ln.parser.error:
                rec.rp_error = ln.parser.error
                ln.parser = None
        elif d.name == "c2s" and rec.resume_ack_at is not None and rec.resumed_at is None:
            rec.resumed_at = time.monotonic()
            ln.parser = None

    def _finish_if_done(self, ln: _Link):
        s2c = ln.s2c
        if ln.c2s.shut and s2c is not None and s2c.shut:
            self._close_link(ln, "client" if ln.c2s.eof else "server", "fin", time.monotonic())

    def _close_link(self, ln: _Link, by: str, how: str, now: float, side: str = "both"):
        rec = ln.rec
        if not rec.open:
            return
        rec.open, rec.closed_at, rec.closed_by = False, now, by
        self._links.pop(rec.index, None)
        if ln in self._cutting:
            self._cutting.remove(ln)
        for sock in (ln.client, ln.server):
            if sock is None:
                continue
            if sock in self._sel.get_map():
                self._sel.unregister(sock)
            if side != "both" and sock is not (ln.client if side == "client" else ln.server):
                self._orphans.append((rec.kind, sock))
                continue
            if how == "rst":
                _abort(sock)
                continue
            # a close with unread bytes queued would send RST: shut down, then read to the EOF
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                sock.close()
                continue
            if self._closing:
                sock.close()
                continue
            self._draining.add(sock)
            self._sel.register(sock, selectors.EVENT_READ, ("drain", None))

    def _drain(self, sock: socket.socket):
        if sock not in self._draining:
            return
        try:
            while sock.recv(CHUNK):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._sel.unregister(sock)
        self._draining.discard(sock)
        sock.close()


def _unsent(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _tune(sock: socket.socket):
    # no SO_RCVBUF/SO_SNDBUF: setting them caps the buffers at net.core.*mem_max and turns
    # off the kernel's autotuning, which grows loopback buffers to megabytes by itself
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
