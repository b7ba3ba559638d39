"""The working-set file: the pages a restored program faulted on, in order of first fault.

``serve-dest --record-workset FILE`` writes one; ``migrate --image IMG --workset FILE`` sends its
pages first (DESIGN.md section 10).  Format version 1, all integers big-endian::

    header   4 bytes  magic "PCWS"
             be16     version (1)
             be16     flags (0; a reader refuses any other value)
             be64     image size: the sum of the block lengths, in bytes
             be16     block count (1..256)
    blocks   per block:
             u8       name length (1..255), then the name (UTF-8, no NUL)
             be64     length in bytes (a multiple of the page size)
             be64     page size in bytes (a power of two, at least 4096)
             be32     run count
    runs     per block, in block order, that block's runs in order of first fault:
             be64     first page, in units of the block's page size
             be32     page count (at least 1; first + count within the block)
             be64     first fault of the run's first page, microseconds after RUN
                      (0 for a fault read before RUN)
    trailer  be32     CRC-32 (zlib.crc32) of every byte before it

A run is pages faulted on one after the other at consecutive addresses; each page appears once
in a file.  Every length, count, name and the checksum are checked on load: a short, long or
corrupt file is a :class:`WorksetError` naming what and where.
"""
from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from .constants import TARGET_PAGE_SIZE as TP

MAGIC = b"PCWS"
VERSION = 1
MAX_BLOCKS = 256

_HEAD = struct.Struct(">4sHHQH")
_BLOCK = struct.Struct(">QQI")
_RUN = struct.Struct(">QIQ")
_CRC = struct.Struct(">I")


class WorksetError(ValueError):
    """A working-set file that cannot be read or does not fit (the message names what and where)."""


@dataclass(frozen=True)
class WorksetBlock:
    name: str
    length: int          # bytes
    page_size: int       # bytes: the unit of the runs
    runs: tuple          # (first page, count, first fault us) in order of first fault

    @property
    def pages(self) -> int:
        return sum(c for _, c, _ in self.runs)


@dataclass(frozen=True)
class Workset:
    blocks: tuple        # WorksetBlock, in the destination's block order

    @property
    def image_size(self) -> int:
        return sum(b.length for b in self.blocks)

    @property
    def pages(self) -> int:
        """Host pages (of each block's page size) in the working set."""
        return sum(b.pages for b in self.blocks)

    @property
    def runs(self) -> int:
        return sum(len(b.runs) for b in self.blocks)

    def in_fault_order(self):
        """Every run of every block as (block name, first page, count, us), ordered by first fault
        (stable: a block's runs keep their order)."""
        out = [(b.name, first, count, us) for b in self.blocks for first, count, us in b.runs]
        out.sort(key=lambda r: r[3])
        return out


def runs_of(pages, times_us) -> tuple:
    """Runs (first, count, us) from pages in order of first fault (``times_us`` the same length):
    a run goes on while each page is the one after the previous."""
    runs = []
    first = prev = None
    t0 = 0
    for p, t in zip(pages, times_us):
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if first is not None:
            runs.append((first, prev - first + 1, t0))
        first = prev = p
        t0 = t
    if first is not None:
        runs.append((first, prev - first + 1, t0))
    return tuple(runs)


def encode(ws: Workset) -> bytes:
    if not 1 <= len(ws.blocks) <= MAX_BLOCKS:
        raise WorksetError(f"a workset has 1 to {MAX_BLOCKS} blocks, not {len(ws.blocks)}")
    parts = [_HEAD.pack(MAGIC, VERSION, 0, ws.image_size, len(ws.blocks))]
    for b in ws.blocks:
        name = b.name.encode()
        parts += [bytes([len(name)]), name, _BLOCK.pack(b.length, b.page_size, len(b.runs))]
    for b in ws.blocks:
        parts += [_RUN.pack(first, count, max(0, int(us))) for first, count, us in b.runs]
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def decode(data: bytes, *, where: str = "workset") -> Workset:
    """The workset in ``data``; WorksetError naming the byte offset of what is wrong."""
    def short(what: str, at: int, need: int):
        raise WorksetError(f"{where}: truncated: {what} at byte {at} needs {need} bytes, the file has "
                           f"{len(data)}")

    if len(data) < _HEAD.size:
        short("the header", 0, _HEAD.size)
    magic, version, flags, image_size, nblocks = _HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise WorksetError(f"{where}: not a workset file (magic {magic!r} at byte 0, expected {MAGIC!r})")
    if version != VERSION:
        raise WorksetError(f"{where}: format version {version} (at byte 4); this postcopy reads version {VERSION}")
    if flags:
        raise WorksetError(f"{where}: unknown flags {flags:#x} at byte 6")
    if not 1 <= nblocks <= MAX_BLOCKS:
        raise WorksetError(f"{where}: block count {nblocks} at byte 16 (1 to {MAX_BLOCKS})")
    pos = _HEAD.size
    heads = []
    names = set()
    for i in range(nblocks):
        if pos >= len(data):
            short(f"block {i}'s name length", pos, 1)
        n = data[pos]
        if n == 0:
            raise WorksetError(f"{where}: block {i} has an empty name (byte {pos})")
        if pos + 1 + n + _BLOCK.size > len(data):
            short(f"block {i}'s name and sizes", pos, 1 + n + _BLOCK.size)
        try:
            name = data[pos + 1:pos + 1 + n].decode()
        except UnicodeDecodeError:
            raise WorksetError(f"{where}: block {i}'s name at byte {pos + 1} is not UTF-8") from None
        if "\0" in name or name in names:
            raise WorksetError(f"{where}: block {i}'s name {name!r} at byte {pos + 1} is "
                               f"{'repeated' if name in names else 'not a block name'}")
        names.add(name)
        length, page_size, nruns = _BLOCK.unpack_from(data, pos + 1 + n)
        at = pos + 1 + n
        if page_size < TP or page_size & (page_size - 1):
            raise WorksetError(f"{where}: block {name!r}: page size {page_size} at byte {at + 8} is not a power of "
                               f"two of at least {TP}")
        if length == 0 or length % page_size:
            raise WorksetError(f"{where}: block {name!r}: length {length} at byte {at} is not a positive multiple "
                               f"of its page size {page_size}")
        if nruns > length // page_size:
            raise WorksetError(f"{where}: block {name!r}: {nruns} runs (byte {at + 16}) in a block of "
                               f"{length // page_size} pages")
        heads.append((name, length, page_size, nruns))
        pos = at + _BLOCK.size
    if sum(h[1] for h in heads) != image_size:
        raise WorksetError(f"{where}: image size {image_size} (byte 8) is not the sum of the block lengths "
                           f"{sum(h[1] for h in heads)}")
    need = pos + sum(h[3] for h in heads) * _RUN.size + _CRC.size
    if len(data) < need:
        short("the runs and checksum", pos, need - pos)
    if len(data) > need:
        raise WorksetError(f"{where}: {len(data) - need} bytes after the checksum at byte {need - _CRC.size}")
    (crc,) = _CRC.unpack_from(data, need - _CRC.size)
    if zlib.crc32(memoryview(data)[:need - _CRC.size]) != crc:
        raise WorksetError(f"{where}: checksum mismatch (byte {need - _CRC.size}): the file is corrupt")
    blocks = []
    for name, length, page_size, nruns in heads:
        pages = length // page_size
        runs = tuple(_RUN.iter_unpack(data[pos:pos + nruns * _RUN.size]))
        for k, (first, count, _) in enumerate(runs):
            if count == 0 or first + count > pages:
                raise WorksetError(f"{where}: block {name!r}: run {k} (byte {pos + k * _RUN.size}) covers pages "
                                   f"{first}+{count} of a block of {pages}")
        blocks.append(WorksetBlock(name, length, page_size, runs))
        pos += nruns * _RUN.size
    return Workset(tuple(blocks))


def load(path: str, *, where: str | None = None) -> Workset:
    """The workset in file ``path``; errors name it as ``where`` (default "workset PATH")."""
    where = where or f"workset {path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise WorksetError(f"{where}: {e.strerror}") from None
    return decode(data, where=where)


def save(path: str, ws: Workset) -> None:
    """Written whole or not at all (a temporary file renamed over ``path``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(encode(ws))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_fits(ws: Workset, blocks, *, where: str) -> None:
    """``ws`` was recorded for memory laid out as ``blocks`` (codec.BlockInfo: name, length, page size)."""
    mine = {b.name: b for b in blocks}
    for b in ws.blocks:
        m = mine.get(b.name)
        if m is None:
            raise WorksetError(f"{where}: block {b.name!r} is not in the image (its blocks: "
                               f"{', '.join(sorted(mine))})")
        if m.page_size != b.page_size:
            raise WorksetError(f"{where}: block {b.name!r} was recorded in pages of {b.page_size} bytes, the image "
                               f"is served in pages of {m.page_size}")
        if m.length != b.length:
            raise WorksetError(f"{where}: block {b.name!r} was recorded with {b.length} bytes, the image's is "
                               f"{m.length} bytes")


def priority_runs(worksets, blocks, *, gap: int = 16, most: int = 256) -> list[tuple[int, int, int]]:
    """The replay order of ``worksets`` (each checked with :func:`check_fits`) for ``blocks``: runs
    (block index, first target page, count) by first fault time across all files, each page once.
    Runs that follow one another in order and sit at most ``gap`` target pages apart are sent as one
    (up to ``most`` pages): a few pages more on the wire cost less than another chunk."""
    index = {b.name: i for i, b in enumerate(blocks)}
    merged = []
    for ws in worksets:
        for name, first, count, us in ws.in_fault_order():
            hp = next(b.page_size for b in ws.blocks if b.name == name) // TP
            merged.append((us, index[name], first * hp, count * hp))
    merged.sort(key=lambda r: r[0])   # stable: a file's order, files in the order given
    seen = [bytearray(b.length // TP) for b in blocks]
    out: list[list[int]] = []
    for _, bi, first, count in merged:
        s = seen[bi]
        pos, end = first, first + count
        while pos < end:   # the parts of this run no earlier run covered
            a = s.find(0, pos, end)
            if a < 0:
                break
            e = s.find(1, a, end)
            e = end if e < 0 else e
            s[a:e] = b"\x01" * (e - a)
            last = out[-1] if out else None
            if last is not None and last[0] == bi and last[1] <= a and a - (last[1] + last[2]) <= gap \
                    and e - last[1] <= most:
                last[2] = max(last[2], e - last[1])
            else:
                out.append([bi, a, e - a])
            pos = e
    return [tuple(r) for r in out]
