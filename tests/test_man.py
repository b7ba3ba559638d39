"""The man pages are generated from the click definitions and must be current."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = os.path.join(ROOT, "man", "generate.py")


def test_man_pages_are_current():
    proc = subprocess.run([sys.executable, GEN, "--check"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"stale man pages (run `python3 man/generate.py`):\n{proc.stderr}"


def test_generation_is_deterministic_and_complete(tmp_path):
    for _ in range(2):
        subprocess.run([sys.executable, GEN, "--dir", str(tmp_path)], check=True, capture_output=True, timeout=60)
    names = sorted(os.listdir(tmp_path))
    assert "postcopy.1" in names and "postcopy-probe.1" in names
    for cmd in ("serve-dest", "migrate", "send-discards", "selftest", "workload"):
        assert f"postcopy-{cmd}.1" in names
    for name in names:
        with open(tmp_path / name) as f, open(os.path.join(ROOT, "man", name)) as g:
            assert f.read() == g.read(), name
    page = (tmp_path / "postcopy-probe.1").read_text()
    for section in (".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH OPTIONS", ".SH EXIT STATUS"):
        assert section in page
    assert "\\-\\-json" in page and "\\-h, \\-\\-help" in page


def test_check_names_stale_files(tmp_path):
    subprocess.run([sys.executable, GEN, "--dir", str(tmp_path)], check=True, capture_output=True, timeout=60)
    (tmp_path / "postcopy-probe.1").write_text("stale\n")
    (tmp_path / "postcopy-gone.1").write_text("old\n")
    proc = subprocess.run([sys.executable, GEN, "--check", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "postcopy-probe.1" in proc.stderr and "postcopy-gone.1" in proc.stderr


# -- content: EXAMPLES, the workload subcommands, the selftest cases -----------------

import re
import socket

import click
import pytest

sys.path.insert(0, os.path.join(ROOT, "man"))
import generate  # noqa: E402

from conftest import needs_root  # noqa: E402


def test_every_page_has_examples():
    for name, text in generate.generate().items():
        assert ".SH EXAMPLES" in text, name
        assert text.index(".SH EXAMPLES") < text.index(".SH SEE ALSO"), name


def test_workload_page_lists_every_subcommand_and_option():
    from postcopy_cli.commands.workload import workload

    page = generate.generate()["postcopy-workload.1"]
    ctx = click.Context(workload, info_name="workload")
    assert workload.list_commands(ctx) == ["incoming", "run", "touch"]
    for name in workload.list_commands(ctx):
        sub = workload.get_command(ctx, name)
        section = page.split(f".SS postcopy workload {name} ", 1)[1].split(".SS ", 1)[0]
        for param in sub.params:
            for opt in param.opts:
                assert generate.esc(opt) in section, (name, opt)


def test_selftest_help_lists_every_case():
    from postcopy_cli.selftest import cases as core
    from postcopy_cli.commands.selftest import selftest

    text = selftest.help
    names = core.case_names()
    assert "live-migration" in names
    for case in core.CASES:
        assert re.search(rf"^\s*{re.escape(case.name)}$", text, re.M), case.name
    page = generate.generate()["postcopy-selftest.1"]
    for name in names:
        assert generate.esc(name) in page
    for word in ("MiB/s", "p50/p99", "blocktime", "all cases passed", '"cases"'):
        assert word in text, word


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_EXAMPLE_BLOCKS = list(dict.fromkeys(cmds for pages in generate.EXAMPLES.values() for _, cmds in pages))


@needs_root
@pytest.mark.slow
@pytest.mark.parametrize("commands", _EXAMPLE_BLOCKS, ids=lambda c: c[-2] if c[-1] == "wait" else c[0])
def test_man_examples_run_as_written(commands, tmp_path):
    """Each EXAMPLES block in bash, in an empty directory (ports and /tmp made private to this run)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "postcopy"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m postcopy_cli "$@"\n')
    shim.chmod(0o755)
    script = "\n".join(commands)
    for port in sorted(set(re.findall(r"127\.0\.0\.1:(\d+)", script))):
        script = script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{_free_port()}")
    script = script.replace("/tmp/", f"{tmp_path}/")
    # `wait` fails if any background command failed
    prelude = 'set -e\nwait() { rc=0; for j in $(jobs -p); do builtin wait "$j" || rc=$?; done; return $rc; }\n'
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", prelude + script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"{script}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
