"""Lazy restore from a memory image file: :class:`ImageMemory` serves the file as one block and
:func:`migrate_image` runs the migration (preamble, STATE, LISTEN, RUN, then post-copy)."""
from __future__ import annotations

import mmap
import os
import socket
import time

from .. import codec
from .._native import ffi
from ..errors import PeerDisconnected, UsageError, with_stats
from ..memory.mappings import libc
from .recovery import Recovery
from .streamer import TP, PageStreamer, send_preamble


class ImageMemory:
    """A memory image file served as one block (Firecracker's memory-file layout: block ``mem``)."""

    def __init__(self, path: str, *, block: str = "mem", page_size: int = TP):
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"cannot open image {path!r}: {e.strerror}") from None
        size = os.fstat(self._fd).st_size
        if size == 0:
            os.close(self._fd)
            raise UsageError(f"image {path!r} is empty")
        length = -(-size // page_size) * page_size
        self.size = size
        self.path = path
        self.blocks = [codec.BlockInfo(block, length, page_size)]
        # mapped a page longer than the file where it ends mid-page: reads past
        # the end of the file within the last page see zeros (mmap(2))
        self._map = mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if length <= -(-size // TP) * TP else \
            self._map_over_zeros(size, length)
        self._view = memoryview(self._map)
        self._base = ffi.from_buffer(self._view)
        self._tail = None
        if size % TP:
            self._tail = ffi.new("uint8_t[]", TP)
            ffi.memmove(self._tail, self._view[size - size % TP:], size % TP)

    def _map_over_zeros(self, size: int, length: int) -> mmap.mmap:
        """The file mapped over zeros of the whole block: a host page size that does not divide the
        file leaves whole target pages past its end, which must read as zeros, not fault."""
        import ctypes

        mm = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(mm)))
        MAP_FIXED = 0x10
        if libc.mmap(addr, size, mmap.PROT_READ, mmap.MAP_PRIVATE | MAP_FIXED, self._fd, 0) != addr:
            err = ctypes.get_errno()
            mm.close()
            os.close(self._fd)
            raise UsageError(f"cannot map image {self.path!r}: {os.strerror(err)}")
        return mm

    pid = 0   # the pages are in our own memory

    @property
    def data_end(self) -> int:
        """The file ends here; the rest of its last page reads as zeros."""
        return self.size

    def base(self, block: int):
        """Pointer to the block in our memory (the kernel maps the image's last page whole)."""
        return self._base

    def segments(self, block: int) -> list:
        return []

    def pages(self, block: int, offset: int, count: int, slot: int = 0):
        """Pointer to ``count`` contiguous target pages from ``offset`` (the mapping: always valid)."""
        if self._tail is not None and offset < self.size < offset + count * TP:
            if count > 1:
                raise ValueError("the partial last page of an image must be read alone")
            return self._tail
        return self._base + offset

    def close(self):
        del self._base
        self._view.release()
        self._map.close()
        os.close(self._fd)


def migrate_image(conn: socket.socket | None, image: ImageMemory, *, state: bytes = b"", max_bandwidth: float = 0.0,
                  timeout: float = 30.0, preempt: socket.socket | None = None, on_start=None,
                  migration_id: bytes | None = None, preempt_channels: int | None = None,
                  recovery: Recovery | None = None, resume: bool = False,
                  priority: list[tuple[int, int, int]] | None = None, priority_before_run: bool = False) -> dict:
    """Lazy restore: preamble, STATE, LISTEN, RUN, then every page (requested ones first), EOF, SHUT.

    ``preempt``: a second connection to the destination for requested pages.
    ``on_start(streamer)``: called with the PageStreamer before it sends (its progress() for a display;
    its ``run_sent`` tells whether RUN went).
    ``migration_id``, ``preempt_channels``, ``recovery``: see PageStreamer.  ``resume`` (``conn``
    None): take over the paused migration ``migration_id`` (no preamble: the resume handshake).
    ``priority``: runs (block, first page, count) the background stream sends first, in order (a
    replayed working set, codec.workset.priority_runs); requested pages still go before them.
    ``priority_before_run``: those runs go before LISTEN and RUN instead (the program starts once its
    working set is in: fewer faults, a later start); ``stats["run_at_seconds"]`` says when RUN went.
    """
    t0 = time.monotonic()
    streamer = PageStreamer(conn, image, max_bandwidth=max_bandwidth, timeout=timeout, preempt=preempt,
                            migration_id=migration_id, preempt_channels=preempt_channels, recovery=recovery)
    streamer.run_sent = resume
    if priority:
        streamer.book.set_priority(priority)
    if on_start is not None:
        on_start(streamer)
    try:
        if not resume:
            try:
                send_preamble(conn, image.blocks, streamer.migration)
                if priority and priority_before_run:
                    streamer.send_priority_first()
                # from the RUN on the destination's program may run (the record of it is kept)
                streamer.run_sent = True
                conn.sendall(codec.encode(codec.State(state)) + codec.encode(codec.PostcopyListen()) +
                             codec.encode(codec.PostcopyRun()))
                streamer.stats["run_at_seconds"] = round(time.monotonic() - t0, 3)
            except OSError as e:
                raise PeerDisconnected(f"the destination connection failed: {e.strerror or e}") from None
        stats = streamer.run(resume=resume)
    except BaseException as e:
        # the figures so far go with the error (migrate --json prints them with it)
        raise with_stats(streamer.refusal(e), _image_totals(dict(streamer.stats), image, t0)) from None
    return _image_totals(stats, image, t0)


def _image_totals(stats: dict, image: ImageMemory, t0: float) -> dict:
    stats["total_seconds"] = round(time.monotonic() - t0, 3)
    stats["pages"] = sum(b.length // TP for b in image.blocks)
    return stats
