"""Addresses and the security rules of DESIGN.md section 8 for the sockets we listen on."""
import os
import socket
import stat
import subprocess
import sys

import pytest

from postcopy_cli.channels import transport
from postcopy_cli.errors import PeerDisconnected, UsageError


def test_parse_addresses():
    assert transport.parse_address("tcp:127.0.0.1:4444") == transport.Address("tcp", host="127.0.0.1", port=4444)
    assert transport.parse_address("tcp:[::1]:5") == transport.Address("tcp", host="::1", port=5)
    assert transport.parse_address("unix:/tmp/x.sock") == transport.Address("unix", path="/tmp/x.sock")
    for bad in ("tcp:host", "udp:1.2.3.4:5", "tcp:1.2.3.4:99999", "nothing", "unix:"):
        with pytest.raises(UsageError, match="address"):
            transport.parse_address(bad)


def test_non_loopback_tcp_needs_insecure():
    with pytest.raises(UsageError, match="--insecure"):
        transport.listen(transport.parse_address("tcp:0.0.0.0:0"))
    s = transport.listen(transport.parse_address("tcp:0.0.0.0:0"), insecure=True)
    s.close()


def test_unix_socket_is_private_and_checks_the_peer_uid(tmp_path):
    path = str(tmp_path / "m.sock")
    os.chmod(tmp_path, 0o755)
    listener = transport.listen(transport.Address("unix", path=path))
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        # another user cannot even connect (the mode), and accept() would refuse its uid
        child = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
             "import socket,sys\n"
             "s=socket.socket(socket.AF_UNIX)\n"
             f"try: s.connect({path!r})\n"
             "except PermissionError: sys.exit(13)\n"],
            capture_output=True, timeout=30)
        if child.returncode not in (0, 13):
            pytest.skip(f"cannot run a child as uid 65534 here: {child.stderr.decode()[-200:]}")
        assert child.returncode == 13
        # our own uid is accepted
        c = socket.socket(socket.AF_UNIX)
        c.connect(path)
        conn = transport.accept(listener, 5)
        conn.close()
        c.close()
    finally:
        listener.close()


def test_accept_times_out_cleanly():
    listener = transport.listen(transport.parse_address("tcp:127.0.0.1:0"))
    try:
        with pytest.raises(PeerDisconnected, match="no connection"):
            transport.accept(listener, 0.1)
    finally:
        listener.close()
