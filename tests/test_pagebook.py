"""The source's page bookkeeping (source/pages.py PageBook) and its bandwidth cap (source/bandwidth.py,
native pc_cap_ahead), in this process: no subprocess.  The request-server cases run the native server
on real socket pairs over an image file."""
import contextlib
import socket
import threading
import time

import pytest

from conftest import write_image
from postcopy_cli import codec
from postcopy_cli._native import ffi, lib
from postcopy_cli.codec.discards import DiscardEncoder
from postcopy_cli.source.bandwidth import BandwidthCap
from postcopy_cli.source.image import ImageMemory
from postcopy_cli.source.pages import CHUNK_PAGES, PageBook
from postcopy_cli.source.requests import RequestServer
from postcopy_cli.source.streamer import Lane

TP = 4096


def book_of(*pages: int, huge: int = 1, track_sent: bool = True) -> PageBook:
    blocks = [codec.BlockInfo(f"b{i}", n * TP, huge * TP) for i, n in enumerate(pages)]
    return PageBook(blocks, track_sent=track_sent)


def to_send(book, bi):
    return bytes(book.arrays()[bi][0])


def sent(book, bi):
    return bytes(book.arrays()[bi][1])


def drain(book) -> list[tuple[int, int, int]]:
    chunks = []
    while (c := book.next_chunk()) is not None:
        chunks.append(c)
    return chunks


def test_a_new_book_has_every_page_to_send_and_none_sent():
    book = book_of(10, 3)
    assert book.remaining == 13
    assert to_send(book, 0) == b"\x01" * 10 and to_send(book, 1) == b"\x01" * 3
    assert sent(book, 0) == bytes(10)
    assert book_of(4, track_sent=False).arrays()[0][1] is None


def test_background_chunks_walk_every_block_in_chunks_then_end():
    book = book_of(CHUNK_PAGES + 5, 7)
    assert drain(book) == [(0, 0, CHUNK_PAGES), (0, CHUNK_PAGES, 5), (1, 0, 7)]
    assert book.remaining == 0
    assert to_send(book, 0) == bytes(CHUNK_PAGES + 5) and sent(book, 1) == b"\x01" * 7
    assert book.next_chunk() is None


def test_chunks_are_whole_huge_pages():
    book = book_of(8, huge=4)   # two 16 KiB pages
    assert book.take(0, 5, 1)   # a request for one target page of the second huge page
    # the walk rounds down to the huge page and sends it whole
    assert drain(book) == [(0, 0, 4), (0, 4, 4)]


def test_requested_pages_are_claimed_once_and_skipped_by_the_walk():
    book = book_of(20)
    assert book.take(0, 4, 3)
    assert book.remaining == 17
    assert not book.take(0, 4, 3)          # already claimed: a request for pages sent already
    assert book.take(0, 3, 2)              # partly claimed still claims the rest
    assert sent(book, 0)[3:7] == b"\x01" * 4
    assert drain(book) == [(0, 0, 3), (0, 7, 13)]


def test_dirty_pages_go_again_after_rewind_and_recount():
    book = book_of(16)
    drain(book)
    book.mark_dirty(0, [(2, 3), (10, 1)])
    assert book.recount() == 4
    assert book.next_chunk() is None       # the walk is at the end until rewound
    book.rewind()
    assert drain(book) == [(0, 2, 3), (0, 10, 1)]


def test_stale_runs_are_the_pages_sent_before_and_dirty_again():
    book = book_of(32)
    assert book.take(0, 0, 8)                                    # sent
    book.mark_dirty(0, [(2, 2), (6, 4), (20, 3)])                # 6..9 straddles sent/never sent
    assert book.stale_runs(0) == [(2, 2), (6, 2)]                # 20..22 was never sent: nothing stale
    runs = book.stale_runs(0)
    # discarded on the destination, then sent again in post-copy
    assert DiscardEncoder("b0").encoded(runs)
    assert book.recount() == 32 - 8 + 2 + 2
    assert book_of(4).stale_runs(0) == []


def test_pages_written_between_syncs_are_held_back_until_quiet():
    """Pre-copy syncs (defer_written): a page written since the last sync is held back (not to send) whether
    or not it was sent; one never sent, held back and quiet for a sync goes again, one sent before stays held
    back; the switch-over (undefer) sends every page still held back, those sent before are stale."""
    book = book_of(16)
    assert book.take(0, 0, 4)                          # pages 0..3 sent in pre-copy
    hot, cooled = book.defer_written(0, [(2, 4)])      # 2, 3 (sent) and 4, 5 (never sent) written
    assert (hot, cooled) == (4, 0)
    assert to_send(book, 0) == bytes([0, 0, 0, 0, 0, 0] + [1] * 10)
    assert book.recount() == 10
    hot, cooled = book.defer_written(0, [(5, 1)])      # 2, 3, 4 quiet since; 5 written again
    # 4 (never sent) cools and goes; 2, 3 were sent, then written: held back for the rest of pre-copy
    assert (hot, cooled) == (3, 1)
    assert to_send(book, 0) == bytes([0, 0, 0, 0, 1, 0] + [1] * 10)
    assert book.undefer() == 3                         # the switch-over: 2, 3 and 5 go in post-copy
    assert to_send(book, 0)[2:6] == b"\x01" * 4 and book.undefer() == 0
    assert book.stale_runs(0) == [(2, 2)]              # sent, then due again: the destination's copy is stale


def test_syncs_need_sent_tracking_and_no_server():
    with pytest.raises(RuntimeError):
        book_of(4, track_sent=False).defer_written(0, [(0, 1)])
    book = book_of(4)
    book.lend()
    with pytest.raises(RuntimeError):
        book.defer_written(0, [(0, 1)])
    book.returned()
    assert book.defer_written(0, []) == (0, 0)
    assert book_of(4, track_sent=False).undefer() == 0


def test_stale_runs_need_sent_tracking():
    with pytest.raises(RuntimeError):
        book_of(4, track_sent=False).stale_runs(0)


def test_clean_spans_are_the_segment_ranges_not_due_to_be_sent():
    """After a dirty scan, the final scan looks only where pages are not going again anyway."""
    class Seg:
        offset, size, host_addr = 4 * TP, 8 * TP, 0x7F0000000000

    book = book_of(16)
    drain(book)
    book.mark_dirty(0, [(0, 6), (9, 1)])    # pages 4, 5 and 9 of the segment's 4..11 go again
    h = Seg.host_addr
    assert book.clean_spans(0, Seg) == [(h + 2 * TP, h + 5 * TP), (h + 6 * TP, h + 8 * TP)]
    book.mark_dirty(0, [(0, 16)])
    assert book.clean_spans(0, Seg) == []


def test_the_arrays_cannot_be_marked_dirty_or_read_for_discards_while_lent():
    book = book_of(4)
    book.lend()
    with pytest.raises(RuntimeError):
        book.mark_dirty(0, [(0, 1)])
    with pytest.raises(RuntimeError):
        book.stale_runs(0)
    book.returned()
    book.mark_dirty(0, [(0, 1)])
    assert book.stale_runs(0) == []


# -- the bandwidth cap --------------------------------------------------------------

def cap_at(rate, t0_ns=0):
    return ffi.new("struct pc_cap *", {"max_bandwidth": rate, "t0_ns": t0_ns})


@pytest.mark.parametrize("rate, t0_ns, sent, now_ns, ahead", [
    (0, 0, 1 << 40, 0, 0.0),                   # no cap
    (1e6, 0, 2_000_000, 1_000_000_000, 1.0),   # 2 s of bytes after 1 s: 1 s ahead
    (1e6, 0, 500_000, 1_000_000_000, 0.0),     # behind the cap: go
    (1e6, 0, 1_000_000, 1_000_000_000, 0.0),   # exactly at the cap
    (4e6, 5_000_000_000, 10_000_000, 5_500_000_000, 2.0),   # counts from t0
    (1e6, 5_000_000_000, 1_000_000, 4_000_000_000, 2.0),    # a clock read before t0 counts as negative time
])
def test_cap_arithmetic(rate, t0_ns, sent, now_ns, ahead):
    assert lib.pc_cap_ahead(cap_at(rate, t0_ns), sent, now_ns) == pytest.approx(ahead)


def test_bandwidth_cap_asks_the_native_arithmetic():
    cap = BandwidthCap(2e6, 10.0)
    assert cap.native.max_bandwidth == 2e6 and cap.native.t0_ns == 10_000_000_000
    assert cap.ahead(6_000_000, now_ns=11_000_000_000) == pytest.approx(2.0)
    assert cap.ahead(1_000_000, now_ns=11_000_000_000) == 0.0
    assert BandwidthCap(0, 10.0).ahead(1 << 40) == 0.0


# -- the native request server claims pages in the book's arrays ----------------------

class Served:
    """A RequestServer over an image, with the destination's ends of the return path and preempt channel."""

    def __init__(self, tmp_path, size=64 * TP):
        self.data = write_image(tmp_path / "img", size, seed=7, zero_runs=())
        self.image = ImageMemory(str(tmp_path / "img"))
        self.book = PageBook(self.image.blocks, track_sent=True)
        self.rp_src, self.rp_dst = socket.socketpair()
        self.pre_src, self.pre_dst = socket.socketpair()
        self.pre_dst.settimeout(30)   # a guard against a hang, not a timing assertion
        self.decoder = codec.ReturnPathDecoder(self.image.blocks)
        self.events = []
        self.codec_calls = threading.Event()
        self.server = RequestServer(self.rp_src, Lane(self.pre_src, 1), self.image, self.book,
                                    BandwidthCap(0.0, time.monotonic()), self.decoder)
        self.server.start(self._on_codec, lambda: any(type(e) is codec.Shut for e in self.events))

    def _on_codec(self):
        self.events += list(self.decoder.events())
        self.codec_calls.set()

    def request(self, first, count):
        self.rp_dst.sendall(codec.encode_rp(codec.ReqPagesId("mem", first * TP, count * TP)))

    def receive(self, pages, *, named=False):
        """The PAGE records of ``pages`` answered pages; ``named``: the first names the block."""
        got = b""
        while len(got) < pages * (8 + TP) + (1 + len("mem") if named else 0):
            got += self.pre_dst.recv(1 << 20)
        return got

    def close(self):
        for s in (self.rp_src, self.rp_dst, self.pre_src, self.pre_dst):
            s.close()
        self.image.close()


@pytest.fixture
def served(tmp_path):
    with contextlib.closing(Served(tmp_path)) as s:
        yield s


def test_pages_the_server_answers_are_claimed_and_marked_sent(served):
    served.request(4, 2)
    got = served.receive(2, named=True)
    assert served.data[4 * TP:5 * TP] in got and served.data[5 * TP:6 * TP] in got
    served.request(4, 1)                  # again: answered again (it may still be in flight), as resent
    served.receive(1)
    served.rp_dst.sendall(codec.encode_rp(codec.Shut(0)))
    served.codec_calls.wait(30)
    stats = served.server.stop()
    assert served.server.error is None
    assert stats["requests"] == 2 and stats["requested_pages"] == 2 and stats["resent_pages"] == 1
    assert to_send(served.book, 0)[4:6] == bytes(2) and sent(served.book, 0)[4:6] == b"\x01\x01"
    # the background walk skips what the server sent
    assert drain(served.book) == [(0, 0, 4), (0, 6, 58)]
    assert [type(e) for e in served.events] == [codec.Shut]


def test_the_book_is_lent_while_the_server_runs(served):
    with pytest.raises(RuntimeError):
        served.book.mark_dirty(0, [(0, 1)])
    served.server.stop()
    served.book.mark_dirty(0, [(0, 1)])
