"""serve-dest as a library call: wait for the memory's owner, then for one migration, and receive it."""
from __future__ import annotations

import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from .. import codec
from ..channels import transport
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


def _joining_section(conn: socket.socket, timeout: float) -> str | None:
    """"PREEMPT" or "RESUME" if the connection's first section (after the 8-byte header) says it joins a
    migration under way; None for anything else (the main stream's decoder judges it), read with MSG_PEEK."""
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
        return None
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
        try:
            for name, size in opts.ram:     # before anything listens: a source never meets a failed --ram
                try:
                    self.mappings.append(AnonymousMapping(size))
                except OSError as e:
                    raise PostcopyError(f"--ram {name}: cannot map {size} bytes ({size / 2**30:g} GiB): {e.strerror}") \
                        from None
            self.listener = transport.listen(self.address, insecure=opts.insecure, what="--listen")
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
        begun, e.g. one that a serve-dest before it received) is refused on its own."""
        deadline = None if self.opts.accept_timeout is None else time.monotonic() + self.opts.accept_timeout
        while True:
            try:
                conn = transport.accept(self.listener, 0.2)
                joining = _joining_section(conn, self.opts.timeout)
                if joining is None:
                    return conn
                conn.close()
                log.warning("refused a connection to %s: its first section is %s, of a migration this serve-dest "
                            "has not begun", self.bound, joining)
            except PostcopyError:
                self.dest.check_program()
                if deadline is not None and time.monotonic() > deadline:
                    raise PostcopyError(f"no source connected to {self.bound} within "
                                        f"{self.opts.accept_timeout:g} s") from None

    def run(self, *, progress=None) -> DestinationResult:
        blocks = self._attach() if self.uffd_listener else self._own_memory()
        self.dest = Destination(blocks, self.uffd, program=self.program, timeout=self.opts.timeout,
                                recover_timeout=self.opts.recover_timeout, record_workset=self.opts.record_workset)
        conn = self._accept_source()
        stop = threading.Event()
        if progress:
            threading.Thread(target=self._report, args=(progress, stop), daemon=True).start()
        threading.Thread(target=self._accept_more, args=(stop,), name="postcopy/accept", daemon=True).start()
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

    def _accept_more(self, stop: threading.Event):
        """The source may open further connections: its preempt channel for requested pages and, after a
        failure, a resumed main stream."""
        while not stop.is_set():
            try:
                conn = transport.accept(self.listener, 0.2, quiet=self._ended)
            except PostcopyError:
                continue
            except OSError:
                return
            # each checked on its own: a connection that sends nothing delays no other
            threading.Thread(target=self._offer, args=(conn,), name="postcopy/offer", daemon=True).start()

    def _ended(self) -> bool:
        """Every page is in (or the migration is over): a late connection is no news."""
        return self.dest.closed or self.dest.phase.ended

    def _offer(self, conn: socket.socket):
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
        for path in paths:
            transport.release_unix_path(path)
        if self.uffd is not None:
            self.uffd.close()
        if self.program is not None:
            self.program.sock.close()
        for m in self.mappings:
            m.close()
