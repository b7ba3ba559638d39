"""TLS on the migration connections (DESIGN.md section 8), QEMU's tls-creds-x509 layout.

The kernel here has no kernel TLS, and the engines' native threads do plain
recv/send/writev on their connection's fd.  So each TLS connection gets a native
relay (native/tls.c): the handshake runs with the GIL released, then a C thread
carries the plaintext between the TCP socket and one end of a socketpair; the
engine gets the other end, as if it were the TCP connection.  Either side ending
ends the other: a broken TLS link is a broken connection to the engine.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .._native import ffi, lib
from ..errors import PeerDisconnected, UsageError

#: the files of each side, in QEMU's layout (qemu-options: tls-creds-x509)
CA = "ca-cert.pem"
SERVER_FILES = ("server-cert.pem", "server-key.pem")
CLIENT_FILES = ("client-cert.pem", "client-key.pem")

#: at most this long for a peer's handshake
HANDSHAKE_TIMEOUT = 10.0

_NOT_TLS = -2


def library() -> str:
    """The TLS library and its version (e.g. "OpenSSL 3.0.19 27 Jan 2026")."""
    return ffi.string(lib.pc_tls_library()).decode()


class PlaintextPeer(Exception):
    """The peer of a TLS listener began without a TLS handshake (nothing of it was read)."""


@dataclass
class Credentials:
    """A TLS context for one side, from a tls-creds-x509 directory."""

    directory: str
    server: bool
    _ctx: object = None

    @classmethod
    def load(cls, directory: str, *, server: bool, option: str = "--tls-creds") -> "Credentials":
        """The side's files in ``directory``, checked and loaded now: a missing, unreadable or
        malformed file is a UsageError naming it (before anything listens or connects)."""
        names = (CA,) + (SERVER_FILES if server else CLIENT_FILES)
        paths = [os.path.join(directory, n) for n in names]
        if not os.path.isdir(directory):
            raise UsageError(f"{option} {directory}: no such directory")
        for path in paths:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise UsageError(f"{option}: {path}: {e.strerror}") from None
        err = ffi.new("char[]", 512)
        ctx = lib.pc_tls_ctx_new(int(server), *(p.encode() for p in paths), err, len(err))
        if ctx == ffi.NULL:
            raise UsageError(f"{option}: {ffi.string(err).decode(errors='replace')}")
        return cls(directory, server, ffi.gc(ctx, lib.pc_tls_ctx_free))

    def wrap(self, sock: socket.socket, *, host: str | None = None,
             timeout: float = HANDSHAKE_TIMEOUT) -> socket.socket:
        """The handshake on connected ``sock`` (taken over: closed on failure), and the socket the
        engine uses from then on.  ``host``: the name (or IP address) the server's certificate
        must carry (client side).  A failed handshake is a PeerDisconnected with the reason; a
        plaintext peer of a server is PlaintextPeer, with ``sock`` left open and unread."""
        ours, relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err = ffi.new("char[]", 512)
        rc = lib.pc_tls_start(self._ctx, sock.fileno(), relay.fileno(), host.encode() if host else ffi.NULL,
                              max(1, int(timeout * 1000)), err, len(err))
        if rc == 0:
            sock.detach()      # the relay thread owns and closes both
            relay.detach()
            return ours
        ours.close()
        relay.close()
        reason = ffi.string(err).decode(errors="replace")
        if rc == _NOT_TLS:
            raise PlaintextPeer(reason)
        sock.close()
        raise PeerDisconnected(reason)
