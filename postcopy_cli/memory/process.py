"""An attached program's memory, read with process_vm_readv(2) (native, GIL released)."""
from __future__ import annotations


from .. import codec
from .._native import ffi, lib
from ..errors import PostcopyError
from ..codec.constants import TARGET_PAGE_SIZE as TP
from ..uffd import native_error
from .mappings import RamBlock

READ_CHUNK_PAGES = 256


class ProcessMemory:
    """The attached program's RAM blocks, read with process_vm_readv (native, GIL released)."""

    def __init__(self, pid: int, blocks: list[RamBlock]):
        self.pid = pid
        self.ram_blocks = blocks
        self.blocks = [codec.BlockInfo(b.name, b.length, b.page_size) for b in blocks]
        # one buffer per sending thread (background, requests)
        self._bufs = [ffi.new("uint8_t[]", READ_CHUNK_PAGES * TP) for _ in range(2)]

    data_end = None   # every page of every block is the program's

    def base(self, block: int):
        return ffi.NULL   # not in our memory: read from the program

    def segments(self, block: int) -> list[tuple[int, int, int]]:
        return [(s.offset, s.host_addr, s.size) for s in self.ram_blocks[block].segments]

    def pages(self, block: int, offset: int, count: int, slot: int = 0):
        """Pointer to ``count`` target pages read from the program (valid until the next call for ``slot``).

        The native request server reads with its own buffer."""
        if count > READ_CHUNK_PAGES:
            raise ValueError(f"read at most {READ_CHUNK_PAGES} pages at a time")
        b = self.ram_blocks[block]
        buf = self._bufs[slot]
        done, total = 0, count * TP
        while done < total:
            addr, room = b.host_span(offset + done)
            want = min(room, total - done)
            if addr is None:   # a hole no region maps: zeros
                ffi.memmove(buf + done, bytes(want), want)
            else:
                n = lib.pc_proc_read(self.pid, addr, buf + done, want)
                if n < 0:
                    raise native_error(n, f"reading {want} bytes at {addr:#x} of pid {self.pid}", PostcopyError)
                if n < want:
                    raise PostcopyError(f"reading {want} bytes at {addr:#x} of pid {self.pid}: short read ({n})")
            done += want
        return buf

    def close(self):
        pass
