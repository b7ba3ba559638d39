"""The live source: migrate a running program (DESIGN.md section 6, ``migrate --attach``).

The program connects to our Unix socket and hands over its memory mappings and
a userfaultfd registered in write-protect mode with UFFD_FEATURE_WP_ASYNC
(:mod:`postcopy_cli.channels.handover`; ``postcopy workload run`` does this).  We read
its memory with process_vm_readv (the pid comes from SO_PEERCRED), find dirtied
pages with PAGEMAP_SCAN (:mod:`postcopy_cli.memory.pagemap`), run pre-copy passes, then
pause it, send discards for pages dirtied since they were sent, STATE, LISTEN
and RUN, and post-copy the rest with requested pages first.

If the migration fails before RUN the program is resumed where it was: nothing
is lost.  After RUN the destination owns the program's state; the source stays
paused (QEMU's postmigrate) and is ended only on success with ``kill_source``.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

from .. import codec, signals
from ..channels import transport
from ..channels.tls import Credentials
from ..memory.pagemap import PagemapScanner
from ..codec.discards import DiscardEncoder
from ..errors import PostcopyError, with_stats
from ..memory.mappings import RamBlock, blocks_from_regions
from ..memory.process import ProcessMemory
from .attached import AttachedSource, accept_program
from .pages import PageBook
from .recovery import RECOVER_TIMEOUT, Recovery, recovery_to
from .streamer import PRECOPY_SYNC, TP, PageStreamer, send_preamble

log = logging.getLogger("postcopy.live")


@dataclass
class LiveOptions:
    postcopy_after: float | None = 1.0
    precopy_passes: int | None = None
    max_bandwidth: float = 0.0
    timeout: float = 30.0
    state: bytes = b""
    kill_source: bool = False
    preempt: bool = True          # requested pages on a second connection
    recover_timeout: float = RECOVER_TIMEOUT   # after RUN: seconds paused, reconnecting, before failing
    migration_id: bytes | None = None          # the ID section's (None: random)
    tls: Credentials | None = None             # --tls-creds: every connection is TLS
    tls_hostname: str | None = None            # --tls-hostname (default: the host of the address)
    hold_hot: bool = True                      # pre-copy holds back pages written since the last sync


def _pages_in(block: RamBlock, start: int, end: int) -> list[tuple[int, int]]:
    """Host range [start, end) as (first target page, count) runs of the block."""
    out = []
    for s in block.segments:
        a, b = max(start, s.host_addr), min(end, s.host_addr + s.size)
        if a < b:
            out.append(((s.offset + a - s.host_addr) // TP, (b - a) // TP))
    return out


class LiveMigration:
    """One live migration of an attached program to a destination connection."""

    def __init__(self, program: AttachedSource, conn: socket.socket, opts: LiveOptions, *, switchover=None,
                 preempt: socket.socket | None = None, recovery: Recovery | None = None):
        self.program = program
        self.conn = conn
        self.opts = opts
        self.switchover = switchover or threading.Event()
        self.ram_blocks = blocks_from_regions(program.handover.regions)
        self.memory = ProcessMemory(program.pid, self.ram_blocks)
        self.scanner = PagemapScanner(program.pid)
        self.scanner2 = PagemapScanner(program.pid)
        self.book = PageBook(self.memory.blocks, track_sent=True)
        self.streamer = PageStreamer(conn, self.memory, book=self.book, max_bandwidth=opts.max_bandwidth,
                                     timeout=opts.timeout, preempt=preempt, migration_id=opts.migration_id,
                                     recovery=recovery)
        self.stats: dict = {}
        self.run_sent = False   # POSTCOPY_RUN handed to the kernel: the destination may be running the program

    def progress(self) -> dict:
        """The streamer's snapshot (PageStreamer.progress): its figures are of the current pre-copy
        pass or of post-copy; in pre-copy, ``pages_left`` are the dirty pages still to send."""
        return self.streamer.progress()

    def _written(self, *, reprotect: bool = True, only_clean: bool = False) -> list[list[tuple[int, int]]]:
        """Per block, the page runs written since the last scan (and, with ``reprotect``, protect them again).

        ``only_clean``: scan only pages not already due to be sent (the scan's
        cost is that of walking the page tables, whatever is dirty).
        """
        spans = []   # (block, start, end)
        for bi, b in enumerate(self.ram_blocks):
            for s in b.segments:
                if only_clean:
                    spans += [(bi, a, e) for a, e in self.book.clean_spans(bi, s)]
                else:
                    spans.append((bi, s.host_addr, s.host_addr + s.size))
        # the walk of the page tables is the cost: two scanners share it (the
        # ioctl runs with the GIL released), one on each half of the bytes
        total = sum(e - a for _, a, e in spans)
        halves: list[list] = [[], []]
        done = 0
        for bi, a, e in spans:
            cut = min(e, max(a, a + (total // 2 - done)))
            cut -= (cut - a) % TP
            if cut > a:
                halves[0].append((bi, a, cut))
            if e > cut:
                halves[1].append((bi, cut, e))
            done += cut - a
        found: list[list] = [[], []]
        failed: list[OSError] = []

        def scan(scanner, half, into):
            try:
                for bi, a, e in half:
                    into += [(bi, r) for r in scanner.written(a, e, reprotect=reprotect)]
            except OSError as err:
                failed.append(err)

        helper = threading.Thread(target=scan, args=(self.scanner2, halves[1], found[1]))
        helper.start()
        scan(self.scanner, halves[0], found[0])
        helper.join()
        if failed:
            # ESRCH: the program is gone (the caller says what became of it)
            raise PostcopyError(f"tracking the writes of pid {self.program.pid}: {failed[0]}") from failed[0]
        out: list[list[tuple[int, int]]] = [[] for _ in self.ram_blocks]
        for bi, (a, e) in found[0] + found[1]:
            out[bi].extend(_pages_in(self.ram_blocks[bi], a, e))
        return out

    def _check_tracking(self) -> None:
        """First scan (protects everything); a region the handed-over userfaultfd does not
        write-protect with WP_ASYNC makes PAGEMAP_SCAN fail with EPERM: say which one."""
        for b in self.ram_blocks:
            for s in b.segments:
                try:
                    self.scanner.written(s.host_addr, s.host_addr + s.size)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EINVAL):
                        raise
                    raise PostcopyError(
                        f"pid {self.program.pid} handed over a userfaultfd that does not track writes to region "
                        f"[{s.host_addr:#x}, {s.host_addr + s.size:#x}) of block {b.name!r}: it must be registered "
                        f"with UFFDIO_REGISTER_MODE_WP after UFFDIO_API with UFFD_FEATURE_WP_ASYNC "
                        f"(PAGEMAP_SCAN: {os.strerror(e.errno)})") from None

    def _refill(self, *, reprotect: bool = True, only_clean: bool = False) -> None:
        """End of a pre-copy pass: what was dirtied meanwhile goes again."""
        for bi, runs in enumerate(self._written(reprotect=reprotect, only_clean=only_clean)):
            self.book.mark_dirty(bi, runs)
        self.stats["dirty_syncs"] = self.stats.get("dirty_syncs", 0) + 1

    def _sync(self) -> None:
        """A pre-copy sync (``hold_hot``): pages written since the last one are held back; those held
        back and quiet since go again (PageBook.defer_written)."""
        for bi, runs in enumerate(self._written()):
            hot, cooled = self.book.defer_written(bi, runs)
            self.stats["precopy_cooled_pages"] = self.stats.get("precopy_cooled_pages", 0) + cooled
        self.stats["dirty_syncs"] = self.stats.get("dirty_syncs", 0) + 1

    def run(self) -> dict:
        opts, streamer = self.opts, self.streamer
        t0 = time.monotonic()
        # protect everything now: from here on, writes are tracked
        self._check_tracking()
        send_preamble(self.conn, self.memory.blocks, streamer.migration)
        deadline = float("inf") if opts.postcopy_after is None else t0 + opts.postcopy_after
        if opts.postcopy_after is None and opts.precopy_passes is None:
            deadline = t0   # no pre-copy at all
        # a deadline's pre-copy syncs within passes too (a pass of a large memory outlasts the time a
        # busy program takes to write its pages again); a pass count syncs at the end of each pass
        sync_every = PRECOPY_SYNC if opts.hold_hot and opts.precopy_passes is None else None
        passes = streamer.precopy(deadline, self._sync if opts.hold_hot else self._refill,
                                  max_passes=opts.precopy_passes, stop=self.switchover, sync_every=sync_every)
        streamer.phase = "switch-over"
        # every page not marked to send has been sent at least once by now,
        # except pages never reached when pass 1 was cut short
        t_switch = time.monotonic()
        how = self.program.pause()
        t_paused = time.monotonic()
        # everything dirtied since the last scan goes again in post-copy; of what
        # goes again, whatever the destination already has a version of is stale.
        # The program is paused: no need to write-protect again, nor to scan
        # what goes again anyway (both cut the downtime).  Pages held back as hot go now.
        held = self.book.undefer()
        self._refill(reprotect=False, only_clean=True)
        t_scanned = time.monotonic()
        discards = 0
        commands: list[bytes] = []
        for bi, b in enumerate(self.ram_blocks):
            runs = self.book.stale_runs(bi)
            if runs:
                commands.extend(DiscardEncoder(b.name).encoded(runs))
                discards += sum(n for _, n in runs)
        # the PING right before LISTEN carries the microseconds since the pause,
        # so the destination can report the downtime up to its program's RUN
        since_pause = min(int((time.monotonic() - t_switch) * 1e6), 0xFFFFFFFF)
        self.conn.sendall(b"".join(commands) + codec.encode(codec.State(opts.state)) +
                          codec.encode(codec.Ping(since_pause)) +
                          codec.encode(codec.PostcopyListen()) + codec.encode(codec.PostcopyRun()))
        self.run_sent = True
        t_run = time.monotonic()
        postcopy_pages = self.book.recount()
        precopy_bytes = streamer.stats["bytes"]
        streamer.run()
        t_done = time.monotonic()
        st = dict(streamer.stats)
        self.stats.update({
            "precopy_passes": passes,
            "precopy_seconds": round(t_switch - t0, 3),
            "precopy_bytes": precopy_bytes,
            "pause": how,
            "downtime_ms": round((t_run - t_switch) * 1000, 3),
            "pause_ms": round((t_paused - t_switch) * 1000, 3),
            "final_scan_ms": round((t_scanned - t_paused) * 1000, 3),
            "precopy_held_pages": held,
            "discarded_pages": discards,
            "discard_commands": len(commands),
            "postcopy_pages": postcopy_pages,
            "postcopy_seconds": round(t_done - t_run, 3),
            "postcopy_requests": st["requests"],
            "requested_pages": st["requested_pages"],
            "resent_pages": st["resent_pages"],
            "bytes": st["bytes"],
            "zero_pages": st["zero_pages"],
            "total_seconds": round(t_done - t0, 3),
            "migration_id": streamer.migration.id.hex(),
            **{k: v for k, v in st.items() if k.startswith("postcopy_")},
        })
        return self.stats

    def close(self):
        self.memory.close()
        self.scanner.close()
        self.scanner2.close()


def shut_connections(*conns) -> bool:
    """End the connections: the sending loops (native, GIL released) fail and return."""
    for c in conns:
        if c is not None:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    return True


def migrate_live(attach_path: str, to: str, opts: LiveOptions, *, on_ready=None, switchover=None,
                 accept_timeout: float | None = 60.0, on_program=None, on_wait=None, on_start=None) -> dict:
    """``migrate --attach``: wait for the program on ``attach_path``, then migrate it to ``to``.

    ``on_program(program)``: once the program connected and handed over;
    ``on_wait(seconds)``: at each retry while the destination does not listen yet;
    ``on_start(migration)``: with the LiveMigration before it sends (its progress() for a display).
    """
    listener = transport.listen(transport.Address("unix", path=attach_path), what="--attach")
    program = None
    try:
        if on_ready:
            on_ready()
        program = accept_program(listener, accept_timeout)
        if on_program is not None:
            on_program(program)
        address = transport.parse_address(to)
        tls = {"tls": opts.tls, "hostname": opts.tls_hostname}
        conn = transport.connect(address, timeout=opts.timeout, on_wait=on_wait, **tls)
        preempt = None
        mig = None
        try:
            preempt = transport.connect(address, timeout=opts.timeout, **tls) if opts.preempt else None
            recovery = recovery_to(address, timeout=opts.timeout, recover_timeout=opts.recover_timeout, **tls)
            mig = LiveMigration(program, conn, opts, switchover=switchover, preempt=preempt, recovery=recovery)
            if on_start is not None:
                on_start(mig)
            with signals.guard(at_risk=lambda: "it runs on the destination and its missing pages are read "
                                               "from it here" if mig.run_sent else None,
                               wake=lambda error: mig.streamer.wake(error)):
                stats = mig.run()
        except BaseException as e:
            if mig is not None:
                # the figures so far go with the error (migrate --json prints them with it)
                e = with_stats(mig.streamer.refusal(e), {**mig.streamer.stats, **mig.stats})
            ran = mig is not None and mig.run_sent
            if not ran:
                # before RUN the program is still the only copy: let it go on
                note = program.fate(program.resume())
                stop = signals.interruption()
                if stop is not None and not isinstance(e, signals.Interrupted):
                    raise signals.Interrupted(stop.signum, f" ({note})") from None
                if isinstance(e, PostcopyError):
                    e.args = (f"{e.args[0] if e.args else e} ({note})",)
            raise e from None
        finally:
            if mig is not None:
                mig.close()
            conn.close()
            if preempt is not None:
                preempt.close()
        if opts.kill_source:
            program.quit()
        else:
            program.migrated()
        return stats
    finally:
        if program is not None:
            program.close()
        listener.close()
        transport.release_unix_path(attach_path)
