"""SIGINT, SIGTERM and SIGHUP: one policy for every command.

Before RUN (nothing is lost by stopping) a signal stops the command at once:
its cleanup runs (socket files removed, a live source program resumed) and it
exits 1 with "interrupted by SIGTERM".  After RUN, while the program runs on
the destination and some of its pages are still missing, stopping would lose
the program: the first signal only prints one line saying so; a second one
stops (the destination's program is then told ``failed`` and its memory stays
registered, so its faulting threads keep waiting).

A signal is read in a thread of its own (``signal.set_wakeup_fd``): the main
thread may be in native code that retries EINTR, where a Python handler would
run only when that code returns.  A command in such a phase registers a
:func:`guard` whose ``wake`` makes the main thread fail by itself; otherwise
the main thread gets the :class:`Interrupted` exception from the handler.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from .errors import PostcopyError

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(PostcopyError):
    """Stopped by a signal (exit 1)."""

    kind = "interrupted"

    def __init__(self, signum: int, detail: str = ""):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}{detail}")


class _Guard:
    def __init__(self, at_risk, wake):
        self.at_risk = at_risk
        self.wake = wake


_lock = threading.Lock()
_guards: list[_Guard] = []
_stopped: int | None = None
_warned = False
_raise_in_main = False


def _handler(signum, frame):
    global _raise_in_main
    # runs in the main thread; the decision was made by the watcher thread
    if _raise_in_main:
        _raise_in_main = False
        raise Interrupted(_stopped)


def _arrived(signum: int) -> None:
    global _stopped, _warned, _raise_in_main
    with _lock:
        if _stopped is not None:
            return
        guard = _guards[-1] if _guards else None
        risk = guard.at_risk() if guard is not None and guard.at_risk is not None else None
        if risk and not _warned:
            _warned = True
            print(f"postcopy: {signal.Signals(signum).name}: stopping now would lose the program ({risk}); "
                  f"going on (send it again to stop anyway)", file=sys.stderr, flush=True)
            return
        _stopped = signum
    if guard is not None and guard.wake is not None and guard.wake(Interrupted(signum)):
        return
    _raise_in_main = True
    # a signal of our own makes a blocking call in the main thread return EINTR
    signal.pthread_kill(threading.main_thread().ident, signum)


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            break
        if not data:
            break
        for signum in data:
            if signum in SIGNALS:   # the wakeup fd gets every signal with a Python handler (SIGUSR1 too)
                _arrived(signum)
    os.close(fd)


@contextlib.contextmanager
def installed():
    """Handle SIGINT, SIGTERM and SIGHUP by this policy for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _stopped, _warned, _raise_in_main
    _stopped, _warned, _raise_in_main = None, False, False
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(r, True)
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(r,), name="postcopy/signals", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(old_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(w)   # the watcher reads EOF and ends; it closes nothing


@contextlib.contextmanager
def guard(*, at_risk=None, wake=None):
    """A phase of the command: ``at_risk()`` returns why stopping now would lose the program
    (or None); ``wake(error)`` makes the main thread fail with ``error`` by itself and returns
    True, or returns False when it cannot (the main thread then gets the exception raised)."""
    g = _Guard(at_risk, wake)
    with _lock:
        _guards.append(g)
    try:
        yield
    finally:
        with _lock:
            _guards.remove(g)


def interruption() -> Interrupted | None:
    """The error of the signal that stopped this command, if one did."""
    return None if _stopped is None else Interrupted(_stopped)
