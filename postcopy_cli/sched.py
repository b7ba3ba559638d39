"""Scheduling of the threads on a demand page's path.

A fault is served by a chain of threads in several processes (the fault
thread, the source's request server, the destination's preempt receiver, the
control readers); each wake-up that waits for a CPU busy with background
streaming adds to the faulting thread's stall.  Where allowed (root or
CAP_SYS_NICE), these threads get nice -10 (setpriority(2) on the thread id;
sched(7): the fair scheduler weighs a thread by its nice value, so they run
soon after they wake).  Measured on the 2-vCPU machines here (1 GiB restore,
p50 request latency / whole restore): default 103 us / 1.46 s, nice -10
74 us / 1.41 s, SCHED_FIFO 67 us / 2.06 s (every wake-up preempting the
streaming threads costs the stream more than it gains).
Set POSTCOPY_NO_PRIORITY=1 to leave every thread at its default.
"""
from __future__ import annotations

import os
import threading

LATENCY_NICE = -10


def make_latency_thread() -> bool:
    """Raise the calling thread's priority; False (unchanged) when not permitted."""
    if os.environ.get("POSTCOPY_NO_PRIORITY"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LATENCY_NICE)
        return True
    except (PermissionError, OSError, AttributeError):
        return False
