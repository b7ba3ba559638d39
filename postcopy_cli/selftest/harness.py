"""Running the CLI as subprocesses: shared by the selftest cases, the tests and the benchmarks."""
from __future__ import annotations

import json
import os
import select
import subprocess
import time


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
