"""Live dirty-page tracking of another process: PAGEMAP_SCAN on /proc/PID/pagemap.

The program registers its memory with userfaultfd in write-protect mode with
UFFD_FEATURE_WP_ASYNC: the kernel resolves write faults on protected pages
itself and marks them written (Documentation/admin-guide/mm/userfaultfd.rst,
"Write Protect Notifications"); PAGEMAP_SCAN with PM_SCAN_WP_MATCHING returns
the written pages and write-protects them again in the same call
(Documentation/admin-guide/mm/pagemap.rst, "Pagemap Scan IOCTL").
"""
from __future__ import annotations

import os

from .._native import ffi, lib
from ..uffd import native_error

VEC_LEN = 4096


class PagemapScanner:
    """Owns an fd of /proc/PID/pagemap; ``written()`` lists written ranges."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"open /proc/{pid}/pagemap: {e.strerror}") from None
        self._vec = ffi.new("struct pc_page_region[]", VEC_LEN)
        self._arg = ffi.new("struct pc_pm_scan_arg *")

    def written(self, start: int, end: int, *, reprotect: bool = True) -> list[tuple[int, int]]:
        """Host ranges [a, b) written since they were last protected; with ``reprotect``, protect them again."""
        out: list[tuple[int, int]] = []
        arg, vec = self._arg, self._vec
        pos = start
        while pos < end:
            arg.size = ffi.sizeof("struct pc_pm_scan_arg")
            arg.flags = (lib.PC_PM_SCAN_WP_MATCHING | lib.PC_PM_SCAN_CHECK_WPASYNC) if reprotect else 0
            arg.start, arg.end = pos, end
            arg.walk_end = 0
            arg.vec = int(ffi.cast("uintptr_t", vec))
            arg.vec_len = VEC_LEN
            arg.max_pages = 0
            arg.category_inverted = 0
            arg.category_mask = lib.PC_PAGE_IS_WRITTEN
            arg.category_anyof_mask = 0
            arg.return_mask = lib.PC_PAGE_IS_WRITTEN
            n = lib.pc_pagemap_scan(self._fd, arg)
            if n < 0:
                raise native_error(n, f"PAGEMAP_SCAN of pid {self.pid} [{pos:#x}, {end:#x})", OSError)
            for i in range(n):
                out.append((vec[i].start, vec[i].end))
            if arg.walk_end <= pos:
                break
            pos = arg.walk_end
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
