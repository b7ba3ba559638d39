"""Only our user and root take part in a migration (DESIGN.md section 8).

Loopback TCP peers are checked in both directions with the kernel's socket table
(/proc/net/tcp{,6} names the uid owning the socket at the other end), Unix peers
with SO_PEERCRED; a refused peer is closed with a one-line warning and the wait for
the real one goes on. The other user is uid 65534, run with setpriv.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import PROC_TIMEOUT, ServeDestProc, postcopy_cmd, run_postcopy, single_stderr_line, write_image
from fakes import preamble
from postcopy_cli import codec
from postcopy_cli.channels import transport
from postcopy_cli.selftest.harness import kill_and_reap

PAGE = 4096
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# the system interpreter: uid 65534 may not be able to reach ours
OTHER_PYTHON = "/usr/bin/python3"

# A peer of another user: connects (TCP port or Unix path in argv[1]), sends stdin, waits for our close.
ATTACKER = """
import socket, sys
where = sys.argv[1]
if where.isdigit():
    s = socket.create_connection(("127.0.0.1", int(where)))
else:
    s = socket.socket(socket.AF_UNIX)
    s.connect(where)
try:
    s.sendall(sys.stdin.buffer.read())
    while s.recv(65536):
        pass
except (BrokenPipeError, ConnectionResetError):   # refused before it finished writing
    pass
print("closed", flush=True)
"""

# A destination of another user: listens, prints its port, counts the bytes it receives.
FAKE_DEST = """
import socket
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(4)
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
c.settimeout(30)
n = 0
try:
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
except OSError:
    pass
print(n, flush=True)
"""


@pytest.fixture
def shared_dir():
    """A directory uid 65534 can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(OTHER_PYTHON):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run a peer as another user")
    d = Path(tempfile.mkdtemp(prefix="pc-uid-", dir="/tmp"))
    os.chmod(d, 0o755)
    probe = subprocess.run(NOBODY + [OTHER_PYTHON, "-c", "print('ok')"], capture_output=True, text=True, timeout=30)
    if probe.stdout.strip() != "ok":
        shutil.rmtree(d)
        pytest.skip(f"cannot run a process as uid 65534 here: {probe.stderr[-200:]}")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def attack(where: str, data: bytes) -> None:
    """Run the other user's peer to the end: it connected, sent ``data``, and we closed it."""
    r = subprocess.run(NOBODY + [OTHER_PYTHON, "-c", ATTACKER, where], input=data, capture_output=True,
                       timeout=PROC_TIMEOUT)
    assert r.stdout.decode().strip() == "closed", r.stderr.decode()


def refusals(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if "refused a connection" in line]


# ---- the socket table parser -------------------------------------------------------------------

TABLE4 = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 23456 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000 65534        0 34567 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:D432 0100007F:1F90 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
"""
TABLE6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:1F91 0000000000000000FFFF00000100007F:D433 01 00000000:00000000 00:00000000 00000000  1001        0 45678 1 0000000000000000 20 4 30 10 -1
   1: 00000000000000000000000001000000:1F92 00000000000000000000000001000000:D434 03 00000000:00000000 00:00000000 00000000  1002        0 0 1 0000000000000000
"""


@pytest.mark.skipif(sys.byteorder != "little", reason="the table rows are written for a little-endian kernel")
def test_socket_table_parser():
    import ipaddress

    lo4, lo6 = ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    owner = transport.tcp_socket_owner
    assert owner(TABLE4, (lo4, 8080), (lo4, 54321)) == (1000, "01")
    assert owner(TABLE4, (lo4, 54321), (lo4, 8080)) == (65534, "01")
    assert owner(TABLE4, (lo4, 54322), (lo4, 8080)) == (0, "06")     # time-wait: no owner left
    assert owner(TABLE4, (lo4, 8080), (lo4, 1)) is None
    # a v4 peer of a v6 socket shows as ::ffff:127.0.0.1
    assert owner(TABLE6, (lo4, 8081), (lo4, 54323)) == (1001, "01")
    assert owner(TABLE6, (lo6, 8082), (lo6, 54324)) == (1002, "03")
    assert owner("garbage\n 0: nothing here at all 1 2 3 4 5\n", (lo4, 1), (lo4, 2)) is None


def test_peer_checks_on_real_sockets(shared_dir):
    """Ours on both ends of a loopback connection (v4 and v6); another user's listener refused
    from the connecting end before it accepted; its closed socket (time-wait) refused too."""
    for host in ("127.0.0.1", "::1"):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam) as l:
            l.bind((host, 0))
            l.listen(1)
            c = socket.create_connection(l.getsockname()[:2])
            a, _ = l.accept()
            assert transport.peer_refusal(c) is None and transport.peer_refusal(a) is None
            c.close()
            a.close()
    srv = subprocess.Popen(NOBODY + [OTHER_PYTHON, "-c", FAKE_DEST], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        c = socket.create_connection(("127.0.0.1", port))
        assert "uid 65534" in transport.peer_refusal(c)
        c.close()
    finally:
        srv.kill()
        srv.wait()


# ---- serve-dest: a loopback TCP peer of another user ---------------------------------------

def test_serve_dest_refuses_another_users_source(shared_dir, tmp_path, serve_dest):
    """The other user connects first and sends a whole migration of wrong pages: refused with a
    warning, nothing placed; the real source then restores every byte."""
    size = 1 << 20
    image = tmp_path / "mem.img"
    write_image(image, size, seed=3)
    sock = shared_dir / "uffd.sock"
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock), "--json", "--timeout", "20")
    toucher = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(sock),
                                            "--image", str(image), "--json", "--connect-timeout", "20"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        block = codec.BlockInfo("mem", size, PAGE)
        bogus = (preamble(block) +
                 codec.encode_ram_section(codec.RamPage("mem", p * PAGE, b"\xee" * PAGE) for p in range(64)))
        attack(str(sd.port), bogus)
        mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--json")
        t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    finally:
        kill_and_reap(toucher)
    rc, out, err = sd.wait()
    assert mig.returncode == 0, mig.stderr
    assert toucher.returncode == 0, t_err
    assert json.loads(t_out)["mismatches"] == 0
    assert rc == 0, err
    lines = refusals(err)
    assert len(lines) == 1 and "uid 65534" in lines[0] and f"tcp:127.0.0.1:{sd.port}" in lines[0], err


# ---- migrate: a destination of another user ------------------------------------------------

def test_migrate_refuses_another_users_destination(shared_dir, tmp_path):
    """A fake destination of another user on the port migrate was given: not a byte sent, exit 4."""
    image = tmp_path / "mem.img"
    write_image(image, 1 << 20, seed=4)
    fake = subprocess.Popen(NOBODY + [OTHER_PYTHON, "-c", FAKE_DEST], stdout=subprocess.PIPE, text=True)
    try:
        port = int(fake.stdout.readline())
        mig = run_postcopy("migrate", "--to", f"tcp:127.0.0.1:{port}", "--image", str(image))
        received = int(fake.stdout.readline())
    finally:
        fake.kill()
        fake.wait()
    assert mig.returncode == 4, mig.stderr
    line = single_stderr_line(mig.stderr)
    assert "refused the destination" in line and "uid 65534" in line, line
    assert received == 0


# ---- Unix peers of another user do not end the wait ----------------------------------------

def test_refused_program_on_uffd_socket_does_not_end_serve_dest(shared_dir, tmp_path, serve_dest):
    size = 1 << 20
    image = tmp_path / "mem.img"
    write_image(image, size, seed=5)
    sock = shared_dir / "uffd.sock"
    sd = serve_dest("--listen", "tcp:127.0.0.1:0", "--uffd-socket", str(sock), "--json", "--timeout", "20")
    os.chmod(sock, 0o777)   # (the mode keeps other users out; here the uid check must)
    attack(str(sock), b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}]')
    toucher = subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(sock),
                                            "--image", str(image), "--json", "--connect-timeout", "20"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mig = run_postcopy("migrate", "--to", sd.address, "--image", str(image), "--json")
        t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    finally:
        kill_and_reap(toucher)
    rc, out, err = sd.wait()
    assert rc == 0, err
    assert mig.returncode == 0, mig.stderr
    assert toucher.returncode == 0, t_err
    assert json.loads(t_out)["mismatches"] == 0
    lines = refusals(err)
    assert len(lines) == 1 and f"unix:{sock}" in lines[0] and "uid 65534" in lines[0], err


def test_refused_program_on_attach_socket_does_not_end_migrate(shared_dir):
    from test_live import MIB, Live, _check_success

    lv = Live(shared_dir)
    try:
        lv.start_dest()
        lv.start_migrate("--postcopy-after", "0.5", "--kill-source")
        src_sock = shared_dir / "src.sock"
        os.chmod(src_sock, 0o777)
        attack(str(src_sock), b"[]")
        lv.start_incoming("8M")
        lv.start_source("8M")
        _check_success(lv, 8 * MIB, kill_source=True)
        lines = refusals(lv.migrate.err)
        assert len(lines) == 1 and f"unix:{src_sock}" in lines[0] and "uid 65534" in lines[0], lv.migrate.err
    finally:
        lv.kill_all()
