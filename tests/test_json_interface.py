"""The machine interface (issue 8 item 5, issue 9 item 4): kebab-case keys in every --json output
(migrate's old snake_case keys kept beside them, deprecated), serve-dest's JSON listening line, and
one JSON document on stdout in every outcome of a command given --json."""
from __future__ import annotations

import json
import socket
import subprocess

import pytest

from conftest import PROC_TIMEOUT, postcopy_cmd, run_postcopy, single_stderr_line, write_image
from postcopy_cli.cli import run as cli_run
from postcopy_cli.commands._common import machine_keys
from postcopy_cli.selftest.harness import NotListening, read_listening

MiB = 1 << 20


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_machine_keys_kebab_with_deprecated_snake_twins():
    doc = machine_keys({"total_seconds": 1.5, "pages": 3, "latency-us": {"histogram": {"64": 2}},
                        "cases": [{"metrics": {"latency_p50_us": 7}}], "capabilities": {"postcopy-ram": True},
                        "PAGEFAULT_FLAG_WP": 1})
    assert list(doc) == ["total-seconds", "pages", "latency-us", "cases", "capabilities", "PAGEFAULT_FLAG_WP",
                         "total_seconds"]
    assert doc["total-seconds"] == doc["total_seconds"] == 1.5
    assert doc["latency-us"] == {"histogram": {"64": 2}}          # data keys stay as they are
    assert doc["cases"] == [{"metrics": {"latency-p50-us": 7, "latency_p50_us": 7}}]


def test_migrate_that_cannot_connect_prints_the_error_document():
    p = run_postcopy("migrate", "--to", f"tcp:127.0.0.1:{_closed_port()}", "--image", "/dev/null", "--json",
                     "--timeout", "1")
    assert p.returncode == 2 and json.loads(p.stdout)["error"]["kind"] == "usage", p   # an empty image
    p = run_postcopy("migrate", "--to", f"tcp:127.0.0.1:{_closed_port()}", "--image", __file__, "--json",
                     "--timeout", "1")
    assert p.returncode == 4, p.stderr
    line = single_stderr_line(p.stderr)
    doc = json.loads(p.stdout)            # one document, nothing else on stdout
    assert doc == {"error": {"code": 4, "kind": "disconnected", "message": line.removeprefix("postcopy: ")}}


@pytest.mark.parametrize("argv", [
    ["migrate", "--json", "--bogus"],                                   # refused by the parser
    ["probe", "--json", "--target-page-size", "100"],                  # refused by an option's type
    ["serve-dest", "--json", "--listen", "tcp:127.0.0.1:0", "--ram", "a=1M", "--ram", "a=2M"],   # by the command
    ["workload", "touch", "--size", "1M", "--attach", "/x.sock", "--connect-timeout", "-1", "--json"],
], ids=["parser", "option-type", "command", "workload"])
def test_usage_errors_with_json_print_the_error_document(capsys, argv):
    assert cli_run(argv) == 2
    out, err = capsys.readouterr()
    line = single_stderr_line(err)
    assert json.loads(out) == {"error": {"code": 2, "kind": "usage", "message": line.removeprefix("postcopy: ")}}


def test_without_json_a_failure_prints_nothing_on_stdout(capsys):
    assert cli_run(["migrate", "--bogus"]) == 2
    assert capsys.readouterr().out == ""


def test_serve_dest_json_lines_listening_then_stats_and_migrate_keys(tmp_path):
    image = tmp_path / "img"
    write_image(image, 1 * MiB, seed=21)
    sd = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "mem=1M", "--json",
                                       "--timeout", "20"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        listening = read_listening(sd, PROC_TIMEOUT)
        assert listening["uffd-socket"] is None and listening["address"].startswith("tcp:127.0.0.1:")
        assert int(listening["address"].rsplit(":", 1)[1]) > 0        # the bound port, not 0
        mig = run_postcopy("migrate", "--to", listening["address"], "--image", str(image), "--json")
        out, err = sd.communicate(timeout=PROC_TIMEOUT)
    finally:
        if sd.poll() is None:
            sd.kill()
            sd.communicate()
    assert sd.returncode == 0 and mig.returncode == 0, (err, mig.stderr)
    assert "listening on " + listening["address"] in err            # the human line stays, on stderr
    lines = out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["pages"]["received"] == 256, out
    stats = json.loads(mig.stdout)
    for new, old in [("total-seconds", "total_seconds"), ("zero-pages", "zero_pages"),
                     ("requested-pages", "requested_pages")]:
        assert stats[new] == stats[old], stats                       # old spelling kept, deprecated
    assert stats["pages"] == 256


def test_serve_dest_json_failure_prints_listening_then_the_error_with_stats():
    sd = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "mem=1M", "--json",
                                       "--timeout", "20"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = read_listening(sd, PROC_TIMEOUT)["address"]
        host, port = address.removeprefix("tcp:").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=PROC_TIMEOUT) as s:
            s.sendall(b"NOT A POSTCOPY STREAM")
            out, err = sd.communicate(timeout=PROC_TIMEOUT)
    finally:
        if sd.poll() is None:
            sd.kill()
            sd.communicate()
    assert sd.returncode == 3, err
    doc = json.loads(out)                      # the listening line was read above: the error is the rest
    assert doc["error"]["code"] == 3 and doc["error"]["kind"] == "protocol", doc
    assert doc["pages"]["total"] == 256 and doc["pages"]["received"] == 0, doc


def test_read_listening_names_a_serve_dest_that_never_listened():
    sd = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", "tcp:127.0.0.1:0", "--json"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with pytest.raises(NotListening) as ei:
        read_listening(sd, PROC_TIMEOUT)
    sd.communicate(timeout=PROC_TIMEOUT)
    assert json.loads(ei.value.output)["error"]["kind"] == "usage"   # what it wrote instead


def _touch_restore(tmp_path, *touch_json: str):
    image = tmp_path / "img"
    write_image(image, 1 * MiB, seed=22)
    usock = str(tmp_path / "u.sock")
    sd = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", "tcp:127.0.0.1:0", "--uffd-socket", usock, "--json",
                                       "--timeout", "20"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    touch = None
    try:
        listening = read_listening(sd, PROC_TIMEOUT)
        assert listening["uffd-socket"] == usock
        touch = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", "1M", "--attach", usock, "--image",
                                              str(image), *touch_json), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        mig = run_postcopy("migrate", "--to", listening["address"], "--image", str(image))
        t_out, t_err = touch.communicate(timeout=PROC_TIMEOUT)
        sd.communicate(timeout=PROC_TIMEOUT)
    finally:
        for p in (sd, touch):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()
    assert mig.returncode == 0 and touch.returncode == 0 and sd.returncode == 0, (mig.stderr, t_err)
    return t_out, t_err


def test_workload_touch_prints_json_only_with_json(tmp_path):
    out, err = _touch_restore(tmp_path)
    assert out == ""
    line = single_stderr_line(err)
    assert line.startswith("postcopy: touched 256 pages") and "0 mismatches" in line, line
    out, err = _touch_restore(tmp_path, "--json")
    report = json.loads(out)
    assert report["pages"] == 256 and report["mismatches"] == 0 and "p50-us" in report, report
    assert err == ""
