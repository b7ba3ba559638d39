"""`postcopy send-discards` end to end through the CLI."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from postcopy_cli.cli import cli, run

QEMU_DISCARD = ("0800060029" "0006" "7063" "2e72" "616d" "00"
                "0000000000001000" "0000000000002000" "0000000000010000" "0000000000001000")


def test_hex_default(capfd):
    assert run(["send-discards", "--block", "pc.ram", "--pages", "1,2,16"]) == 0
    out, err = capfd.readouterr()
    assert out == QEMU_DISCARD + "\n"
    assert err == ""


def test_raw_to_file(tmp_path, capfd):
    out_file = tmp_path / "d.bin"
    assert run(["send-discards", "--block", "pc.ram", "--pages", "16,1-2", "--format", "raw",
                "--output", str(out_file)]) == 0
    assert out_file.read_bytes() == bytes.fromhex(QEMU_DISCARD)
    assert capfd.readouterr().out == ""


def test_raw_to_stdout_via_clirunner():
    res = CliRunner().invoke(cli, ["send-discards", "--block", "pc.ram", "--pages", "1-2,16", "--format", "raw"])
    assert res.exit_code == 0
    assert res.stdout_bytes == bytes.fromhex(QEMU_DISCARD)


def test_bitmap_hex_one_command_per_line(tmp_path, capfd):
    bm = tmp_path / "bitmap"
    bm.write_bytes(b"\x55" * 4)  # pages 0,2,...,30: 16 runs -> 12 + 4
    assert run(["send-discards", "--block", "pc.ram", "--bitmap", str(bm)]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 2
    first, second = (bytes.fromhex(x) for x in lines)
    assert first[:5] == bytes.fromhex("08 0006") + (3 + 6 + 16 * 12).to_bytes(2, "big")
    assert second[:5] == bytes.fromhex("08 0006") + (3 + 6 + 16 * 4).to_bytes(2, "big")
    assert second[-16:] == (30 * 4096).to_bytes(8, "big") + (4096).to_bytes(8, "big")


def test_json_format_and_summary(tmp_path, capfd):
    out_file = tmp_path / "d.json"
    assert run(["send-discards", "--block", "pc.ram", "--pages", "1,2,16,40-41", "--max-per-command", "2",
                "--format", "json", "--output", str(out_file), "--json"]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert summary == {"block": "pc.ram", "pages": 5, "ranges": 3, "commands": 2, "bytes": (9 + 32) + 5 + (9 + 16) + 5}
    assert json.loads(out_file.read_text()) == [
        {"block": "pc.ram", "ranges": [[0x1000, 0x2000], [0x10000, 0x1000]]},
        {"block": "pc.ram", "ranges": [[40 * 4096, 2 * 4096]]},
    ]


def test_json_format_to_stdout(capfd):
    assert run(["send-discards", "--block", "b", "--pages", "0", "--format", "json"]) == 0
    assert json.loads(capfd.readouterr().out) == [{"block": "b", "ranges": [[0, 4096]]}]


def test_json_summary_only_on_stdout(tmp_path, capfd):
    bm = tmp_path / "bitmap"
    bm.write_bytes(b"\xff\x00\x01")
    assert run(["send-discards", "--block", "pc.ram", "--bitmap", str(bm), "--format", "raw", "--json"]) == 0
    out = capfd.readouterr().out
    assert json.loads(out) == {"block": "pc.ram", "pages": 9, "ranges": 2, "commands": 1, "bytes": 14 + 32}


def test_empty_bitmap_gives_no_commands(tmp_path, capfd):
    bm = tmp_path / "bitmap"
    bm.write_bytes(bytes(16))
    assert run(["send-discards", "--block", "pc.ram", "--bitmap", str(bm), "--json"]) == 0
    assert json.loads(capfd.readouterr().out)["commands"] == 0


# name: (the arguments after send-discards, a text its one-line error names or None);
# {tmp} is the test's directory, which holds a one-byte bitmap file "bitmap"
USAGE_ERRORS = {
    "bad-page-list": (["--block", "pc.ram", "--pages", "1,x"], "bad page list item 'x'"),
    "reversed-range": (["--block", "pc.ram", "--pages", "9-3"], "'9-3'"),
    "unreadable-bitmap": (["--block", "pc.ram", "--bitmap", "{tmp}/missing"], "--bitmap: cannot read"),
    "bitmap-is-directory": (["--block", "pc.ram", "--bitmap", "{tmp}"], None),
    "max-per-command-zero": (["--block", "pc.ram", "--pages", "1", "--max-per-command", "0"],
                             "--max-per-command must be at least 1"),
    "max-per-command-too-big": (["--block", "pc.ram", "--pages", "1", "--max-per-command", "100000"],
                                "--max-per-command must be at most"),
    "needs-bitmap-or-pages": (["--block", "pc.ram"], "exactly one of --bitmap FILE or --pages LIST"),
    "bitmap-and-pages": (["--block", "pc.ram", "--pages", "1", "--bitmap", "{tmp}/bitmap"], "exactly one of"),
    "bad-block-name": (["--block", "x" * 300, "--pages", "1"], "--block"),
    "bad-page-size": (["--block", "pc.ram", "--pages", "1", "--page-size", "1000"], "--page-size"),
    "missing-block": (["--pages", "1"], None),
    "bad-format": (["--block", "a", "--pages", "1", "--format", "xml"], None),
    "to-with-hex": (["--block", "a", "--pages", "1", "--format", "hex", "--to", "tcp:127.0.0.1:1"], None),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error(tmp_path, capfd, case):
    args, text = USAGE_ERRORS[case]
    (tmp_path / "bitmap").write_bytes(b"\x01")
    assert run(["send-discards", *(a.format(tmp=tmp_path) for a in args)]) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in err and out == ""
    assert text is None or text in err, err
    assert len(err.strip().splitlines()) <= 3, err


def test_to_sends_the_raw_commands_over_tcp(capfd):
    """--to connects and writes exactly the bytes --format raw would print."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    got = []

    def accept():
        conn, _ = listener.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        got.append(data)
        conn.close()

    t = threading.Thread(target=accept)
    t.start()
    port = listener.getsockname()[1]
    assert run(["send-discards", "--block", "pc.ram", "--pages", "1,3-5", "--format", "raw",
                "--to", f"tcp:127.0.0.1:{port}"]) == 0
    t.join(10)
    listener.close()
    assert run(["send-discards", "--block", "pc.ram", "--pages", "1,3-5", "--format", "raw"]) == 0
    printed = capfd.readouterr().out.encode("latin-1")
    assert got and got[0] == printed and got[0].startswith(b"\x08\x00\x06")


def test_to_refused_connection_is_exit_4(capfd):
    listener = socket_free_port()
    assert run(["send-discards", "--block", "a", "--pages", "1", "--format", "raw",
                "--to", f"tcp:127.0.0.1:{listener}"]) == 4
    assert "cannot connect" in capfd.readouterr().err


def socket_free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
