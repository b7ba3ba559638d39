"""The reference "guest": programs that hand their memory over and keep using it.

Three programs (``postcopy workload run|incoming|touch``) built from the
native loop and checks of :mod:`.loop` and:

* :func:`attach` - register the RAM with a userfaultfd and hand both over
  through a Unix socket (Firecracker's handshake, ``postcopy_cli.channels.handover``).

Rule: this process never touches its registered RAM from Python (not even a
memoryview read); only native code does, with the GIL released.
"""
from __future__ import annotations

import base64
import logging
import mmap
import os
import socket
import sys
import threading
import time

from .. import signals
from ..channels.control import ControlReader
from ..channels.handover import DEFAULT_BLOCK, GuestRegion, HandshakeError, send_handover
from ..channels.transport import Address, connect_retrying
from ..errors import PeerDisconnected
from ..memory.mappings import MADV_DONTNEED, AnonymousMapping, madvise
from ..uffd import Feature, RegisterMode, UffdError, Userfaultfd, offered_features
from ..codec.constants import TARGET_PAGE_SIZE
from .loop import (PAUSE_TIMEOUT, STATE_MAGIC, NativeLoop, WorkloadError, check_memory, data_offsets,
                   layout_page, parse_state_page, state_page, steps_per_pass, touch_memory)

log = logging.getLogger("postcopy.guest")

MODES = ("run", "incoming", "touch")


# ---------------------------------------------------------------------------
# hand-over

def _connect(path: str, timeout: float) -> socket.socket:
    try:
        return connect_retrying(Address("unix", path=path), timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise PeerDisconnected(f"cannot connect to unix:{path}: {e.strerror} (waited {timeout:g} s)") from None
    except OSError as e:
        raise PeerDisconnected(f"cannot connect to unix:{path}: {e.strerror}") from None


def attach(path: str, ram: AnonymousMapping, *, mode: str, connect_timeout: float = 5.0) -> socket.socket:
    """Register ``ram`` with a new userfaultfd and hand both over on the Unix socket ``path``.

    ``mode="run"`` (source side): write-protect mode with UFFD_FEATURE_WP_ASYNC,
    so the kernel resolves write-protect faults itself and only records the
    write in the page table (the page's "written" bit that PAGEMAP_SCAN reports
    and, with PM_SCAN_WP_MATCHING, re-protects); nobody reads fault messages.
    With UFFD_FEATURE_WP_UNPOPULATED, never-populated anonymous pages are
    write-protected too (pte markers), so first writes are tracked as well.
    (userfaultfd(2), UFFDIO_API; Documentation/admin-guide/mm/userfaultfd.rst,
    "Write Protect Notifications"; Documentation/admin-guide/mm/pagemap.rst,
    "Pagemap Scan IOCTL"; both Linux 6.7+.)

    ``mode="incoming"`` / ``"touch"`` (destination side): MISSING mode, with
    EVENT_REMOVE (madvise(MADV_DONTNEED) of registered memory is reported -
    and the madvise waits until the handler has read the event) and THREAD_ID
    (blocktime per thread), each only where the kernel offers it.

    The hand-over asks to be notified (``notify``): the returned socket then
    carries the control messages (:class:`ControlChannel`).  On the destination
    side our copy of the userfaultfd stays open for the life of the program:
    the registration lives as long as one copy does, and once the last copy is
    closed the kernel unregisters the memory and wakes the faulting threads, so
    every page that had not arrived would read as a fresh zero page.  The
    ``ram`` is never unmapped either (:func:`_keep_for_life`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    try:
        offered = offered_features()
        if mode == "run":
            if not offered & Feature.WP_ASYNC:
                raise WorkloadError("this kernel lacks UFFD_FEATURE_WP_ASYNC (Linux 6.7+): "
                                    "the source cannot track dirtied pages")
            want, reg = Feature.WP_ASYNC | Feature.WP_UNPOPULATED, RegisterMode.WP
        else:
            want, reg = Feature.EVENT_REMOVE | Feature.THREAD_ID, RegisterMode.MISSING
        with Userfaultfd() as uffd:
            uffd.api(want & offered)
            uffd.register(ram.addr, ram.size, reg)
            sock = _connect(path, connect_timeout)
            try:
                region = GuestRegion(ram.addr, ram.size, 0, TARGET_PAGE_SIZE, DEFAULT_BLOCK)
                send_handover(sock, [region], uffd.fileno(), notify=True)
            except OSError as e:
                sock.close()
                raise WorkloadError(f"hand-over on {path} failed: {e.strerror or e}") from None
            if mode != "run":
                _keep_for_life(ram, os.dup(uffd.fileno()))
        return sock
    except UffdError as e:
        raise WorkloadError(f"userfaultfd: {e.strerror}") from None


_kept: list = []


def _keep_for_life(*things) -> None:
    """Never unmap these mappings nor close these fds (ints): a native thread may run in the
    memory, or wait in it for a page, until the process exits (exit kills the threads first)."""
    import ctypes

    for t in things:
        if not isinstance(t, int) and not any(k is t for k in _kept):
            # a reference never given back: not even the interpreter's finalization unmaps it
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(t))
        _kept.append(t)


# ---------------------------------------------------------------------------
# control messages

def _reply(reader: ControlReader, message: dict) -> None:
    try:
        reader.send(message)
    except OSError as e:
        log.warning("cannot answer on the control socket: %s", e)


def _get(reader: ControlReader, timeout: float | None):
    """A message dict, CLOSED (once), or None on timeout; WorkloadError on a malformed message."""
    try:
        return reader.get(timeout)
    except HandshakeError as e:
        raise WorkloadError(str(e)) from None


class _PauseAnswer:
    """Answers migrate's pause and resume while the loop runs, in the reader thread: the pause is
    part of the migration's downtime, so it is answered at once, ahead of the loop thread that keeps
    the CPU busy (the reader is a latency thread, sched.make_latency_thread)."""

    def __init__(self, reader: ControlReader, loop: NativeLoop):
        self.reader, self.loop = reader, loop
        self.paused = False   # paused by migrate

    def __call__(self, msg: dict) -> bool:
        kind = msg.get("cmd")
        if kind not in ("pause", "resume") or not self.loop.running:
            return False
        if kind == "pause":
            self.paused = True
            _reply(self.reader, {"event": "paused", "passes": self.loop.pause()})
        else:
            self.loop.resume()
            self.paused = False
            _reply(self.reader, {"event": "resumed"})
        return True


def _reader(sock) -> ControlReader:
    return ControlReader(sock, name="control-reader")


def _kind(msg: dict) -> str:
    kind = msg.get("cmd", msg.get("event"))
    if not isinstance(kind, str):
        raise WorkloadError(f"control message has neither a 'cmd' nor an 'event' string: {msg!r:.120}")
    return kind


def _discard(ram: AnonymousMapping, msg: dict) -> None:
    """madvise(MADV_DONTNEED) the ranges of a discard command (our RAM is block 'mem' at offset 0).

    ``{"cmd": "discard", "ranges": {"mem": [[start, length], ...]}}``.
    """
    ranges = msg.get("ranges")
    if not isinstance(ranges, dict):
        raise WorkloadError("control message: discard without a 'ranges' object of block -> ranges")
    unknown = sorted(set(ranges) - {DEFAULT_BLOCK})
    if unknown:
        raise WorkloadError(f"control message: discard for unknown block {unknown[0]!r}")
    checked = []
    for r in ranges.get(DEFAULT_BLOCK) or []:
        ok = (isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in r))
        if (not ok or r[0] < 0 or r[1] <= 0 or r[0] % TARGET_PAGE_SIZE or r[1] % TARGET_PAGE_SIZE
                or r[0] + r[1] > ram.size):
            raise WorkloadError(f"control message: discard range {r!r:.60} is not page-aligned inside "
                                f"the {ram.size}-byte block")
        checked.append(r)
    for start, length in checked:
        madvise(ram.addr + start, length, MADV_DONTNEED)


def _report(loop: NativeLoop, passes_before: int, seconds: float, windows: "ProgressWindows | None" = None) -> dict:
    passes_after = loop.pause()
    bad = loop.check()
    out = {"passes_before": passes_before, "passes_after": passes_after,
           "passes_per_second": round(loop.passes_per_second(seconds), 3), "seconds": round(seconds, 3),
           "check": "ok" if bad is None else "failed", "first_bad_page": bad}
    if windows is not None:
        out["progress"] = windows.figures()
    return out


class ProgressWindows:
    """The incoming program's progress in two windows a benchmark compares with QEMU's guest: from RUN
    to the complete event (post-copy: its pages still arrive) and the ``after`` seconds that follow
    (every page in).  Each is (seconds, pages touched per second, whole passes made in it)."""

    def __init__(self, loop: NativeLoop, t_run: float, after: float = 1.0):
        self.loop, self.after = loop, after
        self.marks: dict[str, tuple[float, int, int | None]] = {"run": (t_run, 0, None)}   # (passes: the
        # state page's count, known once the loop has read it)

    def _mark(self, name: str, now: float) -> None:
        self.marks.setdefault(name, (now, self.loop.steps, self.loop.passes))

    def on_complete(self, now: float) -> None:
        self._mark("complete", now)

    def tick(self, now: float) -> None:
        done = self.marks.get("complete")
        if done is not None and now - done[0] >= self.after:
            self._mark("after", now)

    @property
    def after_done(self) -> bool:
        return "after" in self.marks

    def figures(self) -> dict:
        out = {}
        per_pass = steps_per_pass(self.loop.size, self.loop.step)
        for name, a, b in (("postcopy", "run", "complete"), ("after_complete", "complete", "after")):
            if a in self.marks and b in self.marks:
                (ta, sa, pa), (tb, sb, pb) = self.marks[a], self.marks[b]
                if pa is None:
                    pa = self.loop.start_passes
                dt = tb - ta
                out[name] = {"seconds": round(dt, 3),
                             "pages_per_second": round((sb - sa) / dt, 1) if dt > 0 else None,
                             "passes_per_second": round((sb - sa) / per_pass / dt, 3) if dt > 0 else None,
                             "whole_passes": pb - pa}
        return out


def _note(text: str) -> None:
    print(f"postcopy workload: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the three programs; each returns its report (None when ended by quit or a
# signal) and raises PostcopyError when it failed; the caller prints the report
# and fails when it says so (check "failed", mismatches > 0)

def run_source(size: int, path: str, *, step: int = TARGET_PAGE_SIZE, report_after: float | None = None,
               connect_timeout: float = 5.0, warmup_passes: int = 0) -> dict | None:
    """``workload run``: start fresh, hand memory over for write-protect tracking, obey pause/resume/quit.

    With ``warmup_passes``, the loop first makes that many passes over its
    memory (every page then populated and dirty, like QEMU's migration-test
    guest once it has booted), then hands the memory over while running.
    """
    ram = AnonymousMapping(size)
    _keep_for_life(ram)   # the native loop runs in it until the process exits
    loop = None
    if warmup_passes:
        loop = NativeLoop(ram.addr, size, step, fresh=True).start()
        loop.wait_started(10)
        while loop.passes < warmup_passes:
            if not loop.running:
                raise WorkloadError(f"workload loop ended: {loop.failed() or 'stopped'}")
            time.sleep(0.01)
    sock = attach(path, ram, mode="run", connect_timeout=connect_timeout)
    if loop is None:
        loop = NativeLoop(ram.addr, size, step, fresh=True).start()
        loop.wait_started(10)
    reader = _reader(sock)
    reader.answer = _PauseAnswer(reader, loop)
    return _control(loop, reader, ram, report_after, time.monotonic(), 0, source=True)


def run_incoming(size: int, path: str, *, step: int = TARGET_PAGE_SIZE, report_after: float | None = None,
                 connect_timeout: float = 5.0, report_after_complete: float | None = None) -> dict | None:
    """``workload incoming``: hand memory over (MISSING), apply discards, wait for RUN, continue the loop.

    ``report_after_complete``: report that many seconds after the complete event (instead of
    ``report_after`` seconds after RUN), with the progress during post-copy and in those seconds."""
    ram = AnonymousMapping(size)
    reader = _reader(attach(path, ram, mode="incoming", connect_timeout=connect_timeout))
    _wait_run(reader, ram)
    t_run = time.monotonic()
    loop = NativeLoop(ram.addr, size, step, fresh=False).start()
    reader.answer = _PauseAnswer(reader, loop)
    windows = ProgressWindows(loop, t_run, report_after_complete if report_after_complete is not None else 1.0)
    return _control(loop, reader, ram, report_after, t_run, None, source=False, windows=windows,
                    report_when_windows_done=report_after_complete is not None)


def _wait_run(reader: ControlReader, ram: AnonymousMapping) -> None:
    """Handle messages until RUN; WorkloadError when the migration failed."""
    while True:
        msg = _get(reader, None)
        if msg is ControlReader.CLOSED:
            raise WorkloadError("the serving side closed the socket before RUN (hand-over refused?)")
        kind = _kind(msg)
        if kind == "run":
            state = msg.get("state", "")
            try:
                base64.b64decode(state or "", validate=True)
            except (ValueError, TypeError):
                raise WorkloadError("control message: run event with a state that is not base64") \
                    from None
            return
        if kind == "discard":
            _discard(ram, msg)
            _reply(reader, {"event": "discarded"})
        elif kind == "failed":
            raise WorkloadError(f"migration failed: {msg.get('reason', 'no reason given')}")
        else:
            log.info("control message before RUN ignored: %s", kind)


def _control(loop: NativeLoop, reader: ControlReader, ram: AnonymousMapping, report_after: float | None,
             t0: float, passes_before: int | None, *, source: bool, windows: ProgressWindows | None = None,
             report_when_windows_done: bool = False) -> dict | None:
    migrated = complete = False
    pause_answer = reader.answer

    def at_risk() -> str | None:
        if source:
            return "migrate is moving it and reads its pages from here" if pause_answer.paused and not migrated \
                else None
        return None if complete else "it runs here and some of its pages are still missing"

    deadline = t0 + report_after if report_after is not None else None
    try:
        with signals.guard(at_risk=at_risk):
            while True:
                if not loop.running:
                    raise WorkloadError(f"workload loop ended: {loop.failed() or 'stopped'}")
                if passes_before is None and loop.started:
                    passes_before = loop.start_passes
                now = time.monotonic()
                if windows is not None:
                    windows.tick(now)
                if (deadline is not None and now >= deadline) or (report_when_windows_done and windows.after_done):
                    if passes_before is None:
                        loop.wait_started(PAUSE_TIMEOUT)
                        passes_before = loop.start_passes
                    return _report(loop, passes_before, now - t0, windows)
                wait = 0.2 if deadline is None else min(0.2, deadline - now)
                if windows is not None and "complete" in windows.marks and not windows.after_done:
                    wait = min(wait, max(0.0, windows.marks["complete"][0] + windows.after - now))
                msg = _get(reader, wait)
                if msg is None:
                    continue
                if msg is ControlReader.CLOSED:
                    if not source and not complete:
                        # nobody will place the missing pages: the loop would wait for them for ever
                        raise WorkloadError("the serving side closed the control socket before every page arrived")
                    if migrated or complete:
                        continue
                    _note("the control socket closed without quit; still running with memory intact")
                    continue
                if pause_answer(msg):   # (queued before the answer was installed)
                    continue
                kind = _kind(msg)
                if kind == "quit":
                    loop.stop()
                    return None
                elif kind == "failed":
                    if not source:
                        raise WorkloadError(f"migration failed: {msg.get('reason', 'no reason given')}")
                    _note(f"migration failed: {msg.get('reason', 'no reason given')}")
                elif kind == "complete":
                    complete = True
                    if windows is not None:
                        windows.on_complete(time.monotonic())
                    log.info("migration complete: every page is in")
                elif kind == "migrated" and source:
                    # the program now runs on the destination; this copy stays
                    # paused (QEMU's postmigrate) until it is ended
                    migrated = True
                    _note("migrated: this copy stays paused until it is ended")
                else:
                    log.info("control message ignored: %s", kind)
    except signals.Interrupted:
        if source and migrated:
            # this copy stays paused until it is ended: ending it is its normal end
            loop.stop(1.0)
            return None
        raise


def run_touch(size: int, path: str, *, image: str | None = None, order: str = "sequential", seed: int = 0,
              wait_run: bool = False, connect_timeout: float = 5.0, jitter: float = 0.1) -> dict | None:
    """``workload touch``: hand memory over (MISSING), touch every page (or, ``order="function"``, the
    pattern's working set, then every page once the migration is complete), compare with ``image``."""
    if size % TARGET_PAGE_SIZE or size <= 0:
        raise WorkloadError(f"size must be a positive multiple of {TARGET_PAGE_SIZE}")
    expected, f = None, None
    if image is not None:
        try:
            f = open(image, "rb")
        except OSError as e:
            raise WorkloadError(f"cannot open image {image}: {e.strerror}") from None
    try:
        if f is not None:
            length = os.fstat(f.fileno()).st_size
            expected = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if length else b""
        ram = AnonymousMapping(size)
        reader = _reader(attach(path, ram, mode="touch", connect_timeout=connect_timeout))
        if wait_run:
            _wait_run(reader, ram)
        return _touch_watched(reader, ram, expected, order, seed, jitter)
    finally:
        if f is not None:
            f.close()


def _touch_watched(reader: ControlReader, ram: AnonymousMapping, expected, order: str, seed: int,
                   jitter: float) -> dict:
    """Touch in a thread (native, GIL released) while the control messages are watched: told that
    the migration failed, or left by the serving side, stop without reading on.  The "function"
    order touches its working set, then, once told the migration is complete (no page faults any
    more), compares every page with ``expected``: the report's ``mismatches`` and
    ``first_mismatch`` are then of every page, ``pages`` and the times of the working set's."""
    if expected is not None:
        _keep_for_life(expected)   # compared with in native code until the end
    done = object()
    out: dict = {}
    complete_seen = threading.Event()
    verify_all = order == "function" and expected is not None

    def touch():
        try:
            report = touch_memory(ram.addr, ram.size, expected=expected, order=order, seed=seed, jitter=jitter)
            if verify_all:
                reader.post(done)
                complete_seen.wait()
                whole = touch_memory(ram.addr, ram.size, expected=expected)
                report.update(mismatches=whole["mismatches"], first_mismatch=whole["first_mismatch"],
                              verified_pages=whole["pages"])
            out["report"] = report
        except WorkloadError as e:
            out["error"] = e
        reader.post(done)

    thread = threading.Thread(target=touch, name="workload-touch", daemon=True)
    thread.start()
    complete = False
    with signals.guard(at_risk=lambda: None if complete else "it is touching pages that are still missing"):
        while True:
            msg = done if complete else _get(reader, None)
            if msg is done:
                if not complete and "report" not in out and "error" not in out:
                    continue   # the working set is touched; every page is compared once complete
                thread.join()
                if "error" in out:
                    raise out["error"]
                return out["report"]
            if msg is ControlReader.CLOSED:
                raise WorkloadError("the serving side closed the control socket before every page arrived")
            kind = _kind(msg)
            if kind == "failed":
                raise WorkloadError(f"migration failed: {msg.get('reason', 'no reason given')}")
            if kind == "complete":
                complete = True   # every page is in: the touch ends
                complete_seen.set()


__all__ = ["STATE_MAGIC", "WorkloadError", "NativeLoop", "attach", "check_memory", "touch_memory",
           "offered_features", "state_page", "parse_state_page", "layout_page", "data_offsets", "steps_per_pass",
           "run_source", "run_incoming", "run_touch"]
