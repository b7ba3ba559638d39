"""Live migration (``migrate --attach``) end to end: real kernel, real sockets, real subprocesses.

Every test runs ``serve-dest``, ``migrate --attach``, ``workload run`` (the source
program) and ``workload incoming`` (the destination program) as subprocesses over
loopback; nothing here touches userfaultfd-registered memory from this process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import postcopy_cli

from conftest import PROC_TIMEOUT, ServeDestProc, finish, needs_root, postcopy_cmd, single_stderr_line
from postcopy_cli.selftest.harness import kill_and_reap, last_json

pytestmark = needs_root

MIB = 1 << 20


class Proc:
    """A postcopy subprocess with stdout/stderr captured."""

    def __init__(self, name: str, *args: str, wait_for: str | None = None):
        self.name = name
        self.p = subprocess.Popen(postcopy_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL)
        self.early_err = ""
        if wait_for:
            while True:
                line = self.p.stderr.readline()
                if not line:
                    raise AssertionError(f"{name} ended before {wait_for!r}: {self.early_err}")
                self.early_err += line
                if wait_for in line:
                    break
        self.rc: int | None = None
        self.out = self.err = ""

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait(self, timeout: float = PROC_TIMEOUT) -> "Proc":
        self.rc, self.out, err = finish(self.p, timeout)
        self.err = self.early_err + err
        return self

    def json(self) -> dict | None:
        return last_json(self.out)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.p.poll() is None:
            self.p.send_signal(sig)

    def __repr__(self):
        return f"<{self.name} rc={self.rc} out={self.out[-400:]!r} err={self.err[-800:]!r}>"


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def is_running(pid: int, seconds: float = 0.6) -> bool:
    """True when the process burns CPU (its native loop runs); a paused workload sits idle."""
    a = cpu_ticks(pid)
    time.sleep(seconds)
    return cpu_ticks(pid) - a >= 5


class Live:
    """One live migration's processes; every one still running at teardown is killed."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.procs: list[Proc] = []
        self.dest = self.migrate = self.incoming = self.source = None

    def start_dest(self, *extra: str) -> ServeDestProc:
        self.dest = ServeDestProc("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(self.tmp / "dst.sock"),
                                  "--json", "--timeout", "30", *extra)
        return self.dest

    def start_migrate(self, *extra: str, to: str | None = None) -> Proc:
        self.migrate = self._add(Proc("migrate", "migrate", "--attach", str(self.tmp / "src.sock"),
                                      "--to", to or self.dest.address, "--json", *extra,
                                      wait_for="waiting for the program"))
        return self.migrate

    def start_incoming(self, mem: str, report_after: float = 2) -> Proc:
        self.incoming = self._add(Proc("workload incoming", "workload", "incoming", "--mem", mem, "--attach",
                                       str(self.tmp / "dst.sock"), "--report-after", str(report_after),
                                       "--connect-timeout", "20"))
        return self.incoming

    def start_source(self, mem: str, *extra: str) -> Proc:
        self.source = self._add(Proc("workload run", "workload", "run", "--mem", mem, "--attach",
                                     str(self.tmp / "src.sock"), *extra))
        return self.source

    def _add(self, p: Proc) -> Proc:
        self.procs.append(p)
        return p

    def all(self, mem: str, *migrate_args: str, dest_mem: str | None = None, source_args=()) -> None:
        self.start_dest()
        self.start_migrate(*migrate_args)
        self.start_incoming(dest_mem or mem)
        self.start_source(mem, *source_args)

    def kill_all(self):
        kill_and_reap(*(p.p for p in self.procs), timeout=PROC_TIMEOUT)
        if self.dest is not None:
            self.dest.kill()


@pytest.fixture
def live(tmp_path):
    runs: list[Live] = []

    def make() -> Live:
        r = Live(tmp_path)
        runs.append(r)
        return r

    yield make
    for r in runs:
        r.kill_all()


def _check_success(lv: Live, mem: int, *, kill_source: bool) -> dict:
    """Common checks of a successful live migration; returns migrate's stats."""
    mig = lv.migrate.wait()
    assert mig.rc == 0, mig
    assert "Traceback" not in mig.err
    stats = mig.json()
    assert stats is not None, mig
    inc = lv.incoming.wait()
    assert inc.rc == 0, inc
    rep = inc.json()
    assert rep["check"] == "ok", rep
    assert rep["passes_after"] > rep["passes_before"], f"the workload must keep running on the destination: {rep}"
    rc, out, err = lv.dest.wait()
    assert rc == 0, err
    dstats = json.loads(out.strip().splitlines()[-1])
    assert dstats["pages"]["received"] == dstats["pages"]["total"] == mem // 4096, dstats
    if kill_source:
        src = lv.source.wait()
        assert src.rc == 0, src
    else:
        # stays alive, paused (QEMU's postmigrate) until it is ended
        time.sleep(0.3)
        assert lv.source.alive(), lv.source.wait()
        assert not is_running(lv.source.pid), "the migrated source must stay paused"
        lv.source.kill(signal.SIGTERM)
        src = lv.source.wait()
        assert src.rc == 0, src
    assert stats["downtime_ms"] > 0
    assert stats["discarded_pages"] >= 0
    assert stats["postcopy_requests"] >= 0
    stats["_dest"] = dstats
    stats["_incoming"] = rep
    return stats


# ---------------------------------------------------------------------------
# 1. happy paths

def test_live_migration_kill_source(live):
    lv = live()
    lv.all("32M", "--precopy-passes", "1", "--postcopy-after", "600", "--kill-source")
    stats = _check_success(lv, 32 * MIB, kill_source=True)
    assert stats["precopy_passes"] >= 1
    assert stats["pause"] == "request"
    assert stats["postcopy_pages"] > 0
    assert stats["_dest"]["pages"]["received"] == 32 * MIB // 4096


def test_live_migration_source_stays_paused(live):
    lv = live()
    # a pass count, not a time: a loaded machine may not finish a pass in a given time
    lv.all("16M", "--precopy-passes", "1", "--postcopy-after", "600")
    stats = _check_success(lv, 16 * MIB, kill_source=False)
    assert stats["precopy_passes"] >= 1


def test_live_migration_precopy_passes(live):
    lv = live()
    lv.all("16M", "--precopy-passes", "2", "--kill-source")
    stats = _check_success(lv, 16 * MIB, kill_source=True)
    assert stats["precopy_passes"] == 2


def test_sigusr1_switches_over_early(live):
    lv = live()
    lv.all("16M", "--postcopy-after", "60", "--kill-source")
    time.sleep(1.0)
    assert lv.migrate.alive()
    t = time.monotonic()
    lv.migrate.kill(signal.SIGUSR1)
    stats = _check_success(lv, 16 * MIB, kill_source=True)
    # not a timing assertion on speed: without the signal it would take 60 s
    assert time.monotonic() - t < 30
    assert stats["precopy_seconds"] < 30     # (how many passes fit before the signal depends on the load)


# ---------------------------------------------------------------------------
# 4. discards for pages that are then requested again

def test_discarded_pages_are_fetched_again(live):
    """The workload dirties every page: pages sent in pre-copy and dirtied since are
    discarded at switch-over and fetched again in post-copy.  If the destination kept
    a stale copy (discard not applied), QEMU's memory check fails."""
    lv = live()
    lv.all("32M", "--postcopy-after", "1", "--kill-source")
    stats = _check_success(lv, 32 * MIB, kill_source=True)
    assert stats["discarded_pages"] > 0
    assert stats["discard_commands"] >= 1
    assert stats["postcopy_pages"] >= stats["discarded_pages"]
    assert stats["_incoming"]["check"] == "ok"


# ---------------------------------------------------------------------------
# 5. bandwidth cap

def test_pages_the_program_keeps_writing_are_held_back_from_precopy(live):
    """The workload writes every page again within milliseconds: after the first sync pre-copy holds them
    back (a copy would be stale at once) and post-copy sends them; every byte is right on the destination.
    With --precopy-resend-hot nothing is held back."""
    lv = live()
    lv.all("32M", "--postcopy-after", "1", "--kill-source")
    stats = _check_success(lv, 32 * MIB, kill_source=True)
    assert stats["precopy_held_pages"] > 0, stats
    assert stats["postcopy_pages"] >= stats["precopy_held_pages"]
    assert stats["_incoming"]["check"] == "ok"


def test_precopy_resend_hot_sends_dirty_pages_again(live):
    lv = live()
    lv.all("16M", "--postcopy-after", "1", "--kill-source", "--precopy-resend-hot")
    stats = _check_success(lv, 16 * MIB, kill_source=True)
    assert stats["precopy_held_pages"] == 0, stats
    assert stats["_incoming"]["check"] == "ok"


@pytest.mark.slow
def test_the_programs_blocktime_fits_in_its_post_copy(live):
    """The incoming workload is one thread, running from RUN: its waits for pages cannot add up to more than
    RUN -> complete.  Live, most requested pages were already sent on the main stream and go again on the
    preempt channel; one that the main stream had placed but not yet counted, found present by the preempt
    copy, was woken then but counted (its wait ended) only with the main stream's run: blocktime came out
    several times the wall time (7.2 s in a 0.61 s post-copy)."""
    lv = live()
    # every page dirty at the hand-over, written again at once: pre-copy sends, post-copy sends it all again
    lv.start_dest()
    lv.start_migrate("--postcopy-after", "1", "--kill-source")
    lv.start_incoming("256M", report_after=8)   # past the end of post-copy even on a loaded machine
    lv.start_source("256M", "--warmup-passes", "1")
    stats = _check_success(lv, 256 * MIB, kill_source=True)
    dstats = stats["_dest"]
    assert dstats["postcopy-requests"] > 0, dstats
    # (1 ms: the two clocks are read in different threads)
    assert dstats["postcopy-blocktime"] <= dstats["postcopy-time-ms"] + 1, dstats


def test_bandwidth_cap_honoured(live):
    lv = live()
    cap = 40 * MIB
    # --precopy-resend-hot: pre-copy sends for its 2 s (the workload writes every page again at once: held
    # back, they would leave pre-copy idle after its first pass)
    lv.all("32M", "--postcopy-after", "2", "--max-bandwidth", "40M", "--kill-source", "--precopy-resend-hot")
    stats = _check_success(lv, 32 * MIB, kill_source=True)
    rate = stats["precopy_bytes"] / stats["precopy_seconds"]
    # Strict on the high side: the cap must never be exceeded by more than 10%.
    # Lenient on the low side (half the cap): this machine is shared with other
    # test runs and 2 vCPUs run four processes here, so the source may be starved;
    # running below a cap is not a violation of it.
    assert rate <= 1.10 * cap, f"{rate / MIB:.1f} MiB/s over a 40 MiB/s cap"
    assert rate >= 0.5 * cap, f"{rate / MIB:.1f} MiB/s, far below a 40 MiB/s cap"


# ---------------------------------------------------------------------------
# 2./3. failures before RUN leave the source program running

def _assert_source_resumed(lv: Live, report_after: float) -> None:
    """The source workload (started with --report-after) is running and reports a good memory check."""
    assert lv.source.alive(), lv.source.wait()
    assert is_running(lv.source.pid), "the source program must be running again after the failed migration"
    src = lv.source.wait()
    assert src.rc == 0, src
    rep = src.json()
    assert rep is not None and rep["check"] == "ok", src
    assert rep["passes_after"] > rep["passes_before"]
    assert rep["seconds"] >= report_after


def test_destination_refuses_blocks_source_keeps_running(live):
    lv = live()
    lv.start_dest()
    lv.start_migrate("--postcopy-after", "1")
    lv.start_incoming("16M")
    lv.start_source("32M", "--report-after", "4")
    rc, out, err = lv.dest.wait()
    assert rc == 3, err
    line = single_stderr_line(err)
    # the message names the block and both sizes
    assert "block 'mem'" in line, line
    assert str(32 * MIB) in line and str(16 * MIB) in line, line
    mig = lv.migrate.wait()
    # serve-dest answers SHUT 1 (exit 1) or just closes (exit 4), depending on when it notices
    assert mig.rc in (1, 3, 4), mig
    line = single_stderr_line(mig.err.replace(lv.migrate.early_err, ""))
    assert "resumed" in line or "keeps running" in line, line
    inc = lv.incoming.wait()
    assert inc.rc != 0
    _assert_source_resumed(lv, 4)


def test_destination_killed_during_precopy_source_resumed(live):
    lv = live()
    lv.start_dest()
    lv.start_migrate("--postcopy-after", "30", "--max-bandwidth", "4M")
    lv.start_incoming("32M")
    lv.start_source("32M", "--report-after", "5")
    time.sleep(1.5)
    assert lv.migrate.alive(), lv.migrate.wait()
    lv.dest.proc.kill()
    mig = lv.migrate.wait()
    assert mig.rc == 4, mig
    line = single_stderr_line(mig.err.replace(lv.migrate.early_err, ""))
    assert "resumed" in line or "keeps running" in line, line
    _assert_source_resumed(lv, 5)


def test_destination_killed_during_postcopy_source_stays_paused(live):
    """After RUN the destination owns the program: the source copy must not run again."""
    lv = live()
    lv.start_dest()
    # no recovery: the destination process is gone, nothing could resume
    lv.start_migrate("--postcopy-after", "0.3", "--max-bandwidth", "4M", "--recover-timeout", "0")
    lv.start_incoming("32M", report_after=30)
    lv.start_source("32M")
    # pre-copy sends ~1.2 MiB of 32 MiB, so post-copy lasts several seconds at 4 MiB/s
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not is_running(lv.source.pid, 0.2):
        pass     # until the source runs (it may still be starting)
    while time.monotonic() < deadline and is_running(lv.source.pid, 0.2):
        pass     # until the switch-over pauses the source
    time.sleep(0.5)
    assert lv.migrate.alive(), lv.migrate.wait()
    lv.dest.proc.kill()
    mig = lv.migrate.wait()
    assert mig.rc == 4, mig
    assert "Traceback" not in mig.err
    assert lv.source.alive()
    assert not is_running(lv.source.pid), "a source whose destination ran the program must not be resumed"


def test_source_program_killed_during_precopy(live):
    lv = live()
    lv.start_dest()
    lv.start_migrate("--postcopy-after", "30", "--max-bandwidth", "4M")
    lv.start_incoming("32M")
    lv.start_source("32M")
    time.sleep(1.5)
    pid = lv.source.pid
    lv.source.kill()
    lv.source.wait()
    mig = lv.migrate.wait()
    assert mig.rc == 1, mig
    line = single_stderr_line(mig.err.replace(lv.migrate.early_err, ""))
    assert f"pid {pid}" in line, line
    # what became of it, truly: not "keeps running" (issue 9)
    assert f"the program (pid {pid}) is gone from the source" in line and "keeps running" not in line, line


# ---------------------------------------------------------------------------
# 6. bad input from the attached program

BAD_PROGRAM = textwrap.dedent("""
    import json, socket, sys, time, array
    sys.path.insert(0, {root!r})
    from postcopy_cli.memory.mappings import AnonymousMapping
    from postcopy_cli.uffd import Feature, RegisterMode, Userfaultfd
    from postcopy_cli.channels.handover import GuestRegion, send_handover

    mode, path = sys.argv[1], sys.argv[2]
    ram = AnonymousMapping(4 << 20)
    u = Userfaultfd()
    s = socket.socket(socket.AF_UNIX)
    for _ in range(400):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    region = GuestRegion(ram.addr, ram.size, 0, 4096)
    if mode == "not-json":
        s.sendmsg([b"this is not json]"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [u.fileno()]).tobytes())])
    elif mode == "missing-field":
        doc = [{{"base_host_virt_addr": ram.addr, "offset": 0, "page_size": 4096}}]
        s.sendmsg([json.dumps(doc).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [u.fileno()]).tobytes())])
    elif mode == "no-fd":
        s.sendall(json.dumps([region.to_json(notify=True)]).encode())
    else:
        if mode == "missing-only":
            u.api(Feature.WP_ASYNC)
            u.register(ram.addr, ram.size, RegisterMode.MISSING)
        elif mode == "wp-sync":
            u.api(0)
            u.register(ram.addr, ram.size, RegisterMode.WP)
        elif mode == "unregistered":
            u.api(Feature.WP_ASYNC)
        send_handover(s, [region], u.fileno(), notify=True)
    # answer pause/resume like a cooperative program, until the socket closes
    buf = b""
    while True:
        d = s.recv(4096)
        if not d:
            break
        buf += d
        while b"\\n" in buf:
            line, buf = buf.split(b"\\n", 1)
            cmd = json.loads(line).get("cmd")
            if cmd in ("pause", "resume"):
                s.sendall(json.dumps({{"event": cmd + "d"}}).encode() + b"\\n")
""")


def _bad_program(live_run: Live, mode: str) -> subprocess.Popen:
    script = live_run.tmp / "bad_program.py"
    # the postcopy_cli under test (a source tree may have no compiled extension)
    script.write_text(BAD_PROGRAM.format(root=os.path.dirname(os.path.dirname(os.path.abspath(postcopy_cli.__file__)))))
    p = subprocess.Popen([sys.executable, str(script), mode, str(live_run.tmp / "src.sock")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live_run.procs.append(type("P", (), {"p": p, "kill": lambda self: p.poll() is None and p.kill()})())
    return p


def _refused_program(live, mode: str):
    """migrate --attach with a bad program (``_bad_program``'s mode): exit 1; (the program, migrate's one line)."""
    lv = live()
    lv.start_dest()
    lv.start_migrate("--postcopy-after", "0.5")
    prog = _bad_program(lv, mode)
    mig = lv.migrate.wait()
    assert mig.rc == 1, mig
    return prog, single_stderr_line(mig.err.replace(lv.migrate.early_err, ""))


@pytest.mark.parametrize("mode, words", [
    ("not-json", "not valid JSON"),
    ("missing-field", "'size'"),
    ("no-fd", "file descriptor"),
])
def test_malformed_handshake(live, mode, words):
    prog, line = _refused_program(live, mode)
    assert words in line, line
    prog.kill()
    prog.communicate(timeout=PROC_TIMEOUT)


@pytest.mark.parametrize("mode", ["missing-only", "wp-sync", "unregistered"])
def test_uffd_not_registered_for_write_protect(live, mode):
    prog, line = _refused_program(live, mode)
    assert f"pid {prog.pid}" in line, line
    assert "WP_ASYNC" in line and "region" in line and "'mem'" in line, line
    prog.kill()
    prog.communicate(timeout=PROC_TIMEOUT)
