"""Input people really type: every refusal is a usage error (exit 2) or a named failure, one line,
no traceback, and serve-dest refuses it before anything listens."""
from __future__ import annotations

import pytest

from conftest import single_stderr_line
from postcopy_cli.cli import run as cli_run

LONG = "a" * 300

# (argv, exit code, text the one stderr line must contain)
CASES = [
    (["send-discards", "--block", "\udcff", "--pages", "3"], 2, r"block name b'\xff' is not valid UTF-8"),
    (["send-discards", "--block", LONG, "--pages", "3"], 2, "must be 1..255 bytes (is 300)"),
    (["send-discards", "--block", "mem", "--pages", "99999999999999999999999"], 2, "beyond the 64-bit byte range"),
    (["send-discards", "--block", "mem", "--pages", "3", "--page-size", "4X"], 2, "not a size: '4X'"),
    (["serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "\udcff=1M"], 2, r"block name b'\xff' is not valid UTF-8"),
    (["serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", f"{LONG}=1M"], 2, "must be 1..255 bytes (is 300)"),
    (["serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "a=1M", "--ram", "a=2M"], 2, "block 'a' is given twice"),
    (["serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "a=1M", "--stats", "/nonexistent-dir/s.json"], 2,
     "--stats /nonexistent-dir/s.json: folder /nonexistent-dir does not exist"),
    (["serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "a=1M", "--stats", "/"], 2, "is a directory"),
    (["serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "mem=1T"], 1, "--ram mem: cannot map 1099511627776 bytes"),
    (["serve-dest", "--listen", "unix:/nonexistent-dir/x.sock", "--ram", "mem=1M"], 1,
     "cannot listen on unix:/nonexistent-dir/x.sock: No such file or directory"),
    (["workload", "touch", "--size", "1M", "--attach", "/nonexistent.sock", "--connect-timeout", "-1"], 2,
     "'--connect-timeout': -1.0 is not in the range"),
    (["probe", "--target-page-size", "100"], 2, "'100' is less than 512"),
    (["send-discards", "--bogus"], 2, "No such option '--bogus'"),
]


@pytest.mark.parametrize("argv,code,text", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_refusal(capsys, argv, code, text):
    assert cli_run(argv) == code
    out, err = capsys.readouterr()
    line = single_stderr_line(err)
    assert text in line, line
    assert "listening on" not in err and out == ""


def test_sizes_take_suffixes(capsys):
    assert cli_run(["send-discards", "--block", "mem", "--pages", "1", "--page-size", "4K", "--format", "json"]) == 0
    assert '"ranges": [[4096, 4096]]' in capsys.readouterr().out
    assert cli_run(["send-discards", "--block", "mem", "--pages", "1", "--page-size", "2M", "--format", "json"]) == 0
    assert '"ranges": [[2097152, 2097152]]' in capsys.readouterr().out


def test_port_in_use_names_the_address(capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        assert cli_run(["serve-dest", "--listen", f"tcp:127.0.0.1:{port}", "--ram", "mem=1M"]) == 1
        line = single_stderr_line(capsys.readouterr().err)
        assert f"cannot listen on tcp:127.0.0.1:{port}: Address already in use" in line, line
    finally:
        s.close()
