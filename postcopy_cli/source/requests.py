"""The request server: answers the destination's page requests at once on the preempt channel.

The native server (``native/source.c``) reads the return path and answers
well-formed MIG_RP_MSG_REQ_PAGES(_ID) with the GIL released, claiming pages in
the :class:`~postcopy_cli.source.pages.PageBook`'s arrays (by the rule stated
there) and charging its bytes to the one bandwidth cap.  Anything else (SHUT,
PONG, a malformed message, one longer than its buffer) it hands back: its
unparsed bytes and its REQ_PAGES state go to the codec in the request thread,
the streamer's handler takes the events, and what the codec left goes back to
the server.
"""
from __future__ import annotations

import os
import select
import socket
import threading
from typing import Callable

from .. import codec, hoptrace
from .._native import ffi, lib
from ..errors import PeerDisconnected, PostcopyError, ProtocolError
from ..sched import make_latency_thread
from ..uffd import native_error
from .bandwidth import BandwidthCap
from .pages import PageBook
from ..channels.tls import buffered


class RequestServer:
    """The native server over ``conn``'s return path, answering on ``lane`` (the preempt channel).

    ``memory`` is the MemorySource (its ``pid``, ``base`` and ``segments``);
    ``decoder`` the codec's return-path decoder the server hands back to.
    """

    def __init__(self, conn: socket.socket, lane, memory, book: PageBook, cap: BandwidthCap,
                 decoder: codec.ReturnPathDecoder):
        self.conn = conn
        self.lane = lane
        self.book = book
        self.decoder = decoder
        self.blocks = book.blocks
        self.index = {b.name: i for i, b in enumerate(self.blocks)}
        self.error: BaseException | None = None
        self._fd = conn.fileno()
        self._quit_fd = os.eventfd(0, os.EFD_CLOEXEC)
        srv = ffi.gc(lib.pc_src_new(self._fd, lane.fd, self._quit_fd, memory.pid), lib.pc_src_free)
        if srv == ffi.NULL:
            os.close(self._quit_fd)
            raise MemoryError("pc_src_new")
        srv.cap = cap.native if cap.max_bandwidth else ffi.NULL
        self._keep: list = [cap]   # what the server points into must stay alive (and the arrays unresized)
        for bi, (to_send, sent) in enumerate(book.arrays()):
            b = self.blocks[bi]
            to_send_p = ffi.from_buffer(to_send)
            sent_p = ffi.from_buffer(sent) if sent is not None else ffi.NULL
            self._keep += [to_send_p, sent_p]
            r = lib.pc_src_add_block(srv, b.name.encode(), b.length, b.page_size, memory.base(bi), to_send_p, sent_p)
            if r < 0:
                raise native_error(r, f"request server: block {b.name!r}", PostcopyError)
            for offset, addr, size in memory.segments(bi):
                lib.pc_src_add_segment(srv, bi, offset, addr, size)
        self.srv = srv
        # the hand-over: the server's rbuf is the buffer the codec's undecoded bytes are lent into
        self._pumped = codec.PumpedDecoder(decoder, ffi.buffer(srv.rbuf))
        self._thread: threading.Thread | None = None

    def enable_hop_trace(self, capacity: int) -> None:
        """Keep the hop times of up to ``capacity`` requests (before :meth:`start`)."""
        r = lib.pc_src_hop_trace(self.srv, capacity)
        if r < 0:
            raise native_error(r, "request server: the hop trace", PostcopyError)

    def hop_trace(self) -> tuple[list[tuple], int]:
        """The hop trace's rows (hoptrace.SOURCE_COLUMNS, in the order the requests were read) and how
        many requests asked for an entry (beyond the rows: dropped)."""
        entries, claimed = hoptrace.read(lib.pc_src_hop_read, self.srv, [b.name for b in self.blocks])
        return hoptrace.source_rows(entries), claimed

    @property
    def bytes_sent(self) -> int:
        """Bytes the server has sent so far (read without a lock: a snapshot)."""
        return self.srv.st.bytes

    @property
    def answered(self) -> tuple[int, int]:
        """(requests, requested pages) the server has answered so far (read without a lock: a snapshot)."""
        st = self.srv.st
        return int(st.requests), int(st.requested_pages)

    def start(self, on_codec: Callable[[], None], done: Callable[[], bool]) -> None:
        """Serve in a thread until ``done()`` or :meth:`stop`.  ``on_codec()`` runs in that thread
        each time the codec has bytes from the server: it takes the decoder's events (and answers
        requests on the lane itself).  A failure ends the thread and is kept in :attr:`error`.

        From here until :meth:`stop` returns, the decoder belongs to the request thread."""
        # what the codec holds of the return path (a partial message, the REQ_PAGES block) goes to the server
        if self._lend() is None:
            raise ProtocolError(f"a message of over {len(self._pumped.buffer)} bytes before page requests",
                                section="return path", offset=self.decoder.offset)
        self.book.lend()
        self._thread = threading.Thread(target=self._serve, args=(on_codec, done), name="postcopy/requests",
                                        daemon=True)
        self._thread.start()

    def _lend(self) -> int | None:
        """The codec's undecoded bytes and REQ_PAGES block to the server (None: they exceed its buffer)."""
        srv = self.srv
        last = self._pumped.block
        n = self._pumped.lend()
        if n is not None:
            srv.last_block = self.index[last] if last is not None else -1
            srv.rlen = n
            srv.need_more = 1 if n else 0
        return n

    def _serve(self, on_codec, done) -> None:
        make_latency_thread()
        srv, lane = self.srv, self.lane
        try:
            while not done():
                r = lib.pc_src_serve(srv)
                if r == lib.PC_SERVE_QUIT:
                    return
                if r == lib.PC_SERVE_EOF:
                    raise PeerDisconnected("the destination disconnected before answering SHUT")
                if r < 0:
                    raise native_error(r, "the destination connection failed", PeerDisconnected)
                self._take_from_server()
                lane.named = srv.named
                while True:
                    on_codec()
                    # a message longer than the server's buffer (a RECV_BITMAP for a block over
                    # 2 GiB): the codec reads the rest of it here
                    if self._pumped.undecoded < len(self._pumped.buffer):
                        break
                    if not self._receive_long():
                        return
                srv.named = lane.named
                self._lend()
        except BaseException as e:   # handed to the streaming thread
            self.error = e

    def _receive_long(self) -> bool:
        """More of a long return-path message, for the codec; False when told to quit."""
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._quit_fd, select.POLLIN)
        while not buffered(self.conn):
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
        self._pumped.feed(data)
        return True

    def _take_from_server(self) -> None:
        """The server's unparsed bytes (rbuf[0, rlen)) and REQ_PAGES state go back to the codec."""
        srv = self.srv
        consumed, srv.consumed = srv.consumed, 0
        self._pumped.take_back(consumed, end=srv.rlen,
                               block=self.blocks[srv.last_block].name if srv.last_block >= 0 else None)
        srv.rlen = 0

    def stop(self) -> dict:
        """Stop the server; from here on the codec reads the return path.  Returns the server's
        counts, in the streamer's stats names."""
        os.eventfd_write(self._quit_fd, 1)
        if self._thread is not None:
            self._thread.join()
        os.close(self._quit_fd)
        if self._pumped.lent:
            self._take_from_server()
        self.book.returned()
        st = self.srv.st
        return {"requests": st.requests, "requested_pages": st.requested_pages, "resent_pages": st.resent_pages,
                "requests_already_sent": st.resent_pages, "bytes": st.bytes, "zero_pages": st.zero_pages}
