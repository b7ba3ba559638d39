"""The destination's huge-page path, end to end: memory in 2 MiB hugetlb pages.

A child process maps MAP_HUGETLB memory, registers it with userfaultfd and
hands it to ``serve-dest --uffd-socket`` with ``"page_size": 2097152``
(Firecracker's hand-over), then touches every 4 KiB page from native code.
``migrate --image --page-size 2097152`` serves an image with random data,
all-zero huge pages and zero 4 KiB pages inside otherwise non-zero huge pages.
Pages must be placed a whole huge page at a time: requests are for whole huge
pages, and a stream that does not give a huge page's target pages together and
in order is refused (exit 3).
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import IS_ROOT, PROC_TIMEOUT, finish, run_postcopy, single_stderr_line, wait_until, waits_in_userfault
from fakes import FakeSource, preamble
from postcopy_cli import codec
from postcopy_cli.selftest.harness import kill_and_reap

TP = 4096
HP = 2 << 20
HUGE_PAGES = 8                    # the guest's memory: 16 MiB
SIZE = HUGE_PAGES * HP
TP_PER_HP = HP // TP
RESERVE = 16                      # free huge pages wanted for the test
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"

# the program whose memory is in huge pages: maps, registers, hands over, touches
TOUCHER = textwrap.dedent("""
    import ctypes, json, mmap, socket, sys
    from postcopy_cli.uffd import RegisterMode, Userfaultfd
    from postcopy_cli.channels.handover import GuestRegion, send_handover
    from postcopy_cli.guest.programs import touch_memory

    sock_path, size, image = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    MAP_HUGETLB = 0x40000
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    uffd = Userfaultfd()
    uffd.api(0)
    uffd.register(addr, size, RegisterMode.MISSING)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sock_path)
    send_handover(sock, [GuestRegion(addr, size, 0, 2097152)], uffd.fileno())
    with open(image, "rb") as f:
        expected = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    report = touch_memory(addr, size, expected=expected, order="random")
    print(json.dumps(report), flush=True)
""")


def _free_hugepages() -> int:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    return max(0, info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0))


@pytest.fixture
def hugepages_2m():
    """RESERVE more free 2 MiB huge pages for the test; vm.nr_hugepages restored after."""
    if not IS_ROOT:
        pytest.skip(f"needs root to reserve huge pages ({NR_HUGEPAGES})")
    with open("/proc/meminfo") as f:
        if "Hugepagesize:       2048 kB" not in f.read():
            pytest.skip("the default huge page size of this kernel is not 2 MiB")
    with open(NR_HUGEPAGES) as f:
        old = f.read().strip()
    try:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(int(old) + RESERVE))
    except OSError as e:
        pytest.skip(f"the kernel refused to reserve huge pages ({NR_HUGEPAGES}: {e.strerror})")
    try:
        free = _free_hugepages()
        if free < HUGE_PAGES:
            pytest.skip(f"the kernel reserved only {free} free 2 MiB huge pages of the {RESERVE} asked for "
                        f"(memory too fragmented or short); the test needs {HUGE_PAGES}")
        yield free
    finally:
        with open(NR_HUGEPAGES, "w") as f:
            f.write(old)


def make_image(path, size: int = SIZE) -> bytes:
    """Random data; huge pages 2 and 6 all zero; zero 4 KiB pages (and a filled one) inside others.

    ``size`` < SIZE: the image ends inside the last huge page (the rest of it reads as zeros).
    """
    rnd = random.Random(2097152)
    data = bytearray(rnd.randbytes(SIZE))
    for hp in (2, 6):
        data[hp * HP:(hp + 1) * HP] = bytes(HP)
    # zero target pages inside otherwise random huge pages: first, middle, last, a run
    for hp, pages in ((0, (0,)), (3, (1, 255, 511)), (5, range(100, 140)), (7, (511,))):
        for p in pages:
            at = hp * HP + p * TP
            data[at:at + TP] = bytes(TP)
    # a target page of one repeated non-zero byte (a PAGE record: a ZERO record means all zeros)
    data[4 * HP + 7 * TP:4 * HP + 8 * TP] = b"\x5a" * TP
    with open(path, "wb") as f:
        f.write(data[:size])
    return bytes(data[:size])


def start_toucher(sock_path, image) -> subprocess.Popen:
    # (conftest points PYTHONPATH at the postcopy_cli under test)
    return subprocess.Popen([sys.executable, "-c", TOUCHER, str(sock_path), str(SIZE), str(image)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_socket(path, proc: subprocess.Popen):
    """serve-dest creates the --uffd-socket before it prints 'listening'; this is a safety net only."""
    deadline = time.monotonic() + PROC_TIMEOUT
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


# ---------------------------------------------------------------------------
# end to end: serve-dest + huge-page program + migrate --image --page-size 2M

@pytest.mark.parametrize("single_channel,image_size", [(False, SIZE), (True, SIZE), (False, SIZE - HP + 3 * TP + 100)],
                         ids=["preempt", "single-channel", "image-ends-mid-huge-page"])
def test_hugetlb_program_end_to_end(tmp_path, serve_dest, hugepages_2m, single_channel, image_size):
    image = tmp_path / "img"
    make_image(image, image_size)
    sock_path = tmp_path / "u.sock"
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock_path), "--json", "--timeout", "30")
    wait_for_socket(sock_path, sd.proc)
    toucher = start_toucher(sock_path, image)
    try:
        mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--page-size", "2097152",
                           "--json", "--timeout", "30", *(["--single-channel"] if single_channel else []))
        t_rc, t_out, t_err = finish(toucher)
        rc, out, err = sd.wait()
    finally:
        kill_and_reap(toucher)
    assert mig.returncode == 0, (mig.stderr, err, t_err)
    assert t_rc == 0, t_err
    assert rc == 0, err
    touched = json.loads(t_out)
    assert touched["pages"] == SIZE // TP
    assert touched["mismatches"] == 0, touched
    stats = json.loads(out)
    pages = stats["pages"]
    assert pages["total"] == SIZE // TP
    assert pages["received"] == SIZE // TP, stats
    # whole huge pages only: each demand-placed page is a whole huge page
    assert pages["demand"] % TP_PER_HP == 0, stats
    assert pages["demand"] + pages["background"] + pages["skipped"] >= SIZE // TP, stats
    src = json.loads(mig.stdout)
    assert src["pages"] == SIZE // TP, src
    # every request the source answered was for whole huge pages
    assert src["requested_pages"] % TP_PER_HP == 0, src
    assert src["requested_pages"] <= src["requests"] * TP_PER_HP, src
    assert stats["postcopy-requests"] >= 1, stats


def fake_source_restore(tmp_path, serve_dest):
    """serve-dest with the toucher attached and a FakeSource of the 2 MiB-page block connected:
    (the image's bytes, serve-dest, the toucher, the source)."""
    image = tmp_path / "img"
    data = make_image(image)
    sock_path = tmp_path / "u.sock"
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock_path), "--json", "--timeout", "30")
    wait_for_socket(sock_path, sd.proc)
    toucher = start_toucher(sock_path, image)
    return data, sd, toucher, FakeSource(sd.port, codec.BlockInfo("mem", SIZE, HP))


def test_hugetlb_requests_whole_huge_pages_fake_source(tmp_path, serve_dest, hugepages_2m):
    """A fake source reads the return path: every request is one whole, aligned 2 MiB page of 'mem'."""
    data, sd, toucher, src = fake_source_restore(tmp_path, serve_dest)
    requests = []
    try:
        src.send(preamble(src.block))
        sent = set()
        # answer requests only, one huge page each, until every huge page went
        while len(sent) < HUGE_PAGES:
            for ev in src.events("serve-dest closed the connection"):
                if not isinstance(ev, codec.ReqPagesId):
                    continue
                requests.append((ev.block, ev.start, ev.length))
                hp = ev.start // HP
                if hp in sent:
                    continue
                sent.add(hp)
                src.send(src.pages(data, range(hp * HP, (hp + 1) * HP, TP)))
        src.send(codec.encode(codec.Eof()))
        t_rc, t_out, t_err = finish(toucher)
        rc, out, err = sd.wait()
    finally:
        src.close()
        kill_and_reap(toucher)
    assert rc == 0, err
    assert t_rc == 0, t_err
    assert json.loads(t_out)["mismatches"] == 0
    assert requests
    for name, start, length in requests:
        assert name == "mem"
        assert length == HP, requests
        assert start % HP == 0, requests
    stats = json.loads(out)
    assert stats["pages"]["received"] == SIZE // TP
    assert stats["pages"]["demand"] == SIZE // TP, stats


def test_hugetlb_own_memory_not_supported():
    """serve-dest --ram allocates its own memory in 4 KiB pages: it has no huge-page option."""
    pytest.skip("serve-dest --ram cannot put its own memory in huge pages; the attached-program tests cover them")


@pytest.mark.parametrize("args,message", [
    (["--attach", "/nonexistent.sock", "--page-size", "2M"], "--page-size goes with --image"),
    (["--image", "IMG", "--page-size", "3000"], "power of two"),
    (["--image", "IMG", "--page-size", "6144"], "power of two"),
    (["--image", "IMG", "--page-size", "2048"], "at least 4096"),
    (["--image", "IMG", "--page-size", "big"], "not a size"),
])
def test_migrate_page_size_usage_errors(tmp_path, args, message):
    image = tmp_path / "img"
    image.write_bytes(bytes(TP))
    r = run_postcopy("migrate", "--to", "tcp:127.0.0.1:1", *[str(image) if a == "IMG" else a for a in args])
    assert r.returncode == 2, r.stderr
    assert message in single_stderr_line(r.stderr)


# ---------------------------------------------------------------------------
# a huge page's target pages out of order or interleaved -> exit 3 naming the host page

def _interleaved(data: bytes) -> bytes:
    enc = codec.RamSectionEncoder()
    recs = [enc.page("mem", 0 * HP + p * TP, data[p * TP:(p + 1) * TP]) for p in range(10)]
    recs.append(enc.page("mem", 1 * HP, data[HP:HP + TP]))            # another huge page cuts in
    return enc.begin() + b"".join(recs) + enc.end()


def _out_of_order(data: bytes) -> bytes:
    enc = codec.RamSectionEncoder()
    base = 3 * HP
    order = [0, 1, 2, 4, 3]                                             # target page 4 before 3
    return enc.begin() + b"".join(enc.page("mem", base + p * TP, data[base + p * TP:base + (p + 1) * TP])
                                  for p in order) + enc.end()


def _zero_interleaved(data: bytes) -> bytes:
    enc = codec.RamSectionEncoder()
    base = 5 * HP
    recs = [enc.page("mem", base + p * TP, data[base + p * TP:base + (p + 1) * TP]) for p in range(3)]
    recs.append(enc.zero("mem", 2 * HP))                               # a ZERO record of huge page 2
    return enc.begin() + b"".join(recs) + enc.end()


def _mid_page_start(data: bytes) -> bytes:
    enc = codec.RamSectionEncoder()
    base = 4 * HP + 5 * TP                                              # not the first target page
    return enc.begin() + enc.page("mem", base, data[base:base + TP]) + enc.end()


MALFORMED = {
    "interleaved": (_interleaved, 0),
    "out-of-order": (_out_of_order, 3 * HP),
    "zero-interleaved": (_zero_interleaved, 5 * HP),
    "mid-page-start": (_mid_page_start, 4 * HP),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_hugetlb_malformed_host_page_exit_3(tmp_path, serve_dest, hugepages_2m, case):
    make, host_page = MALFORMED[case]
    data, sd, toucher, src = fake_source_restore(tmp_path, serve_dest)
    try:
        src.send(preamble(src.block) + make(data))
        rc, out, err = sd.wait()
        # the program's missing pages stay registered: it waits on one, it never reads a wrong page
        wait_until(lambda: waits_in_userfault(toucher.pid) or toucher.poll() is not None,
                   "the toucher waits for a missing page")
        assert toucher.poll() is None, toucher.communicate()
    finally:
        src.close()
        kill_and_reap(toucher)
    assert rc == 3, err
    line = single_stderr_line(err)
    assert re.search(r"protocol error in .*RAM", line), line
    assert f"{host_page:#x}" in line, line
    assert json.loads(out)["error"]["code"] == 3, out   # --json: the error document, nothing else
