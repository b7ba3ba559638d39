"""The messages of the postcopy wire protocol, as plain frozen dataclasses.

Main stream (source -> destination): :class:`Header`, :class:`Blocks`, RAM
records (:class:`RamPage`, :class:`RamZero`, :class:`RamEnd`), :class:`State`,
the commands, :class:`Eof`, and :class:`MigrationId`; a preempt channel starts with
:class:`PreemptChannel`.  Return path (destination -> source):
:class:`Shut`, :class:`Pong`, :class:`ReqPagesId`, :class:`ReqPages`,
:class:`RecvBitmap`, :class:`ResumeAck`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .constants import MIGRATION_ID_LENGTH, TARGET_PAGE_SIZE, VERSION


# ---- main stream -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Header:
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class BlockInfo:
    name: str
    length: int
    page_size: int = TARGET_PAGE_SIZE

    @property
    def npages(self) -> int:
        """Number of target (4096-byte) pages in the block."""
        return self.length // TARGET_PAGE_SIZE


@dataclass(frozen=True, slots=True)
class Blocks:
    blocks: tuple[BlockInfo, ...]


@dataclass(frozen=True, slots=True)
class RamPage:
    """A PAGE record: ``data`` is the 4096 bytes of the page at ``offset`` in ``block``.

    When produced by :class:`~postcopy_cli.codec.StreamDecoder`, ``data`` is a
    memoryview into the decoder's buffer.  It is only guaranteed valid until the
    next ``feed()``: copy (``bytes(ev.data)``) whatever you keep.
    """

    block: str
    offset: int
    data: Any

    def __eq__(self, other):  # memoryview vs bytes compare by content
        if not isinstance(other, RamPage):
            return NotImplemented
        return self.block == other.block and self.offset == other.offset and bytes(self.data) == bytes(other.data)


@dataclass(frozen=True, slots=True)
class RamZero:
    """A ZERO record: the page at ``offset`` is all zeros.

    The record carries one byte after its header, QEMU's old "fill" byte; it
    must be 0 (QEMU's ram_load refuses a zero page with any other value).
    """

    block: str
    offset: int


@dataclass(frozen=True, slots=True)
class RamEnd:
    """The EOS record that closes a RAM section."""


@dataclass(frozen=True, slots=True)
class State:
    data: bytes


@dataclass(frozen=True, slots=True)
class OpenReturnPath:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    value: int


@dataclass(frozen=True, slots=True)
class PostcopyAdvise:
    page_size_summary: int
    target_page_size: int = TARGET_PAGE_SIZE


@dataclass(frozen=True, slots=True)
class PostcopyListen:
    pass


@dataclass(frozen=True, slots=True)
class PostcopyRun:
    pass


@dataclass(frozen=True, slots=True)
class PostcopyRamDiscard:
    """Discard ``ranges`` = ((start, length), ...) of ``block``, both in bytes."""

    block: str
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class PostcopyResume:
    pass


@dataclass(frozen=True, slots=True)
class RecvBitmapRequest:
    block: str


@dataclass(frozen=True, slots=True)
class Eof:
    pass


@dataclass(frozen=True, slots=True)
class MigrationId:
    """The ID section, right after BLOCKS: the migration's 16 random bytes and the number of
    preempt channels (0 or 1) the source will open.  A stream without one has id zero and no
    preempt channel (:data:`NO_MIGRATION_ID`)."""

    id: bytes
    preempt_channels: int = 0


#: What a stream that sends no ID section stands for.
NO_MIGRATION_ID = MigrationId(bytes(MIGRATION_ID_LENGTH), 0)


@dataclass(frozen=True, slots=True)
class PreemptChannel:
    """Marks a connection as the preempt channel of the migration whose ID section carries ``id``."""

    id: bytes


@dataclass(frozen=True, slots=True)
class Resume:
    """Marks a connection as the new main stream of the paused migration whose ID section carried ``id``."""

    id: bytes


# ---- return path -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Shut:
    status: int


@dataclass(frozen=True, slots=True)
class Pong:
    value: int


@dataclass(frozen=True, slots=True)
class ReqPagesId:
    """A page request: ``length`` bytes at ``start`` in ``block``.

    The decoder emits this for both REQ_PAGES_ID and REQ_PAGES (the latter with
    the block of the previous REQ_PAGES_ID filled in).
    """

    block: str
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class ReqPages:
    """REQ_PAGES: same block as the last request (encode side only)."""

    start: int
    length: int


@dataclass(frozen=True, slots=True)
class RecvBitmap:
    """The destination's received-pages bitmap of ``block`` (little-endian, one bit per target page).

    Encoded padded with zeros to a multiple of 8 bytes; decoded as sent (padded).
    """

    block: str
    bitmap: bytes


@dataclass(frozen=True, slots=True)
class ResumeAck:
    value: int = 1


