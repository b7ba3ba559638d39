"""``--max-bandwidth``: the one cap on what a source sends, on both channels.

The cap's state is a native ``struct pc_cap`` (``native/source.h``) and its
arithmetic is ``pc_cap_ahead``: bytes sent since the start against the bytes
the rate allows by now.  The background stream asks it before each chunk with
everything sent (both channels); the native request server asks it before
each requested page with the requested bytes alone, so requests go first and
the background stream makes room for them.
"""
from __future__ import annotations

import time

from .._native import ffi, lib


class BandwidthCap:
    """``max_bandwidth`` bytes/s from ``t0`` (a time.monotonic() value); 0: no cap."""

    def __init__(self, max_bandwidth: float, t0: float):
        self.max_bandwidth = max_bandwidth
        # time.monotonic() is CLOCK_MONOTONIC, which the native server reads
        self.native = ffi.new("struct pc_cap *", {"max_bandwidth": max_bandwidth, "t0_ns": int(t0 * 1e9)})

    def ahead(self, sent_bytes: int, now_ns: int | None = None) -> float:
        """Seconds to wait before sending more, having sent ``sent_bytes`` (0: go)."""
        if not self.max_bandwidth:
            return 0.0
        return lib.pc_cap_ahead(self.native, sent_bytes, time.monotonic_ns() if now_ns is None else now_ns)
