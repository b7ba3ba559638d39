"""`probe` output keeps every remedy whole (pipe, narrow terminal); `selftest` refuses a host that cannot do post-copy."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import termios
import threading

import pytest
from rich.console import Console

from postcopy_cli import probe as probe_mod
from postcopy_cli.cli import run
from postcopy_cli.commands.probe import _render

from conftest import needs_root, read_pty
from test_probe import _deny_uffd, _unprivileged, unprivileged_ready

REMEDY = probe_mod.REMEDY_UFFD
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _denied_report(monkeypatch):
    _deny_uffd(monkeypatch)
    return probe_mod.run_probe()


def test_pipe_prints_plain_lines_with_whole_remedy(monkeypatch, capsys):
    _deny_uffd(monkeypatch)
    monkeypatch.setenv("COLUMNS", "80")
    assert run(["probe"]) == 1
    out = capsys.readouterr().out
    assert "…" not in out and "┃" not in out and "│" not in out, out
    report = probe_mod.run_probe()
    lines = out.splitlines()
    for c in report.checks:
        row = [l for l in lines if l.split()[:2] == [c.name, c.status]]
        assert len(row) == 1 and row[0].endswith(c.detail), (c, out)
    assert f"remedy: {REMEDY}" in lines[[l.split()[:1] for l in lines].index(["userfaultfd"]) + 1]
    assert "postcopy is NOT supported on this host" in out


def test_narrow_terminal_wraps_and_keeps_remedy_whole(monkeypatch):
    report = _denied_report(monkeypatch)
    buf = io.StringIO()
    _render(report, Console(file=buf, width=80, force_terminal=True, color_system=None))
    out = buf.getvalue()
    assert "┃ check" in out  # still the table on a terminal
    assert "…" not in out, out
    assert REMEDY in out, out
    assert max(len(l) for l in out.splitlines() if "│" in l) <= 80
    # the detail wraps inside its cell: every character of it is there
    cells = "".join(l.split("│")[3].strip() for l in out.splitlines() if l.count("│") == 4)
    detail = report.check("userfaultfd").detail
    assert detail.replace(" ", "") in cells.replace(" ", "")


@needs_root
def test_unprivileged_probe_in_a_pipe_at_80_columns(sysctl):
    unprivileged_ready(sysctl)
    proc = _unprivileged(["probe"], columns=80)          # `postcopy probe | cat`
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "…" not in proc.stdout
    assert f"remedy: {REMEDY}" in proc.stdout, proc.stdout
    assert re.search(r"^userfaultfd +fail +userfaultfd\(2\): .*vm\.unprivileged_userfaultfd=0; euid=65534;",
                     proc.stdout, re.M), proc.stdout


@needs_root
def test_unprivileged_probe_on_an_80_column_pty(sysctl):
    unprivileged_ready(sysctl)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    chunks: list[bytes] = []

    def drain():
        chunks.append(read_pty(master))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = _unprivileged(["probe"], columns=80, stdin=slave, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    reader.join(30)
    os.close(master)
    out = ANSI.sub("", b"".join(chunks).decode(errors="replace")).replace("\r\n", "\n")
    assert proc.returncode == 1, out
    assert "┃ check" in out and "…" not in out, out
    assert REMEDY in out, out


@needs_root
def test_unprivileged_selftest_fails_at_once_with_the_remedy(sysctl):
    unprivileged_ready(sysctl)
    proc = _unprivileged(["selftest", "--size", "1M"])   # timeout=60 in the helper detects a hang
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("postcopy: selftest cannot run on this host: the userfaultfd check failed")
    assert REMEDY in lines[0]
    assert "Connection refused" not in proc.stderr and "timed out" not in proc.stderr
    assert proc.stdout == ""


def test_selftest_checks_the_host_before_any_case(monkeypatch, capsys):
    from postcopy_cli.selftest import cases as core

    _deny_uffd(monkeypatch)
    monkeypatch.setattr(core, "run_selftest", lambda **kw: pytest.fail("a case ran on a host without userfaultfd"))
    assert run(["selftest"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and REMEDY in captured.err and len(captured.err.splitlines()) == 1
