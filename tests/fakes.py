"""A hand-written migration source for tests: a real loopback TCP connection to serve-dest on which
the test sends exactly the bytes it chooses (well-formed or not) and reads the return path."""
from __future__ import annotations

import socket

from postcopy_cli import codec
from postcopy_cli.codec.constants import TARGET_PAGE_SIZE

from conftest import PROC_TIMEOUT


def preamble(block: codec.BlockInfo, *, through: str = "run") -> bytes:
    """What a post-copy source sends before its pages: the header, ``block``, OPEN_RETURN_PATH and
    ADVISE, then (``through="run"``) LISTEN and RUN; ``through="advise"`` stops after ADVISE."""
    if through not in ("advise", "run"):
        raise ValueError(f"through must be 'advise' or 'run', not {through!r}")
    messages = [codec.Header(), codec.Blocks((block,)), codec.OpenReturnPath(),
                codec.PostcopyAdvise(block.page_size, TARGET_PAGE_SIZE)]
    if through == "run":
        messages += [codec.PostcopyListen(), codec.PostcopyRun()]
    return b"".join(codec.encode(m) for m in messages)


class FakeSource:
    """A connection to serve-dest at ``port`` that migrates the one block ``block``."""

    def __init__(self, port: int, block: codec.BlockInfo, *, timeout: float = PROC_TIMEOUT):
        self.block = block
        self.conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.return_path = codec.ReturnPathDecoder([block])
        self.ram = codec.RamSectionEncoder()

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def pages(self, data: bytes, offsets, *, end: bool = True) -> bytes:
        """A RAM section with the target pages of ``data`` (the block's contents) at ``offsets``
        (left open with ``end=False``)."""
        return (self.ram.begin()
                + b"".join(self.ram.page(self.block.name, o, data[o:o + TARGET_PAGE_SIZE]) for o in offsets)
                + (self.ram.end() if end else b""))

    def events(self, what: str = "serve-dest closed the connection") -> list:
        """The return-path messages in the next bytes that arrive (fails, naming ``what``, at EOF)."""
        chunk = self.conn.recv(65536)
        assert chunk, what
        self.return_path.feed(chunk)
        return list(self.return_path.events())

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "FakeSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_events(sock: socket.socket, decoder, pred, what: str) -> list:
    """Decode the stream on ``sock`` until ``pred(event)`` holds for one (returned last); RAM pages
    are copied out of the receive buffer.  Fails, naming ``what``, if the source closes first."""
    events = []
    while True:
        for ev in decoder.events():
            if isinstance(ev, codec.RamPage):
                ev = codec.RamPage(ev.block, ev.offset, bytes(ev.data))
            events.append(ev)
            if pred(ev):
                return events
        chunk = sock.recv(1 << 16)
        assert chunk, f"the source closed the connection before {what} (after {len(events)} events)"
        decoder.feed(chunk)
