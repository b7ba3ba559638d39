"""QEMU-style addresses (``tcp:HOST:PORT``, ``unix:PATH``) and their sockets.

A migration stream is raw memory (DESIGN.md section 8): listening anywhere but
loopback or a Unix socket needs authentication, which this version does not
have, so such an address is refused unless ``insecure`` is given explicitly.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from dataclasses import dataclass

from .errors import PeerDisconnected, UsageError


@dataclass(frozen=True)
class Address:
    kind: str          # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"

    @property
    def is_local(self) -> bool:
        if self.kind == "unix":
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_address(uri: str) -> Address:
    """Parse ``tcp:HOST:PORT`` / ``tcp:[V6]:PORT`` / ``unix:PATH``; UsageError naming the problem."""
    kind, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise UsageError(f"address {uri!r}: expected tcp:HOST:PORT or unix:PATH")
    if kind == "unix":
        return Address("unix", path=rest)
    if kind != "tcp":
        raise UsageError(f"address {uri!r}: unknown transport {kind!r} (tcp or unix)")
    host, sep, port = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"address {uri!r}: expected tcp:HOST:PORT with a port 0..65535")
    return Address("tcp", host=host, port=int(port))


# A demand page queues behind whatever background data sits in the socket
# buffers, so they are kept small: the destination's receive buffer bounds the
# backlog (the kernel doubles the value set, socket(7)), and the source keeps
# its unsent queue under one chunk itself (source.unsent_bytes).
STREAM_BUFFER = 192 << 10


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        # requests and demand pages are small and latency-bound
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, STREAM_BUFFER)
        except OSError:
            pass


def listen(addr: Address, *, insecure: bool = False) -> socket.socket:
    """A listening socket for one incoming migration."""
    if not addr.is_local and not insecure:
        raise UsageError(f"refusing to listen on {addr}: a migration stream is raw memory and this version has "
                         f"no authentication; use a loopback or unix: address, or pass --insecure explicitly")
    if addr.kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(addr.path)
        except FileNotFoundError:
            pass
        # only our user (and root) may connect: the mode here, the uid at accept
        old_umask = os.umask(0o177)
        try:
            s.bind(addr.path)
        finally:
            os.umask(old_umask)
    else:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(sockaddr)
    s.listen(4)
    return s


def bound_address(listener: socket.socket, addr: Address) -> Address:
    """The address actually bound (resolves port 0)."""
    if addr.kind == "unix":
        return addr
    host, port = listener.getsockname()[:2]
    return Address("tcp", host=host, port=port)


def accept(listener: socket.socket, timeout: float | None) -> socket.socket:
    listener.settimeout(timeout)
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        raise PeerDisconnected(f"no connection arrived within {timeout:g} s") from None
    conn.settimeout(None)
    if conn.family == socket.AF_UNIX:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        if uid not in (0, os.geteuid()):
            conn.close()
            raise PeerDisconnected(f"refused a connection from pid {pid}: uid {uid} is neither ours nor root")
    _tune(conn)
    return conn


def connect(addr: Address, *, timeout: float = 10.0) -> socket.socket:
    """Connect, retrying while the peer is not listening yet (up to ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if addr.kind == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(addr.path)
            else:
                s = socket.create_connection((addr.host, addr.port), timeout=timeout)
            s.settimeout(None)
            _tune(s)
            return s
        except (ConnectionRefusedError, FileNotFoundError) as e:
            if time.monotonic() >= deadline:
                raise PeerDisconnected(f"cannot connect to {addr}: {e.strerror}") from e
            time.sleep(0.05)
        except OSError as e:
            raise PeerDisconnected(f"cannot connect to {addr}: {e.strerror or e}") from e
