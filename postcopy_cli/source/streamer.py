"""The source engine: streams RAM blocks to a destination and answers its page requests first.

One connection carries both directions (DESIGN.md section 4).  The
:class:`PageStreamer` runs the post-copy phase (and a live source's pre-copy
passes): requested pages jump the queue — background chunks go only when the
small socket buffers have room, so a requested page waits behind little more
than one chunk — and the rest streams in runs, zero pages as ZERO records.

After RUN a failed connection pauses post-copy instead of failing it (DESIGN.md
section 9): with a :class:`~postcopy_cli.source.recovery.Recovery` the streamer
drops its connections, keeps its PageBook, reconnects with backoff and resumes
(RESUME, RECV_BITMAP per block, POSTCOPY_RESUME; the destination answers each
bitmap, then RESUME_ACK), sending again exactly the pages the bitmaps lack.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Protocol

from .. import codec, signals
from .._native import ffi, lib
from ..errors import DestinationRefused, TlsExpected, PeerDisconnected, PeerTimeout, ProtocolError
from .bandwidth import BandwidthCap
from .pages import PageBook
from .recovery import BACKOFF_FIRST, BACKOFF_MAX, Recovery
from .requests import RequestServer
from ..uffd import native_error
from ..channels.tls import buffered

log = logging.getLogger("postcopy.source")

TP = codec.TARGET_PAGE_SIZE
BULK_BUFFER = 1 << 20            # socket buffer of a main stream that has a preempt channel
PRECOPY_FIRST_SYNC = 0.1         # seconds of pre-copy before its first sync of written pages
PRECOPY_SYNC = 0.2               # and between the next ones (a 1 GiB PAGEMAP_SCAN is a few ms)

class MemorySource(Protocol):
    """The memory a source sends: an image file (source.image.ImageMemory) or a program's
    (memory.process.ProcessMemory)."""

    blocks: list[codec.BlockInfo]
    pid: int              # the program the native request server reads blocks without a base from (0: none)
    # where the data ends short of its block (an image file's size): records reaching past it
    # go one page at a time; None: the data fills the blocks
    data_end: int | None

    def base(self, block: int):
        """Pointer to the block in our own memory, or ffi.NULL: read it from ``pid``."""

    def segments(self, block: int) -> list[tuple[int, int, int]]:
        """(offset in the block, address in ``pid``, size) of each mapped part of the block."""

    def pages(self, block: int, offset: int, count: int, slot: int = 0):
        """Pointer to ``count`` target pages from ``offset``, valid until the next call for ``slot``
        (one slot per sending thread)."""

    def close(self) -> None: ...


class Lane:
    """One outgoing connection carrying RAM records: the main stream or the preempt channel."""

    def __init__(self, conn: socket.socket, slot: int):
        self.conn = conn
        self.fd = conn.fileno()
        self.slot = slot          # which read buffer of the memory this lane uses
        self.named = -1           # block named by the last record of the open RAM section
        self.lock = threading.Lock()
        self.ended = False        # EOF sent: nothing more goes on this lane


class PageStreamer:
    """Sends every page still to send in ``book`` (by default all of ``memory``'s), requested
    pages first, then waits for SHUT.

    With a ``preempt`` connection (QEMU's postcopy-preempt channel), post-copy
    runs two threads: this one streams background pages on the main
    connection, the :class:`~postcopy_cli.source.requests.RequestServer`
    reads the return path and answers each request at once on the preempt
    channel, so a requested page never queues behind background pages.
    Without one, requests are served between background chunks on the main
    connection.
    """

    def __init__(self, conn: socket.socket | None, memory: MemorySource, *, book: PageBook | None = None,
                 max_bandwidth: float = 0.0, timeout: float = 30.0, decoder: codec.ReturnPathDecoder | None = None,
                 preempt: socket.socket | None = None, migration_id: bytes | None = None,
                 preempt_channels: int | None = None, recovery: Recovery | None = None):
        """``conn`` (None: attach later, or resume in :meth:`run`) and ``preempt`` are attached
        with :meth:`attach`.  ``migration_id``: the ID section's 16 bytes (default: random);
        ``preempt_channels``: announced there (default: 1 with ``preempt``); ``recovery``: how
        post-copy reconnects after a failure (None: it fails)."""
        self.conn = conn
        self.memory = memory
        self.blocks = memory.blocks
        self.book = book if book is not None else PageBook(self.blocks)
        self.decoder = decoder or codec.ReturnPathDecoder(self.blocks)
        self.timeout = timeout
        self.enc = codec.RamSectionEncoder()
        self.index = {b.name: i for i, b in enumerate(self.blocks)}
        self.requests: list[tuple[int, int, int]] = []   # (block, offset, length) queued
        # requested_pages + background_pages = pages sent once; resent_pages: requested
        # pages sent again on the preempt channel because they were still in flight
        self.stats = {"requests": 0, "requested_pages": 0, "requests_already_sent": 0, "resent_pages": 0,
                      "background_pages": 0,
                      "zero_pages": 0, "bytes": 0, "pongs": 0,
                      "postcopy_recoveries": 0, "postcopy_paused_ms": 0.0, "postcopy_recovery_ms": [],
                      "postcopy_reconnect_attempts": 0}
        self.shut: int | None = None
        # what progress() reports: the phase and the complete pre-copy passes
        # (the phase's pages to send are the book's)
        self.phase = "starting"
        self.passes = 0
        self._shut_event = threading.Event()
        self._t0 = time.monotonic()
        self.cap = BandwidthCap(max_bandwidth, self._t0)
        self._poller = select.poll()
        self._last_heard = self._t0
        self._last_writable = self._t0
        # the main stream's ID section: the destination adopts a preempt
        # channel only if announced there, and only with this id; a resume names it too
        if preempt_channels is None:
            preempt_channels = 1 if preempt is not None else 0
        self.migration = codec.MigrationId(migration_id or os.urandom(codec.MIGRATION_ID_LENGTH), preempt_channels)
        self.stats["preempt"] = preempt_channels > 0
        self.recovery = recovery
        self.paused: dict | None = None   # while paused: reason, since (monotonic), attempts
        self._woken = threading.Event()
        self._wake_error: BaseException | None = None
        self._drain_error: ProtocolError | None = None   # what the return path held after a failure
        self.main: Lane | None = None
        self.preempt: Lane | None = None
        self._server: RequestServer | None = None
        self._fd = -1
        # the hop trace (POSTCOPY_HOP_TRACE, enable_hop_trace): entries per request server (0: off),
        # and the rows and entries asked for of the servers stopped so far
        self.hop_capacity = 0
        self.hop_rows: list[tuple] = []
        self.hop_claimed = 0
        if conn is not None:
            self.attach(conn, preempt)

    def attach(self, conn: socket.socket, preempt: socket.socket | None = None) -> None:
        """Stream on these connections from here on: ``conn`` is the main stream and its return
        path (the decoder's bytes so far belong to it), ``preempt`` the preempt channel (its
        header and PREEMPT section are sent here).  The first start and every resume come here."""
        for sock in (conn, preempt):
            if sock is not None:
                sock.setblocking(True)
                # a write that makes no progress for --timeout fails (EAGAIN): a stalled link
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.timeout))
        self.conn = conn
        self._fd = conn.fileno()
        self.main = Lane(conn, 0)
        self.preempt = None
        self._server = None
        if preempt is not None:
            self.preempt = Lane(preempt, 1)
            # requests no longer queue behind background pages: the main stream
            # may keep more in flight (fewer wake-ups per byte)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BULK_BUFFER)
            self._send(self.preempt, [codec.encode(codec.Header()),
                                      codec.encode(codec.PreemptChannel(self.migration.id))])
            # requests already decoded are queued for the preempt channel; the server takes the rest
            self._handle_return_path(b"")
            self._server = RequestServer(conn, self.preempt, self.memory, self.book, self.cap, self.decoder)
            if self.hop_capacity:
                self._server.enable_hop_trace(self.hop_capacity)

    def enable_hop_trace(self, capacity: int) -> None:
        """Keep the hop times of up to ``capacity`` requests per request server (the native one, on
        the preempt channel: requests answered from Python are not traced); :attr:`hop_rows`."""
        self.hop_capacity = capacity
        if self._server is not None:
            self._server.enable_hop_trace(capacity)

    def progress(self) -> dict:
        """A snapshot for a live display, read from another thread without locks (counters only).

        ``phase_bytes``: memory to send in this phase (or pre-copy pass), ``phase_done_bytes``:
        of it, sent; ``pages_left``: its pages still to send (in pre-copy: dirty); ``sent_bytes``:
        bytes on the wire in all; ``requests``: page requests answered.
        """
        srv = self._server
        requests, served = srv.answered if srv is not None else (0, 0)
        total, done = self.book.phase_progress(served)
        snap = {"phase": self.phase, "pass": self.passes + 1, "phase_bytes": total * TP,
                "phase_done_bytes": done * TP, "pages_left": total - done,
                "sent_bytes": self.stats["bytes"] + (srv.bytes_sent if srv is not None else 0),
                "requests": self.stats["requests"] + requests}
        paused = self.paused
        if paused is not None:
            # ``attempts``: reconnections tried in this pause; ``paused_s``: since the failure
            snap.update(phase="paused", attempts=paused["attempts"], reason=paused["reason"],
                        paused_s=time.monotonic() - paused["since"])
        return snap

    # -- sending ---------------------------------------------------------------------
    def _send(self, lane: Lane, parts: list) -> None:
        total = sum(len(p) for p in parts)
        try:
            while parts:
                n = lane.conn.sendmsg(parts[:1024])
                while n:
                    if n >= len(parts[0]):
                        n -= len(parts[0])
                        parts.pop(0)
                    else:
                        parts[0] = memoryview(parts[0])[n:]
                        n = 0
        except (BrokenPipeError, ConnectionResetError) as e:
            raise PeerDisconnected(f"the destination disconnected: {e.strerror}") from None
        except (BlockingIOError, TimeoutError):   # SO_SNDTIMEO expired
            raise PeerTimeout(f"the destination took no data for {self.timeout:g} s") from None
        self.stats["bytes"] += total

    def _send_pages(self, lane: Lane, bi: int, offset: int, count: int, *, resend: bool = False) -> None:
        """Send ``count`` pages from ``offset`` as PAGE/ZERO records (native: headers, zero check, writev)."""
        memory = self.memory
        if count > 1 and memory.data_end is not None and offset + count * TP > memory.data_end:
            # the image's partial last page goes alone
            self._send_pages(lane, bi, offset, count - 1, resend=resend)
            self._send_pages(lane, bi, offset + (count - 1) * TP, 1, resend=resend)
            return
        name = None if lane.named == bi else self.blocks[bi].name.encode()
        zeros = ffi.new("uint64_t *")
        w = lib.pc_src_send_pages(lane.fd, memory.pages(bi, offset, count, lane.slot), offset, count,
                                  name or ffi.NULL, zeros)
        if w < 0:
            raise native_error(w, "the destination connection failed", PeerDisconnected)
        lane.named = bi
        self.stats["bytes"] += w
        if not resend:
            self.stats["zero_pages"] += zeros[0]

    def _send_requested(self, lane: Lane) -> None:
        requests, self.requests = self.requests, []
        for bi, offset, length in requests:
            n = length // TP
            resend = False
            if not self.book.take(bi, offset // TP, n):
                self.stats["requests_already_sent"] += 1
                if lane is not self.preempt:
                    continue
                # sent already, but maybe still queued behind background pages
                # on the main stream: the preempt channel is quicker (the
                # destination places whichever copy comes first, skips the other)
                resend = True
            with lane.lock:
                if lane.ended:
                    # every page is out and EOF is sent: the copy on the main stream will do
                    continue
                self.stats["resent_pages" if resend else "requested_pages"] += n
                self._send_pages(lane, bi, offset, n, resend=resend)

    def _send_background(self) -> bool:
        chunk = self.book.next_chunk()
        if chunk is None:
            return False
        bi, first, count = chunk
        self.stats["background_pages"] += count
        with self.main.lock:
            self._send_pages(self.main, bi, first * TP, count)
        return True

    # -- receiving ---------------------------------------------------------------------
    def _receive(self) -> None:
        try:
            data = self.conn.recv(65536)
        except (ConnectionResetError, OSError) as e:
            raise PeerDisconnected(f"the destination connection failed: {e.strerror or e}") from None
        if not data:
            raise PeerDisconnected("the destination disconnected before answering SHUT")
        self._handle_return_path(data)

    def _handle_return_path(self, data: bytes) -> None:
        self.decoder.feed(data)
        for ev in self.decoder.events():
            t = type(ev)
            if t is codec.ReqPagesId:
                self.stats["requests"] += 1
                self.requests.append((self.index[ev.block], ev.start, ev.length))
            elif t is codec.Shut:
                self.shut = ev.status
                self._shut_event.set()
            elif t is codec.Pong:
                self.stats["pongs"] += 1
            else:
                self.on_return_path(ev)

    def on_return_path(self, ev) -> None:
        raise ProtocolError(f"unexpected {type(ev).__name__} message", section="return path",
                            offset=self.decoder.offset)

    def _from_request_server(self) -> None:
        """In the request thread: what the native server handed to the codec."""
        self._handle_return_path(b"")
        if self.requests:
            self._send_requested(self.preempt)
        self._last_heard = time.monotonic()

    def _bandwidth_wait(self) -> float:
        """Seconds to wait before the next background chunk under --max-bandwidth (0: go)."""
        sent = self.stats["bytes"]
        if self._server is not None:
            sent += self._server.bytes_sent   # requested pages count against the cap too
        return self.cap.ahead(sent)

    def _begin_section(self, lane: Lane) -> None:
        self._send(lane, [self.enc.begin()])
        lane.named = -1

    def _pump(self, *, until: float | None = None, on_empty=None, serve_requests: bool = True) -> bool:
        """One step: take requests and answer them (unless the request thread does), then one
        background chunk if the socket has room.

        The socket buffers are small (transport.STREAM_BUFFER), so POLLOUT
        means little background data is queued.  Returns False when there was
        nothing to do before ``until``.
        """
        book = self.book
        wait_bw = self._bandwidth_wait() if book.remaining else 0.0
        mask = (select.POLLIN if serve_requests else 0) | \
            (select.POLLOUT if book.remaining and not wait_bw else 0)
        self._poller.register(self._fd, mask)
        timeout = (1.0 if not book.remaining else (wait_bw or 1.0)) if serve_requests else (wait_bw or 0.2)
        if until is not None:
            timeout = max(0.0, min(timeout, until - time.monotonic()))
        pending = serve_requests and buffered(self.conn)
        events = self._poller.poll(0 if pending else int(timeout * 1000) + (1 if timeout else 0))
        got = select.POLLIN if pending else 0
        for _, ev in events:
            got |= ev
        now = time.monotonic()
        if got & select.POLLOUT or not mask & select.POLLOUT:
            self._last_writable = now
        elif now - self._last_writable > self.timeout:
            raise PeerTimeout(f"the destination took no data for {self.timeout:g} s")
        if serve_requests and got & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self._receive()
            self._last_heard = time.monotonic()
        if serve_requests and self.requests:
            self._send_requested(self.main)
        if got & select.POLLOUT and book.remaining and not self._bandwidth_wait():
            self._send_background()
            if not book.remaining and on_empty is not None:
                on_empty()
        return bool(got)

    def precopy(self, deadline: float, on_pass_end, *, max_passes: int | None = None, stop=None,
                sync_every: float | None = None) -> int:
        """Pre-copy: stream passes until ``deadline``, ``max_passes`` or ``stop`` is set.

        At the end of each pass, and every ``sync_every`` seconds within one,
        ``on_pass_end()`` marks in the book what was dirtied meanwhile (and
        returns nothing).  A pass ends when nothing is left to send; with a
        deadline and nothing to send (every dirty page held back as hot), the
        next sync is awaited, not counted as a pass.  Returns the number of
        complete passes.
        """
        book = self.book
        self._begin_section(self.main)
        self.phase = "pre-copy"
        book.begin_phase()
        passes = 0
        first_sync = PRECOPY_FIRST_SYNC if sync_every else None
        next_sync = time.monotonic() + first_sync if first_sync else float("inf")

        def sync():
            nonlocal next_sync
            on_pass_end()
            book.recount()
            if sync_every:
                next_sync = time.monotonic() + sync_every

        def pass_done():
            nonlocal passes
            passes += 1
            book.rewind()
            if max_passes is None or passes < max_passes:
                sync()
                book.begin_phase()
                self.passes = passes

        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if max_passes is not None and passes >= max_passes:
                break
            if time.monotonic() >= next_sync:
                sync()
            self._pump(until=min(deadline, next_sync), on_empty=pass_done)
            if not book.remaining and (max_passes is None or passes < max_passes):
                if sync_every and max_passes is None and book.phase_pages == 0:
                    continue   # nothing to send since the last sync: wait for the next one
                pass_done()
        self._send(self.main, [self.enc.end()])
        book.rewind()
        return passes

    def send_priority_first(self) -> int:
        """Before RUN: the book's priority runs (a replayed working set) in one RAM section on the
        main stream, under the bandwidth cap; the destination's program does not run yet, so nothing
        is requested meanwhile.  Returns the pages sent."""
        book, sent = self.book, 0
        self._begin_section(self.main)
        while (chunk := book.next_priority_chunk()) is not None:
            wait = self._bandwidth_wait()
            if wait:
                time.sleep(wait)
            bi, first, count = chunk
            with self.main.lock:
                self._send_pages(self.main, bi, first * TP, count)
            sent += count
        self._send(self.main, [self.enc.end()])
        self.stats["before_run_pages"] = sent
        return sent

    def _raise_thread_error(self) -> None:
        if self._server is not None and self._server.error is not None:
            raise self._server.error

    def run(self, *, resume: bool = False) -> dict:
        """Post-copy: stream until every page is sent (then EOS and EOF) and SHUT arrives.

        With :attr:`recovery`, a failed connection pauses and resumes (see the module);
        ``resume``: no connection yet, start with the resume handshake (a source taking over a
        paused migration).  ``stats["background_pages"]`` counts the post-copy's background
        pages only."""
        self.stats["background_pages"] = 0
        self.phase = "post-copy"
        self.book.begin_phase()
        failure: BaseException | None = PeerDisconnected("taking over a paused migration") if resume else None
        while True:
            if failure is not None:
                self._recover(failure)
                failure = None
                if self.shut == 0:
                    break
            try:
                self._stream()
                break
            except (PeerDisconnected, OSError) as e:
                e = self.refusal(e)
                if self.shut == 0:
                    break   # SHUT 0 was read after the break: every page is in, nothing to resume
                if not self._recoverable(e):
                    raise e from None
                failure = e
        if self.shut != 0:
            raise DestinationRefused(self.shut)
        self.phase = "done"
        self.stats["seconds"] = round(time.monotonic() - self._t0, 3)
        return self.stats

    def _stream(self) -> None:
        """Post-copy on the attached connections: a new RAM section, every page still to send,
        EOF, then SHUT (a PeerTimeout when none comes within --timeout)."""
        book = self.book
        self._begin_section(self.main)
        self._last_heard = self._last_writable = time.monotonic()
        self._handle_return_path(b"")   # requests decoded with the resume's answers
        if self.preempt is None:
            while book.remaining and self.shut is None:
                self._pump()
        else:
            srv = self._server
            self._begin_section(self.preempt)
            if self.requests:
                self._send_requested(self.preempt)
            srv.start(self._from_request_server, lambda: self.shut is not None)
            try:
                # the server takes pages too, so ``remaining`` over-estimates:
                # done is when no page is left to send
                while book.remaining and self.shut is None:
                    self._raise_thread_error()
                    self._pump(serve_requests=False)
            except BaseException:
                self._shutdown_lanes()   # the server's writes fail at once, it ends
                raise
            finally:
                for key, n in srv.stop().items():
                    self.stats[key] += n
                if self.hop_capacity:
                    rows, claimed = srv.hop_trace()
                    self.hop_rows += rows
                    self.hop_claimed += claimed
                self._server = None
            if srv.error is not None:
                raise srv.error
            with self.preempt.lock:
                self._send(self.preempt, [self.enc.end(), codec.encode(codec.Eof())])
                self.preempt.ended = True
        with self.main.lock:
            self._send(self.main, [self.enc.end(), codec.encode(codec.Eof())])
            self.main.ended = True
        self._last_heard = time.monotonic()
        while self.shut is None:
            self._pump()
            if self.shut is None and time.monotonic() - self._last_heard > self.timeout:
                raise PeerTimeout(f"the destination did not answer SHUT within {self.timeout:g} s of EOF")

    # -- recovery (DESIGN.md sections 4 and 9) -------------------------------------------
    def wake(self, error: BaseException | None = None) -> bool:
        """Make the sending thread fail by itself with ``error`` (a signal stops the command): its
        connections are shut down and a pause ends at once.  For signals.guard."""
        self._wake_error = error
        self._woken.set()
        self._shutdown_lanes()
        return True

    def _recoverable(self, error: BaseException) -> bool:
        return (self.recovery is not None and self.recovery.timeout > 0 and not self._woken.is_set()
                and signals.interruption() is None and not isinstance(error, (DestinationRefused, TlsExpected)))

    def _shutdown_lanes(self) -> None:
        for lane in (self.main, self.preempt):
            if lane is not None:
                try:
                    lane.conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _drop_lanes(self) -> None:
        """Paused: the connections are shut down and closed (the caller's sockets too)."""
        self._shutdown_lanes()
        for lane in (self.main, self.preempt):
            if lane is not None:
                lane.conn.close()
        self.main = self.preempt = None
        self.conn = None
        self._fd = -1
        self.requests = []   # the destination asks again for every page still outstanding

    def _recover(self, failure: BaseException) -> None:
        """Paused after ``failure``: reconnect at once, then with backoff, until a resume succeeds
        (returns) or --recover-timeout has passed since the failure (PeerDisconnected)."""
        rec = self.recovery
        t_fail = time.monotonic()
        reason = str(failure) or type(failure).__name__
        self._drop_lanes()
        self.paused = {"reason": reason, "since": t_fail, "attempts": 0}
        self.phase = "paused"
        log.warning("post-copy paused: %s; reconnecting to %s for up to %g s", reason, rec.to, rec.timeout)
        delay = BACKOFF_FIRST
        while True:
            if self._woken.is_set():
                raise self._wake_error or failure
            stop = signals.interruption()
            if stop is not None:
                raise stop
            self.paused["attempts"] += 1
            self.stats["postcopy_reconnect_attempts"] += 1
            if self._try_resume():
                break
            waited = time.monotonic() - t_fail
            if waited >= rec.timeout:
                self.stats["postcopy_paused_ms"] += round(waited * 1000, 3)
                missing = self.book.recount()
                raise PeerDisconnected(
                    f"post-copy paused {waited:.1f} s without resuming (--recover-timeout {rec.timeout:g}) "
                    f"after: {reason}; {missing} pages never sent")
            self._woken.wait(min(delay, rec.timeout - waited))
            delay = min(delay * 2, BACKOFF_MAX)
        ms = (time.monotonic() - t_fail) * 1000
        self.stats["postcopy_recoveries"] += 1
        self.stats["postcopy_paused_ms"] = round(self.stats["postcopy_paused_ms"] + ms, 3)
        self.stats["postcopy_recovery_ms"].append(round(ms, 3))
        self.paused = None
        self.phase = "post-copy"
        log.warning("post-copy resumed after %.1f ms (recovery %d)", ms, self.stats["postcopy_recoveries"])

    def _try_resume(self) -> bool:
        """One attempt: connect, the resume handshake, the preempt channel, attach.  A failure
        once connected is a double failure: one warning line, and the caller retries."""
        rec = self.recovery
        try:
            conn = rec.connect()
        except (PeerDisconnected, OSError):
            return False   # nothing listens yet: retried quietly
        preempt = None
        try:
            conn.setblocking(True)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.timeout))
            try:
                decoder, bitmaps = self._resume_handshake(conn)
            except _AlreadyComplete:
                conn.close()
                self.shut = 0
                log.info("the destination has every page: the migration is complete")
                return True
            for bi, bitmap in enumerate(bitmaps):
                self.book.from_received(bi, bitmap)
            if self.migration.preempt_channels:
                preempt = rec.connect()
            self.decoder = decoder
            self.attach(conn, preempt)
            return True
        except (PeerDisconnected, OSError, ProtocolError) as e:
            for sock in (conn, preempt):
                if sock is not None:
                    sock.close()
            self.main = self.preempt = None
            self.conn = None
            self._fd = -1
            log.warning("post-copy resume failed: %s", e)
            return False

    def _resume_handshake(self, conn: socket.socket) -> tuple[codec.ReturnPathDecoder, list[bytes]]:
        """Header, RESUME, RECV_BITMAP per block, POSTCOPY_RESUME; then the destination's bitmap of
        every block in order and RESUME_ACK 1.  Returns the new return path's decoder (holding
        what followed RESUME_ACK) and the bitmaps."""
        conn.sendall(b"".join([codec.encode(codec.Header()), codec.encode(codec.Resume(self.migration.id)),
                               *(codec.encode(codec.RecvBitmapRequest(b.name)) for b in self.blocks),
                               codec.encode(codec.PostcopyResume())]))
        decoder = codec.ReturnPathDecoder(self.blocks)
        bitmaps: list[bytes] = []
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        while True:
            for ev in decoder.events():
                t = type(ev)
                if t is codec.RecvBitmap and len(bitmaps) < len(self.blocks):
                    want = self.blocks[len(bitmaps)].name
                    if ev.block != want:
                        raise ProtocolError(f"RECV_BITMAP of block {ev.block!r} where block {want!r} was due",
                                            section="return path", offset=decoder.offset)
                    bitmaps.append(ev.bitmap)
                elif t is codec.ResumeAck and len(bitmaps) == len(self.blocks):
                    if ev.value != 1:
                        raise ProtocolError(f"RESUME_ACK {ev.value} (expected 1)", section="return path",
                                            offset=decoder.offset)
                    return decoder, bitmaps
                elif t is codec.Shut and ev.status == 0:
                    # the migration is complete: its SHUT 0 went down with the broken connection
                    raise _AlreadyComplete()
                elif t is codec.Shut:
                    raise PeerDisconnected(f"the destination refused the resume (SHUT {ev.status})")
                else:
                    raise ProtocolError(f"{type(ev).__name__} where {len(bitmaps)} of {len(self.blocks)} "
                                        f"RECV_BITMAP and then RESUME_ACK were due", section="return path",
                                        offset=decoder.offset)
            if not buffered(conn) and not poller.poll(int(self.timeout * 1000)):
                raise PeerTimeout(f"no answer to the resume within {self.timeout:g} s")
            try:
                data = conn.recv(1 << 20)
            except OSError as e:
                raise PeerDisconnected(f"the resume connection failed: {e.strerror or e}") from None
            if not data:
                raise PeerDisconnected("the destination closed the connection during the resume")
            decoder.feed(data)

    def refusal(self, error: BaseException) -> BaseException:
        """``error``, or :class:`DestinationRefused` if the destination sent SHUT != 0 before it closed.

        A destination that refuses the stream answers SHUT 1 on the return path
        and closes: the source's next write fails (EPIPE, or ECONNRESET once the
        destination's close with unread data resets the connection) or its read
        finds EOF, while the SHUT is still in the receive queue, where TCP and
        Unix sockets keep it readable after the reset or EOF."""
        if isinstance(error, ProtocolError):
            return _tls_expected(error) or error
        if isinstance(error, PeerTimeout) or not isinstance(error, (PeerDisconnected, OSError)):
            return error
        if self.shut is None and self.conn is not None:
            self._drain_return_path()
            if self._drain_error is not None:
                return _tls_expected(self._drain_error) or error
        return DestinationRefused(self.shut) if self.shut else error

    def _drain_return_path(self, grace: float = 1.0) -> None:
        """Read what is left on the return path, looking for SHUT only (the migration has failed)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        deadline = time.monotonic() + grace
        while self.shut is None:
            left = deadline - time.monotonic()
            if left <= 0 or not (buffered(self.conn) or poller.poll(int(left * 1000) + 1)):
                return
            try:
                data = self.conn.recv(65536, socket.MSG_DONTWAIT)
            except OSError:
                return
            if not data:
                return
            self.decoder.feed(data)
            try:
                shuts = [ev.status for ev in self.decoder.events() if type(ev) is codec.Shut]
            except ProtocolError as e:
                self._drain_error = e
                return
            if shuts:
                self.shut = shuts[0]


# a TLS record header where the return path begins: content type 21 (alert), version 3.x (RFC 8446
# section 5.1) read as the be16 message type 0x15 0x03
_TLS_ALERT_TYPE = 0x1503


def _tls_expected(error: ProtocolError) -> TlsExpected | None:
    """The destination's first answer is a TLS alert: it speaks TLS, and this source sent plaintext."""
    if error.offset == 0 and error.problem.startswith(f"unknown message type {_TLS_ALERT_TYPE}"):
        return TlsExpected("the destination answered with a TLS alert: it expects TLS (give --tls-creds DIR)")
    return None


class _AlreadyComplete(Exception):
    """A resume answered SHUT 0: the destination has every page."""


def _timeval(seconds: float) -> bytes:
    """A struct timeval (SO_SNDTIMEO)."""
    return struct.pack("@ll", int(seconds), int(seconds % 1 * 1e6))


def send_preamble(conn: socket.socket, blocks: list, migration: codec.MigrationId) -> None:
    """Header, BLOCKS, ID, OPEN_RETURN_PATH and POSTCOPY_ADVISE."""
    summary = 0
    for b in blocks:
        summary |= b.page_size
    conn.sendall(b"".join([
        codec.encode(codec.Header()),
        codec.encode(codec.Blocks(tuple(blocks))),
        codec.encode(migration),
        codec.encode(codec.OpenReturnPath()),
        codec.encode(codec.PostcopyAdvise(summary, TP)),
    ]))
