"""End-to-end image restores over real loopback sockets into real userfaultfd-registered memory.

serve-dest, migrate and the programs that touch registered memory run as
subprocesses (a thread of the test process touching missing registered memory
would hold the GIL the fault thread needs).
"""
from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import PROC_TIMEOUT, postcopy_cmd, run_postcopy, touch_restore, write_image, zero_pages_of
from fakes import FakeSource, preamble
from postcopy_cli import codec
import postcopy_cli
from postcopy_cli.dest.serve import ServeDest, ServeOptions
from postcopy_cli.selftest.harness import child_env
from postcopy_cli.selftest.harness import kill_and_reap

# where the postcopy_cli under test lives (conftest also exports it in PYTHONPATH)
REPO = Path(postcopy_cli.__file__).resolve().parent.parent
PAGE = 4096
MiB = 1 << 20


def _popen(argv, **kw):
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=child_env(), **kw)


def _stats_ok(stats: dict, image_bytes: bytes, block_len: int, requests: int = 0):
    pages = stats["pages"]
    total = block_len // PAGE
    assert pages["total"] == total
    assert pages["received"] == total
    # every page is placed exactly once, by demand or in background (zero pages included,
    # counted also under "zero"); pages the program dropped itself count as received only
    assert pages["demand"] + pages["background"] + pages["precopy"] == total - pages["removed-by-program"]
    assert pages["removed-by-program"] == 0
    # a requested page may come on both channels (sent again on the preempt
    # channel while still in flight on the main stream); the second copy is skipped
    assert pages["skipped"] <= requests
    padded = image_bytes + bytes(block_len - len(image_bytes))
    assert pages["zero"] == zero_pages_of(padded)
    assert stats["bytes"] == total * PAGE
    # a demand-placed page was requested; never more requests than faults
    assert stats["postcopy-requests"] >= pages["demand"]
    assert stats["postcopy-requests"] <= stats["faults"]
    assert stats["latency-us"]["samples"] <= stats["postcopy-requests"]
    assert stats["unknown-faults"] == 0


def _readline(proc: subprocess.Popen, timeout: float = PROC_TIMEOUT) -> str:
    """proc.stdout.readline() that gives up (killing proc) instead of hanging."""
    box = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        proc.kill()
        pytest.fail(f"no line from pid {proc.pid} within {timeout} s (hung?)")
    return box[0]


# ---------------------------------------------------------------------------
# 1. image restore into an attached toucher

@pytest.mark.parametrize("transport,order,size", [
    ("tcp", "random", 32 * MiB),
    ("unix", "sequential", 16 * MiB),
    ("tcp", "sequential", 64 * MiB),
    ("unix", "random", 20 * MiB + 1234),      # not a multiple of 4096: zeros past its end
])
def test_image_restore_into_attached_toucher(tmp_path, serve_dest, transport, order, size):
    image = tmp_path / "mem.img"
    data = write_image(image, size, seed=size, zero_runs=((16, 40), (100, 1), (size // PAGE - 3, 2)))
    block_len = -(-size // PAGE) * PAGE
    listen = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    stats_file = tmp_path / "stats.json"
    sd = serve_dest("--listen", listen, "--uffd-socket", str(tmp_path / "uffd.sock"), "--json",
                    "--stats", str(stats_file))
    toucher = _popen(postcopy_cmd("workload", "touch", "--size", str(block_len), "--attach",
                                  str(tmp_path / "uffd.sock"), "--image", str(image), "--order", order,
                                  "--seed", "7", "--json"))
    try:
        # a capped source for the random toucher: its faults surely come before the background stream
        extra = ["--max-bandwidth", "64M"] if order == "random" else []
        mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--json", *extra)
        t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    finally:
        kill_and_reap(toucher)
    rc, out, err = sd.wait()
    assert mig.returncode == 0, mig.stderr
    assert toucher.returncode == 0, t_err
    assert rc == 0, err
    assert "Traceback" not in err + mig.stderr + t_err

    # serve-dest cleaned up its sockets' files
    assert not (tmp_path / "uffd.sock").exists()
    assert not (tmp_path / "mig.sock").exists()

    report = json.loads(t_out)
    assert report["pages"] == block_len // PAGE
    assert report["mismatches"] == 0

    stats = json.loads(out)
    assert json.loads(stats_file.read_text()) == stats
    src = json.loads(mig.stdout)
    _stats_ok(stats, data, block_len, requests=src["requests"])
    if order == "random":
        assert stats["postcopy-requests"] >= 1
        assert stats["pages"]["demand"] >= 1

    assert src["pages"] == block_len // PAGE
    # every page goes once; a requested one may go on both channels (a race the
    # destination resolves by skipping the second copy)
    sent = src["requested_pages"] + src["background_pages"]
    assert block_len // PAGE <= sent <= block_len // PAGE + src["requests"]
    assert src["zero_pages"] == stats["pages"]["zero"]


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_one_threads_blocktime_fits_in_its_post_copy(tmp_path, serve_dest, order):
    """The toucher is one thread that starts at RUN: the times it waited for pages cannot add up to more than
    RUN -> complete.  A requested page that the main stream had copied in but not yet counted, when its copy
    from the preempt channel found it there, woke the thread at once but ended its wait only when the main
    stream counted its run: the next waits overlapped it, and blocktime came out many times the wall time."""
    size = 32 << 20
    image = tmp_path / "mem.img"
    write_image(image, size, seed=3)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "uffd.sock"), "--json")
    mig, touch = touch_restore(tmp_path / "uffd.sock", sd.address, image, size, "--max-bandwidth", "48M",
                               order=order, seed=3, wait_run=True)
    rc, out, err = sd.wait()
    assert mig.returncode == 0 and rc == 0 and touch.returncode == 0, (mig.stderr, err, touch.stderr)
    assert json.loads(touch.stdout)["mismatches"] == 0
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["postcopy-requests"] > 0, stats
    # (1 ms: the two clocks are read in different threads)
    assert stats["postcopy-blocktime"] <= stats["postcopy-time-ms"] + 1, stats


def test_toucher_detects_wrong_image(tmp_path, serve_dest):
    """Guard: the end-to-end check above can fail: a different image is reported as mismatching."""
    image = tmp_path / "mem.img"
    other = tmp_path / "other.img"
    write_image(image, 4 * MiB, seed=1)
    write_image(other, 4 * MiB, seed=2)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json")
    toucher = _popen(postcopy_cmd("workload", "touch", "--size", "4M", "--attach", str(tmp_path / "u.sock"),
                                  "--image", str(other), "--json"))
    mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--json")
    t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    rc, _, err = sd.wait()
    assert mig.returncode == 0 and rc == 0, (mig.stderr, err)
    assert toucher.returncode != 0
    assert json.loads(t_out)["mismatches"] > 0


# ---------------------------------------------------------------------------
# 2. into serve-dest's own memory (library)

def test_image_restore_into_own_memory_library(tmp_path):
    size = 24 * MiB + 100
    image = tmp_path / "mem.img"
    data = write_image(image, size, seed=5, zero_runs=((0, 3), (50, 300)))
    block_len = -(-size // PAGE) * PAGE
    server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", ram=[("mem", block_len)], timeout=30))
    try:
        mig = _popen(postcopy_cmd("migrate", "--to", str(server.bound), "--image", str(image), "--json"))
        result = server.run()
        m_out, m_err = mig.communicate(timeout=PROC_TIMEOUT)
        assert mig.returncode == 0, m_err
        assert result.complete
        _stats_ok(result.stats, data, block_len)
        # every page is present now: reading the mapping is safe
        mapping = server.mappings[0]
        got = ctypes.string_at(mapping.addr, block_len)
        assert got[:size] == data
        assert got[size:] == bytes(block_len - size)
    finally:
        server.close()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_image_restore_serve_dest_ram_cli(tmp_path, serve_dest, transport):
    size = 8 * MiB
    image = tmp_path / "mem.img"
    data = write_image(image, size, seed=13)
    listen = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"
    sd = serve_dest("--listen", listen, "--ram", f"mem={size}", "--json", "--stats", str(tmp_path / "s.json"))
    mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--json")
    rc, out, err = sd.wait()
    assert mig.returncode == 0, mig.stderr
    assert rc == 0, err
    stats = json.loads(out)
    _stats_ok(stats, data, size)
    assert stats["postcopy-requests"] == 0 and stats["pages"]["background"] == size // PAGE
    assert json.loads((tmp_path / "s.json").read_text()) == stats


# ---------------------------------------------------------------------------
# 3. Firecracker-style clients written here (no name, no notify; page_size_kib only)

RAW_CLIENT = textwrap.dedent(r"""
    import array, ctypes, json, mmap, os, socket, sys, threading
    from postcopy_cli.uffd import Userfaultfd, RegisterMode, Feature
    from postcopy_cli.guest.programs import touch_memory
    from postcopy_cli.memory.mappings import address_of, madvise, MADV_DONTNEED

    cfg = json.loads(sys.argv[1])
    PAGE = 4096
    image = open(cfg["image"], "rb").read() if cfg.get("image") else b""
    maps = []
    u = Userfaultfd()
    u.api(Feature.EVENT_REMOVE if cfg.get("remove") else 0)
    regions = []
    for off, size in cfg["regions"]:
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = address_of(m)
        madvise(addr, size, 15)   # MADV_NOHUGEPAGE
        u.register(addr, size, RegisterMode.MISSING)
        maps.append((m, addr, off, size))
        r = {"base_host_virt_addr": addr, "size": size, "offset": off}
        if cfg.get("page_size_field") == "page_size":
            r["page_size"] = PAGE     # newer Firecracker: bytes
        else:
            r["page_size_kib"] = 4    # older Firecracker
        regions.append(r)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(cfg["sock"])
    s.sendmsg([json.dumps(regions).encode()],
              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [u.fileno()]).tobytes())])
    u.close()

    def expected(off, size, zero_pages=()):
        e = bytearray(image[off:off + size])
        e += bytes(size - len(e))
        for p in zero_pages:
            e[p * PAGE:(p + 1) * PAGE] = bytes(PAGE)
        return e

    mode = cfg["mode"]
    if mode == "touch":
        bad = 0
        for m, addr, off, size in maps:
            rep = touch_memory(addr, size, expected=expected(off, size), order=cfg.get("order", "random"))
            bad += rep["mismatches"]
        print(json.dumps({"mismatches": bad}), flush=True)
        sys.exit(1 if bad else 0)
    elif mode == "hold":
        print("ready", flush=True)
        sys.stdin.readline()
    elif mode == "remove":
        m, addr, off, size = maps[0]
        p = size // PAGE - 1
        first = touch_memory(addr + p * PAGE, PAGE, expected=expected(off + p * PAGE, PAGE))["mismatches"]
        madvise(addr + p * PAGE, PAGE, MADV_DONTNEED)
        again = touch_memory(addr + p * PAGE, PAGE, expected=b"")["mismatches"]   # zeros expected
        # a page dropped before it ever arrived reads as zeros too (not fetched)
        q = p - 1
        madvise(addr + q * PAGE, PAGE, MADV_DONTNEED)
        never = touch_memory(addr + q * PAGE, PAGE, expected=b"")["mismatches"]
        print(json.dumps({"first": first, "after_remove": again, "never_fetched": never}), flush=True)
        sys.stdin.readline()    # the migration is over
        rest = touch_memory(addr, size, expected=expected(off, size, zero_pages=[p, q]))["mismatches"]
        print(json.dumps({"rest": rest}), flush=True)
    elif mode == "dedup":
        # several threads fault on the same pages at the same time; os.write
        # releases the GIL while the kernel reads the (missing) page
        m, addr, off, size = maps[0]
        view = memoryview(m)
        pages = cfg["pages"]
        out = {}
        def worker(i):
            r, w = os.pipe()
            got = []
            for p in pages:
                os.write(w, view[p * PAGE:(p + 1) * PAGE])
                got.append(os.read(r, PAGE) == expected(off + p * PAGE, PAGE))
            out[i] = all(got)
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(cfg["threads"])]
        for t in ts: t.start()
        for t in ts: t.join()
        print(json.dumps({"ok": all(out.values())}), flush=True)
        sys.stdin.readline()
""")


def _raw_client(tmp_path, cfg: dict) -> subprocess.Popen:
    script = tmp_path / "raw_client.py"
    script.write_text(RAW_CLIENT)
    return subprocess.Popen([sys.executable, str(script), json.dumps(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=child_env())


@pytest.mark.parametrize("regions,field", [
    ([(0, 16 * MiB)], "page_size_kib"),
    ([(0, 16 * MiB)], "page_size"),
    ([(0, 6 * MiB), (6 * MiB, 10 * MiB)], "page_size_kib"),     # two mappings forming one block "mem"
    ([(8 * MiB, 4 * MiB), (0, 4 * MiB)], "page_size"),          # out of order, a hole no mapping covers
])
def test_firecracker_style_client(tmp_path, serve_dest, regions, field):
    size = max(o + s for o, s in regions)
    mapped = sum(s for _, s in regions)
    image = tmp_path / "mem.img"
    write_image(image, size, seed=11)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json")
    client = _raw_client(tmp_path, {"sock": str(tmp_path / "u.sock"), "image": str(image),
                                    "regions": regions, "mode": "touch", "order": "random",
                                    "page_size_field": field})
    mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--json", "--max-bandwidth", "64M")
    c_out, c_err = client.communicate(timeout=PROC_TIMEOUT)
    rc, out, err = sd.wait()
    assert mig.returncode == 0, mig.stderr
    assert rc == 0, err
    assert client.returncode == 0, c_out + c_err
    assert json.loads(c_out) == {"mismatches": 0}
    stats = json.loads(out)
    assert stats["pages"]["received"] == stats["pages"]["total"] == size // PAGE
    assert stats["pages"]["demand"] + stats["pages"]["background"] + stats["pages"]["precopy"] == mapped // PAGE
    assert stats["postcopy-requests"] >= 1


# ---------------------------------------------------------------------------
# 6. the attached program dies mid-migration

def test_program_killed_mid_migration(tmp_path, serve_dest):
    image = tmp_path / "mem.img"
    write_image(image, 64 * MiB, seed=3)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json")
    client = _raw_client(tmp_path, {"sock": str(tmp_path / "u.sock"), "regions": [(0, 64 * MiB)], "mode": "hold"})
    mig = _popen(postcopy_cmd("migrate", "--to", sd.address, "--image", str(image), "--json",
                              "--max-bandwidth", "2M"))
    try:
        assert _readline(client).strip() == "ready"
        time.sleep(0.5)    # let some pages flow (64 MiB at 2 MiB/s takes half a minute)
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=PROC_TIMEOUT)
        rc, out, err = sd.wait()
        m_out, m_err = mig.communicate(timeout=PROC_TIMEOUT)
    finally:
        kill_and_reap(client, mig)
    assert rc == 1, err
    assert "Traceback" not in err
    assert "program" in err and ("exited" in err or "closed" in err), err
    # the destination answers SHUT 1 before it closes (exit 3, when the source reads it) or just closes (4)
    assert mig.returncode in (1, 3, 4), m_err
    assert "Traceback" not in m_err


# ---------------------------------------------------------------------------
# 8. UFFD_EVENT_REMOVE: a dropped page reads as zeros, is not refetched, no hang

def test_event_remove_zero_fills(tmp_path, serve_dest):
    size = 4 * MiB
    image = tmp_path / "mem.img"
    write_image(image, size, seed=21, zero_runs=())
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json")
    client = _raw_client(tmp_path, {"sock": str(tmp_path / "u.sock"), "image": str(image),
                                    "regions": [(0, size)], "mode": "remove", "remove": True})
    # slow source: the last page comes in background only after several seconds, so the
    # program's demand fetch, MADV_DONTNEED and re-read happen mid-migration
    mig = _popen(postcopy_cmd("migrate", "--to", sd.address, "--image", str(image), "--json",
                              "--max-bandwidth", "1M"))
    try:
        line = _readline(client)
        assert json.loads(line) == {"first": 0, "after_remove": 0, "never_fetched": 0}, line + client.stderr.read()
        # ... and that was served by serve-dest, not by the memory being unregistered at the end
        assert sd.proc.poll() is None
        rc, out, err = sd.wait()
        m_out, m_err = mig.communicate(timeout=PROC_TIMEOUT)
        client.stdin.write("done\n")
        client.stdin.flush()
        c_out, c_err = client.communicate(timeout=PROC_TIMEOUT)
    finally:
        kill_and_reap(client, mig)
    assert rc == 0, err
    assert mig.returncode == 0, m_err
    assert client.returncode == 0, c_err
    # the source's copy of the dropped page was not placed over it afterwards
    assert json.loads(c_out) == {"rest": 0}
    stats = json.loads(out)
    # the page dropped before it arrived (the demand-fetched one may count too: its bit is set just after
    # the UFFDIO_COPY that woke the program)
    assert stats["pages"]["removed-by-program"] in (1, 2)
    assert 1 <= stats["late-faults"] <= 10                # the re-reads, zero-filled once (no refault loop)
    assert stats["pages"]["received"] == stats["pages"]["total"]


# ---------------------------------------------------------------------------
# 7. dedup: the fault thread never asks twice for the same page

def test_fault_dedup_with_slow_source(tmp_path, serve_dest):
    size = 2 * MiB
    image = tmp_path / "mem.img"
    data = write_image(image, size, seed=9, zero_runs=())
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json")
    pages = [3, 100, 7, 511, 250, 42]
    client = _raw_client(tmp_path, {"sock": str(tmp_path / "u.sock"), "image": str(image),
                                    "regions": [(0, size)], "mode": "dedup", "pages": pages, "threads": 4})
    src = FakeSource(sd.port, codec.BlockInfo("mem", size, PAGE))
    try:
        src.send(preamble(src.block))
        requested: list[int] = []
        sent = set()
        while len(sent) < len(pages):
            new = []
            for ev in src.events():
                assert isinstance(ev, codec.ReqPagesId), ev
                assert ev.length == PAGE
                requested.append(ev.start // PAGE)
                new.append(ev.start // PAGE)
            time.sleep(0.3)    # answer late: the other threads fault on the same page meanwhile
            src.send(src.pages(data, [p * PAGE for p in new]))
            sent.update(new)
        assert json.loads(_readline(client)) == {"ok": True}
        # the rest in background, EOF, SHUT 0
        src.send(src.pages(data, [p * PAGE for p in range(size // PAGE) if p not in sent]) +
                 codec.encode(codec.Eof()))
        shut = None
        while shut is None:
            for ev in src.events():
                if isinstance(ev, codec.Shut):
                    shut = ev.status
                else:
                    requested.append(ev.start // PAGE)
        assert shut == 0
    finally:
        src.close()
        client.stdin.close()
    rc, out, err = sd.wait()
    client.wait(timeout=PROC_TIMEOUT)
    assert rc == 0, err
    assert sorted(requested) == sorted(set(requested)), requested
    assert set(requested) == set(pages)
    stats = json.loads(out)
    assert stats["postcopy-requests"] == len(pages)
    assert stats["faults"] >= stats["postcopy-requests"]


def test_program_dies_before_source_connects(tmp_path, serve_dest):
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json")
    client = _raw_client(tmp_path, {"sock": str(tmp_path / "u.sock"), "regions": [(0, MiB)], "mode": "hold"})
    try:
        assert _readline(client).strip() == "ready"
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=PROC_TIMEOUT)
        rc, out, err = sd.wait()
    finally:
        kill_and_reap(client)
    assert rc == 1, err
    assert "Traceback" not in err and "program" in err, err


@pytest.mark.parametrize("how", ["stall", "disconnect"])
def test_source_gone_while_program_waits_for_a_page(tmp_path, serve_dest, how):
    """serve-dest ends (exit 4) and the program blocked on a missing page is released, not left hanging."""
    size = MiB
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json",
                    "--timeout", "1")
    image = tmp_path / "img"
    write_image(image, size, seed=2, zero_runs=())
    toucher = _popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(tmp_path / "u.sock"),
                                  "--image", str(image), "--json"))
    src = FakeSource(sd.port, codec.BlockInfo("mem", size, PAGE))
    try:
        src.send(preamble(src.block))
        # wait for the toucher's first request, never answer it
        events = []
        while not events:
            events.extend(src.events())
        assert isinstance(events[0], codec.ReqPagesId) and events[0].start == 0
        if how == "disconnect":
            src.close()
        rc, out, err = sd.wait()
        t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    finally:
        src.close()
        kill_and_reap(toucher)
    assert rc == 4, err
    assert "Traceback" not in err
    assert toucher.returncode != 0     # it saw zeros where the image has data


def test_fault_before_listen_answered_by_precopy_is_not_requested(tmp_path, serve_dest):
    """A program faults before the source connects; the page then arrives in pre-copy (before LISTEN):
    the program gets it, and no request for it goes out at LISTEN."""
    size = MiB
    image = tmp_path / "img"
    data = write_image(image, size, seed=17, zero_runs=())
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(tmp_path / "u.sock"), "--json")
    toucher = _popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(tmp_path / "u.sock"),
                                  "--image", str(image), "--order", "sequential", "--json"))
    time.sleep(1.0)    # let the toucher hand over and block on page 0 (if it has not yet, nothing is requested either)
    src = FakeSource(sd.port, codec.BlockInfo("mem", size, PAGE))
    try:
        src.send(preamble(src.block, through="advise") + src.pages(data, range(0, size, PAGE)) +
                 codec.encode(codec.Ping(1)))
        events = []
        while codec.Pong(1) not in events:     # every page is in before LISTEN goes out
            events.extend(src.events())
        src.send(codec.encode(codec.PostcopyListen()) + codec.encode(codec.PostcopyRun()) +
                 codec.encode(codec.Eof()))
        while not any(isinstance(e, codec.Shut) for e in events):
            events.extend(src.events())
    finally:
        src.close()
    rc, out, err = sd.wait()
    t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    assert rc == 0, err
    assert toucher.returncode == 0, t_err
    assert [e for e in events if not isinstance(e, codec.Pong)] == [codec.Shut(0)]
    stats = json.loads(out)
    assert stats["postcopy-requests"] == 0
