"""The source's page bookkeeping: which pages are still to send, which were sent.

:class:`PageBook` is the one owner of two byte arrays per RAM block, one byte
per target page:

- ``to_send``: 1 = still to send (a requested page, the next background chunk,
  or a page written since it was sent);
- ``sent`` (live sources only): 1 = sent at least once, so the destination
  holds a copy that a later write makes stale (it needs a discard);
- ``hot`` (live sources only): 1 = held back from pre-copy, as a copy sent
  now would most likely be stale before the switch-over: written between the
  last two pre-copy syncs, or written after it was sent.  A page never sent
  goes once a sync finds it quiet; the rest go in post-copy
  (:meth:`PageBook.defer_written`, :meth:`PageBook.undefer`).

Who writes them, and the one rule that makes it safe:

- A page is *claimed* for sending by whoever turns its ``to_send`` byte from
  1 to 0.  Python claims (requested pages, background chunks) go through
  :meth:`PageBook.take` and :meth:`PageBook.next_chunk`, under the book's
  lock.  The native request server (``native/source.c``, ``answer``) claims
  the pages it answers with one atomic exchange per byte and takes no lock.
  So a page may be claimed by both at once and go twice; that is harmless,
  the destination places whichever copy comes first and skips the other
  (UFFDIO_COPY fails with EEXIST on a present page).  For the same reason
  :attr:`PageBook.remaining` over-estimates while the server runs.
- ``sent`` bytes are only ever set to 1 (by both writers).  The scans that
  read the arrays whole (:meth:`PageBook.clean_spans`,
  :meth:`PageBook.stale_runs`) run in the sending thread, the only Python
  writer then, while no native server holds the arrays.
- Setting ``to_send`` bytes back to 1 (:meth:`PageBook.mark_dirty`, after a
  scan of written pages) happens only while no native server holds the
  arrays: pre-copy and the switch-over, never post-copy.  :meth:`PageBook.lend` and
  :meth:`PageBook.returned` bracket the server's run, and ``mark_dirty`` refuses in
  between.
- The arrays are never resized or replaced: the native server holds pointers
  into them.
"""
from __future__ import annotations

import threading

from ..codec.constants import TARGET_PAGE_SIZE as TP

CHUNK_PAGES = 256                # one background chunk: 1 MiB


class PageBook:
    """What is to send and what was sent, per block (``blocks``: codec.BlockInfo).

    Every page starts out to send.  ``track_sent`` keeps the ``sent`` arrays
    (a live source's discards need them).
    """

    def __init__(self, blocks: list, *, track_sent: bool = False):
        self.blocks = blocks
        self._to_send = [bytearray(b"\x01") * (b.length // TP) for b in blocks]
        self._sent = [bytearray(len(t)) for t in self._to_send] if track_sent else None
        self._hot = [bytearray(len(t)) for t in self._to_send] if track_sent else None
        self.remaining = sum(len(t) for t in self._to_send)   # pages to send (an upper bound, see above)
        self.phase_pages = self.remaining   # pages to send when the phase began (see begin_phase)
        self._lock = threading.Lock()
        self._lent = False
        self._block = 0                     # background chunks: the block being walked
        self._cursor = [0] * len(blocks)    # and where each block's walk is
        self._priority: list[tuple[int, int, int]] = []   # runs sent before the walk (see set_priority)
        self._prio = 0                      # the priority run being sent

    # -- claims (any thread) ----------------------------------------------------------
    def take(self, bi: int, first: int, n: int) -> bool:
        """Claim pages [first, first+n) of block ``bi`` (a request); False if none was still to send."""
        with self._lock:
            pending = self._to_send[bi]
            if not any(pending[first:first + n]):
                return False
            pending[first:first + n] = bytes(n)
            if self._sent is not None:
                self._sent[bi][first:first + n] = b"\x01" * n
            self.remaining -= n
            return True

    def set_priority(self, runs: list[tuple[int, int, int]]) -> None:
        """Background chunks go first through ``runs`` (block, first page, count), in that order (a
        replayed working set), then walk the blocks.  A run's pages already sent are skipped."""
        with self._lock:
            self._priority = list(runs)
            self._prio = 0

    def _claim(self, bi: int, first: int, stop: int) -> tuple[int, int, int]:
        pending = self._to_send[bi]
        count = stop - first
        pending[first:stop] = bytes(count)
        if self._sent is not None:
            self._sent[bi][first:stop] = b"\x01" * count
        self.remaining -= count   # the run was all still to send (but see the server above)
        return bi, first, count

    def _next_priority(self) -> tuple[int, int, int] | None:
        """The next chunk of the priority runs still to send (lock held): the rest of the current
        run from its first page still to send, up to the first page sent or one chunk."""
        while self._prio < len(self._priority):
            bi, first, count = self._priority[self._prio]
            pending = self._to_send[bi]
            hp = self.blocks[bi].page_size // TP
            a = pending.find(1, first, first + count)
            if a < 0:
                self._prio += 1
                continue
            a -= a % hp
            end = min(first + count, a + max(CHUNK_PAGES, hp))
            stop = pending.find(0, a, end)
            stop = end if stop < 0 else stop
            stop = a + max(hp, -(-(stop - a) // hp) * hp)
            return self._claim(bi, a, min(stop, len(pending)))
        return None

    def next_priority_chunk(self) -> tuple[int, int, int] | None:
        """Claim the next chunk of the priority runs still to send; None once they are all sent."""
        with self._lock:
            return self._next_priority()

    def next_chunk(self) -> tuple[int, int, int] | None:
        """Claim the next run of pages still to send, at most one chunk and whole (huge) pages of its
        block: (block, first page, count); None when the walk has reached the end.  The priority
        runs (:meth:`set_priority`) come first."""
        with self._lock:
            chunk = self._next_priority()
            if chunk is not None:
                return chunk
            while self._block < len(self.blocks):
                bi = self._block
                pending = self._to_send[bi]
                first = pending.find(1, self._cursor[bi])
                if first < 0:
                    self._block += 1
                    continue
                hp = self.blocks[bi].page_size // TP
                first -= first % hp
                stop = pending.find(0, first, first + max(CHUNK_PAGES, hp))
                if stop < 0:
                    stop = min(len(pending), first + max(CHUNK_PAGES, hp))
                stop = first + max(hp, (stop - first) // hp * hp)
                self._cursor[bi] = stop
                return self._claim(bi, first, stop)
            self.remaining = 0   # (the request server may have taken the last pages)
            return None

    # -- passes (the sending thread, no server running) ---------------------------------
    def rewind(self) -> None:
        """The next background chunk starts again from the first page of the first block."""
        with self._lock:
            self._block = 0
            self._cursor = [0] * len(self.blocks)

    def recount(self) -> int:
        """Count the pages still to send (after :meth:`mark_dirty`); returns :attr:`remaining`."""
        with self._lock:
            self.remaining = sum(t.count(1) for t in self._to_send)
            return self.remaining

    def begin_phase(self) -> None:
        """A phase (a pre-copy pass, post-copy) starts: the pages still to send now are what
        :meth:`phase_progress` counts against."""
        self.phase_pages = self.remaining

    def phase_progress(self, served: int = 0) -> tuple[int, int]:
        """(pages of this phase, of them sent), read without the lock (a display's snapshot);
        ``served``: pages the native request server claimed (they leave ``remaining`` untouched)."""
        total = self.phase_pages
        return total, max(0, min(total, total - self.remaining + served))

    def mark_dirty(self, bi: int, runs: list[tuple[int, int]]) -> None:
        """Pages (first, count) of block ``bi`` written since they were sent go again."""
        with self._lock:
            if self._lent:
                raise RuntimeError("page book: pages marked dirty while the request server runs")
            ts = self._to_send[bi]
            for first, count in runs:
                ts[first:first + count] = b"\x01" * count

    def defer_written(self, bi: int, runs: list[tuple[int, int]]) -> tuple[int, int]:
        """A pre-copy sync of block ``bi``: ``runs`` (first, count) were written since the last one.
        They are hot: held back from pre-copy (not to send; post-copy or a later quiet sync sends
        them).  Pages hot before and not written since have cooled: they go again.  Returns
        (hot pages, cooled pages)."""
        with self._lock:
            if self._lent or self._hot is None:
                raise RuntimeError("page book: pre-copy sync while the request server runs or without track_sent")
            ts, hot, sent = self._to_send[bi], self._hot[bi], self._sent[bi]
            n = len(ts)
            written = bytearray(n)
            for first, count in runs:
                written[first:first + count] = b"\x01" * count
            # one byte per page, 0 or 1: the arrays as integers, combined bitwise
            w, h, t, snt = (int.from_bytes(x, "little") for x in (written, hot, ts, sent))
            ones = int.from_bytes(b"\x01" * n, "little")
            # a page written after it was sent stays held back for the rest of pre-copy: a sync
            # interval is shorter than a large program's round of writes, so a quiet interval does
            # not say it will stay quiet (each page then goes at most once in pre-copy)
            cooled = h & (ones ^ w) & (ones ^ snt)
            hot_now = w | (h & snt)
            ts[:] = ((t & (ones ^ w)) | cooled).to_bytes(n, "little")   # in place (see the module)
            hot[:] = hot_now.to_bytes(n, "little")
            return hot_now.bit_count(), cooled.bit_count()

    def undefer(self) -> int:
        """The switch-over: every page still held back goes in post-copy.  Returns how many."""
        with self._lock:
            if self._hot is None:
                return 0
            held = 0
            for ts, hot in zip(self._to_send, self._hot):
                n = len(ts)
                h = int.from_bytes(hot, "little")
                held += h.bit_count()
                ts[:] = (int.from_bytes(ts, "little") | h).to_bytes(n, "little")
                hot[:] = bytes(n)
            return held

    def from_received(self, bi: int, bitmap: bytes) -> None:
        """After a resume: block ``bi``'s pages go again exactly where the destination's received
        bitmap (RP RECV_BITMAP: little-endian, bit i = target page i is there) has no bit; the
        next background chunk starts from the first page.  Only while no native server runs."""
        with self._lock:
            if self._lent:
                raise RuntimeError("page book: a received bitmap applied while the request server runs")
            ts = self._to_send[bi]
            # bit i of a little-endian bitmap is bit i % 8 of byte i // 8
            missing = b"".join(map(_MISSING.__getitem__, bitmap))
            ts[:] = missing[:len(ts)]       # in place: the native server points into it
            self._block = 0
            self._cursor = [0] * len(self.blocks)
            self._prio = 0                  # what is missing of the priority runs goes first again
            self.remaining = sum(t.count(1) for t in self._to_send)

    def clean_spans(self, bi: int, seg) -> list[tuple[int, int]]:
        """Host ranges of segment ``seg`` (a memory.mappings.Segment) of block ``bi`` whose pages
        are not due to be sent: where a scan for written pages can still find something new."""
        first = seg.offset // TP
        return [(seg.host_addr + (a - first) * TP, seg.host_addr + (e - first) * TP)
                for a, e in _runs(self._to_send[bi], 0, first, (seg.offset + seg.size) // TP)]

    def stale_runs(self, bi: int) -> list[tuple[int, int]]:
        """Runs (first, count) of block ``bi``'s pages both still to send and sent before: the
        destination's copy is stale and must be discarded."""
        if self._sent is None:
            raise RuntimeError("page book: stale runs need track_sent")
        if self._lent:
            raise RuntimeError("page book: stale runs read while the request server runs")
        to_send, sent = self._to_send[bi], self._sent[bi]
        return [(s, t - s) for a, e in _runs(to_send, 1, 0, len(to_send)) for s, t in _runs(sent, 1, a, e)]

    # -- the native request server ----------------------------------------------------
    def arrays(self) -> list[tuple[bytearray, bytearray | None]]:
        """The arrays (to_send, sent or None) per block, for the native server to point into."""
        return [(t, self._sent[bi] if self._sent is not None else None) for bi, t in enumerate(self._to_send)]

    def lend(self) -> None:
        """The native server starts claiming pages in the arrays, by the rule above."""
        with self._lock:
            self._lent = True

    def returned(self) -> None:
        """The native server has stopped: it touches the arrays no more."""
        with self._lock:
            self._lent = False


# per bitmap byte, its 8 pages as to_send bytes: 1 where the bit is clear
_MISSING = [bytes(1 - (v >> k & 1) for k in range(8)) for v in range(256)]


def _runs(flags: bytearray, value: int, lo: int, hi: int):
    """The runs [a, e) of bytes equal to ``value`` (0 or 1) in ``flags[lo:hi]``."""
    other = 1 - value
    pos = lo
    while pos < hi:
        a = flags.find(value, pos, hi)
        if a < 0:
            return
        e = flags.find(other, a, hi)
        e = hi if e < 0 else e
        yield a, e
        pos = e
