"""The fault thread (native, GIL released) and the uffd for memory in this process."""
from __future__ import annotations

import os
import threading

from .._native import lib
from ..sched import make_latency_thread
from ..uffd import Feature, Userfaultfd, offered_features


class FaultThread:
    """The fault thread: the native loop reading the uffd, run with the GIL released.

    It stops when its eventfd is written (the seed's "quit" eventfd).
    """

    def __init__(self, native):
        self._native = native
        self.quit_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.result: int | None = None
        self._thread = threading.Thread(target=self._run, name="postcopy/fault", daemon=True)

    def _run(self):
        make_latency_thread()
        self.result = lib.pc_dest_fault_loop(self._native)

    def start(self):
        self._thread.start()

    def stop(self):
        if self._thread.is_alive():
            os.eventfd_write(self.quit_fd, 1)
            self._thread.join()

    def close(self):
        self.stop()
        if self.quit_fd >= 0:
            os.close(self.quit_fd)
            self.quit_fd = -1


def own_memory_uffd() -> Userfaultfd:
    """A uffd for memory in this process, with the features the destination uses."""
    u = Userfaultfd(nonblocking=True)
    u.api(offered_features() & (Feature.THREAD_ID | Feature.EVENT_REMOVE))
    return u
