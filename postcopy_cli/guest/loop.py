"""The reference workload's memory loop and checks, native (workload.c).

* :class:`NativeLoop` - QEMU migration-test's guest loop in C: one RAM block
  whose page 0 holds the loop state (magic, pass counter, position, step);
  every step increments one data byte, ``step`` bytes apart from page 1 on,
  and a pass is one sweep over all of them.  It runs in a thread calling a
  cffi API-mode function, so the GIL is released while it runs (and while it
  is blocked on a missing page).
* :func:`check_memory` / :func:`touch_memory` - QEMU's memory check and a
  page toucher with latency statistics, both native.
* the state page layout (``struct pc_workload_state``) and the image of a
  consistent RAM (:func:`layout_page`), for tests and the selftest.

Rule: registered RAM is touched only by native code, with the GIL released.
"""
from __future__ import annotations

import errno
import os
import threading

from .._native import ffi, lib
from ..codec.constants import TARGET_PAGE_SIZE
from ..errors import PostcopyError
from ..uffd import native_error

STATE_MAGIC = lib.PC_WORKLOAD_MAGIC
PAUSE_TIMEOUT = 30.0


class WorkloadError(PostcopyError):
    """The workload could not run or its memory failed the check (exit 1)."""


# ---------------------------------------------------------------------------
# state page layout (struct pc_workload_state, native endian u64s)

def state_page(passes: int, position: int, step: int = TARGET_PAGE_SIZE) -> bytes:
    """The 4096-byte state page of a loop that has made ``passes`` passes and is at ``position``."""
    buf = bytearray(TARGET_PAGE_SIZE)
    st = ffi.cast("struct pc_workload_state *", ffi.from_buffer(buf))
    st.magic, st.passes, st.position, st.step = STATE_MAGIC, passes, position, step
    return bytes(buf)


def parse_state_page(page: bytes) -> dict:
    """Decode a state page: {"magic_ok", "passes", "position", "step"}."""
    buf = bytearray(page[:TARGET_PAGE_SIZE])
    st = ffi.cast("struct pc_workload_state *", ffi.from_buffer(buf))
    return {"magic_ok": st.magic == STATE_MAGIC, "passes": st.passes, "position": st.position, "step": st.step}


def data_offsets(size: int, step: int = TARGET_PAGE_SIZE) -> range:
    """Byte offsets the loop increments, in order."""
    return range(TARGET_PAGE_SIZE, size, step)


def layout_page(index: int, size: int, passes: int, position: int, step: int = TARGET_PAGE_SIZE) -> bytes:
    """Page ``index`` of a consistent RAM image: state page 0, data bytes before
    ``position`` at ``passes + 1``, the rest at ``passes`` (mod 256)."""
    if index == 0:
        return state_page(passes, position, step)
    page = bytearray(TARGET_PAGE_SIZE)
    start = index * TARGET_PAGE_SIZE
    first = TARGET_PAGE_SIZE + -(-(start - TARGET_PAGE_SIZE) // step) * step  # first data offset >= start
    for off in range(first, min(start + TARGET_PAGE_SIZE, size), step):
        page[off - start] = (passes + (1 if off < position else 0)) & 0xFF
    return bytes(page)


def steps_per_pass(size: int, step: int) -> int:
    return len(data_offsets(size, step))


# ---------------------------------------------------------------------------
# native wrappers

def _ptr(addr: int):
    return ffi.cast("uint8_t *", addr)


def check_memory(addr: int, size: int, step: int = TARGET_PAGE_SIZE) -> int | None:
    """QEMU's check on RAM at ``addr``: None if the data bytes are consistent, else the first bad page.

    Touches every data byte (native, GIL released): safe on registered memory.
    """
    r = lib.pc_workload_check(_ptr(addr), size, step)
    return None if r == 0 else int(r - 1)


ORDERS = ("sequential", "random", "function")


def touch_memory(addr: int, size: int, *, expected=None, order: str = "sequential", seed: int = 0,
                 jitter: float = 0.1) -> dict:
    """Touch the pages of ``[addr, addr+size)`` (native), comparing each with ``expected``.

    ``order``: every page in address order, every page in a random order (``seed``), or only the
    working set of the "function" pattern (:mod:`.pattern`, ``seed`` and ``jitter``) in its order.
    ``expected``: a buffer (e.g. an mmap of an image file) or None to skip the
    comparison; pages past its end are compared with zeros.  Returns the JSON
    report of ``postcopy workload touch``; ``histogram_us`` maps each bucket's
    upper bound in microseconds (a power of two) to its count, non-empty only.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    res = ffi.new("struct pc_touch_result *")
    if expected is not None and len(expected):
        exp = ffi.from_buffer(expected)
        exp_ptr, exp_len = ffi.cast("uint8_t *", exp), min(len(exp), size)
    elif expected is not None:
        exp_ptr, exp_len = ffi.cast("uint8_t *", ffi.from_buffer(bytearray(1))), 0
    else:
        exp_ptr, exp_len = ffi.NULL, 0
    if order == "function":
        from .pattern import function_order

        pages = function_order(size // TARGET_PAGE_SIZE, seed=seed, jitter=jitter)
        r = lib.pc_touch_pages(_ptr(addr), size, exp_ptr, exp_len, ffi.from_buffer("uint64_t[]", pages), len(pages),
                               res)
    else:
        r = lib.pc_touch(_ptr(addr), size, exp_ptr, exp_len, order == "random", seed & (2**64 - 1), res)
    if r < 0:
        raise native_error(r, f"touch of {size} bytes at {addr:#x} failed", WorkloadError)
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

    def __init__(self, addr: int, size: int, step: int = TARGET_PAGE_SIZE, *, fresh: bool = True):
        if size < 2 * TARGET_PAGE_SIZE or size % TARGET_PAGE_SIZE:
            raise WorkloadError(f"workload memory must be a multiple of {TARGET_PAGE_SIZE} bytes and at least 2 pages")
        if not 1 <= step <= size - TARGET_PAGE_SIZE:
            raise WorkloadError(f"step {step} must be between 1 and {size - TARGET_PAGE_SIZE}")
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
