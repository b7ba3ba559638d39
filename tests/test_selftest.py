"""`postcopy selftest`: the real loopback migrations pass here, and a failing case means exit 1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from postcopy_cli import cli
from postcopy_cli.selftest import cases as selftest

from conftest import needs_root

EXPECTED_CASES = ["restore-random-tcp", "restore-sequential-unix", "restore-in-process", "zero-pages",
                  "malformed-stream", "live-migration"]


def _processes_with_marker(marker: str) -> list[str]:
    """Live processes whose environment carries ``marker`` (inherited from the selftest run)."""
    found = []
    needle = f"POSTCOPY_SELFTEST_MARK={marker}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in env:
            found.append(f"{pid}: {cmd}")
    return found


@needs_root
def test_selftest_json_all_cases_pass():
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "postcopy_cli", "selftest", "--json", "--size", "16M"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "POSTCOPY_SELFTEST_MARK": marker})
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr + p.stdout
    assert "Traceback" not in p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, "--json: one JSON document on stdout and nothing else"
    report = json.loads(lines[0])
    assert report["passed"] is True
    assert report["size"] == 16 << 20
    assert isinstance(report["seconds"], float)
    assert [c["name"] for c in report["cases"]] == EXPECTED_CASES
    for case in report["cases"]:
        assert set(case) == {"name", "passed", "detail", "metrics"}, case
        assert case["passed"] is True, case
        assert isinstance(case["detail"], str) and case["detail"]
        assert isinstance(case["metrics"], dict)
    by_name = {c["name"]: c for c in report["cases"]}
    for name in ("restore-random-tcp", "restore-sequential-unix", "zero-pages"):
        m = by_name[name]["metrics"]
        assert m["mismatches"] == 0
        assert m["throughput_mib_s"] > 0
        assert isinstance(m["requests"], int)
        assert m["blocktime_ms"] >= 0
    assert by_name["restore-random-tcp"]["metrics"]["address"].startswith("tcp:127.0.0.1:")
    assert by_name["restore-sequential-unix"]["metrics"]["address"].startswith("unix:")
    assert by_name["zero-pages"]["metrics"]["pages_zero"] > 0
    assert by_name["restore-in-process"]["metrics"]["resident_pages"] == (16 << 20) // 4096
    m = by_name["malformed-stream"]["metrics"]
    assert m["exit_code"] == 3
    assert "RAM section" in m["message"] and f"byte {m['expected_offset']}" in m["message"]
    m = by_name["live-migration"]["metrics"]
    assert m["check"] == "ok" and m["passes_after"] > m["passes_before"]
    assert m["downtime_ms"] > 0 and m["precopy_passes"] >= 1
    assert isinstance(m["requests"], int) and m["postcopy_seconds"] >= 0
    assert elapsed < 30
    assert _processes_with_marker(marker) == [], "selftest left processes behind"


def _only(monkeypatch, *cases):
    monkeypatch.setattr(selftest, "CASES", list(cases))


def _ok_case(ctx):
    return selftest.result("ok", True, "fine", {"throughput_mib_s": 1.0, "requests": 1})


def test_failing_case_exits_1(monkeypatch, capsys):
    _only(monkeypatch, selftest.Case("ok", "passes", _ok_case),
          selftest.Case("broken", "fails", lambda ctx: selftest.result("broken", False, "byte 7 differs")))
    assert cli.run(["selftest", "--json", "--size", "1M"]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["passed"] is False
    assert [(c["name"], c["passed"]) for c in report["cases"]] == [("ok", True), ("broken", False)]
    assert "broken" in err


def test_raising_case_is_a_failure_not_a_traceback(monkeypatch, capsys):
    def boom(ctx):
        raise RuntimeError("the case blew up")

    _only(monkeypatch, selftest.Case("boom", "raises", boom), selftest.Case("ok", "passes", _ok_case))
    assert cli.run(["selftest", "--json", "--size", "1M"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["cases"][0]["passed"] is False
    assert "the case blew up" in report["cases"][0]["detail"]
    assert report["cases"][1]["passed"] is True, "a failing case does not stop the others"


def test_all_passing_exits_0_and_table(monkeypatch, capsys):
    _only(monkeypatch, selftest.Case("ok", "passes", _ok_case))
    assert cli.run(["selftest", "--size", "1M"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "pass" in out and "MiB/s" in out


def test_register_case_hook(monkeypatch):
    _only(monkeypatch)
    selftest.register_case("later", "added by a later mode")(_ok_case)
    assert selftest.case_names() == ["later"]
    report = selftest.run_selftest(size=1 << 20)
    assert report["passed"] is True and report["cases"][0]["name"] == "ok"


@pytest.mark.parametrize("argv", [["--size", "1000"], ["--size", "lots"], ["--case", "nope"]])
def test_usage_errors_exit_2(argv):
    assert cli.run(["selftest", *argv]) == 2


def test_zero_run_image_shape():
    data = selftest.zero_run_image(1 << 20)
    assert len(data) % 4096 != 0
    pages = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    zero = sum(1 for p in pages if not any(p))
    assert 0 < zero < len(pages)
    assert any(pages[-1]), "the partial last page carries data"
