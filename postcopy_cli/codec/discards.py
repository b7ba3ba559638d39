"""Dirty pages -> POSTCOPY_RAM_DISCARD commands (the send-discards library).

Pages are numbered in units of ``page_size`` (the 4096-byte target page by
default).  Runs are ``(first_page, count)``.  A bitmap is little-endian: bit i
of byte i//8 is page i (the RECV_BITMAP layout without its header/trailer).

:class:`DiscardEncoder` turns runs into commands byte-identical to QEMU's
``qemu_savevm_send_postcopy_ram_discard``; the source engine uses it at
switch-over.  For big bitmaps, :meth:`DiscardEncoder.encoded_from_bitmap` does
the run finding and packing in native code (``native/bitmap.c``) and streams
the output in chunks, so memory stays proportional to the bitmap.  The pure
Python functions are the reference the native path is tested against.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from .constants import MAX_DISCARDS_PER_COMMAND, TARGET_PAGE_SIZE
from .encode import encode, encode_name
from .messages import PostcopyRamDiscard
from ..errors import LocalProtocolError, UsageError

try:  # the optional fast path
    from .._native import ffi as _ffi, lib as _lib
    _HAVE_NATIVE = hasattr(_lib, "pc_discard_encode")
except ImportError:  # pragma: no cover - native part not built
    _ffi = _lib = None
    _HAVE_NATIVE = False

#: Most ranges one command can hold with a 255-byte name (u16 payload length).
MAX_RANGES_LIMIT = (0xFFFF - 3 - 255) // 16

_RUN_BATCH = 65536


# ---- runs --------------------------------------------------------------------

def _window(bitmap, first_page: int, npages: int | None) -> tuple[int, int]:
    total = len(bitmap) * 8
    if first_page < 0:
        raise ValueError("first_page must be >= 0")
    end = total if npages is None else first_page + npages
    if npages is not None and npages < 0:
        raise ValueError("npages must be >= 0")
    if end > total:
        raise ValueError(f"pages {first_page}..{end - 1} go beyond the {total}-bit bitmap")
    return first_page, end


def page_runs_py(bitmap, first_page: int = 0, npages: int | None = None) -> Iterator[tuple[int, int]]:
    """Reference implementation of :func:`page_runs` (pure Python)."""
    start, end = _window(bitmap, first_page, npages)
    data = bytes(bitmap)
    run_start = None
    p = start
    while p < end:
        byte = data[p >> 3]
        if (p & 7) == 0 and end - p >= 8 and byte in (0, 0xFF):
            if byte == 0:
                if run_start is not None:
                    yield run_start, p - run_start
                    run_start = None
            elif run_start is None:
                run_start = p
            p += 8
            continue
        if byte >> (p & 7) & 1:
            if run_start is None:
                run_start = p
        elif run_start is not None:
            yield run_start, p - run_start
            run_start = None
        p += 1
    if run_start is not None:
        yield run_start, end - run_start


def page_runs(bitmap, first_page: int = 0, npages: int | None = None) -> Iterator[tuple[int, int]]:
    """Yield the runs ``(first_page, count)`` of set bits in pages [first_page, first_page+npages).

    ``npages`` defaults to the rest of the bitmap.  Streams: never builds the
    whole list (native batches of 64 Ki runs when the native part is built).
    """
    if not _HAVE_NATIVE:
        yield from page_runs_py(bitmap, first_page, npages)
        return
    start, end = _window(bitmap, first_page, npages)
    src = _ffi.from_buffer("uint8_t[]", bitmap)
    pos = _ffi.new("uint64_t *", start)
    starts = _ffi.new("uint64_t[]", _RUN_BATCH)
    lens = _ffi.new("uint64_t[]", _RUN_BATCH)
    while True:
        n = _lib.pc_bitmap_runs(src, end, pos, starts, lens, _RUN_BATCH)
        if n:
            s = _ffi.unpack(starts, n)
            ln = _ffi.unpack(lens, n)
            yield from zip(s, ln)
        if n < _RUN_BATCH:
            return


_ITEM = re.compile(r"^\s*(\d+|0x[0-9a-fA-F]+)\s*(?:-\s*(\d+|0x[0-9a-fA-F]+)\s*)?$")


def parse_page_list(text: str) -> list[tuple[int, int]]:
    """Parse ``"3,7-9,0x20-0x2f"`` (pages and inclusive ranges) into sorted, merged runs.

    Raises :class:`~postcopy_cli.errors.UsageError` naming the bad item.
    """
    items = [t for t in text.split(",")]
    if not text.strip():
        raise UsageError("page list is empty")
    spans = []
    for item in items:
        m = _ITEM.match(item)
        if not m:
            raise UsageError(f"bad page list item {item.strip()!r} (expected N or N-M, e.g. 3,7-9)")
        lo = int(m.group(1), 0)
        hi = int(m.group(2), 0) if m.group(2) else lo
        if hi < lo:
            raise UsageError(f"bad page list item {item.strip()!r}: range end is before its start")
        spans.append((lo, hi + 1))
    spans.sort()
    runs: list[list[int]] = []
    for lo, hi in spans:
        if runs and lo <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], hi)
        else:
            runs.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in runs]


# ---- commands ----------------------------------------------------------------

@dataclass
class DiscardStats:
    """What an encoder has produced so far."""

    pages: int = 0
    ranges: int = 0
    commands: int = 0
    bytes: int = 0


class DiscardEncoder:
    """Runs of dirty pages of one block -> POSTCOPY_RAM_DISCARD commands.

    Ranges are sent in bytes (``page * page_size``), at most
    ``max_per_command`` per command (QEMU's MAX_DISCARDS_PER_COMMAND, 12).
    ``stats`` accumulates pages/ranges/commands/bytes over all calls.
    """

    def __init__(self, block: str, *, page_size: int = TARGET_PAGE_SIZE,
                 max_per_command: int = MAX_DISCARDS_PER_COMMAND) -> None:
        self._raw = encode_name(block)
        if page_size < TARGET_PAGE_SIZE or page_size & (page_size - 1):
            raise LocalProtocolError(f"page size {page_size} is not a power of two >= {TARGET_PAGE_SIZE}")
        if not 1 <= max_per_command <= MAX_RANGES_LIMIT:
            raise LocalProtocolError(f"max ranges per command must be 1..{MAX_RANGES_LIMIT}, got {max_per_command}")
        self.block = block
        self.page_size = page_size
        self.max_per_command = max_per_command
        self.stats = DiscardStats()

    def commands(self, runs: Iterable[tuple[int, int]]) -> Iterator[PostcopyRamDiscard]:
        """Group runs (first_page, count) into commands; counts of 0 are skipped."""
        ps = self.page_size
        batch: list[tuple[int, int]] = []
        st = self.stats
        for first, count in runs:
            if count <= 0:
                continue
            if first < 0:
                raise LocalProtocolError(f"negative page number {first}")
            batch.append((first * ps, count * ps))
            st.pages += count
            if len(batch) == self.max_per_command:
                st.ranges += len(batch)
                st.commands += 1
                yield PostcopyRamDiscard(self.block, tuple(batch))
                batch = []
        if batch:
            st.ranges += len(batch)
            st.commands += 1
            yield PostcopyRamDiscard(self.block, tuple(batch))

    def encoded(self, runs: Iterable[tuple[int, int]]) -> Iterator[bytes]:
        """Each command as its full encoded COMMAND section."""
        for cmd in self.commands(runs):
            data = encode(cmd)
            self.stats.bytes += len(data)
            yield data

    def encoded_from_bitmap(self, bitmap, first_page: int = 0, npages: int | None = None, *,
                            chunk_size: int = 1 << 20, native: bool | None = None) -> Iterator[bytes]:
        """The commands for the set bits of ``bitmap``, as chunks of concatenated COMMAND sections.

        Chunks end on command boundaries.  Uses the native packer when built
        (``native=False`` forces the pure-Python reference path).
        """
        if native is None:
            native = _HAVE_NATIVE
        if not native:
            parts: list[bytes] = []
            size = 0
            for data in self.encoded(page_runs_py(bitmap, first_page, npages)):
                parts.append(data)
                size += len(data)
                if size >= chunk_size:
                    yield b"".join(parts)
                    parts, size = [], 0
            if parts:
                yield b"".join(parts)
            return
        start, end = _window(bitmap, first_page, npages)
        full = 8 + len(self._raw) + 16 * self.max_per_command
        cap = max(chunk_size, full)
        src = _ffi.from_buffer("uint8_t[]", bitmap)
        pos = _ffi.new("uint64_t *", start)
        out = _ffi.new("uint8_t[]", cap)
        stats = _ffi.new("uint64_t[3]")
        name = _ffi.from_buffer("uint8_t[]", self._raw)
        st = self.stats
        base = (st.ranges, st.pages, st.commands)
        while True:
            n = _lib.pc_discard_encode(src, end, pos, name, len(self._raw), self.page_size, self.max_per_command,
                                       out, cap, stats)
            if not n:
                break
            st.bytes += n
            st.ranges, st.pages, st.commands = base[0] + stats[0], base[1] + stats[1], base[2] + stats[2]
            yield _ffi.buffer(out, n)[:]


def discard_commands(block: str, runs: Iterable[tuple[int, int]], **kw) -> list[PostcopyRamDiscard]:
    """Convenience: all commands for ``runs`` as a list (small inputs)."""
    return list(DiscardEncoder(block, **kw).commands(runs))
