"""serve-dest as a library call: wait for the memory's owner, then for one migration, and receive it."""
from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from .. import codec
from ..channels import transport
from ..channels.tls import Credentials
from ..codec.constants import Section
from .engine import Destination, DestinationResult
from .faults import own_memory_uffd
from ..errors import PostcopyError
from ..channels.handover import Handover, receive_handover
from ..memory.mappings import AnonymousMapping, RamBlock, Segment, blocks_from_regions
from ..uffd import Userfaultfd

log = logging.getLogger("postcopy.serve")


@dataclass
class ServeOptions:
    listen: str
    uffd_socket: str | None = None
    ram: list[tuple[str, int]] = field(default_factory=list)
    timeout: float = 30.0
    accept_timeout: float | None = None
    insecure: bool = False
    recover_timeout: float = 600.0
    record_workset: bool = False
    tls: Credentials | None = None      # --tls-creds: every connection of the source is TLS
    hop_trace: int | None = None        # POSTCOPY_HOP_TRACE: entries to keep (0: one per target page; None: off)


# what a plaintext source that reaches a TLS serve-dest reads before the close: a fatal TLS alert,
# handshake_failure (RFC 8446 sections 5.1 and 6: type 21, version 3.3, length 2, level 2, description 40),
# which our source recognises where its return path begins
_PLAINTEXT_REFUSAL = bytes((21, 3, 3, 0, 2, 2, 40))
# the first byte of a TLS connection: a handshake record (RFC 8446 section 5.1)
_TLS_HANDSHAKE = 0x16


def _joining_section(conn: socket.socket, timeout: float) -> str | None:
    """"PREEMPT" or "RESUME" if the connection's first section (after the 8-byte header) says it joins a
    migration under way, "TLS" if it begins a TLS handshake instead of the stream; None for anything else
    (the main stream's decoder judges it), read with MSG_PEEK."""
    deadline = time.monotonic() + timeout
    head = b""
    while len(head) < 9 and time.monotonic() < deadline:
        ready, _, _ = select.select([conn], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            head = conn.recv(9, socket.MSG_PEEK)
        except OSError:
            return None
        if len(head) < 9:
            if not head:
                return None
            time.sleep(0.001)   # the rest of the header is on its way
    if len(head) < 9 or head[:8] != codec.encode(codec.Header()):
        return "TLS" if head[:1] == bytes([_TLS_HANDSHAKE]) else None
    return {Section.PREEMPT: "PREEMPT", Section.RESUME: "RESUME"}.get(head[8])


class ServeDest:
    """One destination: the listening sockets, the memory (attached or our own), the engine."""

    def __init__(self, opts: ServeOptions, *, on_listening=None):
        if not opts.uffd_socket and not opts.ram:
            raise PostcopyError("serve-dest needs memory: --uffd-socket PATH or --ram NAME=SIZE")
        self.opts = opts
        self.address = transport.parse_address(opts.listen)
        self.mappings: list[AnonymousMapping] = []
        self.listener: socket.socket | None = None
        self.uffd_listener: socket.socket | None = None
        self.program: Handover | None = None
        self.dest: Destination | None = None
        self.uffd: Userfaultfd | None = None
        self._admitted: queue.Queue[socket.socket] = queue.Queue()   # let in, before the source is chosen
        self._admit_lock = threading.Lock()
        self._source_chosen = False
        self._accept_error: str | None = None
        try:
            for name, size in opts.ram:     # before anything listens: a source never meets a failed --ram
                try:
                    self.mappings.append(AnonymousMapping(size))
                except OSError as e:
                    raise PostcopyError(f"--ram {name}: cannot map {size} bytes ({size / 2**30:g} GiB): {e.strerror}") \
                        from None
            self.listener = transport.listen(self.address, insecure=opts.insecure, tls=opts.tls is not None,
                                             what="--listen")
            self.bound = transport.bound_address(self.listener, self.address)
            if opts.uffd_socket:
                self.uffd_listener = transport.listen(transport.Address("unix", path=opts.uffd_socket),
                                                      what="--uffd-socket")
        except BaseException:
            self.close()
            raise
        if on_listening:
            on_listening(self)

    def _attach(self) -> list[RamBlock]:
        conn = transport.accept(self.uffd_listener, self.opts.accept_timeout)
        conn.settimeout(self.opts.timeout)
        try:
            self.program = receive_handover(conn)
        except BaseException:
            conn.close()
            raise
        conn.settimeout(None)
        self.uffd = Userfaultfd.adopt(self.program.uffd)
        log.info("program pid %d handed over %d region(s)", self.program.pid, len(self.program.regions))
        return blocks_from_regions(self.program.regions)

    def _own_memory(self) -> list[RamBlock]:
        blocks = []
        for (name, size), m in zip(self.opts.ram, self.mappings):
            blocks.append(RamBlock(name, size, 4096, [Segment(0, m.addr, size)]))
        self.uffd = own_memory_uffd()
        return blocks

    def _accept_source(self) -> socket.socket:
        """Wait for the source; give up if the attached program goes away meanwhile.  A connection that
        joins a migration (a preempt channel or a resumed stream of a migration this serve-dest has not
        begun, e.g. one that a serve-dest before it received) is refused on its own.  Connections let in
        after the chosen one go to the engine (:meth:`_offer_admitted`)."""
        deadline = None if self.opts.accept_timeout is None else time.monotonic() + self.opts.accept_timeout
        while True:
            try:
                conn = self._admitted.get(timeout=0.2)
            except queue.Empty:
                self.dest.check_program()
                if self._accept_error is not None:
                    raise PostcopyError(f"cannot accept on {self.bound}: {self._accept_error}")
                if deadline is not None and time.monotonic() > deadline:
                    raise PostcopyError(f"no source connected to {self.bound} within "
                                        f"{self.opts.accept_timeout:g} s") from None
                continue
            joining = _joining_section(conn, self.opts.timeout)
            if joining is None:
                with self._admit_lock:
                    self._source_chosen = True
                    later = []
                    while not self._admitted.empty():
                        later.append(self._admitted.get_nowait())
                for other in later:
                    threading.Thread(target=self._offer_admitted, args=(other,), name="postcopy/offer",
                                     daemon=True).start()
                return conn
            conn.close()
            if joining == "TLS":
                log.warning("refused a connection to %s: it begins a TLS handshake and this serve-dest has "
                            "no --tls-creds", self.bound)
            else:
                log.warning("refused a connection to %s: its first section is %s, of a migration this "
                            "serve-dest has not begun", self.bound, joining)

    def run(self, *, progress=None) -> DestinationResult:
        stop = threading.Event()
        # from the start: a TLS source's handshake does not wait for the program's hand-over
        threading.Thread(target=self._accept_all, args=(stop,), name="postcopy/accept", daemon=True).start()
        try:
            blocks = self._attach() if self.uffd_listener else self._own_memory()
            hop = self.opts.hop_trace
            if hop == 0:
                hop = sum(b.pages for b in blocks)
            self.dest = Destination(blocks, self.uffd, program=self.program, timeout=self.opts.timeout,
                                    recover_timeout=self.opts.recover_timeout,
                                    record_workset=self.opts.record_workset, hop_trace=hop or 0)
            conn = self._accept_source()
        except BaseException:
            stop.set()
            raise
        if progress:
            threading.Thread(target=self._report, args=(progress, stop), daemon=True).start()
        try:
            result = self.dest.run(conn)
            if self.dest.shut_maybe_lost:
                # the source did not close after SHUT 0: if the link broke, it comes back to resume, and is
                # told SHUT 0 again (else it would retry until its --recover-timeout)
                self.dest.told_complete.wait(min(self.opts.timeout, self.opts.recover_timeout))
            return result
        finally:
            stop.set()
            conn.close()

    def _accept_all(self, stop: threading.Event):
        """Every connection to --listen, let in by _admit: the first is the main stream (_accept_source);
        then the source's preempt channel for requested pages and, after a failure, a resumed main stream."""
        while not stop.is_set():
            try:
                conn = transport.accept(self.listener, 0.2, checked=False)
            except PostcopyError:
                continue
            except OSError as e:
                self._accept_error = e.strerror or str(e)
                return
            if self.opts.tls is None:
                self._admit(conn)     # the uid check is quick: the order they came in stays
            else:
                # a handshake takes round trips, and a peer may never finish it: each in a thread; the
                # source finishes its main stream's before it connects another
                threading.Thread(target=self._admit, args=(conn,), name="postcopy/admit", daemon=True).start()

    def _admit(self, raw: socket.socket):
        """Let ``raw`` in or refuse it; then hand it to _accept_source or, once the source is chosen, the engine."""
        conn, reason = transport.admit(raw, self.opts.tls, plaintext_reply=_PLAINTEXT_REFUSAL)
        if conn is None:
            if self.dest is None or not self._ended():
                log.warning("refused a connection to %s: %s", self.bound, reason)
            return
        with self._admit_lock:
            if not self._source_chosen:
                self._admitted.put(conn)
                return
        if self.dest is None:
            conn.close()
            return
        threading.Thread(target=self._offer_admitted, args=(conn,), name="postcopy/offer", daemon=True).start()

    def _ended(self) -> bool:
        """Every page is in (or the migration is over): a late connection is no news."""
        return self.dest.closed or self.dest.phase.ended

    def _offer_admitted(self, conn: socket.socket):
        reason = self.dest.offer(conn)
        if reason is not None:
            if not self._ended():
                log.warning("refused an extra connection to %s during the migration: %s", self.bound, reason)
            conn.close()

    def _report(self, progress, stop: threading.Event):
        while not stop.wait(0.25):
            progress(self.dest.progress())

    def close(self):
        paths = []
        if self.listener is not None and self.address.kind == "unix":
            paths.append(self.address.path)    # the listening socket's file, left behind otherwise
        if self.uffd_listener is not None:
            paths.append(self.opts.uffd_socket)
        for s in (self.listener, self.uffd_listener):
            if s is not None:
                s.close()
        with self._admit_lock:
            self._source_chosen = True     # (a connection let in from now on goes nowhere: see _admit)
            while not self._admitted.empty():
                self._admitted.get_nowait().close()
        for path in paths:
            transport.release_unix_path(path)
        if self.uffd is not None:
            self.uffd.close()
        if self.program is not None:
            self.program.sock.close()
        for m in self.mappings:
            m.close()
