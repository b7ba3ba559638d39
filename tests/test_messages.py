"""Messages that say what is true (issue 9 item 9): the channel that failed and the main
stream's state, the source program's real fate, plurals, IPv6 addresses, and one exit
code for "cannot connect"."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest

from conftest import PROC_TIMEOUT, needs_root, postcopy_cmd, run_postcopy, single_stderr_line, write_image
from postcopy_cli import codec
from postcopy_cli.channels.transport import Address, parse_address
from postcopy_cli.units import plural

PAGE = 4096


def test_plural():
    assert plural(1, "request") == "1 request"
    assert plural(0, "request") == "0 requests"
    assert plural(2, "pre-copy pass", "pre-copy passes") == "2 pre-copy passes"


def test_one_page_one_request_in_words(tmp_path):
    """A one-page image: '1 page', never '1 pages'; '0 requests'."""
    image = tmp_path / "img"
    write_image(image, PAGE, zero_runs=())
    # without --json (its human summary is the point): a Unix socket address known in advance
    address = f"unix:{tmp_path / 'dest.sock'}"
    dest = subprocess.Popen(postcopy_cmd("serve-dest", "--listen", address, "--ram", "mem=4K"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mig = run_postcopy("migrate", "--to", address, "--image", str(image))
        _, err = dest.communicate(timeout=PROC_TIMEOUT)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.communicate()
    code = dest.returncode
    assert mig.returncode == 0 and code == 0, (mig.stderr, err)
    assert "migrated 1 page in" in mig.stderr and "(0 requests answered first)" in mig.stderr, mig.stderr
    assert "migration complete: 1 page (" in err and "0 requests" in err and "None" not in err, err


# ---------------------------------------------------------------------------
# IPv6

def test_ipv6_address_in_brackets():
    addr = parse_address("tcp:[::1]:5000")
    assert str(addr) == "tcp:[::1]:5000"
    assert parse_address(str(addr)) == addr
    assert str(Address("tcp", "127.0.0.1", 5)) == "tcp:127.0.0.1:5"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_serve_dest_announces_ipv6_in_brackets(tmp_path, serve_dest):
    dest = serve_dest("--listen", "tcp:[::1]:0", "--ram", "mem=64K")
    assert dest.address.startswith("tcp:[::1]:"), dest.address
    image = tmp_path / "img"
    write_image(image, 64 * 1024)
    mig = run_postcopy("migrate", "--to", dest.address, "--image", str(image))
    assert mig.returncode == 0, mig.stderr
    assert dest.wait()[0] == 0


# ---------------------------------------------------------------------------
# cannot connect: exit 4 everywhere

@pytest.mark.parametrize("cmd", [["run", "--mem", "64K"], ["incoming", "--mem", "64K"], ["touch", "--size", "64K"]])
def test_workload_cannot_connect_is_exit_4(tmp_path, cmd):
    r = run_postcopy("workload", *cmd, "--attach", str(tmp_path / "nobody.sock"), "--connect-timeout", "0.2")
    line = single_stderr_line(r.stderr)
    assert r.returncode == 4 and "cannot connect to unix:" in line, (r.returncode, line)


def test_migrate_cannot_connect_is_exit_4(tmp_path):
    image = tmp_path / "img"
    write_image(image, 64 * 1024)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        r = run_postcopy("migrate", "--to", f"tcp:127.0.0.1:{port}", "--image", str(image), "--timeout", "0.2")
    assert r.returncode == 4 and "cannot connect to" in single_stderr_line(r.stderr)


# ---------------------------------------------------------------------------
# the preempt channel fails: name it, and give the main stream's position and state

def test_preempt_channel_failure_names_the_channel_and_the_main_stream(serve_dest):
    size = 64 * PAGE
    block = codec.BlockInfo("mem", size, PAGE)
    ident = bytes(range(1, 17))
    # (--recover-timeout 0: no pause, the failure itself is the message under test)
    dest = serve_dest("--listen", "tcp:127.0.0.1:0", "--ram", f"mem={size}", "--timeout", "20",
                      "--recover-timeout", "0")
    main = socket.create_connection(("127.0.0.1", dest.port), timeout=PROC_TIMEOUT)
    preamble = b"".join([codec.encode(codec.Header()), codec.encode(codec.Blocks((block,))),
                         codec.encode(codec.MigrationId(ident, 1)), codec.encode(codec.OpenReturnPath()),
                         codec.encode(codec.PostcopyAdvise(PAGE, PAGE)), codec.encode(codec.PostcopyListen()),
                         codec.encode(codec.PostcopyRun())])
    main.sendall(preamble)
    preempt = socket.create_connection(("127.0.0.1", dest.port), timeout=PROC_TIMEOUT)
    preempt.sendall(codec.encode(codec.Header()) + codec.encode(codec.PreemptChannel(ident)))
    time.sleep(0.2)   # (not a timing assertion: the channel may be adopted before or after it closes)
    preempt.close()
    code, _, err = dest.wait()
    main.close()
    line = single_stderr_line(err)
    assert code == 4, err
    assert "preempt channel" in line and f"main stream offset {len(preamble)}" in line and "state RUNNING" in line, line


# ---------------------------------------------------------------------------
# the source program's fate after a failed live migration

@needs_root
def test_source_program_alive_is_said_to_keep_running(tmp_path):
    """The destination refuses the blocks (too small): the program keeps running, and migrate says so."""
    from test_live import Live

    lv = Live(tmp_path)
    try:
        lv.start_dest()
        lv.start_migrate()
        lv.start_incoming("16M")
        lv.start_source("32M")
        mig = lv.migrate.wait()
        line = single_stderr_line(mig.err.replace(lv.migrate.early_err, ""))
        assert mig.rc != 0 and ("keeps running on the source" in line or "was resumed on the source" in line), line
        assert lv.source.alive()
    finally:
        lv.kill_all()


@needs_root
def test_incoming_says_nothing_odd_after_a_successful_migration(tmp_path):
    from test_live import Live

    lv = Live(tmp_path)
    try:
        lv.all("16M", "--postcopy-after", "0.5", "--kill-source")
        mig, incoming = lv.migrate.wait(), lv.incoming.wait()
        assert mig.rc == 0 and incoming.rc == 0, (mig, incoming)
        assert "without quit" not in incoming.err and incoming.err.strip() == "", incoming.err
    finally:
        lv.kill_all()
