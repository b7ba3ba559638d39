"""Running the CLI as subprocesses: shared by the selftest cases, the tests and the benchmarks."""
from __future__ import annotations

import json
import os
import select
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


class NotListening(Exception):
    """serve-dest ended, or wrote something else, before its listening line; ``output`` is what it wrote."""

    def __init__(self, why: str, output: str):
        super().__init__(why)
        self.output = output


def read_listening(proc: subprocess.Popen, timeout: float | None = None, *, path: str | None = None) -> dict:
    """The first line of ``serve-dest --json``: {"event": "listening", "address", "uffd-socket"}.

    Reads ``proc.stdout`` (a pipe, text or bytes) up to that line's newline and
    not a byte further, unbuffered, so the final document stays in the pipe for
    ``proc.communicate()``; or, with ``path``, the file ``proc``'s stdout goes
    to.  Raises :class:`NotListening` if the process ends or writes anything
    else first, or ``timeout`` seconds pass.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    line = _first_line_of_file(proc, path, deadline) if path is not None else _first_line(proc, deadline)
    text = line.decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("event") != "listening" or not isinstance(doc.get("address"), str):
        raise NotListening("serve-dest's first line is not its listening line", text)
    return doc


def _left(deadline: float | None, line: bytes) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise NotListening("no listening line in time", line.decode(errors="replace"))
    return left


def _first_line(proc: subprocess.Popen, deadline: float | None) -> bytes:
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    line = b""
    while not line.endswith(b"\n"):
        left = _left(deadline, line)
        if not poller.poll(None if left is None else int(left * 1000) + 1):
            continue
        byte = os.read(fd, 1)
        if not byte:
            raise NotListening("serve-dest ended before its listening line", line.decode(errors="replace"))
        line += byte
    return line


def _first_line_of_file(proc: subprocess.Popen, path: str, deadline: float | None) -> bytes:
    while True:
        ended = proc.poll() is not None   # before the read: what it wrote before it ended is in the file
        with open(path, "rb") as f:
            line = f.readline()
        if line.endswith(b"\n"):
            return line
        if ended:
            raise NotListening("serve-dest ended before its listening line", line.decode(errors="replace"))
        _left(deadline, line)
        time.sleep(0.01)
