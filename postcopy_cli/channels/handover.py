"""Handing memory over through a Unix socket: Firecracker's UFFD handshake.

A program that owns the memory connects to the socket and sends ONE message:
its data is a JSON array of regions, its SCM_RIGHTS ancillary data carries the
userfaultfd (already registered by the program).  Region fields are
Firecracker's ``GuestRegionUffdMapping``::

    {"base_host_virt_addr": int, "size": int, "offset": int,
     "page_size": int, "page_size_kib": int}

(``page_size_kib`` is the older spelling; either is accepted.)  Our own clients
may add, per region:

* ``"name"``: the RAM block the region belongs to (regions without a name form
  one block named ``mem``, each at its ``offset`` — Firecracker's memory-file
  layout);
* ``"notify": true`` (on any region): the program wants to be told about the
  migration on this same socket; the serving side then writes newline-ended
  JSON lines to it (see :class:`~postcopy_cli.channels.control.ControlChannel`).

Unknown fields are ignored, so an unmodified Firecracker works.  The peer is
checked with SO_PEERCRED.
"""
from __future__ import annotations

import array
import json
import os
import socket
import struct
from dataclasses import dataclass, field

from ..errors import PostcopyError
from .transport import peer_credentials

DEFAULT_BLOCK = "mem"
MAX_HANDSHAKE_BYTES = 1 << 20
MAX_REGIONS = 4096


class HandshakeError(PostcopyError):
    """The program's hand-over message was malformed or its peer not allowed (exit 1)."""


@dataclass(frozen=True)
class GuestRegion:
    """One mapping handed over: ``size`` bytes at ``host_addr``, at ``offset`` in block ``block``."""

    host_addr: int
    size: int
    offset: int
    page_size: int
    block: str = DEFAULT_BLOCK

    def to_json(self, *, notify: bool = False) -> dict:
        d = {"base_host_virt_addr": self.host_addr, "size": self.size, "offset": self.offset,
             "page_size": self.page_size, "page_size_kib": self.page_size // 1024, "name": self.block}
        if notify:
            d["notify"] = True
        return d


@dataclass
class Handover:
    """What a program handed over: its regions, its userfaultfd, who it is."""

    regions: list[GuestRegion]
    uffd: int
    pid: int
    uid: int
    gid: int
    notify: bool
    sock: socket.socket = field(repr=False)


def _int_field(region: dict, name: str, index: int) -> int:
    value = region.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 1 << 64:
        raise HandshakeError(f"hand-over region {index}: field {name!r} must be an unsigned integer, got {value!r}")
    return value


def parse_regions(doc) -> tuple[list[GuestRegion], bool]:
    """Validate a decoded hand-over document; return (regions, notify).  Pure."""
    if not isinstance(doc, list) or not doc:
        raise HandshakeError("hand-over message must be a non-empty JSON array of regions")
    if len(doc) > MAX_REGIONS:
        raise HandshakeError(f"hand-over message has {len(doc)} regions, more than {MAX_REGIONS}")
    regions, notify = [], False
    for i, r in enumerate(doc):
        if not isinstance(r, dict):
            raise HandshakeError(f"hand-over region {i} is not a JSON object")
        addr = _int_field(r, "base_host_virt_addr", i)
        size = _int_field(r, "size", i)
        offset = _int_field(r, "offset", i)
        if "page_size" in r:
            page = _int_field(r, "page_size", i)
        elif "page_size_kib" in r:
            page = _int_field(r, "page_size_kib", i) * 1024
        else:
            raise HandshakeError(f"hand-over region {i}: neither 'page_size' nor 'page_size_kib' given")
        if page < 4096 or page & (page - 1):
            raise HandshakeError(f"hand-over region {i}: page size {page} is not a power of two >= 4096")
        if size == 0 or size % page or addr % page or offset % page:
            raise HandshakeError(f"hand-over region {i}: address {addr:#x}, offset {offset:#x} and size {size:#x} "
                                 f"must be non-zero multiples of the page size {page}")
        name = r.get("name", DEFAULT_BLOCK)
        if not isinstance(name, str) or not 1 <= len(name.encode()) <= 255 or "\0" in name:
            raise HandshakeError(f"hand-over region {i}: block name {name!r} must be 1..255 bytes without NUL")
        notify = notify or r.get("notify") is True
        regions.append(GuestRegion(addr, size, offset, page, name))
    by_addr = sorted(regions, key=lambda g: g.host_addr)
    for a, b in zip(by_addr, by_addr[1:]):
        if a.host_addr + a.size > b.host_addr:
            raise HandshakeError(f"hand-over regions at {a.host_addr:#x} and {b.host_addr:#x} overlap")
    by_off = sorted(regions, key=lambda g: (g.block, g.offset))
    for a, b in zip(by_off, by_off[1:]):
        if a.block == b.block and a.offset + a.size > b.offset:
            raise HandshakeError(f"hand-over regions of block {a.block!r} at offsets {a.offset:#x} and "
                                 f"{b.offset:#x} overlap")
        if a.block == b.block and a.page_size != b.page_size:
            raise HandshakeError(f"hand-over regions of block {a.block!r} have different page sizes")
    return regions, notify


def send_handover(sock: socket.socket, regions: list[GuestRegion], uffd: int, *, notify: bool = False) -> None:
    """Client side: send the regions and the uffd in one message (as Firecracker does)."""
    body = json.dumps([r.to_json(notify=notify) for r in regions]).encode()
    fds = array.array("i", [uffd])
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])


def receive_handover(sock: socket.socket, *, allowed_uids: tuple[int, ...] | None = None) -> Handover:
    """Server side: receive one hand-over on an accepted connection.

    The uid of the peer must be ours or root unless ``allowed_uids`` says
    otherwise.  The socket's timeout (if any) bounds the wait.
    """
    pid, uid, gid = peer_credentials(sock)
    allowed = allowed_uids if allowed_uids is not None else (0, os.geteuid())
    if uid not in allowed:
        raise HandshakeError(f"hand-over from pid {pid} refused: uid {uid} is not allowed (expected {allowed})")
    data = bytearray()
    received_fds: list[int] = []
    fd_size = struct.calcsize("i")
    try:
        while True:
            msg, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16 * fd_size))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % fd_size
                    received_fds.extend(array.array("i", payload[:usable]))
            if flags & socket.MSG_CTRUNC:
                raise HandshakeError("hand-over message carried more file descriptors than expected")
            if not msg:
                raise HandshakeError(f"program (pid {pid}) closed the socket before handing over its memory")
            data += msg
            if len(data) > MAX_HANDSHAKE_BYTES:
                raise HandshakeError(f"hand-over message longer than {MAX_HANDSHAKE_BYTES} bytes")
            try:
                doc = json.loads(data)
                break
            except (UnicodeDecodeError, json.JSONDecodeError):
                # Firecracker sends the document in one sendmsg; keep reading only
                # while it might still be arriving.
                if data.rstrip().endswith((b"]", b"}")) and data.count(b"[") <= data.count(b"]"):
                    raise HandshakeError(f"hand-over message from pid {pid} is not valid JSON") from None
        regions, notify = parse_regions(doc)
        if len(received_fds) != 1:
            raise HandshakeError(f"hand-over message must carry exactly one file descriptor (the userfaultfd), "
                                 f"got {len(received_fds)}")
        uffd = received_fds.pop()
        return Handover(regions, uffd, pid, uid, gid, notify, sock)
    except socket.timeout:
        raise HandshakeError(f"program (pid {pid}) did not hand over its memory in time") from None
    finally:
        for fd in received_fds:
            os.close(fd)
