"""TLS on the migration connections (DESIGN.md section 8), QEMU's tls-creds-x509 layout.

The kernel here has no kernel TLS, and the engines' native threads do their
own recv/send/writev on a connection's fd.  So the handshake runs in OpenSSL
(native/tls.c, the GIL released), and then, with TLS 1.3, the connection's
records are sealed and opened where its bytes are read and written: in the
native threads (native/tls_record.c, found by fd) and, for Python, through
:class:`TlsSocket`.  No thread, wake-up or copy is added per message: a
page request costs one AES-GCM pass of 30 bytes (measured in
benchmarks/tls_bench.py against the relay this replaced).  A peer that offers
only TLS 1.2 gets the relay: a C thread that carries the plaintext between the
TCP socket and one end of a socketpair, the engine holding the other end.
Either way a broken TLS link is a broken connection to the engine.
"""
from __future__ import annotations

import errno
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
_RELAYED = 0
_RECORDS = 1


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
             timeout: float = HANDSHAKE_TIMEOUT) -> "socket.socket | TlsSocket":
        """The handshake on connected ``sock`` (taken over: closed on failure), and the socket the
        engine uses from then on.  ``host``: the name (or IP address) the server's certificate
        must carry (client side).  A failed handshake is a PeerDisconnected with the reason; a
        plaintext peer of a server is PlaintextPeer, with ``sock`` left open and unread."""
        ours, relay = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err = ffi.new("char[]", 512)
        rc = lib.pc_tls_start(self._ctx, sock.fileno(), relay.fileno(), host.encode() if host else ffi.NULL,
                              max(1, int(timeout * 1000)), err, len(err))
        if rc == _RECORDS:
            ours.close()
            relay.close()
            return TlsSocket(sock)
        if rc == _RELAYED:
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


def buffered(sock) -> bool:
    """Whether ``sock`` holds received bytes that poll(2) on its fd would not report (a TLS
    connection's opened records): check before waiting on it."""
    return isinstance(sock, TlsSocket) and sock.pending()


class TlsSocket:
    """A connected socket whose bytes are TLS 1.3 records, sealed and opened in native code
    (native/tls_record.c) by every reader and writer of the connection, native or Python.

    It stands in for the socket.socket it wraps where the engines use one: reads and writes
    take and give plaintext; options, timeouts and shutdown go to the TCP socket; ``fileno()``
    is the TCP socket's (the native threads find the records by it).  A blocking write that
    makes no progress ends with a timeout after the socket's SO_SNDTIMEO, or after
    native/io.h's PC_IO_STALL_MS when the socket has a Python timeout.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._fd = sock.fileno()
        self.family, self.type = sock.family, sock.type

    # -- what goes to the TCP socket
    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, t):
        self._sock.settimeout(t)

    def gettimeout(self):
        return self._sock.gettimeout()

    def setblocking(self, flag: bool):
        self._sock.setblocking(flag)

    def setsockopt(self, *args):
        self._sock.setsockopt(*args)

    def getsockopt(self, *args):
        return self._sock.getsockopt(*args)

    def getpeername(self):
        return self._sock.getpeername()

    def getsockname(self):
        return self._sock.getsockname()

    def shutdown(self, how: int):
        self._sock.shutdown(how)

    def close(self):
        if self._fd >= 0:
            lib.pc_tls_detach(self._fd)   # before the number can be reused
            self._fd = -1
        self._sock.close()

    def __del__(self):
        try:
            self.close()
        except Exception:   # (interpreter shutdown)
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- plaintext
    def pending(self) -> bool:
        return self._fd >= 0 and bool(lib.pc_tls_buffered(self._fd))

    def _failed(self, r: int) -> OSError:
        if r == lib.PC_TLS_WAIT_EXPIRED:
            return socket.timeout("timed out")
        if -r in (errno.EAGAIN, errno.EWOULDBLOCK):
            return BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        why = ffi.new("char[]", 200)
        lib.pc_tls_reason(self._fd, why, len(why))
        reason = ffi.string(why).decode(errors="replace") or os.strerror(-r)
        return OSError(-r, reason)

    def recv_into(self, buf, nbytes: int = 0, flags: int = 0) -> int:
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        view = memoryview(buf).cast("B")
        n = nbytes or len(view)
        timeout = self._sock.gettimeout()
        wait = not flags & socket.MSG_DONTWAIT and timeout != 0.0
        r = lib.pc_tls_recv(self._fd, ffi.from_buffer(view), n,
                            (1 if flags & socket.MSG_PEEK else 0) | (0 if wait else 2),
                            -1 if timeout is None else int(timeout * 1000))
        if r < 0:
            raise self._failed(r)
        return r

    def recv(self, n: int, flags: int = 0) -> bytes:
        buf = bytearray(n)
        got = self.recv_into(buf, n, flags)
        return bytes(buf[:got])

    def sendall(self, data, flags: int = 0) -> None:
        if self._fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        view = memoryview(data).cast("B")
        r = lib.pc_tls_send(self._fd, ffi.from_buffer(view), len(view))
        if r == -errno.ETIMEDOUT:
            raise socket.timeout("timed out")
        if r < 0:
            raise OSError(-r, os.strerror(-r))

    def send(self, data, flags: int = 0) -> int:
        self.sendall(data)
        return len(data)

    def sendmsg(self, buffers, *args) -> int:
        data = b"".join(buffers)
        self.sendall(data)
        return len(data)
