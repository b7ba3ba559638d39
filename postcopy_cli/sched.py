"""Scheduling of the threads on a demand page's path.

A fault is served by a chain of threads in several processes (the fault
thread, the source's request thread, the destination's preempt receiver);
each wake-up that waits for a CPU busy with background streaming adds to the
faulting thread's stall.  Where allowed (root or CAP_SYS_NICE), these threads
run SCHED_FIFO (sched(7)): they preempt background work the moment they wake,
and they block again after a few microseconds of work each, so they cannot
starve it.  Elsewhere they keep the default policy.
"""
from __future__ import annotations

import os

LATENCY_PRIORITY = 10   # of 1..99; above nothing in particular, below kernel threads' defaults


def make_latency_thread() -> bool:
    """Give the calling thread SCHED_FIFO; False (unchanged) when not permitted."""
    if os.environ.get("POSTCOPY_NO_RT"):
        return False
    try:
        # pid 0: the calling thread (sched_setscheduler(2) on Linux is per thread)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(LATENCY_PRIORITY))
        return True
    except (PermissionError, OSError, AttributeError):
        return False
