"""Running the CLI as subprocesses: shared by the selftest cases, the tests and the benchmarks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def postcopy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "postcopy_cli", *args]


def child_env(root: str | None = None) -> dict:
    """The environment of our subprocesses: they import the very postcopy_cli this one runs
    (or the one in the directory ``root``).

    ``python -m`` puts the current directory first on sys.path, where a source
    tree (without its compiled extension) would shadow the installed package:
    PYTHONSAFEPATH (3.11+) leaves it out, and PYTHONPATH names where ours is.
    """
    import postcopy_cli

    env = dict(os.environ)
    here = root or os.path.dirname(os.path.dirname(os.path.abspath(postcopy_cli.__file__)))
    env["PYTHONSAFEPATH"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def last_json(out: str) -> dict | None:
    """The last line of ``out`` that is a JSON document (a command's --json report), or None."""
    for line in reversed(out.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def kill(p: subprocess.Popen) -> None:
    """SIGKILL ``p`` if it still runs, with its process group when it leads one (start_new_session)."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            p.kill()


def kill_and_reap(*procs: subprocess.Popen, timeout: float = 5) -> None:
    """Kill every one of ``procs`` that still runs, then collect each one's exit and output."""
    for p in procs:
        kill(p)
    for p in procs:
        try:
            p.communicate(timeout=timeout)
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass


class Procs:
    """Subprocesses of one case; every one still running at exit is killed."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        p = subprocess.Popen(postcopy_argv(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True, env=child_env())
        self.procs.append(p)
        return p

    def kill_all(self):
        kill_and_reap(*self.procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()


class Finished:
    """The outcome of one subprocess: exit code (None if killed on timeout), stdout, stderr."""

    def __init__(self, name: str, rc: int | None, out: str, err: str):
        self.name, self.rc, self.out, self.err = name, rc, out, err

    def json(self) -> dict | None:
        return last_json(self.out)

    def why(self) -> str:
        if self.rc is None:
            return f"{self.name} timed out"
        last = self.err.strip().splitlines()[-1] if self.err.strip() else "(no message)"
        return f"{self.name} exit {self.rc}: {last}"


def finish(name: str, p: subprocess.Popen, deadline: float) -> Finished:
    try:
        out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
        return Finished(name, p.returncode, out, err)
    except subprocess.TimeoutExpired:
        kill(p)
        out, err = p.communicate()
        return Finished(name, None, out or "", err or "")
