"""Post-copy recovery on the source (DESIGN.md sections 4 and 9): real `postcopy migrate --image`
processes against a destination written here on real loopback sockets, which speaks the
destination's side of the resume handshake byte for byte and cuts connections (RST) mid post-copy."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess

import pytest

from conftest import PROC_TIMEOUT, finish, postcopy_cmd, write_image
from fakes import read_events
from postcopy_cli import codec

PAGE = 4096
MiB = 1 << 20


def rst_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the peer's next write or read fails."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Connection:
    """One accepted connection, decoded with the codec (``joining``: a resume or preempt channel)."""

    def __init__(self, sock: socket.socket, joining=None):
        self.sock = sock
        sock.settimeout(PROC_TIMEOUT)
        self.decoder = codec.StreamDecoder(joining=joining) if joining else codec.StreamDecoder()

    def events(self, pred, what: str) -> list:
        """Events until ``pred(event)`` holds for one (returned last)."""
        return read_events(self.sock, self.decoder, pred, what)

    def send(self, *messages) -> None:
        self.sock.sendall(b"".join(codec.encode_rp(m) for m in messages))


class RecoveringDest:
    """A destination that keeps what it received across connections (its received bitmap)."""

    def __init__(self, image: bytes, block_len: int):
        self.image = image + bytes(block_len - len(image))
        self.block = codec.BlockInfo("mem", block_len, PAGE)
        self.npages = block_len // PAGE
        self.have: dict[int, bytes] = {}
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(PROC_TIMEOUT)
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.migration_id: bytes | None = None
        self.resends = 0   # pages received again (preempt copies of requested pages)
        self.procs: list = []

    def accept(self, joining: bool = False) -> Connection:
        sock, _ = self.listener.accept()
        return Connection(sock, {"mem": self.block} if joining else None)

    def take(self, events, *, allow_again=()) -> None:
        """Record the pages in ``events``: each byte for byte the image's; none had before (but those
        in ``allow_again``)."""
        for ev in events:
            if isinstance(ev, (codec.RamPage, codec.RamZero)):
                data = ev.data if isinstance(ev, codec.RamPage) else bytes(PAGE)
                assert data == self.image[ev.offset:ev.offset + PAGE], f"page {ev.offset:#x} differs from the image"
                if ev.offset in self.have:
                    assert ev.offset in allow_again, f"page {ev.offset:#x} sent again though received"
                    self.resends += 1
                self.have[ev.offset] = data

    def first(self, single_channel: bool = True):
        """The first main connection (and preempt channel) up to RUN."""
        main = self.accept()
        preempt = None if single_channel else self.accept(joining=True)
        events = main.events(lambda e: isinstance(e, codec.PostcopyRun), "RUN")
        ident = next(e for e in events if isinstance(e, codec.MigrationId))
        self.migration_id = ident.id
        return main, preempt

    def read_pages(self, conn: Connection, n: int) -> None:
        """Receive ``n`` more pages on ``conn``."""
        seen = 0

        def enough(ev) -> bool:
            nonlocal seen
            seen += isinstance(ev, (codec.RamPage, codec.RamZero))
            return seen >= n or isinstance(ev, codec.Eof)

        events = conn.events(enough, f"{n} pages")
        assert not isinstance(events[-1], codec.Eof), "the migration ended before the cut"
        self.take(events)

    def bitmap(self) -> bytes:
        bits = 0
        for offset in self.have:
            bits |= 1 << (offset // PAGE)
        return bits.to_bytes((self.npages + 63) // 64 * 8, "little")

    def missing(self) -> list[int]:
        return [o for o in range(0, self.npages * PAGE, PAGE) if o not in self.have]

    def resume_request(self) -> Connection:
        """Accept the resume connection and check its handshake up to POSTCOPY_RESUME."""
        conn = self.accept(joining=True)
        events = conn.events(lambda e: isinstance(e, codec.PostcopyResume), "POSTCOPY_RESUME")
        assert events == [codec.Header(), codec.Resume(self.migration_id), codec.RecvBitmapRequest("mem"),
                          codec.PostcopyResume()], events
        return conn

    def resume(self, *, request: bool = True) -> Connection:
        """A whole resume: the handshake, the bitmap, RESUME_ACK, then a request for a missing page."""
        conn = self.resume_request()
        conn.send(codec.RecvBitmap("mem", self.bitmap()), codec.ResumeAck(1))
        missing = self.missing()
        if request and missing:
            conn.send(codec.ReqPagesId("mem", missing[-1], PAGE))
        return conn

    def finish(self, conn: Connection, preempt: Connection | None = None, *, again=frozenset()) -> None:
        """Read to EOF (on both channels); every page is in, byte for byte; answer SHUT 0.  ``again``:
        pages the preempt channel may bring a second copy of (requested since the resume)."""
        self.take(conn.events(lambda e: isinstance(e, codec.Eof), "EOF"))
        if preempt is not None:
            self.take(preempt.events(lambda e: isinstance(e, codec.Eof), "the preempt channel's EOF"),
                      allow_again=set(self.have) - again)
        assert not self.missing(), f"{len(self.missing())} pages never arrived"
        conn.send(codec.Shut(0))

    def resume_with_preempt(self) -> None:
        """A resume, the re-opened preempt channel (after RESUME_ACK), then to the end: no page
        received before the resume comes again on either channel."""
        conn = self.resume()
        before = frozenset(self.have)
        preempt = self.accept(joining=True)
        marker = preempt.events(lambda e: isinstance(e, codec.PreemptChannel), "PREEMPT")
        assert marker == [codec.Header(), codec.PreemptChannel(self.migration_id)]
        self.finish(conn, preempt, again=before)

    def close(self):
        self.listener.close()


@pytest.fixture
def image_dest(tmp_path):
    made = []

    def make(size: int = 8 * MiB, seed: int = 21):
        path = tmp_path / "img"
        data = write_image(path, size, seed=seed)
        d = RecoveringDest(data, -(-size // PAGE) * PAGE)
        d.path = path
        made.append(d)
        return d

    yield make
    for d in made:
        for proc in d.procs:   # a failed test leaves no source reconnecting for --recover-timeout
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        d.close()


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    path = tmp_path / "state"
    monkeypatch.setenv("POSTCOPY_STATE_DIR", str(path))
    return path


def start(d: RecoveringDest, *extra, image=None):
    proc = subprocess.Popen(postcopy_cmd("migrate", "--to", d.address, "--image", str(image or d.path), "--json",
                                         *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    d.procs.append(proc)
    return proc


def ok_stats(proc) -> dict:
    rc, out, err = finish(proc)
    assert rc == 0, err
    assert "Traceback" not in err, err
    return json.loads(out)


def test_five_cuts_in_one_migration_resend_exactly_the_missing_pages(image_dest):
    d = image_dest()
    proc = start(d, "--single-channel")
    conn, _ = d.first()
    d.read_pages(conn, 64)
    for _ in range(5):
        rst_close(conn.sock)
        conn = d.resume()
        d.read_pages(conn, 128)
    d.finish(conn)
    stats = ok_stats(proc)
    assert stats["postcopy-recoveries"] == 5 and len(stats["postcopy-recovery-ms"]) == 5
    assert stats["postcopy-paused-ms"] > 0 and stats["postcopy-reconnect-attempts"] >= 5
    assert stats["migration-id"] == d.migration_id.hex()


@pytest.mark.parametrize("failed_attempt", ["cut-before-resume-ack", "refused"])
def test_a_failed_resume_attempt_is_retried(image_dest, failed_attempt):
    """A double failure: the resume connection is cut after RECV_BITMAP, before RESUME_ACK; or the
    destination refuses the resume (SHUT 1): the source retries on a new connection."""
    d = image_dest()
    proc = start(d, "--single-channel")
    conn, _ = d.first()
    d.read_pages(conn, 64)
    rst_close(conn.sock)
    failed = d.resume_request()
    if failed_attempt == "refused":
        failed.send(codec.Shut(1))
        failed.sock.close()
    else:
        failed.send(codec.RecvBitmap("mem", d.bitmap()))
        rst_close(failed.sock)
    conn = d.resume()
    d.finish(conn)
    rc, out, err = finish(proc)
    assert rc == 0, err
    stats = json.loads(out)
    assert stats["postcopy-recoveries"] == 1 and stats["postcopy-reconnect-attempts"] >= 2
    assert "post-copy resume failed" in err, err


def test_recover_timeout_0_fails_at_once(image_dest):
    d = image_dest()
    proc = start(d, "--single-channel", "--recover-timeout", "0")
    conn, _ = d.first()
    d.read_pages(conn, 16)
    rst_close(conn.sock)
    rc, out, err = finish(proc)
    assert rc == 4, err
    assert "paused" not in err and "Traceback" not in err


def test_recover_timeout_with_nothing_listening_exit_4(image_dest):
    d = image_dest()
    proc = start(d, "--single-channel", "--recover-timeout", "2")
    conn, _ = d.first()
    d.read_pages(conn, 16)
    d.listener.close()
    rst_close(conn.sock)
    rc, out, err = finish(proc)
    assert rc == 4, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "--recover-timeout 2" in last and "pages never sent" in last, err


def test_preempt_channel_cut_alone(image_dest):
    d = image_dest()
    proc = start(d)
    conn, preempt = d.first(single_channel=False)
    d.read_pages(conn, 32)
    rst_close(preempt.sock)
    # the next requested page goes on the preempt channel: its write fails, the source pauses
    conn.send(codec.ReqPagesId("mem", d.missing()[-1], PAGE))
    d.resume_with_preempt()
    stats = ok_stats(proc)
    assert stats["postcopy-recoveries"] == 1 and stats["preempt"] is True


def test_stalled_link_is_noticed_and_resumed(image_dest):
    d = image_dest(size=32 * MiB)
    proc = start(d, "--single-channel", "--timeout", "1")
    conn, _ = d.first()
    d.read_pages(conn, 16)
    # stop reading and answering: the source's writes make no progress for --timeout
    new = d.resume()
    conn.sock.close()
    d.finish(new)
    stats = ok_stats(proc)
    assert stats["postcopy-recoveries"] == 1


def test_resume_by_migration_id_after_kill(image_dest, state_dir):
    d = image_dest()
    ident = "0123456789abcdef0123456789abcdef"
    proc = start(d, "--single-channel", "--migration-id", ident)
    conn, _ = d.first()
    assert d.migration_id.hex() == ident
    d.read_pages(conn, 64)
    proc.kill()
    finish(proc)
    conn.sock.close()
    os.unlink(next(state_dir.iterdir()))   # no record: the id alone names the migration
    proc = start(d, "--single-channel", "--resume", "--migration-id", ident)
    conn = d.resume()
    d.finish(conn)
    stats = ok_stats(proc)
    assert stats["postcopy-recoveries"] == 1 and stats["migration-id"] == ident


def test_kill_9_then_resume_from_the_record(image_dest, state_dir):
    d = image_dest()
    proc = start(d)
    conn, preempt = d.first(single_channel=False)
    d.read_pages(conn, 64)
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    conn.sock.close()
    preempt.sock.close()
    (record,) = state_dir.iterdir()
    saved = json.loads(record.read_text())
    assert saved["migration-id"] == d.migration_id.hex() and saved["to"] == d.address
    proc = start(d, "--resume")
    d.resume_with_preempt()
    assert ok_stats(proc)["postcopy-recoveries"] == 1
    assert not list(state_dir.iterdir()), "the record outlived the completed migration"


def test_resume_usage_errors(tmp_path, state_dir):
    image = tmp_path / "img"
    write_image(image, MiB, seed=3)
    for args in (["--resume", "--attach", str(tmp_path / "sock")],
                 ["--resume", "--image", str(image)],
                 ["--image", str(image), "--migration-id", "xyz"]):
        p = subprocess.run(postcopy_cmd("migrate", "--to", "tcp:127.0.0.1:1", *args), capture_output=True,
                           text=True, timeout=PROC_TIMEOUT)
        assert p.returncode == 2, (args, p.stderr)
        assert "Traceback" not in p.stderr and ("--resume" in p.stderr or "--migration-id" in p.stderr), p.stderr


def test_resume_answered_shut_0_means_complete(tmp_path):
    """The connection breaks after EOF before SHUT arrives; on the resume the destination answers SHUT 0
    (it has every page): migrate exits 0 without sending anything more."""
    import socket as _socket
    from postcopy_cli import codec as _codec
    from conftest import postcopy_cmd as _cmd, write_image as _write
    import subprocess as _sp
    image = tmp_path / "img"
    _write(image, 1 << 20, seed=2)
    lst = _socket.create_server(("127.0.0.1", 0))
    lst.settimeout(60)
    mig = _sp.Popen(_cmd("migrate", "--to", f"tcp:127.0.0.1:{lst.getsockname()[1]}", "--image", str(image),
                         "--json", "--single-channel", "--recover-timeout", "30"),
                    stdout=_sp.PIPE, stderr=_sp.PIPE, text=True)
    conn, _ = lst.accept()
    conn.settimeout(60)
    dec = _codec.StreamDecoder()
    while not dec.finished:
        chunk = conn.recv(1 << 20)
        assert chunk, "migrate closed before EOF"
        dec.feed(chunk)
        for _ in dec.events():
            pass
    conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    conn.close()
    again, _ = lst.accept()
    again.settimeout(60)
    jd = _codec.StreamDecoder(joining=dec.blocks)
    while not any(isinstance(e, _codec.PostcopyResume) for e in list(jd.events()) or [None]):
        chunk = again.recv(1 << 16)
        assert chunk, "migrate closed during its resume"
        jd.feed(chunk)
    again.sendall(_codec.encode_rp(_codec.Shut(0)))
    out, err = mig.communicate(timeout=60)
    assert mig.returncode == 0, err
    assert again.recv(100) == b"", "nothing more is sent after SHUT 0"
    again.close()
    lst.close()
