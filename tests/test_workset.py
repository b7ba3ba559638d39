"""Working-set record and replay (DESIGN.md section 10): the file format and its checks, the replay
order (PageBook priority runs, merged worksets), and end to end: serve-dest --record-workset in a
cold restore of a program touching the "function" pattern, then migrate --workset replaying it."""
from __future__ import annotations

import json
import struct
import subprocess
import zlib

import pytest

from conftest import PROC_TIMEOUT, finish, postcopy_cmd, run_postcopy, single_stderr_line, write_image
from postcopy_cli import codec
from postcopy_cli.codec import workset as wsfile
from postcopy_cli.guest.pattern import function_order
from postcopy_cli.selftest.harness import kill_and_reap
from postcopy_cli.source.pages import CHUNK_PAGES, PageBook
from test_hugetlb import HP, SIZE, hugepages_2m, make_image, start_toucher  # noqa: F401 (a fixture)

TP = 4096
MIB = 1 << 20


def a_workset(length=64 * TP, page_size=TP, runs=((3, 2, 10), (40, 1, 20), (10, 5, 30)), name="mem"):
    return wsfile.Workset((wsfile.WorksetBlock(name, length, page_size, tuple(runs)),))


# -- the file format ------------------------------------------------------------------------

def test_encode_decode_round_trip_two_blocks():
    ws = wsfile.Workset((wsfile.WorksetBlock("mem", 64 * TP, TP, ((3, 2, 10), (40, 1, 20))),
                         wsfile.WorksetBlock("huge", 4 * 512 * TP, 512 * TP, ((1, 2, 15),))))
    data = wsfile.encode(ws)
    assert data[:4] == b"PCWS"
    back = wsfile.decode(data)
    assert back == ws
    assert back.pages == 5 and back.runs == 3 and back.image_size == 64 * TP + 4 * 512 * TP
    assert [r[0] for r in back.in_fault_order()] == ["mem", "huge", "mem"]


def test_runs_of_groups_consecutive_pages_in_fault_order():
    assert wsfile.runs_of([5, 6, 7, 2, 3, 9, 8], [0, 1, 2, 3, 4, 5, 6]) == ((5, 3, 0), (2, 2, 3), (9, 1, 5), (8, 1, 6))
    assert wsfile.runs_of([], []) == ()


def _reseal(body: bytes) -> bytes:
    """``body`` (a file without its checksum) with a valid checksum: damage the CRC does not hide."""
    return body + struct.pack(">I", zlib.crc32(body))


GOOD = wsfile.encode(a_workset())
BODY = GOOD[:-4]
# header 18 bytes, then u8 3 "mem", be64 length (byte 22), be64 page size (byte 30), be32 runs (byte 38)
CORRUPT = [
    ("bad magic", b"XXXX" + GOOD[4:], "not a workset file"),
    ("version 2", _reseal(BODY[:4] + struct.pack(">H", 2) + BODY[6:]), "format version 2"),
    ("flags", _reseal(BODY[:6] + struct.pack(">H", 1) + BODY[8:]), "unknown flags"),
    ("no blocks", _reseal(BODY[:16] + struct.pack(">H", 0) + BODY[18:]), "block count 0"),
    ("empty name", _reseal(BODY[:18] + b"\x00" + BODY[19:]), "empty name"),
    ("page size 3000", _reseal(BODY[:30] + struct.pack(">Q", 3000) + BODY[38:]), "page size 3000"),
    ("length not whole pages", _reseal(BODY[:22] + struct.pack(">Q", 64 * TP + 100) + BODY[30:]),
     "not a positive multiple"),
    ("more runs than pages", _reseal(BODY[:38] + struct.pack(">I", 65) + BODY[42:]), "65 runs"),
    ("image size", _reseal(BODY[:8] + struct.pack(">Q", 1) + BODY[16:]), "image size 1"),
    ("run past the block", _reseal(BODY[:42] + struct.pack(">Q", 63) + BODY[50:]), "run 0"),
    ("run of 0 pages", _reseal(BODY[:50] + struct.pack(">I", 0) + BODY[54:]), "run 0"),
    ("trailing bytes", GOOD + b"\x00", "after the checksum"),
    ("a flipped bit", BODY[:45] + bytes([BODY[45] ^ 4]) + BODY[46:] + GOOD[-4:], "checksum mismatch"),
    ("bad checksum", BODY + b"\x00\x00\x00\x00", "checksum mismatch"),
]


@pytest.mark.parametrize("data,why", [(d, w) for _, d, w in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_corrupt_files_are_refused_naming_what(data, why):
    with pytest.raises(wsfile.WorksetError, match=why):
        wsfile.decode(data)


def test_every_truncation_is_refused():
    for n in range(len(GOOD)):
        with pytest.raises(wsfile.WorksetError, match="truncated|checksum"):
            wsfile.decode(GOOD[:n])


@pytest.mark.parametrize("case", [CORRUPT[0], CORRUPT[5], CORRUPT[12], ("truncated", GOOD[:30], "truncated")],
                         ids=["magic", "page-size", "flipped-bit", "truncated"])
def test_workset_show_refuses_a_damaged_file_with_exit_2(tmp_path, case):
    _, data, why = case
    path = tmp_path / "bad.ws"
    path.write_bytes(data)
    proc = run_postcopy("workset", "show", str(path))
    assert proc.returncode == 2, proc.stderr
    line = single_stderr_line(proc.stderr)
    assert str(path) in line and why in line, line


def test_workset_show_summary_and_json(tmp_path):
    path = tmp_path / "a.ws"
    path.write_bytes(GOOD)
    proc = run_postcopy("workset", "show", str(path), "--json", "--first", "2")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["pages"] == 8 and doc["runs"] == 3 and doc["image-size"] == 64 * TP
    assert doc["first-us"] == 10 and doc["last-us"] == 30 and doc["span-us"] == 20
    assert doc["first-runs"] == [{"block": "mem", "page": 3, "count": 2, "us": 10},
                                 {"block": "mem", "page": 40, "count": 1, "us": 20}]
    human = run_postcopy("workset", "show", str(path))
    assert human.returncode == 0 and "8 pages in 3 runs" in human.stdout, human


# -- migrate --workset refuses what does not fit (before connecting anywhere) ------------------

MISMATCH = [
    ("another size", a_workset(length=128 * TP), [], "recorded with 524288 bytes, the image's is 262144"),
    ("another block", a_workset(name="ram0"), [], "block 'ram0' is not in the image"),
    ("another page size", a_workset(length=64 * TP, page_size=4 * TP, runs=((1, 1, 0),)), [],
     "recorded in pages of 16384 bytes, the image is served in pages of 4096"),
    ("page size asked", a_workset(), ["--page-size", "16K"], "recorded in pages of 4096 bytes, the image is "
                                                             "served in pages of 16384"),
    ("corrupt", None, [], "checksum mismatch"),
    ("missing", "missing", [], "No such file"),
]


@pytest.mark.parametrize("ws,extra,why", [m[1:] for m in MISMATCH], ids=[m[0] for m in MISMATCH])
def test_migrate_refuses_a_workset_that_does_not_fit_with_exit_2(tmp_path, ws, extra, why):
    image = tmp_path / "img"
    write_image(image, 64 * TP)
    path = tmp_path / "a.ws"
    if ws is None:
        path.write_bytes(GOOD[:-1] + bytes([GOOD[-1] ^ 1]))
    elif ws != "missing":
        path.write_bytes(wsfile.encode(ws))
    good = tmp_path / "good.ws"
    good.write_bytes(GOOD)
    # nothing listens there: the refusal comes before any connection
    # (a good one first: each file is checked; with --page-size the good one does not fit either)
    first = [] if extra else ["--workset", str(good)]
    proc = run_postcopy("migrate", "--to", f"unix:{tmp_path}/nobody.sock", "--image", str(image),
                        *first, "--workset", str(path), "--timeout", "1", *extra)
    assert proc.returncode == 2, proc.stderr
    line = single_stderr_line(proc.stderr)
    assert f"--workset {path}" in line and why in line, line


def test_workset_before_run_goes_with_a_workset(tmp_path):
    image = tmp_path / "img"
    write_image(image, 16 * TP)
    proc = run_postcopy("migrate", "--to", "unix:/nowhere.sock", "--image", str(image), "--workset-before-run")
    assert proc.returncode == 2
    assert "--workset-before-run goes with --workset FILE" in single_stderr_line(proc.stderr)


def test_workset_goes_with_image_only(tmp_path):
    proc = run_postcopy("migrate", "--to", "unix:/nowhere.sock", "--attach", str(tmp_path / "s.sock"),
                        "--workset", str(tmp_path / "a.ws"))
    assert proc.returncode == 2
    assert "--workset goes with --image" in single_stderr_line(proc.stderr)


# -- the replay order -------------------------------------------------------------------

def blocks_of(*pages, huge=1):
    return [codec.BlockInfo(f"b{i}", n * TP, huge * TP) for i, n in enumerate(pages)]


def drain(book):
    out = []
    while (c := book.next_chunk()) is not None:
        out.append(c)
    return out


def test_priority_runs_go_first_in_order_then_the_walk_skips_them():
    book = PageBook(blocks_of(1000, 100))
    book.set_priority([(1, 50, 10), (0, 700, 3), (0, 10, 2)])
    assert book.take(0, 701, 1)            # a request took one page of a priority run
    chunks = drain(book)
    assert chunks[:4] == [(1, 50, 10), (0, 700, 1), (0, 702, 1), (0, 10, 2)]
    sent = {(bi, p) for bi, first, n in chunks for p in range(first, first + n)} | {(0, 701)}
    assert len(sent) == 1100 and sum(n for _, _, n in chunks) == 1099   # every page once


def test_a_long_priority_run_goes_in_chunks():
    book = PageBook(blocks_of(2000))
    book.set_priority([(0, 100, CHUNK_PAGES + 10)])
    assert drain(book)[:2] == [(0, 100, CHUNK_PAGES), (0, 100 + CHUNK_PAGES, 10)]


def test_priority_runs_of_a_huge_page_block_are_whole_huge_pages():
    book = PageBook(blocks_of(8 * 512, huge=512))
    book.set_priority([(0, 3 * 512, 512), (0, 1 * 512, 512)])
    assert drain(book)[:2] == [(0, 3 * 512, 512), (0, 512, 512)]


def test_after_a_resume_what_is_missing_of_the_priority_runs_goes_first_again():
    book = PageBook(blocks_of(64))
    book.set_priority([(0, 40, 8), (0, 8, 8)])
    assert book.next_chunk() == (0, 40, 8)
    assert book.next_chunk() == (0, 8, 8)
    assert book.next_chunk() == (0, 0, 8)
    # the destination has pages 0..7, 40..43 and 8..15 but lost 44..47 (the connection broke)
    have = [0] * 64
    for p in list(range(0, 16)) + list(range(40, 44)):
        have[p] = 1
    bitmap = bytes(sum(have[i * 8 + k] << k for k in range(8)) for i in range(8))
    book.from_received(0, bitmap)
    assert book.next_chunk() == (0, 44, 4)   # the priority order, for what is missing
    assert book.next_chunk() == (0, 16, 24)


def test_merged_worksets_by_first_fault_time_each_page_once():
    blocks = blocks_of(1000, 8 * 512, huge=1)
    blocks[1] = codec.BlockInfo("b1", 8 * 512 * TP, 512 * TP)
    a = wsfile.Workset((wsfile.WorksetBlock("b0", 1000 * TP, TP, ((100, 4, 5), (500, 2, 50))),
                        wsfile.WorksetBlock("b1", 8 * 512 * TP, 512 * TP, ((2, 1, 30),))))
    b = wsfile.Workset((wsfile.WorksetBlock("b0", 1000 * TP, TP, ((102, 6, 1), (800, 1, 40))),
                        wsfile.WorksetBlock("b1", 8 * 512 * TP, 512 * TP, ())))
    order = wsfile.priority_runs([a, b], blocks, gap=0)
    assert order == [(0, 102, 6), (0, 100, 2), (1, 1024, 512), (0, 800, 1), (0, 500, 2)]
    # close runs that follow one another go as one
    assert wsfile.priority_runs([a], blocks, gap=16)[0] == (0, 100, 4)
    near = wsfile.Workset((wsfile.WorksetBlock("b0", 1000 * TP, TP, ((100, 4, 1), (110, 4, 2), (90, 1, 3))),
                           wsfile.WorksetBlock("b1", 8 * 512 * TP, 512 * TP, ())))
    assert wsfile.priority_runs([near], blocks, gap=16) == [(0, 100, 14), (0, 90, 1)]


def test_function_pattern_is_fixed_clustered_and_jittered_by_seed():
    n = 16384
    base = function_order(n, seed=1, jitter=0)
    assert base == function_order(n, seed=99, jitter=0)       # no jitter: the seed changes nothing
    assert 0.10 * n <= len(base) <= 0.20 * n
    assert len(set(base)) == len(base)
    runs = wsfile.runs_of(list(base), list(range(len(base))))
    assert len(runs) < len(base) / 4                          # mostly clustered runs
    one, two = function_order(n, seed=1), function_order(n, seed=2)
    assert one == function_order(n, seed=1)                  # reproducible
    assert one != two
    assert len(set(one) & set(two)) >= 0.8 * len(one)         # mostly the same working set


# -- end to end ---------------------------------------------------------------------------

def _restore(serve_dest, tmp_path, image, size, *, record=None, worksets=(), seed=1, jitter=0.0, extra=(),
             page_size=None, toucher=None):
    """serve-dest (recording to ``record``), a toucher, migrate (replaying ``worksets``): the three
    results (serve-dest stats, the toucher's report, migrate's stats)."""
    sock = tmp_path / "u.sock"
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock), "--timeout", "30",
                    *(["--record-workset", str(record)] if record else []))
    if toucher is None:
        touch = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(sock),
                                              "--image", str(image), "--order", "function", "--seed", str(seed),
                                              "--jitter", str(jitter), "--wait-run", "--json"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    else:
        touch = toucher(sock)
    replay = [arg for w in worksets for arg in ("--workset", str(w))]
    replay += ["--page-size", str(page_size)] if page_size else []
    try:
        mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--json", "--timeout", "30",
                           *extra, *replay)
        (t_rc, t_out, t_err), (rc, out, err) = finish(touch), sd.wait()
    finally:
        kill_and_reap(touch)
    assert mig.returncode == 0, (mig.stderr, err, t_err)
    assert t_rc == 0, t_err
    assert rc == 0, err
    return json.loads(out.splitlines()[-1]), json.loads(t_out), json.loads(mig.stdout)


def test_record_then_replay_every_byte_verified_far_fewer_requests(serve_dest, tmp_path):
    size = 16 * MIB
    image = tmp_path / "img"
    write_image(image, size)
    wanted = set(function_order(size // TP, seed=1, jitter=0))
    # cold: the background stream is slow, so the program faults on nearly all of its working set
    cold_ws = tmp_path / "cold.ws"
    cold, touched, _ = _restore(serve_dest, tmp_path, image, size, record=cold_ws, extra=["--max-bandwidth", "8M"])
    assert touched["mismatches"] == 0 and touched["verified_pages"] == size // TP, touched
    assert touched["pages"] == len(wanted)
    recorded = wsfile.load(str(cold_ws))
    assert recorded.image_size == size and [b.name for b in recorded.blocks] == ["mem"]
    pages = [p for first, n, _ in recorded.blocks[0].runs for p in range(first, first + n)]
    # its faults: on pages not there yet (requests), and on pages that came before it touched them
    assert len(pages) == len(set(pages)) == cold["postcopy-requests"] + cold["staged-faults"], cold
    assert set(pages) <= wanted
    assert len(pages) >= len(wanted) // 2, (len(pages), len(wanted))
    times = [us for *_, us in recorded.in_fault_order()]
    assert times == sorted(times)
    # the replay (no cap) sends those pages first: the program finds most of them there
    replay_ws = tmp_path / "replay.ws"
    replay, touched, src = _restore(serve_dest, tmp_path, image, size, record=replay_ws, worksets=[cold_ws])
    assert touched["mismatches"] == 0 and touched["verified_pages"] == size // TP, touched
    assert replay["pages"]["received"] == size // TP
    assert src["pages"] == size // TP
    assert replay["postcopy-requests"] * 4 <= cold["postcopy-requests"], (replay["postcopy-requests"],
                                                                          cold["postcopy-requests"])
    # the same run with the working set sent before RUN: the program starts with it in place, and
    # faults only on pages it touched after the recording's stream ended (none, mostly)
    early, touched, src = _restore(serve_dest, tmp_path, image, size, worksets=[cold_ws],
                                   extra=["--workset-before-run"])
    assert touched["mismatches"] == 0 and touched["verified_pages"] == size // TP, touched
    assert src["before-run-pages"] >= len(pages) and src["run-at-seconds"] >= 0, src
    assert early["postcopy-requests"] <= len(wanted - set(pages)), early
    # both records merged, with another run's jitter: still every byte
    merged, touched, _ = _restore(serve_dest, tmp_path, image, size, worksets=[cold_ws, replay_ws], seed=7,
                                  jitter=0.2)
    assert touched["mismatches"] == 0 and touched["verified_pages"] == size // TP, touched
    assert merged["pages"]["received"] == size // TP


def test_a_failed_migration_still_writes_what_it_saw(serve_dest, tmp_path):
    """The source disappears after RUN (no recovery): serve-dest fails, the record holds the faults."""
    from fakes import FakeSource, preamble

    size = 4 * MIB
    sock = tmp_path / "u.sock"
    record = tmp_path / "fail.ws"
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock), "--timeout", "30",
                    "--recover-timeout", "0", "--record-workset", str(record))
    touch = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(sock),
                                          "--order", "function", "--wait-run", "--json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        src = FakeSource(sd.port, codec.BlockInfo("mem", size, TP))
        src.send(preamble(src.block))
        first = None
        for ev in src.events("serve-dest closed the connection"):
            if isinstance(ev, codec.ReqPagesId):
                first = ev.start
                break
        src.close()
        rc, out, err = sd.wait()
        finish(touch)
    finally:
        kill_and_reap(touch)
    assert rc == 4, err
    ws = wsfile.load(str(record))
    assert ws.pages >= 1
    assert ws.blocks[0].runs[0][0] == first // TP


def test_a_huge_page_block_records_and_replays_whole_huge_pages(serve_dest, tmp_path, hugepages_2m):
    """Memory in 2 MiB hugetlb pages: the record counts huge pages, the replay sends whole ones."""
    image = tmp_path / "img"
    make_image(image)
    record = tmp_path / "huge.ws"
    sd_stats, touched, _ = _restore(serve_dest, tmp_path, image, SIZE, record=record, page_size=HP,
                                    toucher=lambda sock: start_toucher(sock, image))
    assert touched["mismatches"] == 0, touched
    ws = wsfile.load(str(record))
    (block,) = ws.blocks
    assert (block.name, block.length, block.page_size) == ("mem", SIZE, HP)
    # each huge page the toucher read before the stream's end is in the record, asked for or staged
    assert 1 <= block.pages <= SIZE // HP
    assert block.pages * (HP // TP) == sd_stats["pages"]["demand"] + sd_stats["staged-faults"] * (HP // TP), sd_stats
    replay, touched, _ = _restore(serve_dest, tmp_path, image, SIZE, worksets=[record], page_size=HP,
                                  toucher=lambda sock: start_toucher(sock, image))
    assert touched["mismatches"] == 0 and touched["pages"] == SIZE // TP, touched
    assert replay["pages"]["received"] == SIZE // TP
    # the same file for 4 KiB pages of the same image: refused, naming the page sizes
    proc = run_postcopy("migrate", "--to", "unix:/nowhere.sock", "--image", str(image), "--workset", str(record))
    assert proc.returncode == 2
    assert f"recorded in pages of {HP} bytes, the image is served in pages of 4096" in \
        single_stderr_line(proc.stderr)


# -- pages that arrived before the program touched them (staged placement) -------------------

# A program that hands its memory over, touches the pages of argv[4] (a JSON list, if given) in a
# thread at once, waits for RUN (applying discards), prints "ready" (and that thread's digests), then
# reads the pages named on each stdin line (a JSON list, in that order) and prints a digest of each,
# and at "check" waits for the migration's end and compares every page with the file argv[3].
LATE_TOUCHER = """
import ctypes, hashlib, json, sys
from postcopy_cli.channels.control import ControlReader
from postcopy_cli.guest import programs
from postcopy_cli.memory.mappings import AnonymousMapping

import threading
sock_path, size, final = sys.argv[1], int(sys.argv[2]), sys.argv[3]
early = json.loads(sys.argv[4]) if len(sys.argv) > 4 else []
ram = AnonymousMapping(size)
reader = ControlReader(programs.attach(sock_path, ram, mode="touch"), name="control")
early_digests = []
def touch_early():   # before RUN: these touches wait for their pages
    for p in early:
        early_digests.append(hashlib.sha256(ctypes.string_at(ram.addr + p * 4096, 4096)).hexdigest())
early_thread = threading.Thread(target=touch_early, daemon=True)
early_thread.start()
programs._wait_run(reader, ram)
print("ready", flush=True)
if early:
    early_thread.join()
    print(json.dumps(early_digests), flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        break
    digests = [hashlib.sha256(ctypes.string_at(ram.addr + p * 4096, 4096)).hexdigest()
               for p in json.loads(line)]
    print(json.dumps(digests), flush=True)
while True:
    msg = reader.get(None)
    if msg is ControlReader.CLOSED or msg.get("event") in ("complete", "failed"):
        break
with open(final, "rb") as f:
    want = f.read()
got = ctypes.string_at(ram.addr, size)
bad = [i for i in range(size // 4096) if got[i * 4096:(i + 1) * 4096] != want[i * 4096:(i + 1) * 4096]]
print(json.dumps({"end": msg if msg is ControlReader.CLOSED else msg.get("event"), "bad": bad[:20]}), flush=True)
"""


class LateToucher:
    """LATE_TOUCHER in a subprocess: touch(pages) returns the digests of what it read."""

    def __init__(self, sock, size: int, final_path, early=()):
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", LATE_TOUCHER, str(sock), str(size), str(final_path),
                                      *([json.dumps(list(early))] if early else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

    def line(self) -> str:
        import queue
        import threading

        if not hasattr(self, "_lines"):
            # read in a thread (a select on the pipe misses lines its buffer holds already)
            self._lines = queue.Queue()
            threading.Thread(target=lambda: [self._lines.put(x) for x in self.proc.stdout] + [self._lines.put("")],
                             daemon=True).start()
        try:
            # a hang detector, not a timing: a thread that never gets its page fails the test
            out = self._lines.get(timeout=PROC_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"the toucher printed nothing within {PROC_TIMEOUT} s") from None
        assert out, self.proc.stderr.read()
        return out.strip()

    def touch(self, pages) -> list[str]:
        self.proc.stdin.write(json.dumps(list(pages)) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.line())

    def check(self) -> dict:
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return json.loads(self.line())


def _digest(page: bytes) -> str:
    import hashlib

    return hashlib.sha256(page).hexdigest()


def _pong(src, value: int) -> None:
    """PING ``value``; back once its PONG is: every page sent before it is in (the stream is in order)."""
    src.send(codec.encode(codec.Ping(value)))
    while True:
        if any(isinstance(ev, codec.Pong) and ev.value == value for ev in src.events()):
            return


def _recorded_pages(path) -> list[int]:
    ws = wsfile.load(str(path))
    return [p for _, first, n, _ in ws.in_fault_order() for p in range(first, first + n)]


PAGES = 64
LATE_ORDERS = [[0, PAGES - 1, 1, PAGES - 2, 30, 31, 32, 5],
               [PAGES - 1, 0, 17, 16, 15, PAGES - 1, 0],      # first touches only: 63, 0, 17, 16, 15
               [0, 1, 2, 3, PAGES - 4, PAGES - 3, PAGES - 2, PAGES - 1]]


@pytest.mark.parametrize("order", LATE_ORDERS, ids=["edges-first", "edges-reversed", "runs-at-both-ends"])
def test_pages_that_arrived_before_their_first_touch_are_recorded_in_touch_order(serve_dest, tmp_path, order):
    """Every page arrives (unrequested) before the program touches any: nothing would fault if they
    were placed as they came; the record still holds the touched pages in first-touch order."""
    from fakes import FakeSource, preamble

    size = PAGES * TP
    data = bytearray(random_bytes(size, seed=len(order)))
    data[7 * TP:8 * TP] = bytes(TP)                     # a zero page (a ZERO record)
    sd, toucher, record = _recording(serve_dest, tmp_path, data, "late.ws")
    try:
        with FakeSource(sd.port, codec.BlockInfo("mem", size, TP)) as src:
            src.send(preamble(src.block))
            assert toucher.line() == "ready"
            ram = src.ram
            src.send(ram.begin() + b"".join(ram.zero("mem", o) if o == 7 * TP else ram.page("mem", o, data[o:o + TP])
                                            for o in range(0, size, TP)) + ram.end())
            _pong(src, 1)
            assert toucher.touch(order) == [_digest(data[p * TP:(p + 1) * TP]) for p in order]
            assert toucher.touch([7]) == [_digest(bytes(TP))]
            stats = _end_of_stream(src, sd, toucher)
    finally:
        kill_and_reap(toucher.proc)
    assert stats["postcopy-requests"] == 0 and stats["pages"]["received"] == PAGES, stats
    first_touches = list(dict.fromkeys(order + [7]))
    assert _recorded_pages(record) == first_touches


def _recording(serve_dest, tmp_path, final_data, record_name: str, **toucher_kw):
    """serve-dest recording a workset into ``record_name`` with a LateToucher attached that checks the
    memory against ``final_data`` at the end: (serve-dest, toucher, the record's path)."""
    final = tmp_path / "final"
    final.write_bytes(final_data)
    sock, record = tmp_path / "u.sock", tmp_path / record_name
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock), "--timeout", "30",
                    "--record-workset", str(record))
    return sd, LateToucher(sock, len(final_data), final, **toucher_kw), record


def _end_of_stream(src, sd, toucher) -> dict:
    """EOF from the fake source: serve-dest and the toucher end well (every page the toucher checked
    right); serve-dest's stats."""
    src.send(codec.encode(codec.Eof()))
    rc, out, err = sd.wait()
    assert rc == 0, err
    assert toucher.check() == {"end": "complete", "bad": []}
    assert toucher.proc.wait(timeout=PROC_TIMEOUT) == 0
    return json.loads(out.splitlines()[-1])


def random_bytes(n: int, *, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


def test_a_staged_page_sent_again_or_discarded_reads_its_newest_copy(serve_dest, tmp_path):
    """Pre-copy stages every page; some are sent again (data over data, data over zeros, zeros over
    data) and some discarded (then sent again after RUN, or asked for when touched): the program
    reads the newest copy of each, every byte checked, and the record is its touches in order."""
    from fakes import FakeSource, preamble

    size = PAGES * TP
    v1 = bytearray(random_bytes(size, seed=11))
    v1[3 * TP:4 * TP] = bytes(TP)
    newer = {2: random_bytes(TP, seed=2), 3: random_bytes(TP, seed=3), 4: bytes(TP),
             PAGES - 1: random_bytes(TP, seed=63)}
    after_run = {0: random_bytes(TP, seed=100), 11: random_bytes(TP, seed=111)}
    asked = {10: random_bytes(TP, seed=110)}
    final_data = bytearray(v1)
    for p, page in {**newer, **after_run, **asked}.items():
        final_data[p * TP:(p + 1) * TP] = page
    sd, toucher, record = _recording(serve_dest, tmp_path, final_data, "pre.ws")

    def section(pages: dict) -> bytes:
        return ram.begin() + b"".join(ram.zero("mem", p * TP) if page == bytes(TP) else ram.page("mem", p * TP, page)
                                      for p, page in pages.items()) + ram.end()

    try:
        with FakeSource(sd.port, codec.BlockInfo("mem", size, TP)) as src:
            ram = src.ram
            src.send(preamble(src.block, through="advise"))
            src.send(section({p: bytes(v1[p * TP:(p + 1) * TP]) for p in range(PAGES)}))
            src.send(section(newer))
            src.send(codec.encode(codec.PostcopyRamDiscard("mem", ((0, TP), (10 * TP, 2 * TP)))))
            src.send(codec.encode(codec.PostcopyListen()) + codec.encode(codec.PostcopyRun()))
            assert toucher.line() == "ready"
            src.send(section(after_run))
            _pong(src, 1)
            order = [PAGES - 1, 0, 2, 3, 4, 11, 5]
            assert toucher.touch(order) == [_digest(final_data[p * TP:(p + 1) * TP]) for p in order]
            # page 10 was discarded and not sent again: the touch asks for it
            toucher.proc.stdin.write("[10]\n")
            toucher.proc.stdin.flush()
            req = None
            while req is None:
                req = next((ev for ev in src.events() if isinstance(ev, codec.ReqPagesId)), None)
            assert (req.start, req.length) == (10 * TP, TP)
            src.send(section(asked))
            assert json.loads(toucher.line()) == [_digest(asked[10])]
            stats = _end_of_stream(src, sd, toucher)
    finally:
        kill_and_reap(toucher.proc)
    assert stats["postcopy-requests"] == 1 and stats["pages"]["received"] == PAGES, stats
    assert _recorded_pages(record) == order + [10]


def test_a_touch_before_run_of_a_staged_page_waits_for_run_and_reads_the_newest_copy(serve_dest, tmp_path):
    """The program touches pages before RUN: one not sent yet (asked for, placed when it comes), then
    one that comes staged and is sent again while the thread waits. A staged page is served only from
    RUN on (before, it may change): the thread wakes at RUN and reads the newer copy."""
    from conftest import wait_until, waits_in_userfault
    from fakes import FakeSource, preamble

    size = PAGES * TP
    v1 = random_bytes(size, seed=21)
    v2 = random_bytes(TP, seed=22)
    final_data = bytearray(v1)
    final_data[0:TP] = v2
    sd, toucher, record = _recording(serve_dest, tmp_path, final_data, "early.ws", early=[5, 0])
    try:
        with FakeSource(sd.port, codec.BlockInfo("mem", size, TP)) as src:
            ram = src.ram
            src.send(preamble(src.block, through="advise"))
            wait_until(lambda: waits_in_userfault(toucher.proc.pid), "the early touch of page 5 waiting")
            src.send(src.pages(v1, range(0, size, TP)))
            _pong(src, 1)
            src.send(src.pages(final_data, [0]))          # page 0 again, while the thread may wait on it
            _pong(src, 2)
            wait_until(lambda: waits_in_userfault(toucher.proc.pid), "the early touch of page 0 waiting")
            src.send(codec.encode(codec.PostcopyListen()) + codec.encode(codec.PostcopyRun()))
            assert toucher.line() == "ready"
            assert json.loads(toucher.line()) == [_digest(v1[5 * TP:6 * TP]), _digest(v2)]
            assert toucher.touch([PAGES - 1]) == [_digest(v1[-TP:])]
            stats = _end_of_stream(src, sd, toucher)
    finally:
        kill_and_reap(toucher.proc)
    assert stats["pages"]["received"] == PAGES and stats["staged-faults"] == 2, stats
    assert _recorded_pages(record) == [5, 0, PAGES - 1]
