"""The TLS 1.3 record layer on a connection's own fd (native/tls_record.c, channels/tls.py's
TlsSocket): real handshakes over loopback TCP, then records sealed and opened by our code and
checked against other implementations (Python's ssl module, the openssl command line, with
session tickets and KeyUpdate both ways), cut into single bytes on the way, tampered with, and
against a TLS 1.2-only peer (which gets the relay instead)."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from conftest import PROC_TIMEOUT, run_postcopy
from postcopy_cli.channels.tls import Credentials, TlsSocket, buffered

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("records") / "creds"
    p = run_postcopy("tls-creds", "create", str(path), "--hostname", "localhost", "--ip", "127.0.0.1")
    assert p.returncode == 0, p.stderr
    return str(path)


def _listener() -> socket.socket:
    lis = socket.socket()
    lis.bind(("127.0.0.1", 0))
    lis.listen(4)
    return lis


def _pair(creds: str, *, through=None):
    """(client, server): both ends wrapped by us over loopback TCP; ``through(a, b)`` (optional)
    is started in a thread to carry the bytes between the client's socket and the server's."""
    lis = _listener()
    server_creds = Credentials.load(creds, server=True)
    client_creds = Credentials.load(creds, server=False)
    got: dict = {}

    def serve():
        conn, _ = lis.accept()
        got["server"] = server_creds.wrap(conn)

    t = threading.Thread(target=serve)
    t.start()
    if through is None:
        raw = socket.create_connection(lis.getsockname())
    else:
        mid = _listener()
        raw = socket.create_connection(mid.getsockname())
        inner, _ = mid.accept()
        mid.close()
        outer = socket.create_connection(lis.getsockname())
        threading.Thread(target=through, args=(inner, outer), daemon=True).start()
    client = client_creds.wrap(raw, host="127.0.0.1")
    t.join(PROC_TIMEOUT)
    lis.close()
    return client, got["server"]


def _recv_exactly(sock, n: int, *, sizes=(1, 7, 4096, 16383, 16384, 16385, 65536, 1 << 20)) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        chunk = sock.recv(min(sizes[i % len(sizes)], n - len(out)))
        assert chunk, f"end of stream after {len(out)} of {n} bytes"
        out += chunk
        i += 1
    return bytes(out)


def test_both_ends_ours_take_the_record_layer_and_carry_every_byte(creds):
    client, server = _pair(creds)
    try:
        assert isinstance(client, TlsSocket) and isinstance(server, TlsSocket)
        data = os.urandom(5 << 20)
        sizes = [0, 1, 16383, 16384, 16385, 100000, 1 << 20]
        sent = []

        def send():
            pos = 0
            for i in range(1000):
                n = sizes[i % len(sizes)]
                client.sendall(data[pos:pos + n])
                sent.append(n)
                pos += n
                if pos >= len(data):
                    break
            client.sendall(data[pos:])

        t = threading.Thread(target=send)
        t.start()
        server.settimeout(PROC_TIMEOUT)
        peek = server.recv(5, socket.MSG_PEEK)     # a peek leaves the bytes
        assert peek and data.startswith(peek)
        assert _recv_exactly(server, len(data)) == data
        t.join()
        # the other direction, and the end of the stream
        server.sendall(b"answer")
        client.settimeout(PROC_TIMEOUT)
        assert _recv_exactly(client, 6) == b"answer"
        server.close()
        assert client.recv(10) == b""
    finally:
        client.close()
        server.close()


def test_opened_bytes_poll_cannot_see_are_reported_buffered(creds):
    client, server = _pair(creds)
    try:
        client.sendall(b"0123456789")
        server.settimeout(PROC_TIMEOUT)
        assert server.recv(3) == b"012"
        # the rest of the record is opened already: nothing left in the kernel for poll to see
        assert buffered(server)
        r, _, _ = __import__("select").select([server.fileno()], [], [], 0)
        assert not r
        assert server.recv(100) == b"3456789"
        assert not buffered(server)
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.recv(1)
        with pytest.raises(BlockingIOError):
            server.recv(1, socket.MSG_DONTWAIT)
    finally:
        client.close()
        server.close()


def _one_byte_at_a_time(a: socket.socket, b: socket.socket) -> None:
    """Carry a -> b one byte per send (each record arrives in pieces), b -> a as it comes."""
    def back():
        while (d := b.recv(65536)):
            a.sendall(d)
        a.shutdown(socket.SHUT_WR)
    threading.Thread(target=back, daemon=True).start()
    b.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (d := a.recv(65536)):
        for i in range(len(d)):
            b.send(d[i:i + 1])
    b.shutdown(socket.SHUT_WR)


def test_records_arriving_one_byte_at_a_time(creds):
    client, server = _pair(creds, through=_one_byte_at_a_time)
    try:
        data = os.urandom(40000)
        client.sendall(data)
        server.settimeout(PROC_TIMEOUT)
        assert _recv_exactly(server, len(data)) == data
    finally:
        client.close()
        server.close()


class Corrupter:
    """A carrier that, once armed (after both handshakes, so everything after is records of
    application data), flips the byte at client->server offset ``at`` of what follows, or puts
    ``replace`` there."""

    def __init__(self, at: int, replace: bytes | None = None):
        self.at, self.replace = at, replace
        self.armed = threading.Event()

    def __call__(self, a: socket.socket, b: socket.socket) -> None:
        def back():
            while (d := b.recv(65536)):
                a.sendall(d)
        threading.Thread(target=back, daemon=True).start()
        pos = 0
        while (d := bytearray(a.recv(65536))):
            if self.armed.is_set():
                if pos <= self.at < pos + len(d):
                    if self.replace is None:
                        d[self.at - pos] ^= 0x40
                    else:
                        d[self.at - pos:] = self.replace
                pos += len(d)
            b.sendall(d)


def test_a_tampered_record_is_refused_with_its_reason(creds):
    carrier = Corrupter(20)
    client, server = _pair(creds, through=carrier)
    try:
        carrier.armed.set()
        client.sendall(b"x" * 1000)
        server.settimeout(PROC_TIMEOUT)
        with pytest.raises(OSError) as e:
            server.recv(2000)
        assert e.value.errno == errno.EBADMSG
        assert "integrity check" in str(e.value)
        with pytest.raises(OSError):   # and it stays refused: no later byte is believed
            server.recv(2000)
    finally:
        client.close()
        server.close()


def test_a_record_longer_than_any_peer_may_send_is_refused(creds):
    carrier = Corrupter(0, replace=b"\x17\x03\x03\xff\xff" + b"\0" * 100)
    client, server = _pair(creds, through=carrier)
    try:
        carrier.armed.set()
        client.sendall(b"y" * 50)
        server.settimeout(PROC_TIMEOUT)
        with pytest.raises(OSError) as e:
            server.recv(100)
        assert e.value.errno == errno.EMSGSIZE and "record_overflow" in str(e.value)
    finally:
        client.close()
        server.close()


def _ssl_context(creds: str, server: bool, maximum=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(creds, "ca-cert.pem"))
    side = "server" if server else "client"
    ctx.load_cert_chain(os.path.join(creds, f"{side}-cert.pem"), os.path.join(creds, f"{side}-key.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2-relayed"])
def test_python_ssl_server_and_our_client(creds, maximum):
    """Python's ssl (OpenSSL's own record layer) as the server: two session tickets by default."""
    lis = _listener()
    ctx = _ssl_context(creds, True, maximum)
    data = os.urandom(300000)
    echoed: dict = {}

    def serve():
        conn, _ = lis.accept()
        with ctx.wrap_socket(conn, server_side=True) as s:
            got = bytearray()
            while len(got) < len(data):
                got += s.recv(65536)
            echoed["ok"] = bytes(got) == data
            s.sendall(data[::-1])

    t = threading.Thread(target=serve)
    t.start()
    client = Credentials.load(creds, server=False).wrap(socket.create_connection(lis.getsockname()),
                                                        host="localhost")
    try:
        assert isinstance(client, TlsSocket) == (maximum is None)
        client.sendall(data)
        client.settimeout(PROC_TIMEOUT)
        assert _recv_exactly(client, len(data)) == data[::-1]
        t.join(PROC_TIMEOUT)
        assert echoed["ok"]
    finally:
        client.close()
        lis.close()


def test_python_ssl_client_and_our_server(creds):
    lis = _listener()
    data = os.urandom(200000)
    got: dict = {}

    def client():
        ctx = _ssl_context(creds, False)
        with ctx.wrap_socket(socket.create_connection(lis.getsockname()), server_hostname="localhost") as s:
            s.sendall(data)
            back = bytearray()
            while len(back) < 5:
                back += s.recv(5)
            got["back"] = bytes(back)

    t = threading.Thread(target=client)
    t.start()
    conn, _ = lis.accept()
    server = Credentials.load(creds, server=True).wrap(conn)
    try:
        assert isinstance(server, TlsSocket)
        server.settimeout(PROC_TIMEOUT)
        assert _recv_exactly(server, len(data)) == data
        server.sendall(b"thank")
        t.join(PROC_TIMEOUT)
        assert got["back"] == b"thank"
    finally:
        server.close()
        lis.close()


def test_key_updates_both_ways_with_openssl_s_server(creds):
    """`openssl s_server` sends a KeyUpdate on "k" and asks for ours on "K" (RFC 8446 4.6.3)."""
    lis = _listener()
    port = lis.getsockname()[1]
    lis.close()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-naccept", "1", "-tls1_3",
                            "-cert", os.path.join(creds, "server-cert.pem"),
                            "-key", os.path.join(creds, "server-key.pem"),
                            "-CAfile", os.path.join(creds, "ca-cert.pem"), "-Verify", "1"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + PROC_TIMEOUT
        while True:
            try:
                raw = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        client = Credentials.load(creds, server=False).wrap(raw, host="localhost")
        assert isinstance(client, TlsSocket)
        client.settimeout(PROC_TIMEOUT)

        def say(line: bytes):
            # (s_server takes a line as a command only when it reads it alone)
            srv.stdin.write(line + b"\n")
            srv.stdin.flush()
            time.sleep(0.3)

        say(b"before")
        assert _recv_exactly(client, 7) == b"before\n"
        say(b"k")                         # its next records are under new keys
        say(b"after")
        assert _recv_exactly(client, 6) == b"after\n"
        say(b"K")                         # and it asks us to move to new keys too
        say(b"again")
        assert _recv_exactly(client, 6) == b"again\n"
        client.sendall(b"from the client, under updated keys\n")
        time.sleep(0.3)
        client.close()
        out, err = srv.communicate(timeout=PROC_TIMEOUT)
        assert b"from the client, under updated keys" in out, err
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate()
