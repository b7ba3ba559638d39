"""`postcopy migrate --image` against a fake destination written here with the codec (loopback TCP)."""
from __future__ import annotations

import json
import socket
import struct
import subprocess

import pytest

from conftest import PROC_TIMEOUT, finish, postcopy_cmd, single_stderr_line, write_image
from fakes import read_events
from postcopy_cli import codec

PAGE = 4096
MiB = 1 << 20


class FakeDest:
    """A listening socket; ``accept()`` then read the stream with the codec."""

    def __init__(self, rcvbuf: int | None = None):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(PROC_TIMEOUT)
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.conn: socket.socket | None = None
        self.decoder = codec.StreamDecoder()

    def accept(self):
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(PROC_TIMEOUT)

    def read_until(self, pred):
        """Decode events until ``pred(event)`` is true for one; returns every event read."""
        return read_events(self.conn, self.decoder, pred, "the event looked for")

    def close(self):
        if self.conn:
            self.conn.close()
        self.listener.close()


@pytest.fixture
def fake_dest():
    made = []

    def make(**kw):
        d = FakeDest(**kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def start_migrate(dest: FakeDest, image, *extra):
    return subprocess.Popen(postcopy_cmd("migrate", "--to", dest.address, "--image", str(image), "--json", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _is(kind):
    return lambda ev: isinstance(ev, kind)


def test_full_stream_then_shut_0(tmp_path, fake_dest):
    """Preamble, LISTEN, RUN, every page once (zero pages as ZERO records, the partial tail padded), EOF."""
    size = 3 * MiB + 1000
    image = tmp_path / "img"
    data = write_image(image, size, seed=4, zero_runs=((10, 20),))
    block_len = -(-size // PAGE) * PAGE
    d = fake_dest()
    proc = start_migrate(d, image)
    d.accept()
    events = d.read_until(_is(codec.Eof))
    kinds = [type(e) for e in events]
    assert kinds[:5] == [codec.Header, codec.Blocks, codec.MigrationId, codec.OpenReturnPath, codec.PostcopyAdvise]
    assert events[1].blocks == (codec.BlockInfo("mem", block_len, PAGE),)
    assert len(events[2].id) == 16 and events[2].id != bytes(16) and events[2].preempt_channels == 1
    assert events[4] == codec.PostcopyAdvise(PAGE, PAGE)
    assert kinds.index(codec.PostcopyListen) < kinds.index(codec.PostcopyRun) < kinds.index(codec.RamPage)
    assert d.decoder.state == codec.PostcopyState.END
    got = {}
    zero_records = 0
    for e in events:
        if isinstance(e, codec.RamPage):
            assert e.offset not in got
            got[e.offset] = e.data
        elif isinstance(e, codec.RamZero):
            assert e.offset not in got
            got[e.offset] = bytes(PAGE)
            zero_records += 1
    padded = data + bytes(block_len - size)
    assert sorted(got) == list(range(0, block_len, PAGE))
    assert b"".join(got[o] for o in sorted(got)) == padded
    assert zero_records == 20
    d.conn.sendall(codec.encode_rp(codec.Shut(0)))
    rc, out, err = finish(proc)
    assert rc == 0, err
    stats = json.loads(out)
    assert stats["pages"] == block_len // PAGE
    assert stats["zero_pages"] == 20


def test_requested_page_jumps_the_queue(tmp_path, fake_dest):
    size = 16 * MiB
    image = tmp_path / "img"
    data = write_image(image, size, seed=8, zero_runs=())
    d = fake_dest(rcvbuf=64 << 10)
    proc = start_migrate(d, image, "--single-channel")   # the priority queue of one connection
    d.accept()
    d.read_until(_is(codec.PostcopyRun))
    last = size - PAGE
    d.conn.sendall(codec.encode_rp(codec.ReqPagesId("mem", last, PAGE)) +
                   codec.encode_rp(codec.ReqPages(PAGE * 2000, PAGE)))   # same block as the last request
    events = d.read_until(lambda e: isinstance(e, codec.RamPage) and e.offset == last)
    before = sum(isinstance(e, (codec.RamPage, codec.RamZero)) for e in events)
    assert events[-1].data == data[last:]
    # bounded by socket buffers plus one background chunk, far from the 4096 pages of the image
    assert before < 1024, before
    events += d.read_until(_is(codec.Eof))
    offsets = [e.offset for e in events if isinstance(e, (codec.RamPage, codec.RamZero))]
    assert sorted(offsets) == list(range(0, size, PAGE))    # each page exactly once
    d.conn.sendall(codec.encode_rp(codec.Shut(0)))
    rc, out, err = finish(proc)
    assert rc == 0, err
    stats = json.loads(out)
    assert stats["requests"] == 2
    assert stats["requested_pages"] + stats["requests_already_sent"] >= 1


def test_requested_page_goes_on_the_preempt_channel(tmp_path, fake_dest):
    """With a second connection, a requested page comes on it, not behind background pages."""
    size = 16 * MiB
    image = tmp_path / "img"
    data = write_image(image, size, seed=9, zero_runs=())
    d = fake_dest(rcvbuf=64 << 10)
    d.listener.listen(2)
    proc = start_migrate(d, image)
    d.accept()
    preempt, _ = d.listener.accept()
    preempt.settimeout(PROC_TIMEOUT)
    d.read_until(_is(codec.PostcopyRun))
    pd = codec.StreamDecoder(joining=d.decoder.blocks)
    last = size - PAGE
    d.conn.sendall(codec.encode_rp(codec.ReqPagesId("mem", last, PAGE)))
    got = []
    while not any(isinstance(e, codec.RamPage) for e in got):
        chunk = preempt.recv(1 << 16)
        assert chunk, f"preempt channel closed after {got}"
        pd.feed(chunk)
        got += [codec.RamPage(e.block, e.offset, bytes(e.data)) if isinstance(e, codec.RamPage) else e
                for e in pd.events()]
    assert [type(e) for e in got[:2]] == [codec.Header, codec.PreemptChannel]
    # the preempt channel names the migration announced by the main stream's ID section
    assert d.decoder.migration.preempt_channels == 1 and got[1].id == d.decoder.migration.id
    page = next(e for e in got if isinstance(e, codec.RamPage))
    assert (page.block, page.offset, page.data) == ("mem", last, data[last:])
    # the main stream still carries every page; then both channels end
    events = d.read_until(_is(codec.Eof))
    offsets = sorted(e.offset for e in events if isinstance(e, (codec.RamPage, codec.RamZero)))
    assert offsets == list(range(0, size, PAGE)) or offsets == [o for o in range(0, size, PAGE) if o != last]
    while not pd.finished:
        chunk = preempt.recv(1 << 16)
        assert chunk, "preempt channel closed without EOF"
        pd.feed(chunk)
        list(pd.events())
    d.conn.sendall(codec.encode_rp(codec.Shut(0)))
    rc, out, err = finish(proc)
    preempt.close()
    assert rc == 0, err
    stats = json.loads(out)
    assert stats["preempt"] is True and stats["requests"] == 1 and stats["requested_pages"] == 1


def test_ping_is_not_needed_pong_counted(tmp_path, fake_dest):
    """A PONG on the return path is accepted (counted), not treated as an error."""
    image = tmp_path / "img"
    write_image(image, 1 * MiB, seed=2)
    d = fake_dest()
    proc = start_migrate(d, image)
    d.accept()
    d.read_until(_is(codec.PostcopyRun))
    d.conn.sendall(codec.encode_rp(codec.Pong(5)))
    d.read_until(_is(codec.Eof))
    d.conn.sendall(codec.encode_rp(codec.Shut(0)))
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert json.loads(out)["pongs"] == 1


# ---------------------------------------------------------------------------
# 5. the destination goes away, answers garbage, or fails

def test_destination_disconnects(tmp_path, fake_dest):
    image = tmp_path / "img"
    write_image(image, 32 * MiB, seed=6)
    d = fake_dest()
    proc = start_migrate(d, image, "--recover-timeout", "0")   # RUN is out already: no pause
    d.accept()
    d.read_until(_is(codec.PostcopyAdvise))
    d.conn.close()
    d.conn = None
    rc, out, err = finish(proc)
    assert rc == 4, err
    assert "disconnect" in single_stderr_line(err) or "connection" in err


def test_destination_disconnects_after_eof(tmp_path, fake_dest):
    image = tmp_path / "img"
    write_image(image, 1 * MiB, seed=6)
    d = fake_dest()
    proc = start_migrate(d, image, "--recover-timeout", "0")
    d.accept()
    d.read_until(_is(codec.Eof))
    d.conn.close()
    d.conn = None
    rc, out, err = finish(proc)
    assert rc == 4, err
    single_stderr_line(err)


@pytest.mark.parametrize("garbage", [
    b"\xde\xad\xbe\xef" * 4,                                      # unknown message type
    struct.pack(">HH", 3, 13 + 3) + struct.pack(">QIB", 0, PAGE, 3) + b"foo",   # unknown block
    codec.encode_rp(codec.ReqPagesId("mem", 1 << 30, PAGE)),    # beyond the block
    struct.pack(">HH", 3, 13 + 3) + struct.pack(">QIB", 100, PAGE, 3) + b"mem",  # unaligned start
    struct.pack(">HH", 4, 12) + struct.pack(">QI", 0, PAGE),    # REQ_PAGES before any REQ_PAGES_ID
], ids=["type", "block", "beyond", "unaligned", "no-id"])
def test_malformed_return_path_exit_3(tmp_path, fake_dest, garbage):
    image = tmp_path / "img"
    write_image(image, 16 * MiB, seed=6)
    d = fake_dest(rcvbuf=64 << 10)
    proc = start_migrate(d, image)
    d.accept()
    d.read_until(_is(codec.PostcopyAdvise))
    d.conn.sendall(garbage)
    rc, out, err = finish(proc)
    assert rc == 3, err
    line = single_stderr_line(err)
    assert "return path" in line and "at byte 0" in line, line


def test_shut_1_from_destination_is_a_refusal_exit_3(tmp_path, fake_dest):
    image = tmp_path / "img"
    write_image(image, 16 * MiB, seed=6)
    d = fake_dest(rcvbuf=64 << 10)
    proc = start_migrate(d, image)
    d.accept()
    d.read_until(_is(codec.PostcopyRun))
    d.conn.sendall(codec.encode_rp(codec.Shut(1)))
    rc, out, err = finish(proc)
    assert rc == 3, err
    assert "refused the stream (SHUT 1)" in single_stderr_line(err)


def test_destination_never_answers_shut(tmp_path, fake_dest):
    image = tmp_path / "img"
    write_image(image, 1 * MiB, seed=6)
    d = fake_dest()
    proc = start_migrate(d, image, "--timeout", "1", "--recover-timeout", "0")
    d.accept()
    d.read_until(_is(codec.Eof))
    rc, out, err = finish(proc)
    assert rc == 4, err
    assert "SHUT" in single_stderr_line(err)


def test_nobody_listening_exit_4(tmp_path):
    image = tmp_path / "img"
    write_image(image, 1 * MiB, seed=6)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.run(postcopy_cmd("migrate", "--to", f"tcp:127.0.0.1:{port}", "--image", str(image),
                                    "--timeout", "0.5"), capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert p.returncode == 4, p.stderr
    single_stderr_line(p.stderr)


@pytest.mark.parametrize("args", [
    ["--to", "tcp:127.0.0.1:1"],                                 # neither --image nor --attach
    ["--to", "bogus", "--image", "IMG"],
    ["--to", "tcp:127.0.0.1:1", "--image", "IMG", "--max-bandwidth", "fast"],
])
def test_migrate_usage_errors(tmp_path, args):
    image = tmp_path / "img"
    write_image(image, 1 * MiB, seed=6)
    args = [str(image) if a == "IMG" else a for a in args]
    p = subprocess.run(postcopy_cmd("migrate", *args), capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
