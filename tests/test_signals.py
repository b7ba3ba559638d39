"""SIGINT, SIGTERM and SIGHUP: one policy (issue 7 item 8), checked on real subprocesses."""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from postcopy_cli import codec
from conftest import postcopy_cmd, waits_in_userfault, write_image

PAGE = 4096
MiB = 1 << 20
HANG = 60.0   # a hang guard, not a timing assertion


def _lines(proc) -> list[str]:
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    return out


def _wait_for(cond, what):
    deadline = time.monotonic() + HANG
    while not cond():
        assert time.monotonic() < deadline, f"hang guard: {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_serve_dest_before_run_stops_at_once_and_removes_its_sockets(tmp_path, sig):
    """A source is mid-stream before RUN (it sent its preamble, then nothing; --timeout is long)."""
    listen, usock = tmp_path / "l.sock", tmp_path / "u.sock"
    sd = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", f"unix:{listen}", "--ram", "mem=1M",
                                       "--timeout", "600"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = _lines(sd)
    try:
        _wait_for(lambda: any("listening" in l for l in err), "serve-dest listening")
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(str(listen))
        conn.sendall(codec.encode(codec.Header()) + codec.encode(codec.Blocks((codec.BlockInfo("mem", MiB, PAGE),))))
        time.sleep(0.2)   # (not asserted: lets the stream start)
        sd.send_signal(sig)
        rc = sd.wait(HANG)
        conn.close()
        assert rc == 1, err
        assert f"interrupted by {sig.name}" in "".join(err), err
        assert not listen.exists()
    finally:
        if sd.poll() is None:
            sd.kill()
        sd.wait()


def _attached_restore(tmp_path, size):
    image = tmp_path / "img"
    write_image(image, size, seed=5, zero_runs=())
    usock, listen = tmp_path / "u.sock", tmp_path / "l.sock"
    sd = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", f"unix:{listen}", "--uffd-socket", str(usock)),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = _lines(sd)
    touch = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(usock),
                                          "--image", str(image), "--wait-run", "--json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any("listening" in l for l in err), "serve-dest listening")
    migrate = subprocess.Popen(postcopy_cmd("migrate", "--to", f"unix:{listen}", "--image", str(image),
                                            "--max-bandwidth", "2M"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def faulting():
        return waits_in_userfault(touch.pid)
    _wait_for(faulting, "the program runs and waits for a page")
    return sd, err, touch, migrate, (usock, listen)


@pytest.mark.parametrize("signals_sent", [1, 2])
def test_serve_dest_after_run(tmp_path, signals_sent):
    """After RUN: one signal warns and the migration completes, every byte right; a second stops it."""
    sd, err, touch, migrate, paths = _attached_restore(tmp_path, 16 * MiB)
    try:
        sd.send_signal(signal.SIGTERM)
        _wait_for(lambda: any("would lose the program" in l for l in err) or sd.poll() is not None, "the warning")
        assert any("would lose the program" in l for l in err), err
        if signals_sent == 2:
            sd.send_signal(signal.SIGINT)
        rc = sd.wait(HANG)
        out, terr = touch.communicate(timeout=HANG)
        if signals_sent == 1:
            assert rc == 0, err
            assert touch.returncode == 0 and '"mismatches": 0' in out, (out, terr)
        else:
            assert rc == 1, err
            assert "interrupted by SIGINT" in "".join(err) and "must be stopped" in "".join(err), err
            assert touch.returncode == 1 and "migration failed: interrupted by SIGINT" in terr, terr
            # it never read on (no report, no zero page): the one document is the error
            assert set(json.loads(out)) == {"error"}, out
        assert not any(p.exists() for p in paths)
    finally:
        for p in (sd, touch, migrate):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_selftest_sigterm_leaves_no_temporary_files(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    st = subprocess.Popen(postcopy_cmd("selftest", "--size", "64M"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(lambda: glob.glob(str(tmp_path / "postcopy-selftest-*/*")), "selftest started a case")
        st.send_signal(signal.SIGTERM)
        out, err = st.communicate(timeout=HANG)
        assert st.returncode == 1, err
        assert "interrupted by SIGTERM" in err, err
        assert not glob.glob(str(tmp_path / "postcopy-selftest-*"))
        left = []
        for cmd in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(cmd, "rb") as f:
                    if str(tmp_path).encode() in f.read():
                        left.append(cmd)
            except OSError:
                pass
        assert not left, left
    finally:
        if st.poll() is None:
            st.kill()
            st.communicate()
