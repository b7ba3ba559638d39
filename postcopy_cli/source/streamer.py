"""The source engine: streams RAM blocks to a destination and answers its page requests first.

One connection carries both directions (DESIGN.md section 4).  The
:class:`PageStreamer` runs the post-copy phase (and a live source's pre-copy
passes): requested pages jump the queue — background chunks go only when the
small socket buffers have room, so a requested page waits behind little more
than one chunk — and the rest streams in runs, zero pages as ZERO records.
:class:`ImageMemory` serves a memory image file (lazy restore).
"""
from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import threading
import time

from .. import codec
from .._native import ffi, lib
from ..sched import make_latency_thread
from ..errors import PeerDisconnected, PeerTimeout, PostcopyError, ProtocolError, UsageError

log = logging.getLogger("postcopy.source")

TP = codec.TARGET_PAGE_SIZE
CHUNK_PAGES = 256                # one background chunk: 1 MiB
BULK_BUFFER = 1 << 20            # socket buffer of a main stream that has a preempt channel


class ImageMemory:
    """A memory image file served as one block (Firecracker's memory-file layout: block ``mem``)."""

    def __init__(self, path: str, *, block: str = "mem", page_size: int = TP):
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"cannot open image {path!r}: {e.strerror}") from None
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.close(self._fd)
            raise UsageError(f"image {path!r} is empty")
        length = -(-size // page_size) * page_size
        self.size = size
        self.path = path
        self.blocks = [codec.BlockInfo(block, length, page_size)]
        # mapped a page longer than the file where it ends mid-page: reads past
        # the end of the file within the last page see zeros (mmap(2))
        self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if length <= -(-size // TP) * TP else \
            self._map_over_zeros(size, length)
        self._view = memoryview(self._map)
        self._base = ffi.from_buffer(self._view)
        self._tail = None
        if size % TP:
            self._tail = ffi.new("uint8_t[]", TP)
            ffi.memmove(self._tail, self._view[size - size % TP:], size % TP)

    def _map_over_zeros(self, size: int, length: int) -> mmap.mmap:
        """The file mapped over zeros of the whole block: a host page size that does not divide the
        file leaves whole target pages past its end, which must read as zeros, not fault."""
        import ctypes

        mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(mm)))
        MAP_FIXED = 0x10
        if libc.mmap(addr, size, mmap.PROT_READ, mmap.MAP_PRIVATE | MAP_FIXED, self._fd, 0) != addr:
            err = ctypes.get_errno()
            mm.close()
            os.close(self._fd)
            raise UsageError(f"cannot map image {self.path!r}: {os.strerror(err)}")
        return mm

    pid = 0   # the pages are in our own memory

    def base(self, block: int):
        """Pointer to the block in our memory (the kernel maps the image's last page whole)."""
        return self._base

    def segments(self, block: int) -> list:
        return []

    def pages(self, block: int, offset: int, count: int, slot: int = 0):
        """Pointer to ``count`` contiguous target pages from ``offset`` (the mapping: always valid)."""
        if self._tail is not None and offset < self.size < offset + count * TP:
            if count > 1:
                raise ValueError("the partial last page of an image must be read alone")
            return self._tail
        return self._base + offset

    def close(self):
        del self._base
        self._view.release()
        self._map.close()
        os.close(self._fd)


class _Lane:
    """One outgoing connection carrying RAM records: the main stream or the preempt channel."""

    def __init__(self, conn: socket.socket, slot: int):
        self.conn = conn
        self.fd = conn.fileno()
        self.slot = slot          # which read buffer of the memory this lane uses
        self.named = -1           # block named by the last record of the open RAM section
        self.lock = threading.Lock()
        self.ended = False        # EOF sent: nothing more goes on this lane


class PageStreamer:
    """Sends every page of ``memory``'s blocks, requested pages first, then waits for SHUT.

    ``memory`` has ``blocks`` (list of codec.BlockInfo) and
    ``pages(block, offset, count, slot)``.  ``to_send`` (one bytearray per block,
    1 = still to send) says which pages go; by default all of them.

    With a ``preempt`` connection (QEMU's postcopy-preempt channel), post-copy
    runs two threads: this one streams background pages on the main
    connection, a request thread reads the return path and answers each
    request at once on the preempt channel, so a requested page never queues
    behind background pages.  Without one, requests are served between
    background chunks on the main connection.
    """

    def __init__(self, conn: socket.socket, memory, *, to_send: list[bytearray] | None = None,
                 max_bandwidth: float = 0.0, timeout: float = 30.0, decoder: codec.ReturnPathDecoder | None = None,
                 track_sent: bool = False, preempt: socket.socket | None = None):
        self.conn = conn
        self.memory = memory
        self.blocks = memory.blocks
        self.to_send = to_send if to_send is not None else [bytearray(b"\x01") * (b.length // TP) for b in self.blocks]
        self.remaining = sum(t.count(1) for t in self.to_send)
        # with track_sent: 1 = sent at least once (a live source's discards need it)
        self.sent = [bytearray(len(t)) for t in self.to_send] if track_sent else None
        self.decoder = decoder or codec.ReturnPathDecoder(self.blocks)
        self.max_bandwidth = max_bandwidth
        self.timeout = timeout
        self.enc = codec.RamSectionEncoder()
        self.index = {b.name: i for i, b in enumerate(self.blocks)}
        self._cursor = [0] * len(self.blocks)
        self._block = 0
        self.requests: list[tuple[int, int, int]] = []   # (block, offset, length) queued
        # requested_pages + background_pages = pages sent once; resent_pages: requested
        # pages sent again on the preempt channel because they were still in flight
        self.stats = {"requests": 0, "requested_pages": 0, "requests_already_sent": 0, "resent_pages": 0,
                      "background_pages": 0,
                      "zero_pages": 0, "bytes": 0, "pongs": 0, "preempt": preempt is not None}
        self.shut: int | None = None
        # what progress() reports: the phase, its pages to send, complete pre-copy passes
        self.phase = "starting"
        self.phase_pages = self.remaining
        self.passes = 0
        self._shut_event = threading.Event()
        self._error: BaseException | None = None
        self._t0 = time.monotonic()
        self._poller = select.poll()
        self._fd = conn.fileno()
        self._last_heard = self._t0
        self._lock = threading.Lock()       # page bookkeeping shared by the two threads
        self.main = _Lane(conn, 0)
        self.preempt = _Lane(preempt, 1) if preempt is not None else None
        # the main stream's ID section: the destination adopts a preempt
        # channel only if announced there, and only with this id
        self.migration = codec.MigrationId(os.urandom(codec.MIGRATION_ID_LENGTH), 1 if preempt is not None else 0)
        conn.setblocking(True)
        self._server = None
        if preempt is not None:
            preempt.setblocking(True)
            # requests no longer queue behind background pages: the main stream
            # may keep more in flight (fewer wake-ups per byte)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BULK_BUFFER)
            self._send(self.preempt, [codec.encode(codec.Header()),
                                      codec.encode(codec.PreemptChannel(self.migration.id))])
            self._server = self._request_server()

    def _request_server(self):
        """The native request server (source.c) over our page bookkeeping."""
        self._quit_fd = os.eventfd(0, os.EFD_CLOEXEC)
        srv = ffi.gc(lib.pc_src_new(self._fd, self.preempt.fd, self._quit_fd, self.memory.pid), lib.pc_src_free)
        if srv == ffi.NULL:
            raise MemoryError("pc_src_new")
        srv.max_bandwidth = self.max_bandwidth
        srv.t0_ns = int(self._t0 * 1e9)   # time.monotonic() is CLOCK_MONOTONIC
        self._keep = []   # the bytearrays the server points into must stay alive and unresized
        for bi, b in enumerate(self.blocks):
            to_send = ffi.from_buffer(self.to_send[bi])
            sent = ffi.from_buffer(self.sent[bi]) if self.sent is not None else ffi.NULL
            self._keep += [to_send, sent]
            r = lib.pc_src_add_block(srv, b.name.encode(), b.length, b.page_size, self.memory.base(bi), to_send, sent)
            if r < 0:
                raise PostcopyError(f"request server: block {b.name!r}: {os.strerror(-r)}")
            for offset, addr, size in self.memory.segments(bi):
                lib.pc_src_add_segment(srv, bi, offset, addr, size)
        return srv

    def progress(self) -> dict:
        """A snapshot for a live display, read from another thread without locks (counters only).

        ``phase_bytes``: memory to send in this phase (or pre-copy pass), ``phase_done_bytes``:
        of it, sent; ``pages_left``: its pages still to send (in pre-copy: dirty); ``sent_bytes``:
        bytes on the wire in all; ``requests``: page requests answered.
        """
        srv = self._server
        served = int(srv.st.requested_pages) if srv is not None else 0
        total = self.phase_pages
        done = max(0, min(total, total - self.remaining + served))
        return {"phase": self.phase, "pass": self.passes + 1, "phase_bytes": total * TP,
                "phase_done_bytes": done * TP, "pages_left": total - done,
                "sent_bytes": self.stats["bytes"] + (int(srv.st.bytes) if srv is not None else 0),
                "requests": self.stats["requests"] + (int(srv.st.requests) if srv is not None else 0)}

    # -- sending ---------------------------------------------------------------------
    def _send(self, lane: _Lane, parts: list) -> None:
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
        self.stats["bytes"] += total

    def _send_pages(self, lane: _Lane, bi: int, offset: int, count: int, *, resend: bool = False) -> None:
        """Send ``count`` pages from ``offset`` as PAGE/ZERO records (native: headers, zero check, writev)."""
        memory = self.memory
        if count > 1 and getattr(memory, "size", None) is not None and offset + count * TP > memory.size:
            # the image's partial last page goes alone
            self._send_pages(lane, bi, offset, count - 1, resend=resend)
            self._send_pages(lane, bi, offset + (count - 1) * TP, 1, resend=resend)
            return
        name = None if lane.named == bi else self.blocks[bi].name.encode()
        zeros = ffi.new("uint64_t *")
        w = lib.pc_src_send_pages(lane.fd, memory.pages(bi, offset, count, lane.slot), offset, count,
                                  name or ffi.NULL, zeros)
        if w < 0:
            raise PeerDisconnected(f"the destination connection failed: {os.strerror(-w)}")
        lane.named = bi
        self.stats["bytes"] += w
        if not resend:
            self.stats["zero_pages"] += zeros[0]

    def _take(self, bi: int, first: int, n: int) -> bool:
        """Claim pages [first, first+n) of block ``bi`` for sending; False if already sent."""
        with self._lock:
            pending = self.to_send[bi]
            if not any(pending[first:first + n]):
                return False
            pending[first:first + n] = bytes(n)
            if self.sent is not None:
                self.sent[bi][first:first + n] = b"\x01" * n
            self.remaining -= n
            return True

    def _send_requested(self, lane: _Lane) -> None:
        requests, self.requests = self.requests, []
        for bi, offset, length in requests:
            n = length // TP
            resend = False
            if not self._take(bi, offset // TP, n):
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

    def _next_chunk(self) -> tuple[int, int, int] | None:
        """The next run of unsent pages (block, first page, count), at most one chunk."""
        while self._block < len(self.blocks):
            bi = self._block
            pending = self.to_send[bi]
            first = pending.find(1, self._cursor[bi])
            if first < 0:
                self._block += 1
                continue
            hp = self.blocks[bi].page_size // TP
            first -= first % hp
            stop = pending.find(0, first, first + max(CHUNK_PAGES, hp))
            if stop < 0:
                stop = min(len(pending), first + max(CHUNK_PAGES, hp))
            stop = first + max(hp, (stop - first) // hp * hp)
            self._cursor[bi] = stop
            return bi, first, stop - first
        return None

    def _send_background(self) -> bool:
        with self._lock:
            chunk = self._next_chunk()
            if chunk is None:
                self.remaining = 0   # (the request server may have taken the last pages)
                return False
            bi, first, count = chunk
            # a page the request thread sent meanwhile may go twice: harmless
            self.to_send[bi][first:first + count] = bytes(count)
            if self.sent is not None:
                self.sent[bi][first:first + count] = b"\x01" * count
            self.remaining -= count   # the chunk is a run of pages all still to send
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

    def _bandwidth_wait(self) -> float:
        """Seconds to wait before the next background chunk under --max-bandwidth (0: go)."""
        if not self.max_bandwidth:
            return 0.0
        elapsed = time.monotonic() - self._t0
        sent = self.stats["bytes"]
        if self._server is not None:
            sent += self._server.st.bytes   # requested pages count against the cap too
        ahead = sent / self.max_bandwidth - elapsed
        return max(0.0, ahead)

    def _begin_section(self, lane: _Lane) -> None:
        self._send(lane, [self.enc.begin()])
        lane.named = -1

    def _pump(self, *, until: float | None = None, on_empty=None, serve_requests: bool = True) -> bool:
        """One step: take requests and answer them (unless the request thread does), then one
        background chunk if the socket has room.

        The socket buffers are small (transport.STREAM_BUFFER), so POLLOUT
        means little background data is queued.  Returns False when there was
        nothing to do before ``until``.
        """
        wait_bw = self._bandwidth_wait() if self.remaining else 0.0
        mask = (select.POLLIN if serve_requests else 0) | \
            (select.POLLOUT if self.remaining and not wait_bw else 0)
        self._poller.register(self._fd, mask)
        timeout = (1.0 if not self.remaining else (wait_bw or 1.0)) if serve_requests else (wait_bw or 0.2)
        if until is not None:
            timeout = max(0.0, min(timeout, until - time.monotonic()))
        events = self._poller.poll(int(timeout * 1000) + (1 if timeout else 0))
        got = 0
        for _, ev in events:
            got |= ev
        if serve_requests and got & (select.POLLIN | select.POLLHUP | select.POLLERR):
            self._receive()
            self._last_heard = time.monotonic()
        if serve_requests and self.requests:
            self._send_requested(self.main)
        if got & select.POLLOUT and self.remaining and not self._bandwidth_wait():
            self._send_background()
            if not self.remaining and on_empty is not None:
                on_empty()
        return bool(got)

    def precopy(self, deadline: float, on_pass_end, *, max_passes: int | None = None, stop=None) -> int:
        """Pre-copy: stream passes until ``deadline``, ``max_passes`` or ``stop`` is set.

        At the end of each pass ``on_pass_end()`` refills ``to_send`` with what
        was dirtied meanwhile (and returns nothing).  Returns the number of
        complete passes.
        """
        self._begin_section(self.main)
        self.phase, self.phase_pages = "pre-copy", self.remaining
        passes = 0

        def pass_done():
            nonlocal passes
            passes += 1
            self._block = 0
            self._cursor = [0] * len(self.blocks)
            if max_passes is None or passes < max_passes:
                on_pass_end()
                self.remaining = sum(t.count(1) for t in self.to_send)
                self.phase_pages, self.passes = self.remaining, passes

        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if max_passes is not None and passes >= max_passes:
                break
            self._pump(until=deadline, on_empty=pass_done)
            if not self.remaining and (max_passes is None or passes < max_passes):
                pass_done()
        self._send(self.main, [self.enc.end()])
        self._block = 0
        self._cursor = [0] * len(self.blocks)
        return passes

    def _serve_requests(self) -> None:
        """The request thread: the native server answers requests on the preempt channel;
        whatever else comes on the return path (SHUT, PONG, anything malformed) goes to the codec."""
        make_latency_thread()
        srv, lane = self._server, self.preempt
        try:
            while self.shut is None:
                r = lib.pc_src_serve(srv)
                if r == lib.PC_SERVE_QUIT:
                    return
                if r == lib.PC_SERVE_EOF:
                    raise PeerDisconnected("the destination disconnected before answering SHUT")
                if r < 0:
                    raise PeerDisconnected(f"the destination connection failed: {os.strerror(-r)}")
                self._take_from_server()
                lane.named = srv.named
                while True:
                    self._handle_return_path(b"")
                    if self.requests:
                        self._send_requested(lane)
                    # a message longer than the server's buffer (a RECV_BITMAP for a block over
                    # 2 GiB): the codec reads the rest of it here
                    if self.decoder.buffered < len(srv.rbuf):
                        break
                    if not self._receive_long():
                        return
                srv.named = lane.named
                last = self.decoder.last_block
                srv.last_block = self.index[last] if last is not None else -1
                rest = self.decoder.take_unconsumed()
                ffi.memmove(srv.rbuf, rest, len(rest))
                srv.rlen = len(rest)
                srv.need_more = 1 if rest else 0
                self._last_heard = time.monotonic()
        except BaseException as e:   # handed to the streaming thread
            self._error = e
            self._shut_event.set()

    def _receive_long(self) -> bool:
        """More of a long return-path message, for the codec; False when told to quit."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._quit_fd, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._quit_fd in ready:
                return False
            if self._fd in ready:
                break
        try:
            data = self.conn.recv(1 << 20)
        except OSError as e:
            raise PeerDisconnected(f"the destination connection failed: {e.strerror or e}") from None
        if not data:
            raise PeerDisconnected("the destination disconnected before answering SHUT")
        self.decoder.feed(data)
        return True

    def _take_from_server(self) -> None:
        """The server's unparsed bytes and REQ_PAGES state go (back) to the codec."""
        srv = self._server
        self.decoder.consumed_elsewhere(srv.consumed)
        srv.consumed = 0
        self.decoder.last_block = self.blocks[srv.last_block].name if srv.last_block >= 0 else None
        self.decoder.feed(bytes(ffi.buffer(srv.rbuf, srv.rlen)))
        srv.rlen = 0

    def _stop_request_server(self) -> None:
        os.eventfd_write(self._quit_fd, 1)
        self._request_thread.join()
        os.close(self._quit_fd)
        if self.decoder.buffered == 0:
            self._take_from_server()   # from here on the codec reads the return path
        st = self._server.st
        self.stats["requests"] += st.requests
        self.stats["requested_pages"] += st.requested_pages
        self.stats["resent_pages"] += st.resent_pages
        self.stats["requests_already_sent"] += st.resent_pages
        self.stats["bytes"] += st.bytes
        self.stats["zero_pages"] += st.zero_pages

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            raise self._error

    def run(self) -> dict:
        """Post-copy: stream until every page is sent (then EOS and EOF) and SHUT arrives."""
        self._begin_section(self.main)
        self.phase, self.phase_pages = "post-copy", self.remaining
        self._last_heard = time.monotonic()
        if self.preempt is None:
            while self.remaining and self.shut is None:
                self._pump()
        else:
            self._begin_section(self.preempt)
            self._request_thread = threading.Thread(target=self._serve_requests, name="postcopy/requests",
                                                    daemon=True)
            self._request_thread.start()
            try:
                # the server takes pages too, so ``remaining`` over-estimates:
                # done is when no page is left to send
                while self.remaining and self.shut is None:
                    self._raise_thread_error()
                    self._pump(serve_requests=False)
            finally:
                self._stop_request_server()
            self._raise_thread_error()
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
        if self.shut != 0:
            raise PostcopyError(f"the destination reported failure (SHUT {self.shut})")
        self.phase = "done"
        self.stats["seconds"] = round(time.monotonic() - self._t0, 3)
        return self.stats


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


def migrate_image(conn: socket.socket, image: ImageMemory, *, state: bytes = b"", max_bandwidth: float = 0.0,
                  timeout: float = 30.0, preempt: socket.socket | None = None, on_start=None) -> dict:
    """Lazy restore: preamble, STATE, LISTEN, RUN, then every page (requested ones first), EOF, SHUT.

    ``preempt``: a second connection to the destination for requested pages.
    ``on_start(streamer)``: called with the PageStreamer before it sends (its progress() for a display).
    """
    t0 = time.monotonic()
    streamer = PageStreamer(conn, image, max_bandwidth=max_bandwidth, timeout=timeout, preempt=preempt)
    if on_start is not None:
        on_start(streamer)
    send_preamble(conn, image.blocks, streamer.migration)
    conn.sendall(codec.encode(codec.State(state)) + codec.encode(codec.PostcopyListen()) +
                 codec.encode(codec.PostcopyRun()))
    stats = streamer.run()
    stats["total_seconds"] = round(time.monotonic() - t0, 3)
    stats["pages"] = sum(b.length // TP for b in image.blocks)
    return stats
