"""Control messages: newline-ended JSON lines on the hand-over socket, after the hand-over.

The one codec (:class:`ControlChannel`) and the one reader thread
(:class:`ControlReader`) for every side: the destination and the source
engines talk to an attached program through them, and the reference workload
(``postcopy_cli.guest``) answers through them.
"""
from __future__ import annotations

import json
import queue
import socket
import threading
import time

from ..errors import PostcopyError
from ..sched import make_latency_thread
from .handover import HandshakeError


class ControlChannel:
    """Newline-ended JSON messages on the hand-over socket, after the hand-over.

    Serving side -> program (only when the program asked with ``notify``):
      ``{"event": "run", "state": "<base64 STATE bytes>"}`` at POSTCOPY_RUN,
      ``{"event": "complete"}`` once every page is in,
      ``{"event": "failed", "reason": "..."}`` when the migration failed.
    Serving side -> program, before RUN, when the source discards pages it
      sent and that were dirtied since: ``{"cmd": "discard", "ranges":
      {"<block>": [[start, length], ...]}}`` (bytes within the block); the
      program drops them (madvise MADV_DONTNEED) and answers
      ``{"event": "discarded"}``.
    Source side -> program (live migration): ``{"cmd": "pause"}``,
      ``{"cmd": "resume"}``, ``{"cmd": "quit"}`` (after a successful migration
      with --kill-source), ``{"event": "migrated"}`` (success without it: the
      program stays paused, as QEMU leaves a migrated source); the program answers
      ``{"event": "paused"}`` / ``{"event": "resumed"}``.
    """

    MAX_LINE = 1 << 26

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()

    def send(self, message: dict) -> None:
        self.sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def receive(self) -> dict | None:
        """The next message, or None when the peer closed the socket."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[:nl + 1]
                try:
                    msg = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise HandshakeError(f"control message is not valid JSON: {line[:80]!r}") from None
                if not isinstance(msg, dict):
                    raise HandshakeError(f"control message is not a JSON object: {line[:80]!r}")
                return msg
            if len(self._buf) > self.MAX_LINE:
                raise HandshakeError("control message longer than allowed")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk


class ControlReader:
    """Reads a program's (or the serving side's) control messages in a thread, so the other side
    can wait with timeouts and signals.

    ``gone`` is set when the peer closes its socket or exits; ``on_gone`` (if
    given) is called then, from the reader thread.  ``answer`` (if given) sees
    each message first, in the reader thread, and returns True when it answered
    it there (the reference workload answers migrate's pause at once: it is on
    the downtime's path); the others are queued for :meth:`get` / :meth:`wait_for`.
    """

    CLOSED = object()   # from get(): the peer closed the socket (returned once)

    def __init__(self, sock: socket.socket, *, name: str = "postcopy/control", on_gone=None, answer=None):
        self.channel = ControlChannel(sock)
        self.gone = threading.Event()
        self.answer = answer
        self._messages: queue.Queue = queue.Queue()
        self._on_gone = on_gone
        self._closed_seen = False
        threading.Thread(target=self._read, name=name, daemon=True).start()

    def _read(self) -> None:
        make_latency_thread()   # answers such as "paused" are on the downtime's path
        end = self.CLOSED
        try:
            while True:
                msg = self.channel.receive()
                if msg is None:
                    break
                answer = self.answer
                if answer is not None and answer(msg):
                    continue
                self._messages.put(msg)
        except HandshakeError as e:   # a malformed message: get() raises it
            end = e
        except (OSError, PostcopyError):
            pass
        self.gone.set()
        self._messages.put(end)
        if self._on_gone is not None:
            self._on_gone()

    def send(self, message: dict) -> None:
        self.channel.send(message)

    def post(self, item) -> None:
        """Queue ``item`` for :meth:`get` as if it had been read (news from another thread)."""
        self._messages.put(item)

    def _next(self, timeout: float | None):
        """The next queued item, or None after ``timeout``; the end (closed or malformed) stays queued."""
        try:
            item = self._messages.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is self.CLOSED or isinstance(item, Exception):
            self._messages.put(item)   # stays the end for later waits
        return item

    def get(self, timeout: float | None):
        """The next message (or posted item); CLOSED once the peer has gone (then None after
        ``timeout``, for ever); None after ``timeout``.  Raises HandshakeError on a malformed message."""
        if self._closed_seen:
            time.sleep(timeout if timeout is not None else 3600)
            return None
        item = self._next(timeout)
        if isinstance(item, Exception):
            raise item
        if item is self.CLOSED:
            self._closed_seen = True
        return item

    def wait_for(self, event: str, timeout: float) -> dict | None:
        """The next message with ``"event": event`` (others are dropped); None after ``timeout``.

        Raises HandshakeError when the program goes away first.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            msg = self._next(left)
            if msg is None:
                return None
            if msg is self.CLOSED or isinstance(msg, Exception):
                raise HandshakeError("the program closed its socket or exited")
            if msg.get("event") == event:
                return msg
