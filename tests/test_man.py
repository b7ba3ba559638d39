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
