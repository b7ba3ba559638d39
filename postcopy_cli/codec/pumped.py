"""The hand-over between a decoder and a native fast path that shares its byte stream.

Two native loops consume the bulk of a stream themselves, with the GIL
released: the destination's pump (``native/dest_pump.c``: runs of
PAGE|CONTINUE and ZERO|CONTINUE records of a RAM section) and the source's
request server (``native/source.c``: REQ_PAGES(_ID) messages of the return
path).  Each stops at the first item it does not take and hands the rest back
to the codec, which decodes it and names any error.  :class:`PumpedDecoder`
is the one place where bytes and state cross between the two; nothing else
touches the decoder's buffers.

The rule (the whole lock discipline): every byte fed and not yet consumed is
in exactly one place, either in the decoder or in :attr:`PumpedDecoder.buffer`
``[span[0]:span[1]]`` while it is *lent* to the native side.  :meth:`lend`
moves the decoder's bytes into the buffer (and lends the state the native side
needs: the block); :meth:`take_back` moves what the native side stopped at
back into the decoder and advances the stream offset by what it consumed.
While lent, the decoder may not be fed or asked for events and Python may not
receive into the buffer (each raises ``RuntimeError``): the buffer is the
native side's.  A PumpedDecoder has no lock: it belongs to one thread at a
time, the channel's receiving thread, and passes between threads only across
a thread's start or join.

The bugs this shape rules out: bytes moved into the receive buffer for a pump
that then did not run, so the next receive overwrote them (commit fb7d9fe);
and a pump lent the bytes again at an item it had just refused, before the
codec had the rest of that item (a named record cut by the receive): the pump
stops at once without receiving and the two hand the same bytes back and
forth for ever.  After a stop (``take_back(..., stopped=True)``) :meth:`lend`
refuses until the codec has consumed that item, so the Python side receives
the rest of it.  (The source's server needs no such rule: it receives before
it parses again, ``need_more``.)
"""
from __future__ import annotations

from array import array
from typing import Callable, Iterator, Union

from .decode import ReturnPathDecoder, StreamDecoder, _P_RAM

_Decoder = Union[StreamDecoder, ReturnPathDecoder]


class PumpedDecoder:
    """``decoder`` plus the receive buffer it shares with a native fast path.

    ``buffer``: a writable buffer the native side reads (and, for the pump,
    receives into), or an int: a new ``bytearray`` of that size.
    """

    def __init__(self, decoder: _Decoder, buffer: object) -> None:
        self.decoder = decoder
        self._owned = bytearray(buffer) if isinstance(buffer, int) else buffer
        #: The bytes shared with the native side.
        self.buffer = memoryview(self._owned).cast("B")
        #: [start, end) of the bytes lent to the native side within :attr:`buffer` (a uint64_t[2] the
        #: native side may move in place as it consumes and receives).
        self.span = array("Q", [0, 0])
        self._lent = False
        self._stopped_at = -1   # stream offset of an item the native side refused, until the codec takes it

    # -- the state the native side needs ------------------------------------
    @property
    def lent(self) -> bool:
        """True while the bytes not yet decoded are the native side's."""
        return self._lent

    @property
    def block(self) -> str | None:
        """The block the native side continues with.

        Main stream: the block a CONTINUE record belongs to here, or None (outside a RAM section, before
        its first named record, or after an error): the native pump may take over only where it is not
        None.  Return path: the block a REQ_PAGES refers to (that of the last REQ_PAGES_ID), or None.
        """
        d = self.decoder
        if type(d) is StreamDecoder:
            return d._cur_name if d._phase == _P_RAM and d._error is None else None
        return d._last_block.name if d._last_block is not None else None

    @property
    def undecoded(self) -> int:
        """Bytes received and not consumed yet, wherever they are (decoder or lent)."""
        return self.span[1] - self.span[0] if self._lent else self.decoder.buffered

    # -- the Python side ------------------------------------------------------
    def _not_lent(self, what: str) -> None:
        if self._lent:
            raise RuntimeError(f"{what} while the undecoded bytes are lent to the native side")

    def feed(self, data) -> None:
        """Bytes for the decoder (not while lent)."""
        self._not_lent("feed")
        self.decoder.feed(data)

    def receive(self, recv_into: Callable[[memoryview], int]) -> int:
        """``recv_into(view)`` into the buffer, then feed what it received to the decoder; returns that count.
        Not while lent: the buffer holds the native side's bytes then."""
        self._not_lent("receive")
        n = recv_into(self.buffer)
        if n:
            self.decoder.feed(self.buffer[:n])   # copied by feed: the buffer is reused
        return n

    def events(self) -> Iterator:
        """The decoder's events (not while lent)."""
        self._not_lent("events")
        return self.decoder.events()

    # -- the hand-over --------------------------------------------------------
    def lend(self) -> int | None:
        """Move every byte the decoder holds undecoded to ``buffer[0:n]`` for the native side; returns ``n``.

        None, and nothing moves, if they do not fit in the buffer, or on the main stream where the native
        pump cannot go on (:attr:`block` is None).  The caller decides whether the native side runs for
        the block at all (the pump takes only blocks of target-page size); it lends only if it does.
        """
        self._not_lent("lend")
        d = self.decoder
        if type(d) is StreamDecoder and self.block is None:
            return None
        if d.offset == self._stopped_at and d.buffered:
            return None   # the native side stops here again: the codec needs the rest of this item first
        n = d.buffered
        if n > len(self.buffer):
            return None
        pos = 0
        if len(d._buf) > d._pos:
            part = d._mv[d._pos:]
            self.buffer[:len(part)] = part
            pos = len(part)
        for c in d._chunks:
            self.buffer[pos:pos + len(c)] = c
            pos += len(c)
        # the stream offset stays where it is: the lent bytes are not consumed
        d._base += d._pos
        d._buf = b""
        d._mv = memoryview(b"")
        d._pos = 0
        d._chunks.clear()
        d._pending = 0
        self.span[0], self.span[1] = 0, n
        self._lent = True
        return n

    def take_back(self, consumed: int, *, stopped: bool = False, end: int | None = None,
                  block: str | None = None) -> None:
        """The native side consumed ``consumed`` bytes of whole items; the rest, ``buffer[span[0]:span[1]]``,
        goes back to the decoder, before anything fed later.

        ``stopped``: the native side stopped at the first of those bytes, an item it does not take (not
        merely at the end of its data): it is not lent those bytes again before the codec has consumed
        that item.

        ``end``: for a native side that keeps its bytes at the start of the buffer and counts only their
        length, that length (span becomes [0, end)).  ``block``: the return path's REQ_PAGES block after
        the requests the native side decoded (the main stream's block does not change: the pump takes only
        CONTINUE records).
        """
        if not self._lent:
            raise RuntimeError("take_back without lend")
        if end is not None:
            self.span[0], self.span[1] = 0, end
        start, stop = self.span
        d = self.decoder
        d._base += consumed
        self._stopped_at = d.offset if stopped and stop > start else -1
        if type(d) is ReturnPathDecoder:
            d._last_block = d.blocks[block] if block is not None else None
        self._lent = False
        self.span[0] = self.span[1] = 0
        if stop > start:
            d.feed(self.buffer[start:stop])
