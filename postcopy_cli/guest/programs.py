"""The reference "guest": programs that hand their memory over and keep using it.

Three programs (``postcopy workload run|incoming|touch``) built from:

* :class:`NativeLoop` - QEMU migration-test's guest loop in C (workload.c): one
  RAM block whose page 0 holds the loop state (magic, pass counter, position,
  step); every step increments one data byte, ``step`` bytes apart from page 1
  on, and a pass is one sweep over all of them.  It runs in a thread calling a
  cffi API-mode function, so the GIL is released while it runs (and while it is
  blocked on a missing page).
* :func:`attach` - register the RAM with a userfaultfd and hand both over
  through a Unix socket (Firecracker's handshake, ``postcopy_cli.channels.handover``).
* :func:`check_memory` / :func:`touch_memory` - QEMU's memory check and a
  page toucher with latency statistics, both native.

Rule: this process never touches its registered RAM from Python (not even a
memoryview read); only native code does, with the GIL released.
"""
from __future__ import annotations

import base64
import errno
import logging
import mmap
import os
import queue
import socket
import sys
import threading
import time

from .._native import ffi, lib
from .. import signals
from ..errors import PeerDisconnected, PostcopyError
from ..channels.handover import DEFAULT_BLOCK, ControlChannel, GuestRegion, HandshakeError, send_handover
from ..memory.mappings import MADV_DONTNEED, AnonymousMapping, madvise
from ..sched import make_latency_thread
from ..uffd import Feature, RegisterMode, UffdError, Userfaultfd

log = logging.getLogger("postcopy.guest")

PAGE = 4096
STATE_MAGIC = lib.PC_WORKLOAD_MAGIC
MODES = ("run", "incoming", "touch")
PAUSE_TIMEOUT = 30.0


class WorkloadError(PostcopyError):
    """The workload could not run or its memory failed the check (exit 1)."""


# ---------------------------------------------------------------------------
# state page layout (struct pc_workload_state, native endian u64s)

def state_page(passes: int, position: int, step: int = PAGE) -> bytes:
    """The 4096-byte state page of a loop that has made ``passes`` passes and is at ``position``."""
    buf = bytearray(PAGE)
    st = ffi.cast("struct pc_workload_state *", ffi.from_buffer(buf))
    st.magic, st.passes, st.position, st.step = STATE_MAGIC, passes, position, step
    return bytes(buf)


def parse_state_page(page: bytes) -> dict:
    """Decode a state page: {"magic_ok", "passes", "position", "step"}."""
    buf = bytearray(page[:PAGE])
    st = ffi.cast("struct pc_workload_state *", ffi.from_buffer(buf))
    return {"magic_ok": st.magic == STATE_MAGIC, "passes": st.passes, "position": st.position, "step": st.step}


def data_offsets(size: int, step: int = PAGE) -> range:
    """Byte offsets the loop increments, in order."""
    return range(PAGE, size, step)


def layout_page(index: int, size: int, passes: int, position: int, step: int = PAGE) -> bytes:
    """Page ``index`` of a consistent RAM image: state page 0, data bytes before
    ``position`` at ``passes + 1``, the rest at ``passes`` (mod 256)."""
    if index == 0:
        return state_page(passes, position, step)
    page = bytearray(PAGE)
    start = index * PAGE
    first = PAGE + -(-(start - PAGE) // step) * step  # first data offset >= start
    for off in range(first, min(start + PAGE, size), step):
        page[off - start] = (passes + (1 if off < position else 0)) & 0xFF
    return bytes(page)


def steps_per_pass(size: int, step: int) -> int:
    return len(data_offsets(size, step))


# ---------------------------------------------------------------------------
# native wrappers

def _ptr(addr: int):
    return ffi.cast("uint8_t *", addr)


def check_memory(addr: int, size: int, step: int = PAGE) -> int | None:
    """QEMU's check on RAM at ``addr``: None if the data bytes are consistent, else the first bad page.

    Touches every data byte (native, GIL released): safe on registered memory.
    """
    r = lib.pc_workload_check(_ptr(addr), size, step)
    return None if r == 0 else int(r - 1)


def touch_memory(addr: int, size: int, *, expected=None, order: str = "sequential", seed: int = 0) -> dict:
    """Touch every page of ``[addr, addr+size)`` (native), comparing with ``expected``.

    ``expected``: a buffer (e.g. an mmap of an image file) or None to skip the
    comparison; pages past its end are compared with zeros.  Returns the JSON
    report of ``postcopy workload touch``; ``histogram_us`` maps each bucket's
    upper bound in microseconds (a power of two) to its count, non-empty only.
    """
    if order not in ("sequential", "random"):
        raise ValueError(f"order must be 'sequential' or 'random', not {order!r}")
    res = ffi.new("struct pc_touch_result *")
    if expected is not None and len(expected):
        exp = ffi.from_buffer(expected)
        exp_ptr, exp_len = ffi.cast("uint8_t *", exp), min(len(exp), size)
    elif expected is not None:
        exp_ptr, exp_len = ffi.cast("uint8_t *", ffi.from_buffer(bytearray(1))), 0
    else:
        exp_ptr, exp_len = ffi.NULL, 0
    r = lib.pc_touch(_ptr(addr), size, exp_ptr, exp_len, order == "random", seed & (2**64 - 1), res)
    if r < 0:
        raise WorkloadError(f"touch of {size} bytes at {addr:#x} failed: {os.strerror(-r)}")
    hist = {str(1 << b): int(res.histogram[b]) for b in range(lib.PC_TOUCH_BUCKETS) if res.histogram[b]}
    return {"pages": int(res.pages), "mismatches": int(res.mismatches),
            "first_mismatch": None if res.first_mismatch < 0 else int(res.first_mismatch),
            "seconds": round(res.seconds, 6), "p50_us": round(res.p50_us, 3), "p99_us": round(res.p99_us, 3),
            "max_us": round(res.max_us, 3), "histogram_us": hist}


class NativeLoop:
    """The workload loop on ``size`` bytes at ``addr`` in a thread (GIL released while it runs).

    ``fresh=True`` initialises the state page; ``fresh=False`` continues from it
    (an incoming start: the state page arrives on demand like any other page).
    """

    def __init__(self, addr: int, size: int, step: int = PAGE, *, fresh: bool = True):
        if size < 2 * PAGE or size % PAGE:
            raise WorkloadError(f"workload memory must be a multiple of {PAGE} bytes and at least 2 pages")
        if not 1 <= step <= size - PAGE:
            raise WorkloadError(f"step {step} must be between 1 and {size - PAGE}")
        self.addr, self.size, self.step, self.fresh = addr, size, step, fresh
        self.ctl = ffi.new("struct pc_workload_ctl *")
        self.result: int | None = None
        self._thread = threading.Thread(target=self._run, name="workload-loop", daemon=True)

    def _run(self) -> None:
        self.result = lib.pc_workload_loop(_ptr(self.addr), self.size, self.step, int(self.fresh), self.ctl)

    def start(self) -> "NativeLoop":
        self._thread.start()
        return self

    def _load(self, field: str) -> int:
        return int(lib.pc_workload_load64(ffi.cast("uint64_t *", ffi.addressof(self.ctl, field))))

    @property
    def started(self) -> bool:
        return self.ctl.started == 1

    @property
    def passes(self) -> int:
        return self._load("passes")

    @property
    def start_passes(self) -> int:
        return self._load("start_passes")

    @property
    def steps(self) -> int:
        """Increments made since this loop started."""
        return self._load("steps")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def failed(self) -> str | None:
        """Why the loop ended on its own, or None while it runs / after a stop."""
        if self.result is not None and self.result < 0:
            return ("the state page is not a workload state page for this size and step"
                    if self.result == -errno.EINVAL else os.strerror(-self.result))
        return None

    def wait_started(self, timeout: float | None = None) -> int:
        """Wait until the loop has read its state page; the pass counter it started from."""
        r = lib.pc_workload_wait_started(self.ctl, -1 if timeout is None else int(timeout * 1000))
        if r == -errno.ETIMEDOUT:
            raise WorkloadError(f"workload did not start within {timeout} s (state page not arriving?)")
        if r < 0:
            # the loop has ended: its thread stores the reason as it returns
            self._thread.join(1.0)
            raise WorkloadError(f"workload could not start: {self.failed() or os.strerror(-r)}")
        return self.start_passes

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> int:
        """Pause (state saved in the state page); returns the pass counter."""
        if not self.running:
            raise WorkloadError(f"workload loop is not running: {self.failed() or 'stopped'}")
        if lib.pc_workload_pause(self.ctl, int(timeout * 1000)) < 0:
            raise WorkloadError(f"workload did not pause within {timeout} s")
        return self.passes

    def resume(self) -> None:
        lib.pc_workload_resume(self.ctl)

    def stop(self, timeout: float | None = 5.0) -> None:
        lib.pc_workload_stop(self.ctl)
        self._thread.join(timeout)

    def passes_per_second(self, seconds: float) -> float:
        return self.steps / steps_per_pass(self.size, self.step) / seconds if seconds > 0 else 0.0

    def check(self) -> int | None:
        """QEMU's check of this loop's memory (pause or stop it first)."""
        return check_memory(self.addr, self.size, self.step)


# ---------------------------------------------------------------------------
# hand-over

def offered_features() -> Feature:
    """Features this kernel offers (UFFDIO_API with 0 on a throw-away userfaultfd:
    the handshake may be done once per fd, so it cannot be probed on the real one)."""
    with Userfaultfd() as probe:
        return probe.api(0).features


def _connect(path: str, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if time.monotonic() >= deadline:
                raise PeerDisconnected(f"cannot connect to unix:{path}: {e.strerror} (waited {timeout:g} s)") \
                    from None
            time.sleep(0.05)
        except OSError as e:
            sock.close()
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
                send_handover(sock, [GuestRegion(ram.addr, ram.size, 0, PAGE, DEFAULT_BLOCK)], uffd.fileno(),
                              notify=True)
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

class _Reader:
    """Control messages in a thread, so the main thread can wait with timeouts and signals."""

    CLOSED = object()

    def __init__(self, sock: socket.socket):
        self.channel = ControlChannel(sock)
        self.queue: queue.Queue = queue.Queue()
        self.open = True
        self.paused = False                   # paused by migrate (answered right here)
        self.loop: NativeLoop | None = None   # once set, pause/resume are answered right here
        threading.Thread(target=self._run, name="control-reader", daemon=True).start()

    def _run(self) -> None:
        # the pause is part of the migration's downtime: answer it at once, ahead
        # of the loop thread that keeps the CPU busy (sched.make_latency_thread)
        make_latency_thread()
        while True:
            try:
                msg = self.channel.receive()
            except HandshakeError as e:
                self.queue.put(e)
                return
            except OSError:
                msg = None
            if msg is None:
                self.queue.put(self.CLOSED)
                return
            loop = self.loop
            if loop is not None and loop.running and msg.get("cmd") == "pause":
                self.paused = True
                self.send({"event": "paused", "passes": loop.pause()})
                continue
            if loop is not None and loop.running and msg.get("cmd") == "resume":
                loop.resume()
                self.paused = False
                self.send({"event": "resumed"})
                continue
            self.queue.put(msg)

    def get(self, timeout: float | None):
        """A message dict, CLOSED, or None on timeout; raises on a malformed message."""
        if not self.open:
            time.sleep(timeout if timeout is not None else 3600)
            return None
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise WorkloadError(str(item))
        if item is self.CLOSED:
            self.open = False
        return item

    def send(self, message: dict) -> None:
        try:
            self.channel.send(message)
        except OSError as e:
            log.warning("cannot answer on the control socket: %s", e)


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
        if not ok or r[0] < 0 or r[1] <= 0 or r[0] % PAGE or r[1] % PAGE or r[0] + r[1] > ram.size:
            raise WorkloadError(f"control message: discard range {r!r:.60} is not page-aligned inside "
                                f"the {ram.size}-byte block")
        checked.append(r)
    for start, length in checked:
        madvise(ram.addr + start, length, MADV_DONTNEED)


def _report(loop: NativeLoop, passes_before: int, seconds: float) -> dict:
    passes_after = loop.pause()
    bad = loop.check()
    return {"passes_before": passes_before, "passes_after": passes_after,
            "passes_per_second": round(loop.passes_per_second(seconds), 3), "seconds": round(seconds, 3),
            "check": "ok" if bad is None else "failed", "first_bad_page": bad}


def _note(text: str) -> None:
    print(f"postcopy workload: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# the three programs; each returns its report (None when ended by quit or a
# signal) and raises PostcopyError when it failed; the caller prints the report
# and fails when it says so (check "failed", mismatches > 0)

def run_source(size: int, path: str, *, step: int = PAGE, report_after: float | None = None,
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
    reader = _Reader(sock)
    reader.loop = loop
    return _control(loop, reader, ram, report_after, time.monotonic(), 0, source=True)


def run_incoming(size: int, path: str, *, step: int = PAGE, report_after: float | None = None,
                 connect_timeout: float = 5.0) -> dict | None:
    """``workload incoming``: hand memory over (MISSING), apply discards, wait for RUN, continue the loop."""
    ram = AnonymousMapping(size)
    reader = _Reader(attach(path, ram, mode="incoming", connect_timeout=connect_timeout))
    _wait_run(reader, ram)
    t_run = time.monotonic()
    loop = NativeLoop(ram.addr, size, step, fresh=False).start()
    return _control(loop, reader, ram, report_after, t_run, None, source=False)


def _wait_run(reader: _Reader, ram: AnonymousMapping) -> None:
    """Handle messages until RUN; WorkloadError when the migration failed."""
    while True:
        msg = reader.get(None)
        if msg is _Reader.CLOSED:
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
            reader.send({"event": "discarded"})
        elif kind == "failed":
            raise WorkloadError(f"migration failed: {msg.get('reason', 'no reason given')}")
        else:
            log.info("control message before RUN ignored: %s", kind)


def _control(loop: NativeLoop, reader: _Reader, ram: AnonymousMapping, report_after: float | None,
             t0: float, passes_before: int | None, *, source: bool) -> dict | None:
    migrated = complete = False

    def at_risk() -> str | None:
        if source:
            return "migrate is moving it and reads its pages from here" if reader.paused and not migrated else None
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
                if deadline is not None and now >= deadline:
                    if passes_before is None:
                        loop.wait_started(PAUSE_TIMEOUT)
                        passes_before = loop.start_passes
                    return _report(loop, passes_before, now - t0)
                wait = 0.2 if deadline is None else min(0.2, deadline - now)
                msg = reader.get(wait)
                if msg is None:
                    continue
                if msg is _Reader.CLOSED:
                    if not source and not complete:
                        # nobody will place the missing pages: the loop would wait for them for ever
                        raise WorkloadError("the serving side closed the control socket before every page arrived")
                    if migrated or complete:
                        continue
                    _note("the control socket closed without quit; still running with memory intact")
                    continue
                kind = _kind(msg)
                if kind == "pause":
                    reader.send({"event": "paused", "passes": loop.pause()})
                elif kind == "resume":
                    loop.resume()
                    reader.send({"event": "resumed"})
                elif kind == "quit":
                    loop.stop()
                    return None
                elif kind == "failed":
                    if not source:
                        raise WorkloadError(f"migration failed: {msg.get('reason', 'no reason given')}")
                    _note(f"migration failed: {msg.get('reason', 'no reason given')}")
                elif kind == "complete":
                    complete = True
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
              wait_run: bool = False, connect_timeout: float = 5.0) -> dict | None:
    """``workload touch``: hand memory over (MISSING), touch every page, compare with ``image``."""
    if size % PAGE or size <= 0:
        raise WorkloadError(f"size must be a positive multiple of {PAGE}")
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
        reader = _Reader(attach(path, ram, mode="touch", connect_timeout=connect_timeout))
        if wait_run:
            _wait_run(reader, ram)
        return _touch_watched(reader, ram, expected, order, seed)
    finally:
        if f is not None:
            f.close()


def _touch_watched(reader: _Reader, ram: AnonymousMapping, expected, order: str, seed: int) -> dict:
    """Touch in a thread (native, GIL released) while the control messages are watched: told that
    the migration failed, or left by the serving side, stop without reading on."""
    if expected is not None:
        _keep_for_life(expected)   # compared with in native code until the end
    done = object()
    out: dict = {}

    def touch():
        try:
            out["report"] = touch_memory(ram.addr, ram.size, expected=expected, order=order, seed=seed)
        except WorkloadError as e:
            out["error"] = e
        reader.queue.put(done)

    thread = threading.Thread(target=touch, name="workload-touch", daemon=True)
    thread.start()
    complete = False
    with signals.guard(at_risk=lambda: None if complete else "it is touching pages that are still missing"):
        while True:
            msg = reader.get(None) if not complete else done
            if msg is done:
                thread.join()
                if "error" in out:
                    raise out["error"]
                return out["report"]
            if msg is _Reader.CLOSED:
                raise WorkloadError("the serving side closed the control socket before every page arrived")
            kind = _kind(msg)
            if kind == "failed":
                raise WorkloadError(f"migration failed: {msg.get('reason', 'no reason given')}")
            if kind == "complete":
                complete = True   # every page is in: the touch ends


__all__ = ["PAGE", "STATE_MAGIC", "WorkloadError", "NativeLoop", "attach", "check_memory", "touch_memory",
           "offered_features", "state_page", "parse_state_page", "layout_page", "data_offsets", "steps_per_pass",
           "run_source", "run_incoming", "run_touch"]
