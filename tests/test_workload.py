"""The reference guest: native loop, memory check, toucher, and the three programs.

For the programs this test is the serving side: it listens on a Unix socket,
receives the hand-over, adopts the userfaultfd and resolves the program's
faults with UFFDIO_COPY.  The program runs in another process, so this
process never touches registered memory.
"""
from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import finish
from postcopy_cli.guest import programs as guest
from postcopy_cli._native import ffi, lib
from postcopy_cli.codec.constants import TARGET_PAGE_SIZE
from postcopy_cli.channels.control import ControlChannel
from postcopy_cli.channels.handover import receive_handover
from postcopy_cli.memory.mappings import AnonymousMapping
from postcopy_cli.uffd import PagefaultMsg, RemoveMsg, UffdError, Userfaultfd

PAGE = TARGET_PAGE_SIZE
TIMEOUT = 20.0


def _uffd_available() -> bool:
    try:
        Userfaultfd().close()
        return True
    except OSError:
        return False


needs_uffd = pytest.mark.skipif(not _uffd_available(), reason="userfaultfd not available to this user")


# ---------------------------------------------------------------------------
# native parts on plain (unregistered) memory

def _check_bytes(buf: bytearray, step: int = PAGE):
    return guest.check_memory(int(ffi.cast("uintptr_t", ffi.from_buffer(buf))), len(buf), step)


def test_check_accepts_one_step_down_and_wrap():
    size = 8 * PAGE
    for passes, pos in [(0, PAGE), (7, 4 * PAGE), (255, 5 * PAGE), (3, 7 * PAGE)]:
        buf = bytearray(b"".join(guest.layout_page(i, size, passes, pos) for i in range(8)))
        assert _check_bytes(buf) is None, (passes, pos)


def test_check_finds_first_bad_page():
    size = 8 * PAGE
    buf = bytearray(b"".join(guest.layout_page(i, size, 5, 3 * PAGE) for i in range(8)))
    buf[6 * PAGE] = 4  # a second step down
    assert _check_bytes(buf) == 6
    buf[6 * PAGE] = 5
    buf[2 * PAGE] = 9  # a jump up
    assert _check_bytes(buf) == 2


def test_layout_with_small_step_passes_check():
    size, step = 6 * PAGE, 1000
    buf = bytearray(b"".join(guest.layout_page(i, size, 2, PAGE + 7 * step, step) for i in range(6)))
    assert _check_bytes(buf, step) is None
    assert guest.parse_state_page(buf[:PAGE]) == {"magic_ok": True, "passes": 2, "position": PAGE + 7 * step,
                                                  "step": step}


def test_native_loop_in_process_pause_check_resume_stop():
    with AnonymousMapping(64 * PAGE) as ram:
        loop = guest.NativeLoop(ram.addr, ram.size, fresh=True).start()
        assert loop.wait_started(5) == 0
        time.sleep(0.05)
        p1 = loop.pause()
        assert loop.check() is None
        st = guest.parse_state_page(bytes(ram.view()[:PAGE]))  # unregistered memory: fine to read here
        assert st["magic_ok"] and st["passes"] == p1 and st["step"] == PAGE
        loop.resume()
        time.sleep(0.05)
        p2 = loop.pause()
        assert p2 > p1 and loop.check() is None
        # a second loop continues from the state page
        loop.stop()
        assert not loop.running and loop.failed() is None
        again = guest.NativeLoop(ram.addr, ram.size, fresh=False).start()
        assert again.wait_started(5) == p2
        again.stop()


def test_incoming_loop_refuses_foreign_state_page():
    with AnonymousMapping(8 * PAGE) as ram:
        loop = guest.NativeLoop(ram.addr, ram.size, fresh=False).start()
        with pytest.raises(guest.WorkloadError, match="state page"):
            loop.wait_started(5)


def test_touch_in_process_compares_and_reports():
    size = 32 * PAGE
    with AnonymousMapping(size) as ram:
        image = os.urandom(20 * PAGE)
        ram.view()[:len(image)] = image
        r = guest.touch_memory(ram.addr, size, expected=image, order="random", seed=7)
        assert r["pages"] == 32 and r["mismatches"] == 0 and r["first_mismatch"] is None
        assert sum(r["histogram_us"].values()) == 32
        assert r["p50_us"] <= r["p99_us"] <= r["max_us"]
        ram.view()[25 * PAGE + 9] = 1  # past the image: must be zero
        ram.view()[3 * PAGE] ^= 0xFF
        r = guest.touch_memory(ram.addr, size, expected=image, order="sequential")
        assert r["mismatches"] == 2 and r["first_mismatch"] == 3


# ---------------------------------------------------------------------------
# the programs, with this test as the serving side

class Server:
    """Listen, receive one hand-over, serve the program's faults from ``page_for(index)``."""

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "attach.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(TIMEOUT)
        self.faults = 0
        self.removes = []
        self._stop = threading.Event()
        self._thread = None

    def accept(self):
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        self.h = receive_handover(conn)
        self.uffd = Userfaultfd.adopt(self.h.uffd)
        self.uffd.set_blocking(False)
        self.region = self.h.regions[0]
        self.channel = ControlChannel(conn)
        return self.h

    def serve(self, page_for):
        def run():
            while not self._stop.is_set():
                if not select.select([self.uffd.fileno()], [], [], 0.05)[0]:
                    continue
                for msg in self.uffd.read_messages():
                    if isinstance(msg, RemoveMsg):
                        self.removes.append((msg.start, msg.end))
                    elif isinstance(msg, PagefaultMsg):
                        addr = msg.address & ~(PAGE - 1)
                        try:
                            self.uffd.copy_from(addr, page_for((addr - self.region.host_addr) // PAGE))
                            self.faults += 1
                        except UffdError as e:
                            if e.errno != 17:  # EEXIST: placed meanwhile
                                raise
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self):
        self._stop.set()
        if self._thread:
            self._thread.join(5)
        self.listener.close()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.close()


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "postcopy_cli", "workload", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=TIMEOUT):
    code, out, err = finish(proc, timeout)
    assert "Traceback" not in err, err
    return code, out, err


@needs_uffd
def test_touch_after_handover_gets_served_pages(server, tmp_path):
    size = 40 * PAGE
    image = os.urandom(30 * PAGE)
    (tmp_path / "img").write_bytes(image)
    proc = _spawn("touch", "--attach", server.path, "--size", str(size), "--image", str(tmp_path / "img"),
                  "--order", "random", "--seed", "5", "--json")
    h = server.accept()
    assert h.pid == proc.pid and h.notify and h.regions[0].size == size
    server.serve(lambda i: image[i * PAGE:(i + 1) * PAGE].ljust(PAGE, b"\0"))
    code, out, err = _finish(proc)
    report = json.loads(out)
    assert code == 0, err
    assert report["pages"] == 40 and report["mismatches"] == 0 and report["first_mismatch"] is None
    assert server.faults == 40
    assert set(report) >= {"seconds", "p50_us", "p99_us", "max_us", "histogram_us"}


@needs_uffd
def test_touch_reports_mismatch_and_waits_for_run(server, tmp_path):
    size = 16 * PAGE
    image = os.urandom(size)
    (tmp_path / "img").write_bytes(image)
    proc = _spawn("touch", "--attach", server.path, "--size", str(size), "--image", str(tmp_path / "img"),
                  "--wait-run", "--json")
    server.accept()
    server.serve(lambda i: bytes(PAGE) if i == 9 else image[i * PAGE:(i + 1) * PAGE])
    time.sleep(0.2)
    assert server.faults == 0  # nothing touched before RUN
    server.channel.send({"event": "run", "state": ""})
    code, out, _ = _finish(proc)
    report = json.loads(out)
    assert code == 1 and report["mismatches"] == 1 and report["first_mismatch"] == 9, (report, server.faults)


@needs_uffd
def test_incoming_continues_from_state_page_and_reports(server):
    size, passes, pos = 64 * PAGE, 7, 20 * PAGE
    proc = _spawn("incoming", "--attach", server.path, "--mem", str(size), "--report-after", "0.5")
    server.accept()
    server.serve(lambda i: guest.layout_page(i, size, passes, pos))
    # a discard before RUN is applied and acknowledged
    server.channel.send({"cmd": "discard", "ranges": {"mem": [[4 * PAGE, 2 * PAGE]]}})
    assert server.channel.receive() == {"event": "discarded"}
    server.channel.send({"event": "run", "state": base64.b64encode(b"dev").decode()})
    code, out, err = _finish(proc)
    report = json.loads(out)
    assert code == 0, err
    assert report["check"] == "ok" and report["first_bad_page"] is None
    assert report["passes_before"] == passes and report["passes_after"] > passes
    assert report["passes_per_second"] > 0
    assert server.faults == 64
    if server.h.regions and lib.UFFD_FEATURE_EVENT_REMOVE:
        assert server.removes == [(server.region.host_addr + 4 * PAGE, server.region.host_addr + 6 * PAGE)]


@needs_uffd
def test_incoming_reports_progress_during_postcopy_and_after_complete(server):
    """--report-after-complete: the report comes that long after the complete event, with the program's
    progress from RUN to complete and in the window after it (what qemu_compare.py sets beside QEMU's
    guest)."""
    size, passes, pos = 64 * PAGE, 3, 20 * PAGE
    proc = _spawn("incoming", "--attach", server.path, "--mem", str(size), "--report-after-complete", "0.5")
    server.accept()
    server.serve(lambda i: guest.layout_page(i, size, passes, pos))
    server.channel.send({"event": "run", "state": ""})
    time.sleep(0.3)
    server.channel.send({"event": "complete"})
    code, out, err = _finish(proc)
    assert code == 0, err
    report = json.loads(out)
    assert report["check"] == "ok"
    post, after = report["progress"]["postcopy"], report["progress"]["after_complete"]
    assert post["seconds"] >= 0.3 and after["seconds"] >= 0.5, report
    assert after["pages_per_second"] > 0 and after["whole_passes"] > 0, report
    assert report["seconds"] >= post["seconds"] + after["seconds"] - 0.01, report


@needs_uffd
def test_incoming_failed_event_exits_1(server):
    proc = _spawn("incoming", "--attach", server.path, "--mem", "64K")
    server.accept()
    server.channel.send({"event": "failed", "reason": "source went away"})
    code, out, err = _finish(proc)
    assert code == 1 and out == "" and "source went away" in err


@needs_uffd
def test_incoming_malformed_control_message_exits_1(server):
    proc = _spawn("incoming", "--attach", server.path, "--mem", "64K")
    server.accept()
    server.channel.sock.sendall(b"{not json\n")
    code, _, err = _finish(proc)
    assert code == 1 and err.count("\n") == 1


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        buf = bytearray(size)
        assert os.preadv(fd, [buf], addr) == size
        return bytes(buf)
    finally:
        os.close(fd)


@needs_uffd
def test_run_pause_read_resume_quit(server):
    size = 64 * PAGE
    proc = _spawn("run", "--attach", server.path, "--mem", str(size))
    h = server.accept()
    assert h.pid == proc.pid
    time.sleep(0.2)
    server.channel.send({"cmd": "pause"})
    paused = server.channel.receive()
    assert paused["event"] == "paused"
    mem = bytearray(_read_mem(h.pid, server.region.host_addr, size))
    st = guest.parse_state_page(mem[:PAGE])
    assert st["magic_ok"] and st["step"] == PAGE and st["passes"] == paused["passes"] > 0
    assert PAGE <= st["position"] < size
    assert _check_bytes(mem) is None
    time.sleep(0.1)
    assert _read_mem(h.pid, server.region.host_addr, size) == bytes(mem)  # really paused
    server.channel.send({"cmd": "resume"})
    assert server.channel.receive() == {"event": "resumed"}
    time.sleep(0.1)
    server.channel.send({"cmd": "pause"})
    assert server.channel.receive()["passes"] > paused["passes"]
    server.channel.send({"cmd": "quit"})
    code, out, err = _finish(proc)
    assert code == 0 and out == "", err


@needs_uffd
def test_run_keeps_running_after_socket_closes_and_reports(server):
    proc = _spawn("run", "--attach", server.path, "--mem", "256K", "--report-after", "0.6")
    server.accept()
    server.channel.sock.close()
    server.uffd.close()
    code, out, err = _finish(proc)
    report = json.loads(out)
    assert code == 0 and report["check"] == "ok" and report["passes_before"] == 0
    assert report["passes_after"] > 0 and "without quit" in err


def test_missing_socket_is_one_line_exit_4(tmp_path):
    """Cannot connect: exit 4 (disconnected), as in migrate."""
    proc = _spawn("run", "--attach", str(tmp_path / "nothing"), "--mem", "64K", "--connect-timeout", "0.2")
    code, out, err = _finish(proc)
    assert code == 4 and out == "" and err.count("\n") == 1 and "cannot connect" in err


def test_bad_size_is_usage_error(tmp_path):
    code, _, err = _finish(_spawn("incoming", "--attach", str(tmp_path / "x"), "--mem", "5000"))
    assert code == 2 and "multiple of 4096" in err


def _written_pages(pid: int, start: int, size: int, *, reprotect: bool) -> set[int]:
    """Page indexes written since last protected (PAGEMAP_SCAN, PAGE_IS_WRITTEN), optionally re-protecting."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        vec = ffi.new("struct pc_page_region[]", size // PAGE)
        arg = ffi.new("struct pc_pm_scan_arg *")
        arg.size = ffi.sizeof("struct pc_pm_scan_arg")
        arg.flags = lib.PC_PM_SCAN_WP_MATCHING | lib.PC_PM_SCAN_CHECK_WPASYNC if reprotect else 0
        arg.start, arg.end = start, start + size
        arg.vec, arg.vec_len = int(ffi.cast("uintptr_t", vec)), size // PAGE
        arg.category_mask = arg.return_mask = lib.PC_PAGE_IS_WRITTEN
        n = lib.pc_pagemap_scan(fd, arg)
        assert n >= 0, os.strerror(-n)
        return {p for r in vec[0:n] for p in range((r.start - start) // PAGE, (r.end - start) // PAGE)}
    finally:
        os.close(fd)


@needs_uffd
def test_run_memory_is_write_tracked_with_wp_async(server):
    """The source's view: protect everything, let the loop run, PAGEMAP_SCAN finds what it dirtied."""
    size = 64 * PAGE
    proc = _spawn("run", "--attach", server.path, "--mem", str(size), "--step", str(8 * PAGE))
    h = server.accept()
    base = server.region.host_addr
    server.channel.send({"cmd": "pause"})
    assert server.channel.receive()["event"] == "paused"
    server.uffd.writeprotect(base, size, True)
    assert _written_pages(h.pid, base, size, reprotect=False) == set()
    server.channel.send({"cmd": "resume"})
    assert server.channel.receive() == {"event": "resumed"}
    time.sleep(0.1)
    server.channel.send({"cmd": "pause"})
    assert server.channel.receive()["event"] == "paused"
    dirty = _written_pages(h.pid, base, size, reprotect=True)
    assert dirty == {0} | {p for p in range(1, 64) if (p - 1) % 8 == 0}  # state page + every 8th page
    assert _written_pages(h.pid, base, size, reprotect=False) == set()  # re-protected
    server.channel.send({"cmd": "quit"})
    code, _, err = _finish(proc)
    assert code == 0, err


@needs_uffd
def test_refused_handover_is_one_line_exit_1(server):
    proc = _spawn("incoming", "--attach", server.path, "--mem", "64K")
    server.accept()
    server.uffd.close()
    server.channel.sock.close()
    code, out, err = _finish(proc)
    assert code == 1 and out == "" and err.count("\n") == 1 and "before RUN" in err
