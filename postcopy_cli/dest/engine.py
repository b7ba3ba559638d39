"""The destination engine: the seed's postcopy-ram.c destination, whole.

State machine NONE -> ADVISE -> DISCARD -> LISTENING -> RUNNING -> END (the
codec refuses commands out of order); discards dropped; userfaultfd
registration at LISTEN; a :class:`FaultThread` (native, GIL released) that
turns each fault into one request on the return path; pages placed atomically
a whole host page at a time, in runs where they arrive in runs; a received
bitmap; SHUT 0 when every page is in; cleanup that unregisters and closes
every fd.

The memory is either our own (``--ram``, library use) or an attached
program's, handed over with its userfaultfd (:mod:`postcopy_cli.channels.handover`).
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from .. import codec, hoptrace
from .._native import ffi, lib
from ..errors import PeerDisconnected, PeerTimeout, PostcopyError, ProtocolError
from ..channels.control import ControlReader
from ..codec import workset
from ..channels.handover import Handover, HandshakeError
from ..memory.mappings import MADV_DONTNEED, RamBlock, madvise, relock, unlock_if_locked
from ..sched import make_latency_thread
from .channel import StreamReceiver
from .faults import FaultThread
from .phase import DestPhase
from .stats import dest_stats
from ..uffd import RegisterMode, UffdError, Userfaultfd, check_native, native_error

log = logging.getLogger("postcopy.dest")

TP = codec.TARGET_PAGE_SIZE


class ProgramGone(PostcopyError):
    """The attached program exited or closed its socket (exit 1)."""


def _peer_closed(sock: socket.socket) -> bool:
    """True if the peer of ``sock`` has closed it (EOF pending)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


@dataclass
class DestinationResult:
    stats: dict
    state: bytes
    complete: bool


class Destination:
    """Receives one migration into ``blocks``.

    ``uffd`` is the userfaultfd covering the blocks' memory.  ``program`` is the
    attached program's hand-over (None for memory in this process, which is
    registered at LISTEN and written with memcpy before that).
    """

    def __init__(self, blocks: list[RamBlock], uffd: Userfaultfd, *, program: Handover | None = None,
                 timeout: float = 30.0, recover_timeout: float = 0.0, record_workset: bool = False,
                 hop_trace: int = 0):
        """``record_workset``: keep the pages the program faults on, in order (:meth:`workset`);
        ``hop_trace``: keep the hop times of up to this many page requests (:meth:`hop_trace`; 0: off)."""
        self.blocks = blocks
        self.uffd = uffd
        self.program = program
        self.timeout = timeout
        self.recover_timeout = recover_timeout   # seconds a broken post-copy may stay paused (0: fail at once)
        self.index = {b.name: i for i, b in enumerate(blocks)}
        self.total_pages = sum(b.pages for b in blocks)
        self.state_bytes = b""
        self.native = ffi.gc(lib.pc_dest_new(uffd.fileno(), -1, program.pid if program else 0), lib.pc_dest_free)
        if self.native == ffi.NULL:
            raise MemoryError("pc_dest_new")
        for b in blocks:
            bi = lib.pc_dest_add_block(self.native, b.name.encode(), b.length, b.page_size)
            check_native(bi, f"block {b.name!r}")
            for s in b.segments:
                check_native(lib.pc_dest_add_segment(self.native, bi, s.offset, s.host_addr, s.size),
                             f"segment of block {b.name!r}")
            for off, length in b.unmapped_ranges():
                lib.pc_dest_mark(self.native, bi, off, length, 1)
        if record_workset:
            # (pages sent unasked are staged, not placed, until touched or the stream's end: native/dest_place.c)
            check_native(lib.pc_dest_record_workset(self.native, 1), "setting up the working-set record")
        self.hop_capacity = hop_trace
        if hop_trace:
            # before the fault thread starts: every request has its entry
            check_native(lib.pc_dest_hop_trace(self.native, hop_trace), "setting up the hop trace")
        os.set_blocking(uffd.fileno(), False)
        self.fault_thread = FaultThread(self.native)
        lib.pc_dest_set_quit_fd(self.native, self.fault_thread.quit_fd)
        self._registered: list[tuple[int, int]] = []
        self._control: ControlReader | None = None
        self._conn: socket.socket | None = None
        self._main: StreamReceiver | None = None
        self._preempt_thread: threading.Thread | None = None
        self._preempt_error: PostcopyError | None = None
        self._preempt_conn: socket.socket | None = None
        self._preempt_lock = threading.Lock()
        self._migration_known = threading.Event()   # the main stream's ID section (or its absence) is decoded
        self.migration: codec.MigrationId | None = None   # that ID section
        self._wire_blocks: dict | None = None          # the blocks the main stream announced
        self._preempt_adopted = threading.Event()
        self._dropping = False     # the stream's thread is ending the channels (a pause): their errors are no news
        # post-copy recovery: a resumed main stream (connection, decoder past its RESUME section) waiting
        # for the stream's thread; a newer one supersedes the connection in use
        self._resume_lock = threading.Lock()
        self._resume_pending: tuple[socket.socket, codec.StreamDecoder] | None = None
        self._resume_ready = threading.Event()
        self._superseded = False
        self._epoch = 0            # main streams attached so far: a preempt channel joins the one it met
        self._shut_delivered = False
        self._shut_sent = False
        self._arrived_seen = 0     # pages placed at the main stream's last silence (pages_arrived_lately)
        self.told_complete = threading.Event()   # a resuming source was told the migration is complete
        self._closed = False
        self._stop_error: PostcopyError | None = None
        self._pending_discards: dict[str, list] = {}
        self.phase = DestPhase(self, self if program else None, flush=lambda: self._main._flush())
        self._switching = False   # a discard or LISTEN arrived: pre-copy is over
        self.t_start = time.monotonic()
        self._mlocked = False
        # written when the program leaves: it wakes the stream's thread, which alone decides what that means
        self._left_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) if program else -1
        self._left_lock = threading.Lock()
        if program:
            self._register_all()
            self._control = ControlReader(program.sock, name="postcopy/program", on_gone=self._signal_program_left)
        self.fault_thread.start()

    # -- the attached program -----------------------------------------------------
    def _signal_program_left(self):
        """The attached program exited or closed its socket (the control reader's thread): wake the stream's
        thread, which decides (:meth:`program_left`)."""
        with self._left_lock:
            if self._left_fd >= 0:
                os.eventfd_write(self._left_fd, 1)

    def program_left(self):
        """The stream's thread, woken because the program left: with every page in nothing is lost and the
        migration goes on to its end; otherwise it failed."""
        try:
            os.eventfd_read(self._left_fd)
        except BlockingIOError:
            pass
        self.check_program()

    @property
    def _program_gone(self) -> bool:
        return self._control is not None and self._control.gone.is_set()

    # -- what DestPhase changes -----------------------------------------------------
    def set_phase(self, phase: int) -> None:
        r = lib.pc_dest_set_phase(self.native, phase)
        if r == -errno.ENOMEM:
            raise native_error(r, "collecting the outstanding page requests")
        # any other failure is the return path's: the requests held back went out on it (LISTEN, or a
        # resumed stream), and its breaking is the source connection's, which pauses a running migration
        check_native(r, "the source connection failed sending page requests", PeerDisconnected)

    def register_own_memory(self) -> None:
        self._register_all()

    def place_staged(self) -> None:
        """Place the pages held back for the working-set record (none without one)."""
        r = lib.pc_dest_place_staged(self.native)
        if r < 0:
            if r == -errno.ESRCH and self.program and self._control.gone.wait(self.timeout):
                return   # the program exited with every page here: it lost nothing (check_program)
            self.check_program()
            raise native_error(r, "placing the pages staged for the working-set record", PostcopyError)

    def tell(self, message: dict) -> None:
        self._tell_program(message)

    def _tell_program(self, message: dict) -> None:
        if self.program and self.program.notify and not self._program_gone:
            try:
                self._control.send(message)
            except OSError:
                pass

    def _all_received(self) -> bool:
        return lib.pc_dest_count_received(self.native, -1) >= self.total_pages

    def check_program(self):
        # a program that leaves once every page is in has lost nothing
        if self._program_gone:
            missing = self.total_pages - lib.pc_dest_count_received(self.native, -1)
            if missing > 0:
                raise ProgramGone(f"the attached program (pid {self.program.pid}) exited or closed its socket "
                                  f"during the migration, with {missing} of {self.total_pages} pages not "
                                  f"received yet")

    # -- registration ---------------------------------------------------------------
    def _register_all(self):
        for b in self.blocks:
            for s in b.segments:
                try:
                    self.uffd.register(s.host_addr, s.size, RegisterMode.MISSING)
                except UffdError as e:
                    # ENOMEM: the program's address space is gone (fs/userfaultfd.c
                    # fails mmget_not_zero() with it): it is exiting, even if its
                    # socket is not closed yet (exit_mm() runs before exit_files())
                    if self.program and (e.errno == errno.ENOMEM or _peer_closed(self.program.sock)):
                        raise ProgramGone(f"the attached program (pid {self.program.pid}) exited or closed its "
                                          f"socket before its memory could be registered") from None
                    raise PostcopyError(f"cannot register block {b.name!r} at {s.host_addr:#x}+{s.size:#x} with "
                                        f"userfaultfd: {e.strerror}") from e
                self._registered.append((s.host_addr, s.size))

    def _unregister_all(self):
        for addr, size in self._registered:
            try:
                self.uffd.unregister(addr, size)
            except UffdError as e:
                # the program may have exited or unmapped the range already
                log.debug("unregister %#x+%#x: %s", addr, size, e)
        self._registered.clear()

    # -- commands -------------------------------------------------------------------
    def _check_blocks(self, msg: codec.Blocks, offset: int):
        theirs = {b.name: b for b in msg.blocks}
        for b in self.blocks:
            t = theirs.get(b.name)
            if t is None:
                raise ProtocolError(f"the source has no block {b.name!r}", section="BLOCKS section", offset=offset)
            if (t.length, t.page_size) != (b.length, b.page_size):
                raise ProtocolError(f"block {b.name!r}: the source has {t.length} bytes in pages of {t.page_size}, "
                                    f"this side {b.length} bytes in pages of {b.page_size}",
                                    section="BLOCKS section", offset=offset)
        extra = sorted(set(theirs) - set(self.index))
        if extra:
            raise ProtocolError(f"the source sends block(s) this side does not have: {', '.join(extra)}",
                                section="BLOCKS section", offset=offset)

    def _advise(self, msg: codec.PostcopyAdvise, offset: int):
        summary = 0
        for b in self.blocks:
            summary |= b.page_size
        if msg.target_page_size != TP or msg.page_size_summary != summary:
            raise ProtocolError(f"page sizes differ: source page-size summary {msg.page_size_summary:#x} and target "
                                f"page {msg.target_page_size}, this side {summary:#x} and {TP}",
                                section="COMMAND POSTCOPY_ADVISE", offset=offset)
        if not self.program:
            self._munlock()

    def _munlock(self):
        if unlock_if_locked():
            self._mlocked = True

    def _discard(self, msg: codec.PostcopyRamDiscard):
        """Drop the ranges (stale since the source sent them); an attached program's drops are batched."""
        bi = self.index[msg.block]
        block = self.blocks[bi]
        self._main._flush()
        if self.program:
            if not self.program.notify:
                raise PostcopyError(f"the source discards pages of block {msg.block!r}, but the attached program "
                                    f"did not ask to be told (no \"notify\" in its hand-over), so they cannot be "
                                    f"dropped")
            self._pending_discards.setdefault(msg.block, []).extend(msg.ranges)
            return
        for start, length in msg.ranges:
            pos, end = start, start + length
            while pos < end:       # one madvise per mapped span of the range
                addr, span = block.host_span(pos)
                step = min(span, end - pos)
                if addr is not None:
                    madvise(addr, step, MADV_DONTNEED)
                pos += step
            lib.pc_dest_mark(self.native, bi, start, length, 0)

    def apply_discards(self):
        """One round trip to the attached program for all discards received so far."""
        if not self._pending_discards:
            return
        pending, self._pending_discards = self._pending_discards, {}
        # the program's madvise raises UFFD_EVENT_REMOVE, which the fault
        # thread reads (the madvise waits for that); those are not drops
        lib.pc_dest_set_discarding(self.native, 1)
        try:
            self._tell_program({"cmd": "discard", "ranges": {name: [list(r) for r in ranges]
                                                              for name, ranges in pending.items()}})
            self._await_program("discarded")
        finally:
            lib.pc_dest_set_discarding(self.native, 0)
        for name, ranges in pending.items():
            for start, length in ranges:
                lib.pc_dest_mark(self.native, self.index[name], start, length, 0)

    def _await_program(self, event: str):
        try:
            msg = self._control.wait_for(event, self.timeout)
        except HandshakeError:
            self.check_program()
            raise
        if msg is None:
            raise PostcopyError(f"the attached program did not answer {event!r} within {self.timeout:g} s")
        return msg

    def placement_failed(self, r: int, block: int, offset: int):
        if r == -errno.ESRCH and self.program and self._control.gone.wait(self.timeout):
            # UFFDIO_COPY found the program's address space gone: it is exiting
            # (its socket closes just after: exit_mm() runs before exit_files())
            self.check_program()
            return   # every page is in: the other channel placed these too
        self.check_program()
        raise native_error(r, f"placing pages of block {self.blocks[block].name!r} at offset {offset:#x}",
                           PostcopyError)

    def _send_rp(self, data: bytes):
        check_native(lib.pc_dest_rp_send(self.native, data, len(data)), "the source connection failed writing the "
                     "return path", PeerDisconnected)

    def _recv_bitmap(self, msg: codec.RecvBitmapRequest):
        bi = self.index[msg.block]
        nbytes = (self.blocks[bi].pages + 7) // 8
        out = ffi.new("uint8_t[]", max(nbytes, 1))
        lib.pc_dest_bitmap_le(self.native, bi, out, nbytes)
        self._send_rp(codec.encode_rp(codec.RecvBitmap(msg.block, bytes(ffi.buffer(out, nbytes)))))

    # -- the stream -------------------------------------------------------------------
    def run(self, conn: socket.socket) -> DestinationResult:
        """Receive the whole migration from ``conn``; returns when every page is in.

        After RUN a broken connection pauses the migration (with ``recover_timeout``): the program's
        faulting threads keep waiting, and the migration goes on on a resumed main stream (:meth:`offer`)."""
        self._attach(conn, codec.StreamDecoder())
        try:
            while True:
                try:
                    self._main.receive_loop()
                    self._join_preempt()
                    return self._finish(self._main.decoder)
                except PeerDisconnected as e:      # PeerTimeout too
                    if self.phase.running and self._all_received():
                        # every page is in: the migration has succeeded, whatever became of the connection
                        # or of the program (it lost nothing); a source that missed SHUT 0 comes back to
                        # resume and is told it again
                        return self._finish(self._main.decoder)
                    if not self._may_pause():
                        raise
                    self._pause(e)
                except ProtocolError as e:
                    if not (self.phase.paused and self._main.decoder.resumed):
                        raise
                    # the resume handshake went wrong: that connection alone is refused
                    self._pause(e, refused=True)
        except PostcopyError as e:
            err = self._stop_error or e
            missing = self.total_pages - lib.pc_dest_count_received(self.native, -1)
            if self.program and missing > 0 and not self._program_gone:
                # its memory stays registered (close()): the threads that touch a
                # missing page wait for ever, so the program must not go on
                err.args = (f"{err}: {missing} of {self.total_pages} pages never arrived; the attached program "
                            f"(pid {self.program.pid}) must be stopped",)
            self._fail_shut(str(err))
            if err is e:
                raise
            raise err from None
        finally:
            self.close()

    def _attach(self, conn: socket.socket, decoder: codec.StreamDecoder) -> None:
        """``conn`` is the main stream from here on (the first, or a resumed one)."""
        self._conn = conn
        self._epoch += 1
        conn.settimeout(self.timeout)
        lib.pc_dest_set_return_path(self.native, conn.fileno())
        self._main = StreamReceiver(self, conn, decoder, timeout=self.timeout, wake_fd=self._left_fd)

    # -- post-copy recovery (DESIGN.md section 9) ------------------------------------------
    def _may_pause(self) -> bool:
        """A broken connection pauses the migration only from LISTEN on (the source may have sent RUN), with
        a migration id to resume by, with recovery on, and when nothing else ends it (a signal, the
        program's leaving)."""
        return (self.recover_timeout > 0 and self.phase.can_pause and
                self.migration is not None and self.migration.id != codec.NO_MIGRATION_ID.id and
                self._stop_error is None and not self._program_gone and not self._closed)

    def _pause(self, error: PostcopyError, *, refused: bool = False) -> None:
        """Drop the broken channels, pause, and wait for a resumed main stream (attached on return);
        PeerDisconnected once ``recover_timeout`` has passed since the pause began."""
        reason = "the source resumed on a new connection" if self._superseded else str(error)
        self._superseded = False
        self._drop_channels()
        if self.phase.on_pause(reason):
            log.warning("post-copy paused: %s; waiting up to %g s for the source to resume on this address",
                        reason, self.recover_timeout)
        elif refused:
            log.warning("refused a resumed stream: %s; the migration stays paused", reason)
        else:
            log.warning("the resumed stream failed: %s; the migration stays paused", reason)
        conn, decoder = self._wait_resumed()
        log.info("a source resumes the migration")
        self._attach(conn, decoder)

    def _drop_channels(self) -> None:
        """End the main stream and the preempt channel (the source re-opens both)."""
        with self._preempt_lock:
            self._dropping = True
            pconn, thread = self._preempt_conn, self._preempt_thread
            self._preempt_conn = self._preempt_thread = None
            self._preempt_adopted.clear()
        for c in (self._conn, pconn):
            if c is not None:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if thread is not None:
            thread.join(self.timeout)
        # the fault thread's requests wait (PAUSED) until a resumed stream
        lib.pc_dest_set_return_path(self.native, -1)
        if self._conn is not None:
            self._conn.close()
        self._preempt_error = None
        self._dropping = False

    def _wait_resumed(self) -> tuple[socket.socket, codec.StreamDecoder]:
        start = self.phase.pauses[-1][0]
        deadline = start + self.recover_timeout
        while True:
            with self._resume_lock:
                pending, self._resume_pending = self._resume_pending, None
                self._resume_ready.clear()
            if pending is not None:
                return pending
            if self._stop_error is not None:
                raise self._stop_error
            self.check_program()
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerDisconnected(f"post-copy stayed paused for {time.monotonic() - start:.1f} s "
                                       f"(--recover-timeout {self.recover_timeout:g}) and no source resumed it; "
                                       f"it paused because {self.phase.pause_reason}")
            self._resume_ready.wait(min(left, 0.2))

    def _offer_resume(self, conn: socket.socket, decoder: codec.StreamDecoder) -> str | None:
        """A connection whose RESUME section names this migration: it becomes the main stream (a
        connection still in use is dead or stale: it is dropped).  Returns why it is refused, or None."""
        migration = self.migration
        if migration is None or migration.id == codec.NO_MIGRATION_ID.id:
            return "this migration has no id to resume by (its source sent no ID section)"
        if decoder.marker.id != migration.id:
            return "its RESUME section names another migration id"
        if self.phase.ended:
            # every page is in and SHUT 0 went on a connection that broke: the source missed it
            try:
                # its handshake is read whole first: closed with nothing unread, the connection ends with
                # a FIN after SHUT, not a reset that could overtake it
                conn.settimeout(self.timeout)
                seen = False
                while not seen:
                    data = conn.recv(65536)
                    if not data:
                        break
                    decoder.feed(data)
                    seen = any(type(ev) is codec.PostcopyResume for ev in decoder.events())
                conn.sendall(codec.encode_rp(codec.Shut(0)))
            except (OSError, ProtocolError):
                pass
            conn.close()
            log.info("a source resumed the complete migration: told it SHUT 0 again")
            self.told_complete.set()
            return None
        if self.recover_timeout <= 0:
            return "recovery is off (--recover-timeout 0)"
        if not self.phase.paused and not self.phase.running:
            return f"RESUME while the migration is {self.phase.state.value} (only a running or paused migration " \
                   f"resumes)"
        with self._resume_lock:
            if self._closed:
                return "the migration has ended"
            if self._resume_pending is not None:
                return "another connection is resuming the migration already"
            conn.settimeout(self.timeout)
            self._resume_pending = (conn, decoder)
            self._resume_ready.set()
            current = self._conn
            if current is not None and current.fileno() >= 0:
                # a connection in use (half-open: the source knew it was dead before this side did, or a
                # resume handshake that a newer one supersedes): ended, the stream's thread takes this one
                self._superseded = True
                try:
                    current.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        return None

    def stop(self, error: PostcopyError) -> bool:
        """Make run() fail with ``error`` (e.g. a signal): it ends the source connection.

        False if run() is not receiving (not started, or over)."""
        conn = self._conn
        if conn is None or self._closed:
            return False
        self._stop_error = error
        try:
            conn.shutdown(socket.SHUT_RD)   # wakes the stream's thread; SHUT 1 still goes to the source
        except OSError:
            pass
        return True

    def at_risk(self) -> str | None:
        """Why stopping now would lose the attached program (it runs, pages are missing), or None."""
        if self.program is None or not (self.phase.running or self.phase.paused) or self._closed:
            return None
        missing = self.total_pages - lib.pc_dest_count_received(self.native, -1)
        if missing <= 0:
            return None
        return f"the attached program (pid {self.program.pid}) runs here and {missing} of its pages are still missing"

    # -- the preempt channel ---------------------------------------------------------
    def offer(self, conn: socket.socket) -> str | None:
        """A further connection to the listening address: by its first section, the source's preempt channel
        (requested pages only) or, after a failure, a resumed main stream.

        The preempt channel is adopted if the main stream's ID section announced one, only once per main
        stream, and only if it starts with that id; a resumed stream only with that id, while the migration
        runs or is paused.  Returns None once adopted, else why it is refused (the caller warns and closes
        it; the migration goes on).
        """
        deadline = time.monotonic() + self.timeout
        # the source may connect it before sending its preamble on the main stream
        while not self._migration_known.wait(0.05):
            if self._closed or time.monotonic() > deadline:
                return "the main stream has announced no preempt channel"
        # a preempt channel belongs to the main stream it met (a stale one, from before a pause, is
        # refused: its source re-opens one after RESUME_ACK, once the resumed stream is attached)
        epoch = self._epoch
        decoder = codec.StreamDecoder(joining=self._wire_blocks)
        # exactly the header and the PREEMPT or RESUME section: nothing after it is read here
        want = 8 + 1 + codec.MIGRATION_ID_LENGTH
        try:
            while decoder.marker is None:
                conn.settimeout(max(0.001, deadline - time.monotonic()))
                data = conn.recv(want - decoder.offset - decoder.buffered)
                if not data:
                    return "it closed before sending a preempt channel header"
                decoder.feed(data)
                for _ in decoder.events():   # Header, then PreemptChannel or Resume: raises on anything else
                    pass
        except socket.timeout:
            return f"it sent no preempt channel header within {self.timeout:g} s"
        except OSError as e:
            return f"it failed before sending a preempt channel header: {e.strerror or e}"
        except ProtocolError as e:
            return str(e)
        if decoder.resumed:
            return self._offer_resume(conn, decoder)
        return self._adopt_preempt(conn, decoder, deadline, epoch)

    def _adopt_preempt(self, conn: socket.socket, decoder: codec.StreamDecoder, deadline: float,
                       epoch: int) -> str | None:
        migration = self.migration
        if not migration.preempt_channels:
            return "the main stream announced no preempt channel"
        if decoder.marker.id != migration.id:
            return "its preempt channel header names another migration id"
        # a resumed source re-opens its preempt channel once it has RESUME_ACK, sent just before this side
        # runs again
        while self.phase.paused:
            if self._closed or time.monotonic() > deadline:
                return "the migration is paused: a preempt channel joins a resumed stream after RESUME_ACK"
            time.sleep(0.005)
        conn.settimeout(None)   # idle whenever nothing is requested; it ends with the main stream
        channel = StreamReceiver(self, conn, decoder, timeout=self.timeout, main=self._main)
        thread = threading.Thread(target=self._run_preempt, args=(channel,), name="postcopy/preempt", daemon=True)
        with self._preempt_lock:   # close() may be running in the stream's thread
            if self._closed:
                return "the migration has ended"
            if self._preempt_thread is not None:
                return "the preempt channel is connected already"
            if epoch != self._epoch:
                return "it is the preempt channel of a connection that broke (the migration paused since)"
            # requests no longer queue behind background pages on the main stream:
            # it may keep more in flight (fewer wake-ups per byte)
            try:
                self._conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            except OSError:
                pass
            thread.start()
            self._preempt_conn, self._preempt_thread = conn, thread
            self._preempt_adopted.set()
        return None

    @property
    def closed(self) -> bool:
        return self._closed

    def _run_preempt(self, channel: StreamReceiver):
        make_latency_thread()
        try:
            channel.receive_loop()
        except PostcopyError as e:
            if self._program_gone or self._dropping:
                # the main stream's thread decides what the program's leaving means, and it ended
                # this channel itself to pause
                return
            self._preempt_error = e
            try:
                # wake the main stream loop; its write side stays open for the SHUT 1 that tells the source
                self._conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        finally:
            channel.conn.close()

    def _join_preempt(self):
        """At EOF on the main stream: an announced preempt channel must have connected and ended
        (the source sent some requested pages only there)."""
        migration = self.migration
        if migration is not None and migration.preempt_channels and not self._all_received():
            if not self._preempt_adopted.wait(self.timeout):
                missing = self.total_pages - lib.pc_dest_count_received(self.native, -1)
                raise PeerTimeout(f"the source announced a preempt channel that did not connect within "
                                  f"{self.timeout:g} s of EOF; {missing} of {self.total_pages} pages never arrived")
        t = self._preempt_thread
        if t is not None:
            t.join(self.timeout)
            if t.is_alive():
                raise PeerTimeout(f"the preempt channel did not end within {self.timeout:g} s of EOF")
        self._check_preempt()

    def pages_arrived_lately(self) -> bool:
        """Pages placed since the last call (or since the stream began): under a bandwidth cap that
        requested pages fill, the main stream may be silent for --timeout while the preempt channel is
        busy; that is no dead link."""
        raw = ffi.new("struct pc_dest_stats *")
        lib.pc_dest_get_stats(self.native, raw)
        arrived = raw.demand_pages + raw.background_pages + raw.skipped_pages
        moved, self._arrived_seen = arrived != self._arrived_seen, arrived
        return moved and self._preempt_thread is not None

    def check_peers(self):
        """The stream broke: raise what is behind it, the program's leaving or the preempt channel's failure."""
        self.check_program()
        self._check_preempt()

    def _check_preempt(self):
        if self._preempt_error is not None:
            raise self._preempt_error

    def command(self, ev, decoder) -> bool:
        """A non-RAM event of the main stream (the receiver's sink); True at EOF."""
        off = decoder.offset
        if decoder.migration is not None and not self._migration_known.is_set():
            self.migration, self._wire_blocks = decoder.migration, dict(decoder.blocks)
            self._migration_known.set()
        t = type(ev)
        if self._pending_discards and t is not codec.PostcopyRamDiscard:
            self.apply_discards()
        if t is codec.Blocks:
            self._check_blocks(ev, off)
        elif t is codec.Ping:
            self._send_rp(codec.encode_rp(codec.Pong(ev.value)))
            self.phase.on_ping(ev.value)
        elif t is codec.PostcopyAdvise:
            self._advise(ev, off)
            self.phase.on_advise(off)
        elif t is codec.PostcopyRamDiscard:
            self._switching = True
            self._discard(ev)
            self.phase.on_discard(off)
        elif t is codec.State:
            self.state_bytes = ev.data
        elif t is codec.PostcopyListen:
            self._switching = True
            self.phase.on_listen(off)
        elif t is codec.PostcopyRun:
            self.phase.on_run(off, self.state_bytes)
        elif t is codec.RecvBitmapRequest:
            self._recv_bitmap(ev)
        elif t is codec.PostcopyResume:
            # (only a resumed stream's decoder lets it through) RESUME_ACK goes before the requests sent again
            self._send_rp(codec.encode_rp(codec.ResumeAck()))
            seconds = self.phase.on_resume(off, self.state_bytes)
            log.warning("post-copy resumed after %.0f ms (recovery %d)", seconds * 1000,
                        self.phase.recovery_figures()["postcopy-recoveries"])
        elif t is codec.Eof:
            return True
        self.phase.command_done(t is codec.Ping)
        return False

    def check_fault_thread(self):
        raw = ffi.new("struct pc_dest_stats *")
        lib.pc_dest_get_stats(self.native, raw)
        if raw.first_error:
            self.check_program()
            raise PostcopyError(f"the fault thread failed: {os.strerror(raw.first_error)}")

    def _finish(self, decoder) -> DestinationResult:
        received = lib.pc_dest_count_received(self.native, -1)
        if received < self.total_pages:
            raise ProtocolError(f"EOF with {self.total_pages - received} of {self.total_pages} pages never sent",
                                section="EOF", offset=decoder.offset)
        self.phase.on_end(decoder.offset, self._wind_down)
        self._shut_delivered = self._shut_sent and self._await_source_close()
        return DestinationResult(self.stats(), self.state_bytes, True)

    def _await_source_close(self) -> bool:
        """After SHUT 0: True once the source has closed the connection (its EOF: a source closes right after
        it read SHUT), False if the connection breaks first (a reset): SHUT may be lost with it (a link can
        hold it unsent and then break), and the source would come back to resume (shut_maybe_lost).  A
        source that keeps the connection open and silent for --timeout is taken to have it."""
        conn = self._conn
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return True
                conn.settimeout(left)
                if not conn.recv(65536):
                    return True
        except socket.timeout:
            return True
        except OSError:
            return False

    @property
    def shut_maybe_lost(self) -> bool:
        """The migration is complete, but the source may not have read SHUT 0: it may come back to resume."""
        return (self.phase.ended and not self._shut_delivered and self.recover_timeout > 0 and
                self.migration is not None and self.migration.id != codec.NO_MIGRATION_ID.id)

    def _wind_down(self):
        try:
            self._send_rp(codec.encode_rp(codec.Shut(0)))
            self._shut_sent = True
        except PeerDisconnected:
            self._shut_sent = False   # the source learns it on its resume (shut_maybe_lost)
        self.fault_thread.stop()
        self._unregister_all()

    def _fail_shut(self, reason: str):
        try:
            self._send_rp(codec.encode_rp(codec.Shut(1)))
        except (OSError, PostcopyError):
            pass
        self._tell_program({"event": "failed", "reason": reason})

    def stats(self) -> dict:
        raw = ffi.new("struct pc_dest_stats *")
        lib.pc_dest_get_stats(self.native, raw)
        phase = self.phase
        end = phase.t_complete or time.monotonic()
        return dest_stats(raw, total_pages=self.total_pages, elapsed_s=end - self.t_start,
                          run_to_complete_s=(end - phase.t_run) if phase.t_run else None,
                          downtime_ms=phase.downtime_ms, recovery=phase.recovery_figures())

    def workset(self) -> tuple[workset.Workset, bool]:
        """The pages the program faulted on so far (recorded with ``record_workset``), per block in
        order of first fault, times in microseconds after RUN; and whether the record is whole (False:
        it stopped early for lack of memory)."""
        cap = max(1, self.total_pages)
        pages, times = ffi.new("uint64_t[]", cap), ffi.new("uint64_t[]", cap)
        truncated = ffi.new("int *")
        n = lib.pc_dest_workset_read(self.native, pages, times, cap, truncated)
        check_native(n, "reading the working-set record")
        t_run = self.phase.t_run
        base_ns = int(t_run * 1e9) if t_run is not None else None
        per_block: list[tuple[list, list]] = [([], []) for _ in self.blocks]
        for p, t in zip(ffi.unpack(pages, n), ffi.unpack(times, n)):
            bi = p >> 56
            hp = self.blocks[bi].page_size // TP
            got = per_block[bi]
            got[0].append((p & ((1 << 56) - 1)) // hp)
            got[1].append(0 if base_ns is None or t < base_ns else (t - base_ns) // 1000)
        return workset.Workset(tuple(workset.WorksetBlock(b.name, b.length, b.page_size,
                                                          workset.runs_of(*per_block[bi]))
                                     for bi, b in enumerate(self.blocks))), not truncated[0]

    def hop_trace(self) -> tuple[list[tuple], int]:
        """The hop trace (``hop_trace``): rows of hoptrace.DEST_COLUMNS, one per page request in the
        order the faults were read, and how many requests asked for an entry (beyond the rows: dropped)."""
        entries, claimed = hoptrace.read(lib.pc_dest_hop_read, self.native, [b.name for b in self.blocks])
        return hoptrace.dest_rows(entries), claimed

    def progress(self) -> dict:
        """A snapshot for a live display.  ``received``: pages in now (discards at the switch-over
        take pages out again; from RUN on it only grows); ``arrived``: pages placed in all, copies
        sent again included (never goes down); ``phase``: pre-copy, switch-over (discards or LISTEN
        seen), post-copy (after RUN) or done."""
        raw = ffi.new("struct pc_dest_stats *")
        lib.pc_dest_get_stats(self.native, raw)
        # the phase is read after the counters: a count lowered by discards is never
        # reported as pre-copy (_switching is set before the first discard is applied)
        phase = self.phase
        name = "done" if phase.t_complete is not None else "paused" if phase.paused else \
            "post-copy" if phase.t_run is not None else "switch-over" if self._switching else "pre-copy"
        arrived = raw.precopy_pages + raw.overwritten_pages + raw.demand_pages + raw.background_pages + \
            raw.skipped_pages
        snap = {"phase": name, "received": int(raw.received_pages), "total": self.total_pages,
                "arrived": int(arrived), "demand": int(raw.demand_pages), "background": int(raw.background_pages),
                "faults": int(raw.faults), "requests": int(raw.requests),
                "recoveries": phase.recovery_figures()["postcopy-recoveries"]}
        if name == "paused":
            snap.update(reason=phase.pause_reason, paused_s=time.monotonic() - phase.pauses[-1][0],
                        recover_timeout=self.recover_timeout)
        return snap

    def close(self):
        """Stop the fault thread, unregister (not an attached program's missing memory), restore mlock;
        the uffd itself is closed by its owner."""
        with self._resume_lock:
            pending, self._resume_pending = self._resume_pending, None
        if pending is not None:
            pending[0].close()
        with self._preempt_lock:
            self._closed = True
            conn, thread = self._preempt_conn, self._preempt_thread
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(5)
        self.fault_thread.close()
        # staged pages (--record-workset) are in no other copy on this side: placed before anything
        # unregisters (a program gone meanwhile has no memory left to place them in)
        lib.pc_dest_place_staged(self.native)
        # an attached program's memory stays registered until every page is in:
        # unregistered, each missing page would read as a fresh zero page (its
        # own open uffd keeps the registration once ours is closed)
        if not self.phase.ended and (self.program is None or self._all_received()):
            self._unregister_all()
        lib.pc_dest_set_return_path(self.native, -1)
        if self._conn is not None:
            self._conn.close()   # a resumed stream's (the first is its caller's too)
        if self._mlocked:
            relock()
            self._mlocked = False
        with self._left_lock:
            if self._left_fd >= 0:
                os.close(self._left_fd)
                self._left_fd = -1
