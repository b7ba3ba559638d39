"""The preempt channel belongs to one migration (DESIGN.md sections 4 and 8).

The main stream announces it (ID section: 16 random bytes and the channel count);
serve-dest adopts a second connection only if announced, once, and only if its
PREEMPT section carries that id; any other connection is refused on its own and the
migration goes on. At main-stream EOF an announced channel is waited for: requested
pages may have come only on it.

The sources here are written in the test with the codec, over real loopback TCP,
into real registered memory of a `workload touch` that checks every byte.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import PROC_TIMEOUT, postcopy_cmd, single_stderr_line, write_image
from postcopy_cli import codec
from postcopy_cli.errors import ProtocolError
from postcopy_cli.selftest.harness import kill_and_reap, read_listening

PAGE = 4096
PAGES = 256
SIZE = PAGES * PAGE
BLOCK = codec.BlockInfo("mem", SIZE, PAGE)
MIG_ID = bytes(range(1, 17))


# ---- a source written here --------------------------------------------------------------------

def preamble(migration: codec.MigrationId | None) -> bytes:
    parts = [codec.encode(codec.Header()), codec.encode(codec.Blocks((BLOCK,)))]
    if migration is not None:
        parts.append(codec.encode(migration))
    parts += [codec.encode(codec.OpenReturnPath()), codec.encode(codec.PostcopyAdvise(PAGE, PAGE)),
              codec.encode(codec.PostcopyListen()), codec.encode(codec.PostcopyRun())]
    return b"".join(parts)


def ram(data: bytes, pages) -> bytes:
    return codec.encode_ram_section(codec.RamPage("mem", p * PAGE, data[p * PAGE:(p + 1) * PAGE]) for p in pages)


def preempt_start(ident: bytes) -> bytes:
    return codec.encode(codec.Header()) + codec.encode(codec.PreemptChannel(ident))


EOF = codec.encode(codec.Eof())


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=PROC_TIMEOUT)


def closed_by_peer(conn: socket.socket) -> None:
    """Wait until serve-dest has closed this connection (it never sends anything on it)."""
    try:
        while conn.recv(65536):
            pass
    except ConnectionResetError:
        pass


def _tcp_queues(local_port: int, remote_port: int) -> tuple[int, int] | None:
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                fld = line.split()
                if int(fld[1].split(":")[1], 16) == local_port and int(fld[2].split(":")[1], 16) == remote_port:
                    tx, rx = fld[4].split(":")
                    return int(tx, 16), int(rx, 16)
    return None


def read_by_peer(conn: socket.socket) -> None:
    """Wait until every byte sent on ``conn`` has been read by serve-dest (both queues empty)."""
    me, peer = conn.getsockname()[1], conn.getpeername()[1]
    deadline = time.monotonic() + PROC_TIMEOUT
    while time.monotonic() < deadline:
        mine, theirs = _tcp_queues(me, peer), _tcp_queues(peer, me)
        if mine is None or theirs is None:
            pytest.fail("serve-dest closed the connection")
        if mine[0] == 0 and theirs[1] == 0:
            return
        time.sleep(0.005)
    pytest.fail("serve-dest never read what was sent")


class Restore:
    """serve-dest --uffd-socket with a `workload touch --image` attached (sequential: it blocks on page 0)."""

    def __init__(self, tmp_path, serve_dest, *, timeout: str = "20", recover_timeout: str = "600"):
        self.image = tmp_path / "mem.img"
        self.data = write_image(self.image, SIZE, seed=11, zero_runs=())
        sock = tmp_path / "uffd.sock"
        self.sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock), "--json",
                             "--timeout", timeout, "--recover-timeout", recover_timeout)
        self.toucher = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(SIZE), "--attach", str(sock),
                                                     "--image", str(self.image), "--order", "sequential", "--json",
                                                     "--connect-timeout", "20"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self):
        try:
            rc, out, err = self.sd.wait()
            t_out, t_err = self.toucher.communicate(timeout=PROC_TIMEOUT)
        finally:
            kill_and_reap(self.toucher)
        return rc, out, err, self.toucher.returncode, t_out, t_err


def _warnings(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "refused" in line]


# ---- item 3: EOF waits for the announced preempt channel -----------------------------------

def test_eof_waits_for_the_announced_preempt_channel(tmp_path, serve_dest):
    """Main-stream EOF read before the preempt channel even connects: serve-dest waits for it."""
    r = Restore(tmp_path, serve_dest)
    main = connect(r.sd.port)
    try:
        # pages 0..15 go only on the preempt channel (as requested pages do); all others on main
        main.sendall(preamble(codec.MigrationId(MIG_ID, 1)) + ram(r.data, range(16, PAGES)) + EOF)
        read_by_peer(main)           # serve-dest has read the main stream's EOF
        pre = connect(r.sd.port)
        try:
            pre.sendall(preempt_start(MIG_ID) + ram(r.data, range(16)) + EOF)
            rc, out, err, t_rc, t_out, t_err = r.finish()
        finally:
            pre.close()
    finally:
        main.close()
    assert rc == 0, err
    assert t_rc == 0, t_err
    assert json.loads(t_out)["mismatches"] == 0
    stats = json.loads(out)
    assert stats["pages"]["received"] == PAGES
    assert _warnings(err) == []


def test_announced_preempt_channel_that_never_connects_fails(tmp_path, serve_dest):
    """Announced, never opened, pages missing at EOF: a clear failure naming the channel, not a success."""
    # (no pause: what is under test is the wait at EOF and its message)
    r = Restore(tmp_path, serve_dest, timeout="2", recover_timeout="0")
    main = connect(r.sd.port)
    try:
        main.sendall(preamble(codec.MigrationId(MIG_ID, 1)) + ram(r.data, range(16, PAGES)) + EOF)
        rc, out, err, t_rc, t_out, t_err = r.finish()
    finally:
        main.close()
    assert rc == 4, err
    line = single_stderr_line(err)
    assert "preempt channel" in line and "did not connect" in line and "16 of 256 pages" in line, line
    assert t_rc != 0   # the program was never given the pages it waited for


# ---- item 4a: only the announced channel, once, with the id --------------------------------

def test_extra_connections_are_refused_and_the_migration_goes_on(tmp_path, serve_dest):
    """A second connection with another id, and a third with the right id once the channel is
    adopted: both refused with a warning, their pages never placed, every byte right."""
    r = Restore(tmp_path, serve_dest)
    garbage = bytes([0xEE]) * SIZE
    main = connect(r.sd.port)
    conns = [main]
    try:
        main.sendall(preamble(codec.MigrationId(MIG_ID, 1)))
        wrong = connect(r.sd.port)
        conns.append(wrong)
        wrong.sendall(preempt_start(bytes(16)) + ram(garbage, range(32)) + EOF)
        closed_by_peer(wrong)
        real = connect(r.sd.port)
        conns.append(real)
        real.sendall(preempt_start(MIG_ID) + ram(r.data, range(16)))
        read_by_peer(real)           # adopted: its pages were read (a candidate is read for its header only)
        again = connect(r.sd.port)
        conns.append(again)
        again.sendall(preempt_start(MIG_ID) + ram(garbage, range(16, 32)) + EOF)
        closed_by_peer(again)
        real.sendall(EOF)
        main.sendall(ram(r.data, range(16, PAGES)) + EOF)
        rc, out, err, t_rc, t_out, t_err = r.finish()
    finally:
        for c in conns:
            c.close()
    assert rc == 0, err
    assert t_rc == 0, t_err
    assert json.loads(t_out)["mismatches"] == 0
    warnings = _warnings(err)
    assert len(warnings) == 2, err
    assert "another migration id" in warnings[0]
    assert "connected already" in warnings[1]


@pytest.mark.parametrize("announce", ["single-channel", "no-id-section"])
def test_connection_to_a_single_channel_migration_is_refused(tmp_path, serve_dest, announce):
    """The issue's case: the source uses one channel; a second connection (even with the id) is not
    adopted, and its pages never reach the program."""
    r = Restore(tmp_path, serve_dest)
    migration = codec.MigrationId(MIG_ID, 0) if announce == "single-channel" else None
    main = connect(r.sd.port)
    extra = connect(r.sd.port)
    try:
        main.sendall(preamble(migration))
        extra.sendall(preempt_start(MIG_ID) + ram(bytes([0xEE]) * SIZE, range(PAGES)) + EOF)
        closed_by_peer(extra)
        main.sendall(ram(r.data, range(PAGES)) + EOF)
        rc, out, err, t_rc, t_out, t_err = r.finish()
    finally:
        main.close()
        extra.close()
    assert rc == 0, err
    assert t_rc == 0, t_err
    assert json.loads(t_out)["mismatches"] == 0
    warnings = _warnings(err)
    assert len(warnings) == 1 and "announced no preempt channel" in warnings[0], err


def test_preempt_codec_carries_the_id():
    data = preempt_start(MIG_ID)
    assert data[8:] == b"\x20" + MIG_ID
    dec = codec.StreamDecoder(joining={"mem": BLOCK})
    for i in range(len(data)):   # a byte at a time: the id is waited for whole
        dec.feed(data[i:i + 1])
        events = list(dec.events())
        if i == len(data) - 1:
            assert events == [codec.PreemptChannel(MIG_ID)]
    dec = codec.StreamDecoder(joining={"mem": BLOCK})
    dec.feed(codec.encode(codec.Header()) + b"\x20" + MIG_ID + codec.encode(codec.MigrationId(MIG_ID, 1)))
    with pytest.raises(ProtocolError, match="carries only RAM sections"):
        list(dec.events())


# ---- item 3 in a loop: the README's restore flow under CPU load ----------------------------

@pytest.mark.slow
def test_restore_flow_with_preempt_channel_under_load(tmp_path):
    """The README's restore (serve-dest --uffd-socket, workload touch, migrate --image with its
    preempt channel) 50 times with two CPU hogs: every run exit 0 on all three, no mismatch."""
    image = tmp_path / "mem.img"
    write_image(image, 1 << 20, seed=5)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    failures = []
    try:
        for i in range(50):
            sock = tmp_path / f"u{i}.sock"
            sd = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", "tcp:127.0.0.1:0", "--uffd-socket",
                                               str(sock), "--json"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            address = read_listening(sd, PROC_TIMEOUT)["address"]
            toucher = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", "1M", "--attach", str(sock),
                                                    "--image", str(image), "--order", "random", "--seed", str(i),
                                                    "--json", "--connect-timeout", "20"),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            mig = subprocess.run(postcopy_cmd("migrate", "--to", address, "--image", str(image), "--json"),
                                 capture_output=True, text=True, timeout=PROC_TIMEOUT)
            t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
            out, err = sd.communicate(timeout=PROC_TIMEOUT)
            ok = (mig.returncode == toucher.returncode == sd.returncode == 0
                  and json.loads(t_out)["mismatches"] == 0)
            if not ok:
                failures.append((i, mig.returncode, toucher.returncode, sd.returncode, err[-300:],
                                 mig.stderr[-300:], t_err[-300:]))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert failures == []
