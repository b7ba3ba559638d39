"""The shared plumbing, each piece once: the control-message reader, connect-with-retry, the page size in C
and Python, the native -errno helper, mlock save/restore."""
from __future__ import annotations

import ctypes
import errno
import socket
import threading
import time

import pytest

from postcopy_cli._native import lib
from postcopy_cli.channels.control import ControlChannel, ControlReader
from postcopy_cli.channels.handover import HandshakeError
from postcopy_cli.channels.transport import Address, connect_retrying, peer_credentials
from postcopy_cli.codec.constants import TARGET_PAGE_SIZE
from postcopy_cli.errors import PeerDisconnected
from postcopy_cli.memory import mappings
from postcopy_cli.uffd import UffdError, check_native, native_error

from conftest import IS_ROOT

WAIT = 30.0   # a hang detector, not a timing


def _pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return ControlChannel(a), b


def test_reader_answers_in_its_thread_and_queues_the_rest():
    peer, sock = _pair()
    answered = []

    def answer(msg):
        if msg.get("cmd") == "pause":
            answered.append(msg)
            peer_side.send({"event": "paused"})
            return True
        return False

    reader = ControlReader(sock, answer=answer)
    peer_side = reader   # answers go back on the same socket
    peer.send({"cmd": "pause"})
    peer.send({"cmd": "discard", "ranges": {}})
    assert reader.get(WAIT) == {"cmd": "discard", "ranges": {}}
    assert answered == [{"cmd": "pause"}]
    assert peer.receive() == {"event": "paused"}
    reader.post("news")
    assert reader.get(WAIT) == "news"
    peer.sock.close()
    assert reader.get(WAIT) is ControlReader.CLOSED
    assert reader.gone.wait(WAIT)
    assert reader.get(0.01) is None        # CLOSED comes once
    with pytest.raises(HandshakeError, match="closed its socket"):
        reader.wait_for("paused", WAIT)


def test_reader_malformed_message_is_raised_and_ends_it():
    peer, sock = _pair()
    gone = threading.Event()
    reader = ControlReader(sock, on_gone=gone.set)
    peer.sock.sendall(b"not json\n")
    with pytest.raises(HandshakeError, match="not valid JSON"):
        reader.get(WAIT)
    assert gone.wait(WAIT) and reader.gone.is_set()


def test_reader_wait_for_skips_other_events():
    peer, sock = _pair()
    reader = ControlReader(sock)
    peer.send({"event": "resumed"})
    peer.send({"event": "paused", "passes": 3})
    assert reader.wait_for("paused", WAIT) == {"event": "paused", "passes": 3}


def test_connect_retrying_waits_for_the_listener(tmp_path, monkeypatch):
    path = str(tmp_path / "later.sock")
    retried = threading.Event()
    real_sleep = time.sleep

    def sleep(seconds):
        retried.set()   # (only the retry loop sleeps in this test)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", sleep)
    got: dict = {}
    t = threading.Thread(target=lambda: got.setdefault("sock", connect_retrying(Address("unix", path=path), WAIT)))
    t.start()
    assert retried.wait(WAIT)     # it found nothing listening and tries again
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        t.join(WAIT)
        conn, _ = listener.accept()
    assert peer_credentials(conn)[1] == peer_credentials(got["sock"])[1]
    got["sock"].close()
    conn.close()


def test_connect_retrying_gives_the_last_error_after_its_time(tmp_path):
    with pytest.raises(FileNotFoundError):
        connect_retrying(Address("unix", path=str(tmp_path / "nobody.sock")), 0)


def test_one_target_page_size_in_c_and_python():
    assert lib.PC_TARGET_PAGE_SIZE == TARGET_PAGE_SIZE == 4096


@pytest.mark.parametrize("error,is_os", [(UffdError, True), (OSError, True), (PeerDisconnected, False)])
def test_native_error_names_the_operation_and_errno(error, is_os):
    e = native_error(-errno.EPIPE, "writing the return path", error)
    assert isinstance(e, error)
    assert str(e).endswith("writing the return path: Broken pipe"), str(e)
    assert str(e).count("Broken pipe") == 1
    if is_os:
        assert e.errno == errno.EPIPE
    assert check_native(7, "x") == 7
    with pytest.raises(error, match="x: Broken pipe"):
        check_native(-errno.EPIPE, "x", error)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to lock memory")
def test_mlock_is_saved_and_restored():
    assert mappings.locked_kib() == 0
    assert mappings.unlock_if_locked() is False
    page = mappings.AnonymousMapping(TARGET_PAGE_SIZE)
    try:
        assert mappings.libc.mlock(ctypes.c_void_p(page.addr), ctypes.c_size_t(TARGET_PAGE_SIZE)) == 0
        assert mappings.locked_kib() > 0
        assert mappings.unlock_if_locked() is True
        assert mappings.locked_kib() == 0
        mappings.relock()
        assert mappings.locked_kib() > 0
    finally:
        mappings.munlockall()
        page.close()
    assert mappings.locked_kib() == 0
