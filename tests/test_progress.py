"""Live status of migrate and serve-dest (issue 9 items 1 and 2).

The displays are fed the engines' real progress snapshots from a real live
migration (workload run -> migrate_live -> ServeDest -> workload incoming, over
loopback TCP), rendered at 80 columns into a string, and checked for what an
operator needs: the phase, bytes done of total, MiB/s, ETA, dirty pages,
requests, and no line that wraps.  The destination's figures must never run
backwards although the switch-over's discards lower its received count.
"""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import socket
import struct
import subprocess
import termios
import threading
import time

import pytest

from conftest import PROC_TIMEOUT, needs_root, postcopy_cmd, read_pty, write_image
from postcopy_cli.commands._common import format_rate, format_size, live_status, status_line
from postcopy_cli.commands.migrate import SourceStatus
from postcopy_cli.commands.serve_dest import DestStatus

MIB = 1 << 20
WIDTH = 80


def render_rows(status, snaps) -> list[list[str]]:
    """Each snapshot's rows as the display draws them at 80 columns."""
    return [status(s, WIDTH) for s in snaps]


def printed_lines(rows: list[str]) -> list[str]:
    """The rows printed on an 80-column terminal console: a row that wraps becomes two lines."""
    from rich.console import Console
    from rich.text import Text

    out = io.StringIO()
    console = Console(file=out, width=WIDTH, force_terminal=True, color_system=None)
    for row in rows:
        console.print(Text(row))
    return out.getvalue().splitlines()


def assert_fits(all_rows: list[list[str]]) -> None:
    for rows in all_rows:
        assert printed_lines(rows) == rows, f"wrapped at {WIDTH} columns: {rows}"
        assert all(len(r) < WIDTH for r in rows), rows


# ---------------------------------------------------------------------------
# formatting helpers

def test_sizes_and_rates_in_binary_units():
    assert format_size(512) == "512 B"
    assert format_size(64 * MIB) == "64.0 MiB"
    assert format_size(3 << 30) == "3.0 GiB"
    assert format_rate(120.5 * MIB) == "120.5 MiB/s"


def test_status_line_drops_fields_instead_of_wrapping():
    full = status_line("post-copy", done=20 * MIB, total=64 * MIB, rate=40 * MIB, eta=3, extra="12 requests",
                       width=WIDTH)
    assert "20.0/64.0 MiB" in full and "40.0 MiB/s" in full and "ETA 0:03" in full and "12 requests" in full
    assert "━" in full and len(full) < WIDTH
    for width in (60, 40, 20, 10):
        line = status_line("post-copy", done=20 * MIB, total=64 * MIB, rate=40 * MIB, eta=3, extra="12 requests",
                           width=width)
        assert len(line) < width and line.startswith("post-copy"), (width, line)


def test_migrate_attach_says_what_it_waits_for_before_the_engine_starts():
    from postcopy_cli.commands.migrate import _Watch

    watch, status = _Watch("tcp:127.0.0.1:4445", program="unix:/tmp/src.sock"), SourceStatus()
    assert status(watch(0.0), WIDTH) == ["waiting for the program on unix:/tmp/src.sock (0:00)"]
    assert status(watch(2.0), WIDTH) == ["waiting for the program on unix:/tmp/src.sock (0:02)"]
    watch.on_program(object())
    assert status(watch(0.1), WIDTH) == ["connecting to tcp:127.0.0.1:4445"]
    watch.on_wait(3.2)
    assert status(watch(3.3), WIDTH) == ["waiting for tcp:127.0.0.1:4445 (0:03)"]


# ---------------------------------------------------------------------------
# a real live migration, its snapshots recorded on both sides

@pytest.fixture(scope="module")
def live_snapshots(tmp_path_factory):
    """(source snapshots, destination snapshots) of one live migration of 16 MiB with discards."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from postcopy_cli.dest import engine
    from postcopy_cli.dest.serve import ServeDest, ServeOptions
    from postcopy_cli.source.live import LiveOptions, migrate_live

    tmp = tmp_path_factory.mktemp("progress")
    dest_snaps: list[dict] = []
    src_snaps: list[dict] = []

    def record_dest(d):
        dest_snaps.append(dict(d.progress(), t=time.monotonic()))

    # the destination's counters before and after each command of the stream (DISCARD,
    # STATE, LISTEN, RUN, EOF), and at the end: the switch-over, deterministically
    orig_command, orig_finish = engine.Destination.command, engine.Destination._finish

    def command(self, ev, decoder):
        record_dest(self)
        try:
            return orig_command(self, ev, decoder)
        finally:
            record_dest(self)

    def finish(self, decoder):
        result = orig_finish(self, decoder)
        record_dest(self)
        return result

    engine.Destination.command, engine.Destination._finish = command, finish
    procs = []
    try:
        server = ServeDest(ServeOptions(listen="tcp:127.0.0.1:0", uffd_socket=str(tmp / "dst.sock"), timeout=30))
        results: list = []

        def serve():
            try:
                results.append(server.run(progress=lambda p: dest_snaps.append(dict(p, t=time.monotonic()))))
            except BaseException as e:
                results.append(e)

        procs.append(subprocess.Popen(postcopy_cmd("workload", "incoming", "--mem", "16M", "--attach",
                                                   str(tmp / "dst.sock"), "--report-after", "2",
                                                   "--connect-timeout", "20"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        dest_thread = threading.Thread(target=serve)
        dest_thread.start()
        procs.append(subprocess.Popen(postcopy_cmd("workload", "run", "--mem", "16M", "--attach",
                                                   str(tmp / "src.sock"), "--connect-timeout", "20"),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))

        def on_start(mig):
            # a snapshot after every background chunk and at every pass end: every phase is seen
            streamer, send_background, refill = mig.streamer, mig.streamer._send_background, mig._refill

            def chunk():
                sent = send_background()
                src_snaps.append(dict(mig.progress(), t=time.monotonic()))
                return sent

            def pass_end(**kw):
                refill(**kw)
                src_snaps.append(dict(mig.progress(), t=time.monotonic()))

            streamer._send_background, mig._refill = chunk, pass_end

        # hold_hot off: the second pass sends the pages written again (held back, it would have nothing to send)
        opts = LiveOptions(postcopy_after=None, precopy_passes=2, max_bandwidth=48 * MIB, kill_source=True,
                           hold_hot=False)
        stats = migrate_live(str(tmp / "src.sock"), str(server.bound), opts, on_start=on_start)
        dest_thread.join(PROC_TIMEOUT)
        server.close()
        assert results and not isinstance(results[0], BaseException), results
        assert stats["discarded_pages"] > 0, stats
        src_snaps.append(dict(src_snaps[-1], phase="done", t=time.monotonic()))
        for p in procs:
            p.communicate(timeout=PROC_TIMEOUT)
        assert procs[0].returncode == 0, procs[0].stderr
    finally:
        engine.Destination.command, engine.Destination._finish = orig_command, orig_finish
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return src_snaps, dest_snaps


@needs_root
def test_migrate_display_shows_phases_bytes_rate_eta(live_snapshots):
    src, _ = live_snapshots
    all_rows = render_rows(SourceStatus(), src)
    assert_fits(all_rows)
    text = "\n".join(r for rows in all_rows for r in rows)
    for want in ("pre-copy pass 1", "pre-copy pass 2", "post-copy", "/16.0 MiB", "MiB/s", "ETA ", " dirty",
                 "requests", "done"):
        assert want in text, (want, text[-2000:])
    assert "MB/s" not in text


@needs_root
def test_serve_dest_display_never_runs_backwards(live_snapshots):
    _, dest = live_snapshots
    # the raw count does go down at the switch-over (the discards): what the display must not show
    precopy_max = max(s["received"] for s in dest if s["phase"] == "pre-copy")
    after = [s["received"] for s in dest if s["phase"] in ("switch-over", "post-copy")]
    assert min(after) < precopy_max, "no discard lowered the received count: the test shows nothing"

    all_rows = render_rows(DestStatus(), dest)
    assert_fits(all_rows)
    shown: dict[str, float] = {}
    phases = set()
    for rows in all_rows:
        for row in rows:
            m = re.match(r"(pre-copy|post-copy|done)\s.*?\s(\d+\.\d)% (\S+)/(\S+ \S+)", row)
            if not m:
                continue
            label, pct = m.group(1), float(m.group(2))
            phases.add(label)
            # one figure per phase (done continues post-copy's count), never going down
            key = "post-copy" if label == "done" else label
            assert pct >= shown.get(key, 0.0), (label, pct, shown, rows)
            shown[key] = pct
    assert {"pre-copy", "post-copy", "done"} <= phases, phases
    text = "\n".join(r for rows in all_rows for r in rows)
    assert "switch-over" in text and "MiB/s" in text and "ETA " in text and "/16.0 MiB" in text
    assert "MB/s" not in text
    assert shown["post-copy"] == 100.0


@needs_root
def test_live_status_draws_on_a_terminal_console(live_snapshots):
    """The display object itself, on an 80-column terminal console: its rows, transient."""
    from rich.console import Console

    src, _ = live_snapshots
    out = io.StringIO()
    console = Console(file=out, width=WIDTH, force_terminal=True, color_system=None)
    with live_status(SourceStatus(), console=console) as status:
        for s in src:
            status.update(s)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", out.getvalue())
    assert "pre-copy pass 1" in drawn and "post-copy" in drawn
    assert all(len(line) < WIDTH for line in re.split(r"[\r\n]", drawn))


# ---------------------------------------------------------------------------
# migrate on a terminal while nobody listens

def _closed_port() -> socket.socket:
    """A bound port with no listener: connecting is refused (and nobody else takes it meanwhile)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


def test_migrate_on_a_terminal_says_what_it_waits_for(tmp_path):
    image = tmp_path / "img"
    write_image(image, 64 * 1024)
    with _closed_port() as blocker:
        port = blocker.getsockname()[1]
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, WIDTH, 0, 0))
        proc = subprocess.Popen(postcopy_cmd("migrate", "--image", str(image), "--to", f"tcp:127.0.0.1:{port}",
                                             "--timeout", "2"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = read_pty(master)
        proc.communicate(timeout=PROC_TIMEOUT)
        os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 4, text
    assert f"waiting for tcp:127.0.0.1:{port} (0:0" in text, text
    assert f"cannot connect to tcp:127.0.0.1:{port}" in text, text


def test_migrate_off_a_terminal_draws_no_bar(tmp_path):
    image = tmp_path / "img"
    write_image(image, 64 * 1024)
    with _closed_port() as blocker:
        port = blocker.getsockname()[1]
        r = subprocess.run(postcopy_cmd("migrate", "--image", str(image), "--to", f"tcp:127.0.0.1:{port}",
                                        "--timeout", "0.5"), capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert r.returncode == 4
    assert "waiting for" not in r.stderr and "━" not in r.stderr and "\x1b" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr


def test_both_displays_show_a_paused_migration():
    """Post-copy recovery: PAUSED, why, how long, and (source) the reconnect attempts."""
    dest_rows = DestStatus()({"phase": "paused", "received": 100, "total": 400, "arrived": 100, "demand": 3,
                              "background": 97, "faults": 3, "requests": 3, "recoveries": 1, "paused_s": 4.2,
                              "recover_timeout": 600.0, "reason": "the source connection failed", "t": 1.0},
                             width=160)
    line = dest_rows[-1]
    assert line.startswith("PAUSED 4/600 s") and "waiting for the source to resume" in line, dest_rows
    assert "the source connection failed" in line and "25.0%" in line, line
    src_rows = SourceStatus()({"phase": "paused", "pass": 1, "phase_bytes": 1 << 20, "phase_done_bytes": 0,
                               "pages_left": 256, "sent_bytes": 0, "requests": 0, "attempts": 3, "paused_s": 2.5,
                               "reason": "the destination connection failed", "to": "tcp:127.0.0.1:1", "t": 1.0},
                              width=160)
    assert len(src_rows) == 1 and "PAUSED" in src_rows[0] and "attempt 3" in src_rows[0], src_rows
    assert "the destination connection failed" in src_rows[0], src_rows
