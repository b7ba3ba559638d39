"""The socket-file options never replace what is not a stale socket (issue: a regular file became a
socket, a second serve-dest took over a live one's socket).

For each of ``serve-dest --listen unix:PATH``, ``serve-dest --uffd-socket PATH`` and
``migrate --attach PATH``: a regular file, a directory and a socket with a live listener at PATH are
refused with exit 2 and one line naming the option and the path, and are left as they were; a stale
socket file (nobody listening) is replaced; removing our socket file at the end never removes a live
socket that another process bound at the same path meanwhile.
"""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import time

import pytest

from conftest import PROC_TIMEOUT, postcopy_cmd, single_stderr_line
from postcopy_cli.channels import transport


def argv(option: str, path: str, other: str) -> list[str]:
    if option == "--listen":
        return ["serve-dest", "--listen", f"unix:{path}", "--ram", "mem=1M"]
    if option == "--uffd-socket":
        return ["serve-dest", "--listen", f"unix:{other}", "--uffd-socket", path]
    return ["migrate", "--attach", path, "--to", f"unix:{other}"]


OPTIONS = ["--listen", "--uffd-socket", "--attach"]


def live_listener(path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def wait_listening(path, proc, timeout=PROC_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ended early: rc {proc.returncode}: {proc.stderr.read()}")
        try:
            if transport.unix_path_has_listener(str(path)):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"nobody listens on {path}")


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("occupant", ["regular-file", "directory", "live-socket"])
def test_refuses_what_is_not_a_stale_socket(tmp_path, option, occupant):
    path, other = tmp_path / "s.sock", tmp_path / "other.sock"
    keep = None
    if occupant == "regular-file":
        path.write_bytes(b"precious")
    elif occupant == "directory":
        path.mkdir()
    else:
        keep = live_listener(path)
    try:
        p = subprocess.run(postcopy_cmd(*argv(option, str(path), str(other))), capture_output=True, text=True,
                           timeout=PROC_TIMEOUT)
        assert p.returncode == 2, p.stderr
        line = single_stderr_line(p.stderr)
        assert option in line and str(path) in line, line
        assert ("not a socket" if occupant != "live-socket" else "another process is listening") in line, line
        if occupant == "regular-file":
            assert path.read_bytes() == b"precious"
        elif occupant == "directory":
            assert path.is_dir()
        else:
            assert transport.unix_path_has_listener(str(path))
        assert not other.exists()          # nothing else was left behind either
    finally:
        if keep is not None:
            keep.close()


@pytest.mark.parametrize("option", OPTIONS)
def test_stale_socket_is_replaced(tmp_path, option):
    path, other = tmp_path / "s.sock", tmp_path / "other.sock"
    live_listener(path).close()            # a socket file nobody listens on
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    proc = subprocess.Popen(postcopy_cmd(*argv(option, str(path), str(other))), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(path, proc)
    finally:
        proc.kill()
        proc.communicate(timeout=PROC_TIMEOUT)


def test_second_serve_dest_does_not_take_over_a_live_one(tmp_path, serve_dest):
    path = tmp_path / "mig.sock"
    first = serve_dest("--listen", f"unix:{path}", "--ram", "mem=1M")
    p = subprocess.run(postcopy_cmd("serve-dest", "--listen", f"unix:{path}", "--ram", "mem=1M"),
                       capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert p.returncode == 2
    assert "another process is listening" in single_stderr_line(p.stderr)
    assert first.proc.poll() is None and transport.unix_path_has_listener(str(path))


def test_release_keeps_a_socket_another_process_bound_meanwhile(tmp_path):
    path = str(tmp_path / "s.sock")
    ours = transport.listen(transport.Address("unix", path=path))
    ours.close()
    os.unlink(path)
    theirs = live_listener(path)
    try:
        transport.release_unix_path(path)
        assert transport.unix_path_has_listener(path)
    finally:
        theirs.close()
    transport.release_unix_path(path)      # not ours: stays, even with nobody listening
    assert os.path.exists(path)


def test_release_removes_ours_while_another_thread_still_polls_it(tmp_path):
    """A thread blocked in accept() keeps the closed listener alive a moment: the file is ours all the same."""
    import threading

    path = str(tmp_path / "s.sock")
    ours = transport.listen(transport.Address("unix", path=path))
    ours.settimeout(0.5)

    def accept():
        try:
            ours.accept()
        except OSError:
            pass

    waiting = threading.Thread(target=accept, daemon=True)
    waiting.start()
    ours.close()
    transport.release_unix_path(path)
    assert not os.path.exists(path)
    waiting.join(2)


def test_bind_error_names_the_address(tmp_path):
    p = subprocess.run(postcopy_cmd("serve-dest", "--listen", f"unix:{tmp_path}/no-such-dir/x.sock", "--ram", "mem=1M"),
                       capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert p.returncode == 1
    line = single_stderr_line(p.stderr)
    assert f"{tmp_path}/no-such-dir/x.sock" in line and "No such file or directory" in line, line


def test_parse_unix_diag_vfs_table():
    import struct

    def msg(kind, body):
        return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body

    vfs = struct.pack("=HHII", 12, 1, 1234, (8 << 20) | 3)
    name = struct.pack("=HH", 7, 0) + b"abc\0"            # an attribute padded to 4 bytes
    diag = msg(20, bytes(16) + name + vfs)
    assert transport.parse_unix_diag_vfs(diag) == ({(8, 3, 1234)}, False)
    assert transport.parse_unix_diag_vfs(diag + msg(3, b"\0\0\0\0")) == ({(8, 3, 1234)}, True)
    assert transport.parse_unix_diag_vfs(diag[:20]) == (set(), False)            # truncated: nothing made up
    with pytest.raises(OSError):
        transport.parse_unix_diag_vfs(msg(2, struct.pack("=i", -13)))
