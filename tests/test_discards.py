"""Dirty-page runs and POSTCOPY_RAM_DISCARD packing: native path against the pure-Python reference."""
from __future__ import annotations

import random
import time

import pytest

from postcopy_cli.codec import discards
from postcopy_cli.codec import (BlockInfo, Blocks, Header, PostcopyAdvise, PostcopyRamDiscard, StreamDecoder,
                                encode)
from postcopy_cli.codec.discards import DiscardEncoder, page_runs, page_runs_py, parse_page_list
from postcopy_cli.errors import LocalProtocolError, UsageError

needs_native = pytest.mark.skipif(not discards._HAVE_NATIVE, reason="native part not built")


def bits_to_bitmap(pages, nbytes):
    bm = bytearray(nbytes)
    for p in pages:
        bm[p // 8] |= 1 << (p % 8)
    return bytes(bm)


def naive_runs(bitmap, first=0, npages=None):
    end = len(bitmap) * 8 if npages is None else first + npages
    runs, start = [], None
    for p in range(first, end):
        if bitmap[p // 8] >> (p % 8) & 1:
            if start is None:
                start = p
        elif start is not None:
            runs.append((start, p - start))
            start = None
    if start is not None:
        runs.append((start, end - start))
    return runs


def random_bitmaps():
    rng = random.Random(1234)
    yield b""
    yield bytes(9)
    yield b"\xff" * 17
    yield b"\x01"
    yield b"\x80" * 3
    yield bytes(8) + b"\x01" + bytes(7) + b"\x80"
    for n in (1, 7, 8, 9, 63, 64, 65, 200):
        for density in (0.05, 0.5, 0.95):
            yield bytes(sum((rng.random() < density) << b for b in range(8)) for _ in range(n))
        yield bytes(rng.choice((0, 0xFF, 0x0F, 0xF0)) for _ in range(n))


@pytest.mark.parametrize("bitmap", list(random_bitmaps()))
def test_page_runs_match_naive(bitmap):
    expect = naive_runs(bitmap)
    assert list(page_runs_py(bitmap)) == expect
    assert list(page_runs(bitmap)) == expect


@pytest.mark.parametrize("first,npages", [(0, 0), (3, 5), (5, 70), (64, 64), (1, 199 * 8), (100, 13)])
def test_page_runs_window(first, npages):
    rng = random.Random(first * 1000 + npages)
    bitmap = bytes(rng.randrange(256) for _ in range(200))
    expect = naive_runs(bitmap, first, npages)
    assert list(page_runs_py(bitmap, first, npages)) == expect
    assert list(page_runs(bitmap, first, npages)) == expect


def test_page_runs_window_beyond_bitmap():
    with pytest.raises(ValueError):
        list(page_runs(b"\xff", 4, 8))


@needs_native
def test_page_runs_crosses_batches():
    bitmap = b"\x55" * (discards._RUN_BATCH // 4 + 3)  # more runs than one native batch
    runs = list(page_runs(bitmap))
    assert len(runs) == len(bitmap) * 4
    assert runs[:3] == [(0, 1), (2, 1), (4, 1)] and runs[-1] == (len(bitmap) * 8 - 2, 1)


@pytest.mark.parametrize("text,runs", [
    ("3", [(3, 1)]),
    ("3,7-9", [(3, 1), (7, 3)]),
    ("7-9,3", [(3, 1), (7, 3)]),
    ("1-4,3-6,7", [(1, 7)]),
    (" 0x10 - 0x11 , 2 ", [(2, 1), (16, 2)]),
    ("5,5,5", [(5, 1)]),
])
def test_parse_page_list(text, runs):
    assert parse_page_list(text) == runs


@pytest.mark.parametrize("text,what", [("", "empty"), ("1,,2", "''"), ("a", "'a'"), ("9-3", "'9-3'"),
                                       ("-1", "'-1'"), ("1-2-3", "'1-2-3'")])
def test_parse_page_list_errors(text, what):
    with pytest.raises(UsageError) as ei:
        parse_page_list(text)
    assert what in str(ei.value)


def test_commands_group_by_max():
    enc = DiscardEncoder("pc.ram", max_per_command=2)
    cmds = list(enc.commands([(1, 2), (16, 1), (20, 0), (30, 3), (40, 1), (50, 1)]))
    assert cmds == [PostcopyRamDiscard("pc.ram", ((0x1000, 0x2000), (0x10000, 0x1000))),
                    PostcopyRamDiscard("pc.ram", ((30 * 4096, 3 * 4096), (40 * 4096, 4096))),
                    PostcopyRamDiscard("pc.ram", ((50 * 4096, 4096),))]
    assert (enc.stats.pages, enc.stats.ranges, enc.stats.commands) == (8, 5, 3)


def test_encoded_is_qemu_bytes():
    # qemu_savevm_send_postcopy_ram_discard("pc.ram", starts [0x1000, 0x10000], lengths [0x2000, 0x1000])
    expect = bytes.fromhex("08 0006 0029 00 06 7063 2e72 616d 00"
                           "0000000000001000 0000000000002000 0000000000010000 0000000000001000")
    enc = DiscardEncoder("pc.ram")
    assert list(enc.encoded([(1, 2), (16, 1)])) == [expect]
    assert enc.stats.bytes == len(expect)
    bitmap = bits_to_bitmap([1, 2, 16], 4)
    assert list(DiscardEncoder("pc.ram").encoded_from_bitmap(bitmap)) == [expect]
    assert list(DiscardEncoder("pc.ram").encoded_from_bitmap(bitmap, native=False)) == [expect]


def test_page_size_scales_ranges():
    enc = DiscardEncoder("huge", page_size=0x200000)
    assert list(enc.commands([(1, 2)])) == [PostcopyRamDiscard("huge", ((0x200000, 0x400000),))]


@pytest.mark.parametrize("kw", [{"max_per_command": 0}, {"max_per_command": discards.MAX_RANGES_LIMIT + 1},
                                {"page_size": 1000}, {"page_size": 2048}])
def test_encoder_refuses_bad_settings(kw):
    with pytest.raises(LocalProtocolError):
        DiscardEncoder("pc.ram", **kw)


def test_encoder_refuses_bad_name():
    with pytest.raises(LocalProtocolError):
        DiscardEncoder("x" * 256)


@needs_native
@pytest.mark.parametrize("max_per", [1, 2, 12, 13, 100])
@pytest.mark.parametrize("seed", range(4))
def test_native_packing_matches_reference(max_per, seed):
    rng = random.Random(seed)
    bitmap = bytes(rng.choice((0, 0xFF, 0x55, rng.randrange(256))) for _ in range(rng.randrange(1, 3000)))
    first = rng.randrange(0, 16)
    npages = len(bitmap) * 8 - first - rng.randrange(0, 16)
    ref = DiscardEncoder("ram-" + str(seed), max_per_command=max_per)
    nat = DiscardEncoder("ram-" + str(seed), max_per_command=max_per)
    a = b"".join(ref.encoded_from_bitmap(bitmap, first, npages, native=False))
    chunks = list(nat.encoded_from_bitmap(bitmap, first, npages, chunk_size=1000, native=True))
    assert b"".join(chunks) == a
    assert ref.stats == nat.stats
    assert b"".join(ref.encoded(naive_runs(bitmap, first, npages))) == a


def test_commands_decode_back():
    bitmap = bytes(random.Random(5).randrange(256) for _ in range(64))  # 512 pages
    enc = DiscardEncoder("pc.ram")
    data = b"".join(enc.encoded_from_bitmap(bitmap))
    dec = StreamDecoder()
    dec.feed(encode(Header()) + encode(Blocks((BlockInfo("pc.ram", 512 * 4096, 4096),)))
             + encode(PostcopyAdvise(4096, 4096)) + data)
    cmds = [e for e in dec.events() if isinstance(e, PostcopyRamDiscard)]
    assert cmds == list(DiscardEncoder("pc.ram").commands(naive_runs(bitmap)))
    assert dec.buffered == 0


@needs_native
def test_scale_64gib_every_other_page():
    bitmap = b"\x55" * (2 << 20)  # 64 GiB of 4 KiB pages, every other one dirty: 8M runs
    enc = DiscardEncoder("pc.ram")
    t = time.perf_counter()
    total = 0
    biggest = 0
    for chunk in enc.encoded_from_bitmap(bitmap):
        total += len(chunk)
        biggest = max(biggest, len(chunk))
    elapsed = time.perf_counter() - t
    npages = 8 << 20
    ncmds = -(-npages // 12)
    assert (enc.stats.pages, enc.stats.ranges, enc.stats.commands) == (npages, npages, ncmds)
    assert total == enc.stats.bytes == ncmds * 14 + npages * 16
    assert biggest <= 1 << 20  # streamed in bounded chunks
    assert elapsed < 10
