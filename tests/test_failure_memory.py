"""After a failed migration an attached program never reads a zero page (issue 7 items 1 and 6).

The attached program is a real process that keeps its uffd open and touches its pages in order
from a thread calling native code (GIL released), printing each page's verification.  After the
failure it must be told ``failed`` and stay blocked on the first missing page: its touching
thread waits in handle_userfault (read from /proc, a state, not a timing) once serve-dest is gone.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from postcopy_cli import codec
from postcopy_cli.guest import programs as guest
from conftest import postcopy_cmd, waits_in_userfault, write_image
from fakes import FakeSource, preamble
from postcopy_cli.selftest.harness import kill_and_reap

PAGE = 4096
MiB = 1 << 20
HANG = 60.0   # a hang guard, not a timing assertion

PROG = r'''
import json, socket, sys, threading, time
from postcopy_cli._native import ffi, lib
from postcopy_cli.channels.handover import GuestRegion, send_handover
from postcopy_cli.memory.mappings import AnonymousMapping
from postcopy_cli.uffd import RegisterMode, Userfaultfd
path, image, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
exp = open(image, "rb").read()
ram = AnonymousMapping(size)
uffd = Userfaultfd()            # kept open for the life of the program
uffd.api(0)
uffd.register(ram.addr, size, RegisterMode.MISSING)
sock = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try:
        sock.connect(path)
        break
    except OSError:
        time.sleep(0.05)
send_handover(sock, [GuestRegion(ram.addr, size, 0, 4096, "mem")], uffd.fileno(), notify=True)
lock = threading.Lock()
def out(s):
    with lock:
        sys.stdout.write(s + "\n")
        sys.stdout.flush()
def toucher():
    out(f"TID {threading.get_native_id()}")
    res = ffi.new("struct pc_touch_result *")
    e = ffi.cast("uint8_t *", ffi.from_buffer(exp))
    for i in range(size // 4096):
        lib.pc_touch(ffi.cast("uint8_t *", ram.addr + i * 4096), 4096, e + i * 4096, 4096, 0, 0, res)
        out(f"PAGE {i} {'bad' if res.mismatches else 'ok'}")
    out("DONE")
for line in sock.makefile():
    msg = json.loads(line)
    out("EVENT " + json.dumps(msg))
    if msg.get("event") == "run":
        threading.Thread(target=toucher, daemon=True).start()
out("CLOSED")
threading.Event().wait()
'''


class Prog:
    """The attached test program; its stdout lines are collected in a thread."""

    def __init__(self, sock_path: str, image: str, size: int):
        self.p = subprocess.Popen([sys.executable, "-c", PROG, sock_path, image, str(size)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.tid: int | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            line = line.strip()
            if line.startswith("TID "):
                self.tid = int(line.split()[1])
            self.lines.append(line)

    def pages(self) -> int:
        return sum(1 for l in self.lines if l.startswith("PAGE "))

    def blocked(self) -> bool:
        """The touching thread waits for a missing page (in the kernel's userfaultfd)."""
        if self.tid is None:
            return False
        try:
            with open(f"/proc/{self.p.pid}/task/{self.tid}/wchan") as f:
                return f.read().strip() == "handle_userfault"
        except OSError:
            return False

    def events(self) -> list[dict]:
        return [json.loads(l[6:]) for l in self.lines if l.startswith("EVENT ")]

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def _wait_for(cond, what: str):
    deadline = time.monotonic() + HANG
    while not cond():
        assert time.monotonic() < deadline, f"hang guard: {what}"
        time.sleep(0.01)


def _settle(prog: Prog, sd) -> None:
    """Until serve-dest has exited and the program either waits on a missing page or has finished."""
    _wait_for(lambda: sd.proc.poll() is not None and (prog.blocked() or "DONE" in prog.lines
                                                      or prog.p.poll() is not None),
              "serve-dest ended and the program blocked or done")


def _proxy(target: tuple[str, int], cut_after: int) -> tuple[socket.socket, threading.Thread]:
    """A TCP proxy for one connection: forwards, then closes both sides once ``cut_after`` bytes (or a little
    more) went through and the destination has answered on the return path (so it took the connection: a connection that
    closes before serve-dest accepts it is refused, not a migration that broke)."""
    lst = socket.create_server(("127.0.0.1", 0))

    def run():
        a, _ = lst.accept()
        b = socket.create_connection(target)
        done = threading.Event()
        answered = threading.Event()

        def back():
            try:
                while not done.is_set():
                    d = b.recv(65536)
                    if not d:
                        break
                    answered.set()
                    a.sendall(d)
            except OSError:
                pass
        threading.Thread(target=back, daemon=True).start()
        sent = 0
        try:
            while sent < cut_after or not answered.is_set():
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
                sent += len(d)
        finally:
            done.set()
            for s in (a, b):
                s.shutdown(socket.SHUT_RDWR)
                s.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lst, t


def slow_image_migrate(sd, image, rate: str) -> subprocess.Popen:
    """`migrate --image` to serve-dest at ``rate`` (slow enough for a failure mid post-copy)."""
    return subprocess.Popen(postcopy_cmd("migrate", "--to", f"tcp:127.0.0.1:{sd.port}", "--image", str(image),
                                         "--max-bandwidth", rate),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _corrupt_source(port: int, image: bytes, pages: int):
    """A hand-written source: preamble, LISTEN, RUN, ``pages`` pages, then a record header with unknown flags."""
    src = FakeSource(port, codec.BlockInfo("mem", len(image), PAGE))
    src.send(preamble(src.block) + src.pages(image, range(0, pages * PAGE, PAGE), end=False) +
             (pages * PAGE | 0x40 | 0x08).to_bytes(8, "big"))
    return src


@pytest.mark.parametrize("how", ["kill-migrate", "cut", "corrupt"])
def test_program_never_reads_zeros_after_a_failure(tmp_path, serve_dest, how):
    size = 32 * MiB
    image = tmp_path / "img"
    data = write_image(image, size, seed=7, zero_runs=())
    usock = str(tmp_path / "u.sock")
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", usock, "--json", "--timeout", "30",
                    "--recover-timeout", "1")   # recovery waits 1 s, then fails as before
    prog = Prog(usock, str(image), size)
    migrate = conn = None
    try:
        if how == "corrupt":
            conn = _corrupt_source(sd.port, data, 8)
            expect_rc = 3
        else:
            to = f"tcp:127.0.0.1:{sd.port}"
            if how == "cut":
                lst, _ = _proxy(("127.0.0.1", sd.port), MiB)
                to = f"tcp:127.0.0.1:{lst.getsockname()[1]}"
            migrate = subprocess.Popen(postcopy_cmd("migrate", "--to", to, "--image", str(image), "--single-channel",
                                                    "--max-bandwidth", "4M"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            expect_rc = 4
            if how == "kill-migrate":
                _wait_for(lambda: prog.pages() >= 20, "the program touched 20 pages")
                migrate.kill()
        _settle(prog, sd)
        rc, out, err = sd.wait()
        bad = [l for l in prog.lines if l.endswith(" bad")]
        assert not bad, f"{len(bad)} pages read wrong (zeros) after the failure, first {bad[0]}"
        assert "DONE" not in prog.lines and prog.blocked(), "the program must wait on its missing page"
        assert rc == expect_rc, err
        assert "must be stopped" in err and "never arrived" in err, err
        failed = [e for e in prog.events() if e.get("event") == "failed"]
        assert failed and "never arrived" in failed[0]["reason"], prog.events()
        assert failed[0]["reason"] in err
    finally:
        prog.kill()
        if migrate is not None and migrate.poll() is None:
            migrate.kill()
        if migrate is not None:
            migrate.communicate()
        if conn is not None:
            conn.close()


def test_workload_touch_keeps_its_uffd_when_serve_dest_is_killed(tmp_path, serve_dest):
    """serve-dest dies (kill -9): workload touch reports the failure, exit 1, with no page read as zero."""
    size = 32 * MiB
    image = tmp_path / "img"
    write_image(image, size, seed=3, zero_runs=())
    usock = str(tmp_path / "u.sock")
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", usock, "--timeout", "30")
    touch = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", usock,
                                          "--image", str(image), "--wait-run", "--json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    migrate = slow_image_migrate(sd, image, "2M")
    try:
        def faulting():
            return waits_in_userfault(touch.pid)
        _wait_for(faulting, "workload touch waits for a page")
        sd.proc.kill()
        out, err = touch.communicate(timeout=HANG)
        assert touch.returncode == 1, (out, err)
        # no report (it never read on): the one document is the error
        assert "differ" not in err and set(json.loads(out)) == {"error"}, (out, err)
        assert "closed the control socket before every page arrived" in err, err
    finally:
        kill_and_reap(touch, migrate)


def test_workload_incoming_told_failed_exits_1_not_sigsegv(tmp_path, serve_dest):
    """The source dies after RUN: workload incoming is told failed and exits 1 with the reason (it crashed)."""
    size = 16 * MiB
    image = tmp_path / "img"
    with open(image, "wb") as f:
        for i in range(size // PAGE):
            f.write(guest.layout_page(i, size, 3, PAGE))
    usock = str(tmp_path / "u.sock")
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", usock, "--timeout", "30",
                    "--recover-timeout", "1")
    inc = subprocess.Popen(postcopy_cmd("workload", "incoming", "--mem", str(size), "--attach", usock),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    migrate = slow_image_migrate(sd, image, "1M")
    try:
        # the loop runs (RUN is past) once it waits for a page
        def faulting():
            return waits_in_userfault(inc.pid)
        _wait_for(faulting, "workload incoming waits for a page")
        migrate.kill()
        out, err = inc.communicate(timeout=HANG)
        assert inc.returncode == 1, (inc.returncode, err)
        assert "migration failed:" in err and "never arrived" in err, err
        rc, _, serr = sd.wait()
        assert rc in (1, 4), serr
    finally:
        kill_and_reap(inc, migrate)
