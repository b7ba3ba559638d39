"""The userfaultfd binding against the real kernel.

Faults are raised by the kernel on behalf of a helper thread: ``os.readv`` from
a pipe into registered memory (or ``os.write`` from it) releases the GIL and
the kernel's copy_to_user / copy_from_user faults on the registered page, so
this thread is free to read the uffd message and resolve it.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import threading

import pytest

from postcopy_cli import memory
from postcopy_cli.uffd import (Event, Feature, ForkMsg, Ioctl, PagefaultFlag, PagefaultMsg, PartialCopy,
                               RegisterMode, RemapMsg, RemoveMsg, UffdError, Userfaultfd, UnknownMsg,
                               UnmapMsg, flag_names, parse_message, parse_messages)
from postcopy_cli.uffd import fd as fdmod

PAGE = memory.page_size()
TIMEOUT = 5.0


@pytest.fixture
def uffd():
    u = Userfaultfd(nonblocking=True)
    u.api(Feature.THREAD_ID)
    yield u
    u.close()  # wakes any thread still blocked on a registered page


@pytest.fixture
def region(uffd):
    m = memory.anonymous(4 * PAGE)
    uffd.register(m.addr, m.size, RegisterMode.MISSING)
    yield m
    uffd.unregister(m.addr, m.size)
    m.close()


class Toucher(threading.Thread):
    """Touches one page of ``mapping`` from kernel code with the GIL released."""

    def __init__(self, mapping: memory.Mapping, page: int, write: bool):
        super().__init__(daemon=True)
        self.mapping, self.page, self.write = mapping, page, write
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.tid = None
        self.r, self.w = os.pipe()
        if write:
            os.write(self.w, b"\xab" * PAGE)

    def run(self):
        self.tid = threading.get_native_id()
        mv = memoryview(self.mapping.map)[self.page * PAGE:(self.page + 1) * PAGE]
        try:
            if self.write:  # the kernel writes the pipe's bytes into the page
                os.readv(self.r, [mv])
            else:  # the kernel reads the page into the pipe
                os.write(self.w, mv)
                self.result = os.read(self.r, PAGE)
        except BaseException as e:  # pragma: no cover - reported by finish()
            self.error = e
        finally:
            mv.release()

    def finish(self):
        self.join(TIMEOUT)
        os.close(self.r)
        os.close(self.w)
        assert not self.is_alive(), "toucher still blocked"
        assert self.error is None, self.error


def wait_fault(u: Userfaultfd) -> PagefaultMsg:
    ready, _, _ = select.select([u], [], [], TIMEOUT)
    assert ready, "no userfaultfd message"
    msgs = u.read_messages(1)
    assert len(msgs) == 1 and isinstance(msgs[0], PagefaultMsg), msgs
    return msgs[0]


def test_api_handshake():
    with Userfaultfd() as u:
        info = u.api(0)
        assert info.api == 0xAA
        assert Ioctl.REGISTER in info.ioctls and Ioctl.UNREGISTER in info.ioctls
        assert Feature.MISSING_SHMEM in info.features
        assert "MISSING_SHMEM" in flag_names(info.features)
        assert u.api_info is info


def test_register_reports_range_ioctls(uffd):
    with memory.anonymous(PAGE) as m:
        ioctls = uffd.register(m.addr, PAGE, RegisterMode.MISSING)
        assert Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE in ioctls
        uffd.unregister(m.addr, PAGE)


def test_write_fault_resolved_by_copy(uffd, region):
    t = Toucher(region, 1, write=True)
    t.start()
    msg = wait_fault(uffd)
    assert msg.address == region.addr + PAGE
    assert PagefaultFlag.WRITE in msg.flags
    assert msg.thread_id == t.tid  # THREAD_ID was asked for
    assert uffd.copy_from(msg.address, b"\x11" * PAGE) == PAGE
    t.finish()
    assert region.map[PAGE:2 * PAGE] == b"\xab" * PAGE  # readv completed into the placed page
    # a second COPY onto the present page fails with EEXIST, naming the operation
    with pytest.raises(UffdError) as ei:
        uffd.copy_from(msg.address, b"\x22" * PAGE)
    assert ei.value.errno == errno.EEXIST
    assert "UFFDIO_COPY" in str(ei.value) and ei.value.operation == "UFFDIO_COPY"


def test_read_fault_resolved_by_zeropage(uffd, region):
    t = Toucher(region, 0, write=False)
    t.start()
    msg = wait_fault(uffd)
    assert msg.address == region.addr
    assert PagefaultFlag.WRITE not in msg.flags
    assert uffd.zeropage(msg.address, PAGE) == PAGE
    t.finish()
    assert t.result == b"\0" * PAGE
    with pytest.raises(UffdError) as ei:
        uffd.zeropage(msg.address, PAGE)
    assert ei.value.errno == errno.EEXIST and "UFFDIO_ZEROPAGE" in str(ei.value)


def test_dontwake_copy_then_wake(uffd, region):
    t = Toucher(region, 2, write=True)
    t.start()
    msg = wait_fault(uffd)
    uffd.copy_from(msg.address, b"\x33" * PAGE, dontwake=True)
    t.join(0.2)
    assert t.is_alive(), "DONTWAKE copy woke the faulting thread"
    uffd.wake(msg.address, PAGE)
    t.finish()
    assert region.map[2 * PAGE:3 * PAGE] == b"\xab" * PAGE


def test_partial_copy_reported(monkeypatch, uffd, region):
    real = fdmod.lib

    class ShortLib:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def pc_ioctl(fd, request, arg):
            if request == real.UFFDIO_COPY:
                arg.copy = PAGE
                return -errno.EAGAIN
            return real.pc_ioctl(fd, request, arg)

    monkeypatch.setattr(fdmod, "lib", ShortLib())
    with pytest.raises(PartialCopy) as ei:
        uffd.copy_from(region.addr, b"\0" * (2 * PAGE))
    e = ei.value
    assert (e.done, e.wanted, e.errno) == (PAGE, 2 * PAGE, errno.EAGAIN)
    assert isinstance(e, OSError) and "UFFDIO_COPY" in str(e) and f"placed {PAGE} of {2 * PAGE}" in str(e)


def test_error_names_operation_and_errno(uffd):
    with memory.anonymous(PAGE) as m:
        with pytest.raises(UffdError) as ei:
            uffd.register(m.addr, PAGE, 0)  # no mode: EINVAL
    assert ei.value.errno == errno.EINVAL
    assert "UFFDIO_REGISTER: " + os.strerror(errno.EINVAL) in str(ei.value)
    assert ei.value.operation == "UFFDIO_REGISTER" and isinstance(ei.value, OSError)


def test_fd_ownership():
    u = Userfaultfd(nonblocking=True)
    fd = u.fileno()
    assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert not os.get_blocking(fd)
    u.api(0)
    assert u.read_raw() == b""  # nothing pending
    assert u.read_messages() == []
    u.close()
    u.close()  # safe
    assert u.closed
    with pytest.raises(ValueError):
        u.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)
    with Userfaultfd() as b:
        assert os.get_blocking(b.fileno())
    assert b.closed


def _msg(event: int, body: bytes) -> bytes:
    return struct.pack("=B3xI", event, 0) + body.ljust(24, b"\0")


def test_parse_every_event_kind():
    raw = b"".join([
        _msg(Event.PAGEFAULT, struct.pack("=QQI", PagefaultFlag.WRITE | PagefaultFlag.WP, 0x7F0000001000, 4242)),
        _msg(Event.FORK, struct.pack("=I", 17)),
        _msg(Event.REMAP, struct.pack("=QQQ", 0x1000, 0x9000, 0x3000)),
        _msg(Event.REMOVE, struct.pack("=QQ", 0x2000, 0x4000)),
        _msg(Event.UNMAP, struct.pack("=QQ", 0x5000, 0x6000)),
        _msg(0x7E, b"xyz"),
    ])
    msgs = parse_messages(raw)
    assert msgs[0] == PagefaultMsg(0x7F0000001000, PagefaultFlag.WRITE | PagefaultFlag.WP, 4242)
    assert msgs[1] == ForkMsg(17)
    assert msgs[2] == RemapMsg(0x1000, 0x9000, 0x3000)
    assert msgs[3] == RemoveMsg(0x2000, 0x4000)
    assert msgs[4] == UnmapMsg(0x5000, 0x6000)
    assert isinstance(msgs[5], UnknownMsg) and msgs[5].event == 0x7E and len(msgs[5].raw) == 32
    assert parse_message(raw, 32) == ForkMsg(17)
    with pytest.raises(ValueError):
        parse_messages(raw[:40])
    with pytest.raises(ValueError):
        parse_message(raw[:31])


def test_shmem_fault_resolved(uffd):
    """MISSING on a memfd (MAP_SHARED): the same path for shared memory."""
    with Userfaultfd(nonblocking=True) as u, memory.memfd(2 * PAGE) as m:
        u.api(Feature.MISSING_SHMEM)
        u.register(m.addr, m.size, RegisterMode.MISSING)
        t = Toucher(m, 1, write=False)
        t.start()
        msg = wait_fault(u)
        assert msg.address == m.addr + PAGE
        u.copy_from(msg.address, b"\x5a" * PAGE)
        t.finish()
        assert t.result == b"\x5a" * PAGE
        u.unregister(m.addr, m.size)
