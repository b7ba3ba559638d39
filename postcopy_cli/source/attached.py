"""The program on this host that is being migrated (``migrate --attach``): accepting its hand-over,
pausing and resuming it, and telling it the outcome."""
from __future__ import annotations

import logging
import os
import signal
import socket

from ..channels import transport
from ..channels.control import ControlReader
from ..channels.handover import Handover, HandshakeError, receive_handover
from ..errors import PostcopyError
from ..uffd import Userfaultfd

log = logging.getLogger("postcopy.live")

PAUSE_TIMEOUT = 2.0


class AttachedSource:
    """The program on this host that is being migrated, and how to pause and resume it."""

    def __init__(self, handover: Handover):
        self.handover = handover
        self.pid = handover.pid
        self.uffd = Userfaultfd.adopt(handover.uffd)   # keeps the WP registration alive
        self.control = ControlReader(handover.sock, name="postcopy/source-program")
        self.gone = self.control.gone
        self.stopped_by_signal = False
        self.paused = False

    def _await(self, event: str, timeout: float) -> dict | None:
        try:
            return self.control.wait_for(event, timeout)
        except HandshakeError:
            raise PostcopyError(f"the program being migrated (pid {self.pid}) exited or closed its socket") \
                from None

    def pause(self) -> str:
        """Pause the program: a pause request, acknowledged; SIGSTOP if it does not answer."""
        if self.gone.is_set():
            raise PostcopyError(f"the program being migrated (pid {self.pid}) exited or closed its socket")
        try:
            self.control.send({"cmd": "pause"})
            if self._await("paused", PAUSE_TIMEOUT) is not None:
                self.paused = True
                return "request"
        except OSError:
            pass
        log.warning("pid %d did not acknowledge the pause request; stopping it with SIGSTOP", self.pid)
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped_by_signal = self.paused = True
        return "SIGSTOP"

    def resume(self) -> bool:
        """Let the program go on where it was (a failed migration loses nothing); True if it was paused."""
        if not self.paused:
            return False
        if self.stopped_by_signal:
            os.kill(self.pid, signal.SIGCONT)
        else:
            try:
                self.control.send({"cmd": "resume"})
                self._await("resumed", PAUSE_TIMEOUT)
            except (OSError, PostcopyError):
                pass
        self.paused = False
        return True

    def alive(self) -> bool:
        """The program still exists (not exited, killed or a zombie) and its control socket is open."""
        if self.gone.is_set():
            return False
        # proc(5) /proc/PID/stat after the command's ")": state, ppid, pgrp, session, tty_nr,
        # tpgid, flags; a task being killed has PF_EXITING (0x4) set before it turns zombie
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            state, flags = fields[0], int(fields[6])
        except (OSError, IndexError, ValueError):
            return False
        return state not in ("Z", "X") and not flags & 0x4

    def fate(self, was_paused: bool) -> str:
        """What became of the program after a migration failed before RUN, in words that are true."""
        if not self.alive():
            return f"the program (pid {self.pid}) is gone from the source: it exited, was killed or closed " \
                   f"its control socket"
        return f"the program {'was resumed' if was_paused else 'keeps running'} on the source"

    def migrated(self) -> None:
        """Tell the program it now runs on the destination (it stays paused here)."""
        try:
            self.control.send({"event": "migrated"})
        except OSError:
            pass

    def quit(self) -> None:
        try:
            self.control.send({"cmd": "quit"})
        except OSError:
            pass
        if self.stopped_by_signal:
            os.kill(self.pid, signal.SIGCONT)

    def close(self):
        self.uffd.close()
        self.handover.sock.close()


def accept_program(listener: socket.socket, timeout: float | None) -> AttachedSource:
    conn = transport.accept(listener, timeout)
    conn.settimeout(10.0)
    try:
        handover = receive_handover(conn)
    except BaseException:
        conn.close()
        raise
    conn.settimeout(None)
    return AttachedSource(handover)
