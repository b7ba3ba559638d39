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
    """Reads a program's control messages in a thread, so the engine can wait with timeouts.

    ``gone`` is set when the program closes its socket or exits; ``on_gone``
    (if given) is called then, from the reader thread.
    """

    def __init__(self, sock: socket.socket, *, name: str = "postcopy/control", on_gone=None):
        self.channel = ControlChannel(sock)
        self.gone = threading.Event()
        self._messages: queue.Queue = queue.Queue()
        self._on_gone = on_gone
        threading.Thread(target=self._read, name=name, daemon=True).start()

    def _read(self) -> None:
        make_latency_thread()   # answers such as "paused" are on the downtime's path
        try:
            while True:
                msg = self.channel.receive()
                if msg is None:
                    break
                self._messages.put(msg)
        except (OSError, PostcopyError):
            pass
        self.gone.set()
        self._messages.put(None)
        if self._on_gone is not None:
            self._on_gone()

    def send(self, message: dict) -> None:
        self.channel.send(message)

    def wait_for(self, event: str, timeout: float) -> dict | None:
        """The next message with ``"event": event`` (others are dropped); None after ``timeout``.

        Raises HandshakeError when the program goes away first.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self._messages.get(timeout=left)
            except queue.Empty:
                return None
            if msg is None:
                self._messages.put(None)   # stays gone for later waits
                raise HandshakeError("the program closed its socket or exited")
            if msg.get("event") == event:
                return msg
