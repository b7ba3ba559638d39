"""Post-copy recovery end to end (issue 10): serve-dest and migrate as real processes, the FaultProxy between
them breaking, stalling and resetting the connections; every byte checked on the destination.

Image mode: ``workload touch`` on the destination reads every page of its memory in random order and
compares it with the image (mismatches must be 0).  Live mode: ``workload incoming``'s memory check
(QEMU's migration-test rule).  All processes must exit 0 and both sides count the recoveries.
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time

import pytest

from conftest import PROC_TIMEOUT, ServeDestProc, postcopy_cmd, write_image
from postcopy_cli.selftest.harness import kill_and_reap, last_json
from proxy import FaultProxy
from test_live import live  # noqa: F401 (the fixture)

MiB = 1 << 20


class ImageRestore:
    """serve-dest with `workload touch` attached, `migrate --image` to it through a FaultProxy."""

    def __init__(self, tmp_path, size: int, *, dest_args=(), touch_order: str = "random"):
        self.tmp, self.size = tmp_path, size
        self.image = tmp_path / "mem.img"
        write_image(self.image, size, seed=5)
        sock = tmp_path / "uffd.sock"
        self.dest = ServeDestProc("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock), "--json",
                                  "--timeout", "5", "--recover-timeout", "60", *dest_args)
        self.touch = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(sock),
                                                   "--image", str(self.image), "--order", touch_order, "--json",
                                                   "--connect-timeout", "20"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.proxy = FaultProxy(("127.0.0.1", self.dest.port))
        self.migrates: list[subprocess.Popen] = []

    def migrate(self, *args: str, to: str | None = None) -> subprocess.Popen:
        p = subprocess.Popen(postcopy_cmd("migrate", "--image", str(self.image), "--to", to or self.proxy.uri,
                                          "--json", "--timeout", "5", "--recover-timeout", "60", *args),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.migrates.append(p)
        return p

    def finish(self, mig: subprocess.Popen) -> tuple[dict, dict]:
        """Both commands and the program exit 0, every byte matched; (migrate's stats, serve-dest's stats)."""
        out, err = mig.communicate(timeout=PROC_TIMEOUT)
        assert mig.returncode == 0, err
        rc, dout, derr = self.dest.wait()
        assert rc == 0, derr
        t_out, t_err = self.touch.communicate(timeout=PROC_TIMEOUT)
        assert self.touch.returncode == 0, t_err
        report = json.loads(t_out.strip().splitlines()[-1])
        assert report["mismatches"] == 0 and report["pages"] == self.size // 4096, report
        assert "Traceback" not in err + derr + t_err
        return last_json(out), json.loads(dout.strip().splitlines()[-1])

    @contextlib.contextmanager
    def explained(self):
        """A failure inside names what every process said (their stderr), for the record."""
        try:
            yield
        except (AssertionError, subprocess.TimeoutExpired) as e:
            logs = []
            for name, p in [("serve-dest", self.dest.proc), ("workload touch", self.touch),
                            *[("migrate", m) for m in self.migrates]]:
                if p.poll() is None:
                    p.kill()
                try:
                    _, err = p.communicate(timeout=PROC_TIMEOUT)
                except ValueError:   # read already
                    err = "(read)"
                logs.append(f"--- {name} (rc {p.returncode}):\n{err[-3000:]}")
            logs.append(f"--- proxy: {self.proxy.connections()}")
            raise AssertionError(f"{e}\n" + "\n".join(logs)) from None

    def close(self):
        kill_and_reap(self.touch, *self.migrates)
        self.dest.kill()
        self.proxy.close()


@pytest.fixture
def restore(tmp_path):
    made = []

    def make(size: int, **kw) -> ImageRestore:
        r = ImageRestore(tmp_path, size, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def wait_postcopy(proxy: FaultProxy, nbytes: int) -> None:
    """serve-dest runs the migration (its first page request came back: it took the connection and is past
    LISTEN) and ``nbytes`` went its way.  (The tests that break a migration once cap it at 10M, several
    seconds for their 64 MiB, so that a test thread starved of CPU still breaks it before its end.)"""
    proxy.wait_bytes("main", "s2c", 1, timeout=PROC_TIMEOUT)
    proxy.wait_bytes("main", "c2s", nbytes, timeout=PROC_TIMEOUT)


def cut_repeatedly(proxy: FaultProxy, cuts: int, *, kind=None, first_after: int = 1 << 20) -> None:
    """``cuts`` failures in one migration: the first once ``first_after`` bytes went to the destination, each
    next one once the previous recovery has pages flowing again."""
    wait_postcopy(proxy, first_after)
    for i in range(cuts):
        if i:
            proxy.wait_resumed(i, timeout=PROC_TIMEOUT)
            if i % 2:
                time.sleep(0.05)   # else the next break comes right after RESUME_ACK
        proxy.cut(kind)


@pytest.mark.parametrize("channels", ["preempt", "single-channel"])
def test_ten_cuts_in_one_image_migration(restore, channels):
    r = restore(96 * MiB)
    mig = r.migrate("--max-bandwidth", "40M", *(["--single-channel"] if channels == "single-channel" else []))
    with r.explained():
        cut_repeatedly(r.proxy, 10)
        r.proxy.wait_resumed(10, timeout=PROC_TIMEOUT)
        mstats, dstats = r.finish(mig)
    assert mstats["postcopy-recoveries"] == 10, mstats
    assert dstats["postcopy-recoveries"] == 10 and len(dstats["postcopy-recovery-ms"]) == 10, dstats
    assert dstats["pages"]["received"] == dstats["pages"]["total"]


def test_ten_cuts_while_recording_a_workset(restore, tmp_path):
    """--record-workset stages the pages that come unasked: they count as received in the bitmap a
    resumed source gets (never sent again), and the faults on them are served while paused too."""
    from postcopy_cli.codec import workset as wsfile

    record = tmp_path / "cuts.ws"
    r = restore(96 * MiB, dest_args=("--record-workset", str(record)))
    mig = r.migrate("--max-bandwidth", "40M")
    with r.explained():
        cut_repeatedly(r.proxy, 10)
        r.proxy.wait_resumed(10, timeout=PROC_TIMEOUT)
        mstats, dstats = r.finish(mig)
    assert mstats["postcopy-recoveries"] == 10 and dstats["postcopy-recoveries"] == 10, (mstats, dstats)
    assert dstats["pages"]["received"] == dstats["pages"]["total"]
    assert dstats["pages"]["staged"] > 0 and dstats["staged-faults"] > 0, dstats
    ws = wsfile.load(str(record))
    pages = [p for _, first, n, _ in ws.in_fault_order() for p in range(first, first + n)]
    assert len(pages) == len(set(pages)) >= dstats["staged-faults"]


def test_preempt_channel_cut_alone(restore):
    r = restore(64 * MiB)
    with r.explained():
        mig = r.migrate("--max-bandwidth", "10M")
        r.proxy.wait_connections("preempt", 1, timeout=PROC_TIMEOUT)
        wait_postcopy(r.proxy, 256 << 10)
        r.proxy.cut("preempt")
        r.proxy.wait_resumed(1, timeout=PROC_TIMEOUT)
        mstats, dstats = r.finish(mig)
        assert dstats["postcopy-recoveries"] >= 1 and mstats["postcopy-recoveries"] >= 1


def test_half_open_source_notices_first(restore):
    """Only the source's side breaks; serve-dest's connection stays open and silent (half-open, as when a
    peer's host vanished): the source resumes on a new connection and serve-dest drops the dead one."""
    r = restore(64 * MiB)
    with r.explained():
        mig = r.migrate("--max-bandwidth", "10M", "--single-channel")
        wait_postcopy(r.proxy, 256 << 10)
        r.proxy.cut(side="client")
        r.proxy.wait_resumed(1, timeout=PROC_TIMEOUT)
        mstats, dstats = r.finish(mig)
    assert mstats["postcopy-recoveries"] == 1 and dstats["postcopy-recoveries"] == 1, (mstats, dstats)


def test_stall_past_timeout_then_resume(restore):
    """The link goes silent (nothing closes): both sides notice within --timeout, pause, and resume once it
    carries bytes again."""
    r = restore(64 * MiB)
    with r.explained():
        mig = r.migrate("--max-bandwidth", "10M", "--timeout", "2")
        wait_postcopy(r.proxy, 256 << 10)
        r.proxy.stall()
        time.sleep(8)   # the source fills the buffers on the way (MBs at 10M), then its --timeout 2 runs out
        r.proxy.unstall()
        r.proxy.wait_resumed(1, timeout=PROC_TIMEOUT)
        mstats, dstats = r.finish(mig)
        assert mstats["postcopy-recoveries"] >= 1


def test_cut_during_the_resume_handshake(restore):
    """The first resume connection breaks after one byte of RECV_BITMAP (double failure): paused again, the
    next attempt resumes."""
    r = restore(64 * MiB)
    with r.explained():
        mig = r.migrate("--max-bandwidth", "10M")
        r.proxy.cut_after("resume", "s2c", 1)
        wait_postcopy(r.proxy, 256 << 10)
        r.proxy.cut()
        r.proxy.wait_resumed(1, timeout=PROC_TIMEOUT)
        mstats, dstats = r.finish(mig)
        assert len(r.proxy.connections("resume")) >= 2
        # the destination may have sent RESUME_ACK before the cut reached it: then it ran again, and paused
        # again, once more than the source (which never got the ACK)
        assert mstats["postcopy-recoveries"] == 1 and dstats["postcopy-recoveries"] in (1, 2), (mstats, dstats)


@contextlib.contextmanager
def _after_a_whole_restore(tmp_path):
    """(r, stream): a fresh 8 MiB single-channel restore set up (not started) and the byte count of its main
    stream, measured on a first whole restore of the same image (the same image gives the same stream);
    inside ``r.explained()``."""
    runs = []
    for name in ("whole", "broken"):
        (tmp_path / name).mkdir()
        runs.append(ImageRestore(tmp_path / name, 8 * MiB))
    try:
        whole, r = runs
        with whole.explained():
            whole.finish(whole.migrate("--single-channel"))
        with r.explained():
            yield r, whole.proxy.connections("main")[0].bytes["c2s"]
    finally:
        for run in runs:
            run.close()


def test_shut_held_by_the_link_then_lost(tmp_path):
    """Every page is in and serve-dest sent SHUT 0, but the link holds it (stalled past a second) and then
    breaks: the source never read it.  serve-dest must not take the silence for delivery and leave (the
    source would retry a gone destination until its --recover-timeout): it stays until the source resumes
    and tells it SHUT 0 again; both exit 0."""
    with _after_a_whole_restore(tmp_path) as (r, stream):
        mig = r.migrate("--single-channel")
        # the whole stream (pages, EOF) has gone to serve-dest: its SHUT 0 is what comes back next
        r.proxy.wait_bytes("main", "c2s", stream, timeout=PROC_TIMEOUT)
        r.proxy.stall()
        time.sleep(2.0)
        r.proxy.cut()
        r.proxy.unstall()
        mstats, dstats = r.finish(mig)
    assert mstats["postcopy-recoveries"] == 1, mstats
    assert dstats["pages"]["received"] == dstats["pages"]["total"]


def test_program_gone_with_every_page_then_the_link_breaks(tmp_path):
    """Every page is in, the program read them all and exited, and the link breaks before the stream's end
    reached serve-dest (its last byte held, then a reset).  The program lost nothing: the migration has
    succeeded.  serve-dest must not fail for the program's absence (the source, which cannot know, would
    retry a gone destination until its --recover-timeout): it tells the resuming source SHUT 0; both exit 0."""
    with _after_a_whole_restore(tmp_path) as (r, stream):
        r.proxy.hold_after("main", "c2s", stream - 1)   # all but the end of the stream
        mig = r.migrate("--single-channel")
        r.touch.wait(timeout=PROC_TIMEOUT)               # read every page and left
        r.proxy.cut()
        mstats, dstats = r.finish(mig)
    assert mstats["postcopy-recoveries"] == 1, mstats
    assert dstats["pages"]["received"] == dstats["pages"]["total"]


def test_foreign_source_with_a_wrong_id_is_refused(restore):
    """Another source resuming with a wrong id is refused on its own connection; the real migration ends well."""
    r = restore(64 * MiB)
    with r.explained():
        mig = r.migrate("--max-bandwidth", "10M")
        wait_postcopy(r.proxy, 256 << 10)
        foreign = r.migrate("--resume", "--migration-id", "00" * 15 + "01", "--recover-timeout", "1",
                            to=r.dest.address)
        f_out, f_err = foreign.communicate(timeout=PROC_TIMEOUT)
        assert foreign.returncode == 4, f_err
        mstats, dstats = r.finish(mig)
        assert dstats["postcopy-recoveries"] == 0


def test_killed_image_source_is_restarted_with_resume(restore):
    """kill -9 of migrate --image mid post-copy; a new `migrate --image --resume` takes the paused migration over
    from the destination's RECV_BITMAP (its id from the record the first one wrote)."""
    r = restore(64 * MiB)
    with r.explained():
        first = r.migrate("--max-bandwidth", "10M")
        wait_postcopy(r.proxy, 256 << 10)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=PROC_TIMEOUT)
        second = r.migrate("--resume")
        mstats, dstats = r.finish(second)
        assert dstats["postcopy-recoveries"] == 1, dstats
        # the restarted source sent only what the destination lacked
        assert dstats["pages"]["skipped"] < dstats["pages"]["total"] // 4, dstats


def test_ten_cuts_in_one_live_migration(live):
    """migrate --attach: ten failures after RUN; the source program stays paused with its memory intact until
    the end, the destination program's memory check passes."""
    lv = live()
    lv.start_dest("--recover-timeout", "60")
    with FaultProxy(("127.0.0.1", lv.dest.port)) as proxy:
        lv.start_migrate("--postcopy-after", "0.5", "--max-bandwidth", "20M", "--recover-timeout", "60",
                         "--timeout", "5", to=proxy.uri)
        lv.start_incoming("64M", report_after=3)
        lv.start_source("64M")
        # after RUN only: the destination's first page request (before LISTEN it sends one PONG, 8 bytes)
        proxy.wait_bytes("main", "s2c", 9, timeout=PROC_TIMEOUT)
        for i in range(10):
            if i:
                proxy.wait_resumed(i, timeout=PROC_TIMEOUT)
                time.sleep(0.05)
            proxy.cut()
        proxy.wait_resumed(10, timeout=PROC_TIMEOUT)
        mig = lv.migrate.wait()
        assert mig.rc == 0, mig
        stats = mig.json()
        assert stats["postcopy-recoveries"] == 10, stats
        inc = lv.incoming.wait()
        assert inc.rc == 0, inc
        assert inc.json()["check"] == "ok", inc
        rc, out, err = lv.dest.wait()
        assert rc == 0, err
        dstats = json.loads(out.strip().splitlines()[-1])
        assert dstats["postcopy-recoveries"] == 10
        assert lv.source.alive(), lv.source.wait()
        lv.source.kill(signal.SIGTERM)
        assert lv.source.wait().rc == 0


@pytest.mark.slow
def test_cuts_at_random_moments_loop_with_cpu_hogs(tmp_path):
    """20 small restores with two CPU hogs, each cut once or twice at a random moment of its post-copy
    (right at its start, in the middle, near or after its last page): every one ends with exit 0 on all
    processes and every byte right."""
    import random
    import sys
    rng = random.Random(7)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(20):
            run_dir = tmp_path / f"run{i}"
            run_dir.mkdir()
            r = ImageRestore(run_dir, 8 * MiB)
            try:
                with r.explained():
                    mig = r.migrate("--max-bandwidth", "16M",
                                    *(["--single-channel"] if i % 2 else []))
                    r.proxy.wait_bytes("main", "s2c", 1, timeout=PROC_TIMEOUT)
                    for _ in range(1 + i % 2):
                        time.sleep(rng.uniform(0, 0.6))
                        r.proxy.cut()
                    r.finish(mig)
            finally:
                r.close()
    finally:
        for h in hogs:
            h.kill()
            h.wait()
