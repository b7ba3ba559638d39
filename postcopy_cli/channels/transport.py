"""QEMU-style addresses (``tcp:HOST:PORT``, ``unix:PATH``) and their sockets.

A migration stream is raw memory (DESIGN.md section 8): listening anywhere but
loopback or a Unix socket needs authentication, TLS (:mod:`.tls`), so without
it such an address is refused unless ``insecure`` is given explicitly.  With
TLS the certificates decide who may take part; without it, the peer's uid.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass

from ..errors import PeerDisconnected, PostcopyError, TlsRefused, UsageError
from .tls import HANDSHAKE_TIMEOUT, Credentials, PlaintextPeer

log = logging.getLogger("postcopy.transport")


@dataclass(frozen=True)
class Address:
    kind: str          # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        # an IPv6 host goes in brackets, as parse_address reads it back
        return f"tcp:[{self.host}]:{self.port}" if ":" in self.host else f"tcp:{self.host}:{self.port}"

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


# sock_diag(7): a SOCK_DIAG_BY_FAMILY dump request (struct unix_diag_req,
# linux/unix_diag.h) for AF_UNIX sockets in TCP_LISTEN state (10) with
# UDIAG_SHOW_VFS answers, per listening socket, the inode and device of the file
# it is bound to (UNIX_DIAG_VFS: struct unix_diag_vfs).  The device is the
# kernel's dev_t (MAJOR << 20 | MINOR, include/linux/kdev_t.h).
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_UNIX_DIAG_VFS = 1
_NLMSG = struct.Struct("=IHHII")
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")


def parse_unix_diag_vfs(data: bytes) -> tuple[set[tuple[int, int, int]], bool]:
    """(the (major, minor, inode) of each bound file in a sock_diag answer, whether it ended).  Pure."""
    files, pos, done = set(), 0, False
    while pos + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size or pos + length > len(data):
            break
        if kind == _NLMSG_DONE:
            done = True
        elif kind == _NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, pos + _NLMSG.size)
            raise OSError(-err, os.strerror(-err))
        elif kind == _SOCK_DIAG_BY_FAMILY:
            at, end = pos + _NLMSG.size + 16, pos + length      # after struct unix_diag_msg
            while at + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, at)
                if alen < 4:
                    break
                if atype == _UNIX_DIAG_VFS and alen >= 12:
                    ino, dev = struct.unpack_from("=II", data, at + 4)
                    files.add((dev >> 20, dev & 0xFFFFF, ino))
                at += (alen + 3) & ~3
        pos += (length + 3) & ~3
    return files, done


def _listening_unix_files() -> set[tuple[int, int, int]]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG) as nl:
        req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << 10, 0, 0x2, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.sendto(_NLMSG.pack(_NLMSG.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0) + req, (0, 0))
        files: set[tuple[int, int, int]] = set()
        while True:
            more, done = parse_unix_diag_vfs(nl.recv(1 << 16))
            files |= more
            if done:
                return files


def unix_path_has_listener(path: str) -> bool:
    """True if a socket is listening on the socket file at ``path``."""
    st = os.stat(path)
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in _listening_unix_files()


def claim_unix_path(path: str, what: str) -> None:
    """Make room to bind ``path``: a stale socket file goes; anything else there is a usage error (exit 2)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{what} {path}: refusing to replace it, it exists and is not a socket")
    try:
        live = unix_path_has_listener(path)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot tell whether another process listens on it "
                         f"(sock_diag: {e.strerror}); remove it if it is stale") from None
    if live:
        raise UsageError(f"{what} {path}: another process is listening on it")
    os.unlink(path)


# the socket files this process bound: path -> identity of the file (a freed
# inode number may be given to the next file at once: the change time tells them apart)
_bound_files: dict[str, tuple[int, int, int]] = {}


def release_unix_path(path: str) -> None:
    """Remove the socket file we bound at ``path``, unless another one replaced it meanwhile."""
    ours = _bound_files.pop(path, None)
    try:
        st = os.lstat(path)
        if ours == (st.st_dev, st.st_ino, st.st_ctime_ns):
            os.unlink(path)
    except OSError:
        pass


def listen(addr: Address, *, insecure: bool = False, tls: bool = False,
           what: str = "listening socket") -> socket.socket:
    """A listening socket for one incoming migration (``tls``: its connections will be TLS)."""
    if not addr.is_local and not insecure and not tls:
        raise UsageError(f"refusing to listen on {addr}: a migration stream is raw memory and needs "
                         f"authentication; give --tls-creds DIR, use a loopback or unix: address, or pass "
                         f"--insecure explicitly")
    if addr.kind == "unix":
        claim_unix_path(addr.path, what)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # only our user (and root) may connect: the mode here, the uid at accept
        old_umask = os.umask(0o177)
        try:
            s.bind(addr.path)
            st = os.lstat(addr.path)
            _bound_files[addr.path] = (st.st_dev, st.st_ino, st.st_ctime_ns)
        except OSError as e:
            s.close()
            raise PostcopyError(f"cannot listen on {addr}: {e.strerror}") from None
        finally:
            os.umask(old_umask)
    else:
        infos = socket.getaddrinfo(addr.host, addr.port, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as e:
            s.close()
            raise PostcopyError(f"cannot listen on {addr}: {e.strerror}") from None
    s.listen(4)
    return s


def bound_address(listener: socket.socket, addr: Address) -> Address:
    """The address actually bound (resolves port 0)."""
    if addr.kind == "unix":
        return addr
    host, port = listener.getsockname()[:2]
    return Address("tcp", host=host, port=port)


# /proc/net/tcp and tcp6 (proc(5)): one socket a line, "sl local_address rem_address st
# tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...", addresses as the kernel's
# 32-bit words in hex in host byte order (%08X each), ports in hex; st is the TCP state.
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
# A peer's socket whose uid means something: connected (01), or on the listening side
# not accepted yet (03 SYN_RECV, or 01 with the listener's uid).  A socket its owner has
# closed may be a time-wait entry, which shows uid 0.
_TCP_LIVE_STATES = ("01", "03")


def _table_endpoint(field: str) -> tuple:
    addr, port = field.split(":")
    raw = b"".join(struct.pack("=I", int(addr[i:i + 8], 16)) for i in range(0, len(addr), 8))
    return _endpoint(ipaddress.ip_address(raw), int(port, 16))


def _endpoint(ip, port: int) -> tuple:
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped   # a v4 peer of a v6 socket shows as ::ffff:a.b.c.d
    return ip, port


def tcp_socket_owner(table: str, local: tuple, remote: tuple) -> tuple[int, str] | None:
    """(uid, state) of the socket bound to ``local`` and connected to ``remote`` ((ip, port) each)
    in the text of /proc/net/tcp or tcp6; None if it has no such line."""
    for line in table.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            if _table_endpoint(f[1]) == local and _table_endpoint(f[2]) == remote:
                return int(f[7]), f[3]
        except ValueError:
            continue
    return None


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a Unix socket (SO_PEERCRED, unix(7))."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def peer_refusal(conn: socket.socket) -> str | None:
    """Why the peer of ``conn`` may not take part in a migration, or None.

    Only our user and root may: a Unix peer's uid comes with the connection
    (SO_PEERCRED: the connecting process, or the listening one when we
    connected); a loopback TCP peer's from the kernel's socket table, which
    names the owner of the socket at the other end.  Other TCP peers are not
    checked here (they need TLS).
    """
    ours = (0, os.geteuid())
    if conn.family == socket.AF_UNIX:
        pid, uid, _ = peer_credentials(conn)
        return None if uid in ours else f"pid {pid} runs as uid {uid}, neither ours nor root"
    if conn.family not in (socket.AF_INET, socket.AF_INET6):
        return f"unexpected socket family {conn.family!r}"
    me, peer = conn.getsockname(), conn.getpeername()
    me, peer = (_endpoint(ipaddress.ip_address(a[0].split("%")[0]), a[1]) for a in (me, peer))
    if not peer[0].is_loopback:
        return None
    for attempt in range(20):
        for path in _TCP_TABLES:
            try:
                with open(path) as f:
                    found = tcp_socket_owner(f.read(), peer, me)
            except FileNotFoundError:
                continue
            if found is not None:
                uid, state = found
                if state not in _TCP_LIVE_STATES:
                    return f"the peer's socket at port {peer[1]} is closing (TCP state {state})"
                return None if uid in ours else f"the peer's socket at port {peer[1]} belongs to uid {uid}, " \
                                                f"neither ours nor root"
        time.sleep(0.005)   # (a listener's end moves from its SYN queue to its accept queue)
    return f"the peer's socket at port {peer[1]} is not in the kernel's socket table"


# how long a plaintext peer of a TLS listener has to read our refusal
_REFUSAL_LINGER = 2.0


def _refuse_plaintext(conn: socket.socket, reply: bytes) -> None:
    """Tell a peer that sent plaintext to a TLS listener ``reply`` (in its own protocol) and close;
    what it sent is read first, so that the close is not a reset that discards the reply."""
    try:
        conn.settimeout(_REFUSAL_LINGER)
        if reply:
            conn.sendall(reply)
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + _REFUSAL_LINGER
        while time.monotonic() < deadline and conn.recv(1 << 16):
            pass
    except OSError:
        pass
    finally:
        conn.close()


def admit(conn: socket.socket, tls: Credentials | None = None, *, plaintext_reply: bytes = b"",
          timeout: float | None = None) -> tuple[socket.socket | None, str | None]:
    """(the connection to use, None) if the peer of accepted ``conn`` may take part, or (None, why
    not) with ``conn`` closed.  Without TLS :func:`peer_refusal` decides; with it, the handshake
    (at most ``timeout`` seconds): the engine gets the relay's socket.  A peer that sends plaintext
    to a TLS listener gets ``plaintext_reply`` before the close."""
    if tls is None:
        try:
            reason = peer_refusal(conn)
        except OSError as e:   # (it went away already)
            reason = f"the peer failed: {e.strerror or e}"
        if reason is None:
            _tune(conn)
            return conn, None
        conn.close()
        return None, reason
    _tune(conn)
    try:
        inner = tls.wrap(conn, timeout=timeout or HANDSHAKE_TIMEOUT)
    except PlaintextPeer as e:
        _refuse_plaintext(conn, plaintext_reply)
        return None, f"TLS: {e}"
    except PeerDisconnected as e:
        return None, f"TLS handshake failed: {e}"
    _tune(inner)
    return inner, None


def _listener_name(listener: socket.socket):
    name = listener.getsockname()
    return f"unix:{name}" if listener.family == socket.AF_UNIX else Address("tcp", name[0], name[1])


def accept(listener: socket.socket, timeout: float | None, *, quiet=None, tls: Credentials | None = None,
           plaintext_reply: bytes = b"", checked: bool = True) -> socket.socket:
    """The next connection whose peer :func:`admit` lets in; a refused one is closed with a
    warning (unless ``quiet()`` says it is no news) and the wait goes on, up to ``timeout`` in all.
    ``checked=False``: the next connection as it is, for the caller to :func:`admit` (e.g. in a
    thread of its own, so that a peer slow to shake hands holds up no other)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        listener.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            raise PeerDisconnected(f"no connection arrived within {timeout:g} s") from None
        conn.settimeout(None)
        if not checked:
            return conn
        admitted, reason = admit(conn, tls, plaintext_reply=plaintext_reply)
        if admitted is not None:
            return admitted
        if quiet is None or not quiet():
            log.warning("refused a connection to %s: %s", _listener_name(listener), reason)


def connect_retrying(addr: Address, timeout: float, *, on_wait=None) -> socket.socket:
    """A socket connected to ``addr``, retrying while nothing listens there yet (no socket file, or
    refused) for up to ``timeout`` seconds: then the last such error; any other OSError at once.

    ``on_wait(seconds)`` is called at each retry with the seconds waited so far."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        try:
            if addr.kind == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(addr.path)
                except OSError:
                    s.close()
                    raise
            else:
                s = socket.create_connection((addr.host, addr.port), timeout=timeout)
            s.settimeout(None)
            return s
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() >= deadline:
                raise
            if on_wait is not None:
                on_wait(time.monotonic() - t0)
            time.sleep(0.05)


def connect(addr: Address, *, timeout: float = 10.0, on_wait=None, tls: Credentials | None = None,
            hostname: str | None = None) -> socket.socket:
    """Connect, retrying while the peer is not listening yet (up to ``timeout``).

    ``on_wait(seconds)`` is called at each retry with the seconds waited so far.  With ``tls``, the
    handshake follows (the server's certificate must name ``hostname``, default the address's host)
    and the relay's socket is returned; a failed handshake is TlsRefused with the reason."""
    try:
        s = connect_retrying(addr, timeout, on_wait=on_wait)
        if tls is None:
            # not a byte to a destination run by another user
            reason = peer_refusal(s)
            if reason is not None:
                s.close()
                raise PeerDisconnected(f"refused the destination at {addr}: {reason}")
        _tune(s)
        if tls is None:
            return s
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise PeerDisconnected(f"cannot connect to {addr}: {e.strerror}") from e
    except OSError as e:
        raise PeerDisconnected(f"cannot connect to {addr}: {e.strerror or e}") from e
    host = hostname or (addr.host if addr.kind == "tcp" else None)
    try:
        inner = tls.wrap(s, host=host, timeout=timeout)
    except PeerDisconnected as e:
        # a plaintext serve-dest closes (or resets) a connection that begins with a TLS handshake
        hint = " (does the destination have --tls-creds?)" if "the connection" in str(e) else ""
        raise TlsRefused(f"TLS handshake with {addr} failed: {e}{hint}") from None
    _tune(inner)
    return inner
