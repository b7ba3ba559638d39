"""migrate's return path with its preempt channel, against a fake destination speaking the wire format.

The native request server holds 64 KiB of return path; a message longer than
that (a RECV_BITMAP for a block over 2 GiB) goes to the codec, which reads it
whole, and long runs of requests are all served.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading

import pytest

from conftest import PROC_TIMEOUT, postcopy_cmd, single_stderr_line, write_image
from postcopy_cli import codec

PAGE = 4096
F_ZERO, F_PAGE, F_CONT = 0x02, 0x08, 0x20


class FakeDest:
    """Accepts migrate's main connection and its preempt channel; records or drains what comes."""

    def __init__(self, image, *extra: str):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(PROC_TIMEOUT)
        port = self.listener.getsockname()[1]
        self.proc = subprocess.Popen(postcopy_cmd("migrate", "--to", f"tcp:127.0.0.1:{port}", "--image", str(image),
                                                  *extra),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.main, _ = self.listener.accept()
        self.preempt, _ = self.listener.accept()
        self.preempt_bytes = bytearray()
        self.preempt_more = threading.Condition()
        threading.Thread(target=self._read_preempt, daemon=True).start()

    def _read_preempt(self):
        while True:
            try:
                data = self.preempt.recv(1 << 20)
            except OSError:
                data = b""
            with self.preempt_more:
                self.preempt_bytes += data
                if not data:
                    self.preempt_bytes += b"<closed>"
                self.preempt_more.notify_all()
            if not data:
                return

    def drain_main(self, *, until_eof: bool = False):
        """Read the main stream in a thread (to its EOF section with until_eof); returns the thread."""
        done = threading.Event()

        def run():
            decoder = codec.StreamDecoder()
            while True:
                try:
                    data = self.main.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                if until_eof:
                    decoder.feed(data)
                    if any(type(ev) is codec.Eof for ev in decoder.events()):
                        done.set()
                        return

        threading.Thread(target=run, daemon=True).start()
        return done

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=PROC_TIMEOUT)
        except subprocess.TimeoutExpired:   # spinning or hung: the failure this file guards against
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"migrate did not end within {PROC_TIMEOUT} s: {err}")
        finally:
            for s in (self.main, self.preempt, self.listener):
                s.close()
        return self.proc.returncode, out, err


def test_return_path_message_longer_than_native_buffer(tmp_path):
    """A RECV_BITMAP of a 3 GiB block (96 KiB of bitmap) on the return path, where migrate asked for
    none: the codec reads it whole and migrate ends with exit 3 naming it, at once (it used to hand the
    same 64 KiB back and forth at 100% CPU until --timeout), after serving the request sent before it."""
    image = tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(3 << 30)   # sparse: block "mem" of 3 GiB, all zeros
    # a capped background stream takes minutes: what ends migrate is the return path
    fd = FakeDest(image, "--timeout", "300", "--max-bandwidth", "16K")
    fd.drain_main()
    bitmap = bytes((3 << 30) // PAGE // 8)
    assert len(bitmap) > 64 * 1024
    fd.main.sendall(codec.encode_rp(codec.ReqPagesId("mem", 5 * PAGE, PAGE)) +
                    codec.encode_rp(codec.RecvBitmap("mem", bitmap)))
    rc, _, err = fd.finish()
    assert rc == 3, err
    line = single_stderr_line(err)
    assert "RecvBitmap" in line and "return path" in line, line
    # the request before it was answered on the preempt channel: a ZERO record naming block "mem"
    assert struct.pack(">Q", 5 * PAGE | F_ZERO) + b"\x03mem\x00" in fd.preempt_bytes


def _records(stream: bytes, first: int):
    """(offset, data) of the PAGE records of the preempt channel from its first record, which is
    a PAGE naming block "mem" at ``first`` (nothing while that record has not arrived yet)."""
    pos = stream.find(struct.pack(">Q", first | F_PAGE) + b"\x03mem")
    if pos < 0:
        return
    while pos + 8 <= len(stream):
        (v,) = struct.unpack_from(">Q", stream, pos)
        off, flags = v & ~0xFFF, v & 0xFFF
        if not flags & (F_PAGE | F_ZERO):
            return   # end of the section
        pos += 8 if flags & F_CONT else 8 + 1 + stream[pos + 8]
        size = PAGE if flags & F_PAGE else 1
        if pos + size > len(stream):
            return
        yield off, bytes(stream[pos:pos + size])
        pos += size


def test_long_burst_of_requests_all_served(tmp_path):
    """5,001 requests in one burst (80 KiB of return path, more than the server's buffer holds at once):
    each is answered on the preempt channel with the page's bytes, then the migration completes."""
    size = 32 << 20
    image = tmp_path / "mem.img"
    data = write_image(image, size, seed=9, zero_runs=())
    pages = list(range(1, 8192, 2))[:4096] + list(range(2, 8192, 8))[:905]
    assert len(set(pages)) == len(pages) == 5001
    fd = FakeDest(image, "--json")
    # the main stream is not read yet: the background stream stalls, the requests must come first
    burst = codec.encode_rp(codec.ReqPagesId("mem", pages[0] * PAGE, PAGE)) + b"".join(
        codec.encode_rp(codec.ReqPages(p * PAGE, PAGE)) for p in pages[1:])
    assert len(burst) > 64 * 1024
    fd.main.sendall(burst)
    want = {p * PAGE for p in pages}
    got: dict[int, bytes] = {}
    with fd.preempt_more:
        while not want <= got.keys():
            assert fd.preempt_more.wait(PROC_TIMEOUT), f"{len(want - got.keys())} requested pages never came"
            assert not fd.preempt_bytes.endswith(b"<closed>"), fd.proc.stderr.read()
            got = dict(_records(bytes(fd.preempt_bytes), pages[0] * PAGE))
    for off in want:
        assert got[off] == data[off:off + PAGE], f"page {off:#x}"
    eof = fd.drain_main(until_eof=True)
    assert eof.wait(PROC_TIMEOUT)
    fd.main.sendall(codec.encode_rp(codec.Shut(0)))
    rc, out, err = fd.finish()
    assert rc == 0, err
