"""The source learns that the destination refused its stream (issue 9 item 8).

A destination that refuses what it receives sends SHUT 1 on the return path and closes; the
source, whose next write fails or whose read finds EOF, reads what is left on the return path,
finds the SHUT and exits 3 with a message saying the destination refused the stream and what to
check (it said "Broken pipe" / "Connection reset by peer", exit 4, before).
"""
from __future__ import annotations

import json
import socket
import subprocess

import pytest

from conftest import PROC_TIMEOUT, postcopy_cmd, single_stderr_line, write_image
from postcopy_cli import codec

MiB = 1 << 20
REFUSED = "the destination refused the stream (SHUT 1)"


def _migrate(address: str, image, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(postcopy_cmd("migrate", "--to", address, "--image", str(image), "--json", *extra),
                          capture_output=True, text=True, timeout=PROC_TIMEOUT)


def _assert_refused(mig: subprocess.CompletedProcess) -> None:
    assert mig.returncode == 3, (mig.returncode, mig.stderr)
    line = single_stderr_line(mig.stderr)
    assert REFUSED in line and "page sizes" in line, line
    error = json.loads(mig.stdout)["error"]
    assert error == {"code": 3, "kind": "refused", "message": line.removeprefix("postcopy: ")}, error


@pytest.mark.parametrize("channels", [(), ("--single-channel",)], ids=["preempt", "single-channel"])
def test_page_size_mismatch_source_exits_3_naming_the_refusal(tmp_path, serve_dest, channels):
    image = tmp_path / "img"
    write_image(image, 4 * MiB, seed=11)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", "mem=4M", "--timeout", "20")
    mig = _migrate(sd.address, image, "--page-size", "2M", *channels)
    rc, out, err = sd.wait()
    assert rc == 3 and "pages of 2097152" in single_stderr_line(err), err
    _assert_refused(mig)


def test_block_size_mismatch_source_exits_3_naming_the_refusal(tmp_path, serve_dest):
    image = tmp_path / "img"
    write_image(image, 4 * MiB, seed=12)
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", "mem=8M", "--timeout", "20")
    mig = _migrate(sd.address, image)
    rc, out, err = sd.wait()
    assert rc == 3 and "block 'mem'" in single_stderr_line(err), err
    _assert_refused(mig)


def test_shut_found_after_the_reset(tmp_path):
    """The destination answers SHUT 1 and closes with the source's bytes unread (a TCP reset): the
    source's writes fail, and the SHUT is still readable behind them."""
    image = tmp_path / "img"
    write_image(image, 16 * MiB, seed=13)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(PROC_TIMEOUT)
    proc = subprocess.Popen(postcopy_cmd("migrate", "--to", f"tcp:127.0.0.1:{listener.getsockname()[1]}",
                                         "--image", str(image), "--single-channel", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = listener.accept()
        conn.settimeout(PROC_TIMEOUT)
        decoder = codec.StreamDecoder()
        while not any(isinstance(ev, codec.Blocks) for ev in decoder.events()):
            chunk = conn.recv(4096)
            assert chunk
            decoder.feed(chunk)
        conn.sendall(codec.encode_rp(codec.Shut(1)))
        conn.close()       # unread data in its receive queue: the kernel answers with RST
        out, err = proc.communicate(timeout=PROC_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        listener.close()
    _assert_refused(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
