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
import signal
import socket
import threading
import time
from dataclasses import dataclass

from .. import codec, signals
from ..channels import transport
from .._native import ffi, lib
from ..memory.pagemap import PagemapScanner
from ..codec.discards import DiscardEncoder
from ..errors import PostcopyError
from ..channels.handover import ControlReader, Handover, HandshakeError, receive_handover
from ..memory.mappings import RamBlock, blocks_from_regions
from .streamer import TP, PageStreamer, send_preamble
from ..uffd import Userfaultfd

log = logging.getLogger("postcopy.live")

PAUSE_TIMEOUT = 2.0
READ_CHUNK_PAGES = 256


class ProcessMemory:
    """The attached program's RAM blocks, read with process_vm_readv (native, GIL released)."""

    def __init__(self, pid: int, blocks: list[RamBlock]):
        self.pid = pid
        self.ram_blocks = blocks
        self.blocks = [codec.BlockInfo(b.name, b.length, b.page_size) for b in blocks]
        # one buffer per sending thread (background, requests)
        self._bufs = [ffi.new("uint8_t[]", READ_CHUNK_PAGES * TP) for _ in range(2)]

    def base(self, block: int):
        return ffi.NULL   # not in our memory: read from the program

    def segments(self, block: int) -> list[tuple[int, int, int]]:
        return [(s.offset, s.host_addr, s.size) for s in self.ram_blocks[block].segments]

    def pages(self, block: int, offset: int, count: int, slot: int = 0):
        """Pointer to ``count`` target pages read from the program (valid until the next call for ``slot``).

        The native request server reads with its own buffer."""
        if count > READ_CHUNK_PAGES:
            raise ValueError(f"read at most {READ_CHUNK_PAGES} pages at a time")
        b = self.ram_blocks[block]
        buf = self._bufs[slot]
        done, total = 0, count * TP
        while done < total:
            addr, room = b.host_span(offset + done)
            want = min(room, total - done)
            if addr is None:   # a hole no region maps: zeros
                ffi.memmove(buf + done, bytes(want), want)
            else:
                n = lib.pc_proc_read(self.pid, addr, buf + done, want)
                if n < 0:
                    raise PostcopyError(f"reading {want} bytes at {addr:#x} of pid {self.pid}: {os.strerror(-n)}")
                if n < want:
                    raise PostcopyError(f"reading {want} bytes at {addr:#x} of pid {self.pid}: short read ({n})")
            done += want
        return buf

    def close(self):
        pass


class AttachedSource:
    """The program on this host that is being migrated, and how to pause and resume it."""

    def __init__(self, handover: Handover):
        self.handover = handover
        self.pid = handover.pid
        self.uffd = Userfaultfd.adopt(handover.uffd)   # keeps the WP registration alive
        self.control = ControlReader(handover.sock, name="postcopy/source-program")
        self.gone = self.control.gone
        self.stopped_by_signal = False
        self.paused = False

    def _await(self, event: str, timeout: float) -> dict | None:
        try:
            return self.control.wait_for(event, timeout)
        except HandshakeError:
            raise PostcopyError(f"the program being migrated (pid {self.pid}) exited or closed its socket") \
                from None

    def pause(self) -> str:
        """Pause the program: a pause request, acknowledged; SIGSTOP if it does not answer."""
        if self.gone.is_set():
            raise PostcopyError(f"the program being migrated (pid {self.pid}) exited or closed its socket")
        try:
            self.control.send({"cmd": "pause"})
            if self._await("paused", PAUSE_TIMEOUT) is not None:
                self.paused = True
                return "request"
        except OSError:
            pass
        log.warning("pid %d did not acknowledge the pause request; stopping it with SIGSTOP", self.pid)
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped_by_signal = self.paused = True
        return "SIGSTOP"

    def resume(self) -> bool:
        """Let the program go on where it was (a failed migration loses nothing); True if it was paused."""
        if not self.paused:
            return False
        if self.stopped_by_signal:
            os.kill(self.pid, signal.SIGCONT)
        else:
            try:
                self.control.send({"cmd": "resume"})
                self._await("resumed", PAUSE_TIMEOUT)
            except (OSError, PostcopyError):
                pass
        self.paused = False
        return True

    def alive(self) -> bool:
        """The program still exists (not exited, killed or a zombie) and its control socket is open."""
        if self.gone.is_set():
            return False
        # proc(5) /proc/PID/stat after the command's ")": state, ppid, pgrp, session, tty_nr,
        # tpgid, flags; a task being killed has PF_EXITING (0x4) set before it turns zombie
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            state, flags = fields[0], int(fields[6])
        except (OSError, IndexError, ValueError):
            return False
        return state not in ("Z", "X") and not flags & 0x4

    def fate(self, was_paused: bool) -> str:
        """What became of the program after a migration failed before RUN, in words that are true."""
        if not self.alive():
            return f"the program (pid {self.pid}) is gone from the source: it exited, was killed or closed " \
                   f"its control socket"
        return f"the program {'was resumed' if was_paused else 'keeps running'} on the source"

    def migrated(self) -> None:
        """Tell the program it now runs on the destination (it stays paused here)."""
        try:
            self.control.send({"event": "migrated"})
        except OSError:
            pass

    def quit(self) -> None:
        try:
            self.control.send({"cmd": "quit"})
        except OSError:
            pass
        if self.stopped_by_signal:
            os.kill(self.pid, signal.SIGCONT)

    def close(self):
        self.uffd.close()
        self.handover.sock.close()


@dataclass
class LiveOptions:
    postcopy_after: float | None = 1.0
    precopy_passes: int | None = None
    max_bandwidth: float = 0.0
    timeout: float = 30.0
    state: bytes = b""
    kill_source: bool = False
    preempt: bool = True          # requested pages on a second connection


def accept_program(listener: socket.socket, timeout: float | None) -> AttachedSource:
    conn = transport.accept(listener, timeout)
    conn.settimeout(10.0)
    try:
        handover = receive_handover(conn)
    except BaseException:
        conn.close()
        raise
    conn.settimeout(None)
    return AttachedSource(handover)


def _pages_in(block: RamBlock, start: int, end: int) -> list[tuple[int, int]]:
    """Host range [start, end) as (first target page, count) runs of the block."""
    out = []
    for s in block.segments:
        a, b = max(start, s.host_addr), min(end, s.host_addr + s.size)
        if a < b:
            out.append(((s.offset + a - s.host_addr) // TP, (b - a) // TP))
    return out


def _clean_spans(to_send: bytearray, seg) -> list[tuple[int, int]]:
    """Host ranges of segment ``seg`` whose pages are not due to be sent (to_send 0)."""
    spans = []
    first, last = seg.offset // TP, (seg.offset + seg.size) // TP
    pos = first
    while pos < last:
        a = to_send.find(0, pos, last)
        if a < 0:
            break
        e = to_send.find(1, a, last)
        e = last if e < 0 else e
        spans.append((seg.host_addr + (a - first) * TP, seg.host_addr + (e - first) * TP))
        pos = e
    return spans


def _stale_runs(to_send: bytearray, sent: bytearray) -> list[tuple[int, int]]:
    """Runs of pages both still to send and sent before: the destination's copy is stale."""
    runs = []
    pos, n = 0, len(to_send)
    while pos < n:
        a = to_send.find(1, pos)
        if a < 0:
            break
        e = to_send.find(0, a)
        e = n if e < 0 else e
        p = a
        while p < e:
            s = sent.find(1, p, e)
            if s < 0:
                break
            t = sent.find(0, s, e)
            t = e if t < 0 else t
            runs.append((s, t - s))
            p = t
        pos = e
    return runs


class LiveMigration:
    """One live migration of an attached program to a destination connection."""

    def __init__(self, program: AttachedSource, conn: socket.socket, opts: LiveOptions, *, switchover=None,
                 preempt: socket.socket | None = None):
        self.program = program
        self.conn = conn
        self.opts = opts
        self.switchover = switchover or threading.Event()
        self.ram_blocks = blocks_from_regions(program.handover.regions)
        self.memory = ProcessMemory(program.pid, self.ram_blocks)
        self.scanner = PagemapScanner(program.pid)
        self.scanner2 = PagemapScanner(program.pid)
        self.streamer = PageStreamer(conn, self.memory, max_bandwidth=opts.max_bandwidth, timeout=opts.timeout,
                                     track_sent=True, preempt=preempt)
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
                    spans += [(bi, a, e) for a, e in _clean_spans(self.streamer.to_send[bi], s)]
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

        def scan(scanner, half, into):
            for bi, a, e in half:
                into += [(bi, r) for r in scanner.written(a, e, reprotect=reprotect)]

        helper = threading.Thread(target=scan, args=(self.scanner2, halves[1], found[1]))
        helper.start()
        scan(self.scanner, halves[0], found[0])
        helper.join()
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
            ts = self.streamer.to_send[bi]
            for first, count in runs:
                ts[first:first + count] = b"\x01" * count
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
        passes = streamer.precopy(deadline, self._refill, max_passes=opts.precopy_passes, stop=self.switchover)
        streamer.phase = "switch-over"
        # every page not marked to send has been sent at least once by now,
        # except pages never reached when pass 1 was cut short
        t_switch = time.monotonic()
        how = self.program.pause()
        t_paused = time.monotonic()
        # everything dirtied since the last scan goes again in post-copy; of what
        # goes again, whatever the destination already has a version of is stale.
        # The program is paused: no need to write-protect again, nor to scan
        # what goes again anyway (both cut the downtime).
        self._refill(reprotect=False, only_clean=True)
        t_scanned = time.monotonic()
        discards = 0
        commands: list[bytes] = []
        for bi, b in enumerate(self.ram_blocks):
            runs = _stale_runs(streamer.to_send[bi], streamer.sent[bi])
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
        streamer.remaining = sum(t.count(1) for t in streamer.to_send)
        postcopy_pages = streamer.remaining
        precopy_bytes = streamer.stats["bytes"]
        streamer.stats["background_pages"] = 0
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
        conn = transport.connect(address, timeout=opts.timeout, on_wait=on_wait)
        preempt = None
        mig = None
        try:
            preempt = transport.connect(address, timeout=opts.timeout) if opts.preempt else None
            mig = LiveMigration(program, conn, opts, switchover=switchover, preempt=preempt)
            if on_start is not None:
                on_start(mig)
            with signals.guard(at_risk=lambda: "it runs on the destination and its missing pages are read "
                                               "from it here" if mig.run_sent else None,
                               wake=lambda error: shut_connections(conn, preempt)):
                stats = mig.run()
        except BaseException as e:
            ran = mig is not None and mig.run_sent
            if not ran:
                # before RUN the program is still the only copy: let it go on
                note = program.fate(program.resume())
                stop = signals.interruption()
                if stop is not None and not isinstance(e, signals.Interrupted):
                    raise signals.Interrupted(stop.signum, f" ({note})") from None
                if isinstance(e, PostcopyError):
                    e.args = (f"{e.args[0] if e.args else e} ({note})",)
            raise
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
