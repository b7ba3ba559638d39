"""One incoming connection of the destination: the main stream or the preempt channel."""
from __future__ import annotations

import errno
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

from .. import codec
from .._native import ffi, lib
from ..errors import PeerDisconnected, PeerTimeout, ProtocolError
from ..uffd import native_error
from ..channels.tls import buffered

TP = codec.TARGET_PAGE_SIZE
RECV_CHUNK = 1 << 20
RUN_PAGES = 256          # placement runs up to 1 MiB: UFFDIO_COPY is ~14x faster per byte at 64 KiB+ than at 4 KiB


@dataclass
class _Run:
    """Target pages arriving back to back for one block: assembled, then placed in one go."""

    block: int = -1
    offset: int = 0
    pages: int = 0
    buf: bytearray = field(default_factory=lambda: bytearray(RUN_PAGES * TP))


class ReceiverSink(Protocol):
    """What a :class:`StreamReceiver` needs of the destination (:class:`~postcopy_cli.dest.engine.Destination`)."""

    blocks: list            # RamBlock, in native block order
    index: dict             # block name -> native block index
    native: object          # the native pc_dest handle: placement and the pump

    def placement_failed(self, r: int, block: int, offset: int) -> None:
        """A native placement returned -errno ``r``: raise, or return if nothing is lost."""

    def check_peers(self) -> None:
        """The stream broke: raise the error behind it if there is one (the program left, the preempt channel
        failed)."""

    def check_fault_thread(self) -> None:
        """Raise if the fault thread failed."""

    def pages_arrived_lately(self) -> bool:
        """The main stream was silent for its timeout: True if pages arrived meanwhile (on the preempt
        channel), so the link is alive."""

    def program_left(self) -> None:
        """The wake fd fired: the attached program left (decide what that means)."""

    def apply_discards(self) -> None:
        """Drop the discards received so far (no-op if there are none) before the next RAM record."""

    def command(self, ev, decoder: codec.StreamDecoder) -> bool:
        """A non-RAM event of the main stream; True at its end (EOF)."""


class StreamReceiver:
    """One incoming connection: the main stream, or the preempt channel (RAM sections only).

    Owns its decoder, receive buffer and the run of pages being assembled;
    placement itself is thread-safe native code shared by both channels.
    """

    def __init__(self, sink: ReceiverSink, conn: socket.socket, decoder: codec.StreamDecoder, *, timeout: float,
                 wake_fd: int = -1, main: StreamReceiver | None = None):
        self.dest = sink
        self.conn = conn
        self.decoder = decoder
        self.timeout = timeout
        self.wake_fd = wake_fd    # the main stream: readable when the program left
        self.main = main          # the preempt channel: the main stream's receiver
        self._run = _Run()
        self._discards_pending = False

    def position(self, *, state: bool = False) -> str:
        """Where this channel is, for messages: the preempt channel carries only RAM, so it is named
        and the main stream's position and state go with it."""
        if not self.decoder.preempt or self.main is None:
            return f"stream offset {self.decoder.offset}" + (f", state {self.decoder.state.name}" if state else "")
        main = self.main.decoder
        return f"preempt channel offset {self.decoder.offset}; main stream offset {main.offset}, " \
               f"state {main.state.name}"

    def _flush(self):
        """Place the whole host pages assembled so far; a partial huge page stays."""
        run = self._run
        if not run.pages:
            return
        hp_pages = self.dest.blocks[run.block].page_size // TP
        whole = run.pages - run.pages % hp_pages
        if whole:
            r = lib.pc_dest_place(self.dest.native, run.block, run.offset, ffi.from_buffer(run.buf), whole * TP)
            if r < 0:
                run.pages = 0
                self.dest.placement_failed(r, run.block, run.offset)
            rest = run.pages - whole
            if rest:
                run.buf[:rest * TP] = run.buf[whole * TP:run.pages * TP]
            run.offset += whole * TP
            run.pages = rest

    def _page(self, bi: int, offset: int, data):
        run = self._run
        if run.pages:
            contiguous = run.block == bi and offset == run.offset + run.pages * TP
            at_host_page = (run.pages * TP) % self.dest.blocks[run.block].page_size == 0
            if not at_host_page and not contiguous:
                # the seed refuses this too: a huge page is placed whole, so its
                # target pages must arrive together and in order
                hp = self.dest.blocks[run.block].page_size
                host_page = run.offset + run.pages * TP - run.pages * TP % hp
                raise ProtocolError(f"block {self.dest.blocks[run.block].name!r}: host page at {host_page:#x}"
                                    f" interrupted by page {offset:#x} of block {self.dest.blocks[bi].name!r}",
                                    section="RAM section", offset=self.decoder.offset)
            if at_host_page and (not contiguous or run.pages * TP >= len(run.buf)):
                self._flush()
        if not run.pages:
            hp = self.dest.blocks[bi].page_size
            if offset % hp:
                raise ProtocolError(f"block {self.dest.blocks[bi].name!r}: page {offset:#x} is not the first target "
                                    f"page of its {hp}-byte host page at {offset - offset % hp:#x}",
                                    section="RAM section", offset=self.decoder.offset)
            run.block, run.offset = bi, offset
            if len(run.buf) < hp:
                run.buf = bytearray(hp)
        start = run.pages * TP
        run.buf[start:start + TP] = data
        run.pages += 1

    def _zero(self, bi: int, offset: int):
        block = self.dest.blocks[bi]
        if block.page_size > TP:
            self._page(bi, offset, bytes(TP))
            return
        self._flush()
        r = lib.pc_dest_place_zero(self.dest.native, bi, offset, TP)
        if r < 0:
            self.dest.placement_failed(r, bi, offset)

    def _recv_into(self, conn: socket.socket, view: memoryview) -> int:
        dest = self.dest
        while True:
            try:
                if self.wake_fd >= 0:
                    self._wait_readable(conn)
                n = conn.recv_into(view)
                break
            except socket.timeout:
                dest.check_peers()
                if dest.pages_arrived_lately():
                    continue   # the preempt channel carries the source's pages meanwhile: the link lives
                raise PeerTimeout(f"the source sent nothing for {self.timeout:g} s ({self.position()})") from None
            except OSError as e:
                dest.check_peers()
                raise PeerDisconnected(f"the source connection failed ({self.position()}): {e.strerror or e}") \
                    from None
        if not n:
            dest.check_peers()
            raise PeerDisconnected(f"the source disconnected before the end of the migration "
                                   f"({self.position(state=True)})")
        return n

    def _wait_readable(self, conn: socket.socket) -> None:
        """Wait for the source's bytes (socket.timeout after the socket's timeout); a wake on the way means
        the program left."""
        if buffered(conn):
            return
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
        timeout = conn.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            ready = dict(poller.poll(left))
            if self.wake_fd in ready:
                self.dest.program_left()
                poller.unregister(self.wake_fd)
            if conn.fileno() in ready:
                return
            if left == 0:
                raise socket.timeout

    def receive_loop(self) -> None:
        """Bytes in; the bulk of each RAM section goes to the native pump, the rest to the codec.

        Inside a RAM section of a target-page-size block, after its first (named) record, the native pump
        receives and places runs of PAGE|CONTINUE and ZERO|CONTINUE records with the GIL released,
        straight from the receive buffer; anything else goes through the validating sans-IO decoder.
        The bytes and the block pass between the two only through the
        :class:`~postcopy_cli.codec.pumped.PumpedDecoder` (its rule: every undecoded byte is in one place).
        """
        conn, dest = self.conn, self.dest
        index = dest.index
        native = dest.native
        fast = ffi.new("struct pc_ram_fast *")
        small_pages = [b.page_size == TP for b in dest.blocks]
        pumped = codec.PumpedDecoder(self.decoder, RECV_CHUNK)
        ptr = ffi.from_buffer(pumped.buffer)
        cap = len(pumped.buffer)
        span = ffi.from_buffer("uint64_t[]", pumped.span)   # the pump moves [start, end) in place
        fd = conn.fileno()
        timeout_ms = -1 if conn.gettimeout() is None else int(conn.gettimeout() * 1000)
        # the hop trace names the channel that accounted for each requested page (this thread's)
        lib.pc_dest_hop_channel(lib.PC_HOP_PREEMPT if self.main is not None else lib.PC_HOP_MAIN)
        recv_into = lambda view: self._recv_into(conn, view)  # noqa: E731
        try:
            eof = False
            while not eof:
                if pumped.lent:
                    bi = index[pumped.block]
                    self._flush()
                    r = lib.pc_dest_pump(native, fd, self.wake_fd, bi, ptr, cap, span, span + 1, timeout_ms, fast)
                    pumped.take_back(fast.consumed, stopped=r == lib.PC_PUMP_STOP)
                    if fast.error:
                        dest.placement_failed(fast.error, bi, fast.error_offset)
                    if r == lib.PC_PUMP_WAKE:
                        dest.program_left()
                    elif r != lib.PC_PUMP_STOP:
                        self._pump_ended(r)
                else:
                    pumped.receive(recv_into)
                eof = self._decode_events(pumped)
                name = pumped.block
                if not eof and name is not None and small_pages[index[name]]:
                    pumped.lend()   # back to the fast path (unless the undecoded bytes exceed the buffer)
                self._flush()
        finally:
            # the native views go now, not with a garbage cycle an exception left (that order freed the
            # buffer under its view: a crash at exit)
            ffi.release(ptr)
            ffi.release(span)
        dest.check_fault_thread()

    def _pump_ended(self, r: int) -> None:
        dest = self.dest
        if r == lib.PC_PUMP_FAULT_THREAD:
            dest.check_fault_thread()
        dest.check_peers()
        if r == -errno.ETIMEDOUT and dest.pages_arrived_lately():
            return   # the preempt channel carries the source's pages meanwhile: the link lives
        if r == -errno.ETIMEDOUT:
            raise PeerTimeout(f"the source sent nothing for {self.timeout:g} s ({self.position()})")
        if r == lib.PC_PUMP_EOF:
            raise PeerDisconnected(f"the source disconnected before the end of the migration "
                                   f"({self.position(state=True)})")
        raise native_error(r, f"the source connection failed ({self.position()})", PeerDisconnected)

    def _decode_events(self, pumped: codec.PumpedDecoder) -> bool:
        """Handle decoded events until the decoder needs data or can hand over to the fast path."""
        decoder = pumped.decoder
        dest = self.dest
        index = dest.index
        blocks = dest.blocks
        RamPage, RamZero = codec.RamPage, codec.RamZero
        for ev in pumped.events():
            t = type(ev)
            if t is RamPage:
                if self._discards_pending:
                    self._discards_pending = False
                    dest.apply_discards()
                self._page(index[ev.block], ev.offset, ev.data)
                if blocks[index[ev.block]].page_size == TP:
                    return False   # the rest of this section can go the fast way
            elif t is RamZero:
                if self._discards_pending:
                    self._discards_pending = False
                    dest.apply_discards()
                self._zero(index[ev.block], ev.offset)
            elif t is codec.RamEnd:
                self._flush()
            elif t is codec.PreemptChannel:
                pass
            elif decoder.preempt:
                if t is codec.Eof:
                    return True
            else:
                if t is codec.PostcopyRamDiscard:
                    self._discards_pending = True
                if dest.command(ev, decoder):
                    return True
        return False
