"""A userfaultfd as an object that owns its file descriptor.

Every raw call goes through :func:`_check`, which retries EINTR and turns a
negative errno into :class:`UffdError` naming the operation.  The native calls
are cffi API-mode functions, which release the GIL while they run, so a thread
blocked in one never stops the thread that would serve a fault.
"""
from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass

from .._native import ffi, lib
from ..owned import Owned
from .constants import UFFD_API, UFFD_MSG_SIZE, Feature, Ioctl, RegisterMode
from .messages import UffdMsg, parse_messages


class UffdError(OSError):
    """A userfaultfd operation failed; ``errno`` is the kernel's, the message names the call."""

    def __init__(self, err: int, operation: str, detail: str = ""):
        text = f"{operation}: {os.strerror(err)}"
        if detail:
            text += f" ({detail})"
        super().__init__(err, text)
        self.operation = operation


def native_error(result: int, what: str, error: type[Exception] = UffdError) -> Exception:
    """The exception for a native call that failed with ``result`` (a negative errno, the
    kernel's convention that the native layer keeps): ``error`` saying ``what: <strerror>``;
    OSError kinds carry the errno as theirs."""
    err = -result
    if issubclass(error, UffdError):
        return error(err, what)
    text = f"{what}: {os.strerror(err)}"
    return error(err, text) if issubclass(error, OSError) else error(text)


def check_native(result: int, what: str, error: type[Exception] = UffdError) -> int:
    """``result`` of a native call returning -errno on failure, when it did not fail (see :func:`native_error`)."""
    if result < 0:
        raise native_error(result, what, error)
    return result


class PartialCopy(UffdError):
    """UFFDIO_COPY/ZEROPAGE/CONTINUE placed only ``done`` bytes before stopping with EAGAIN.

    The kernel does this when the mapping changed under it (mmap_changing) or
    when a fatal signal is pending; the caller retries the remainder.
    """

    def __init__(self, operation: str, done: int, wanted: int):
        super().__init__(_errno.EAGAIN, operation, f"placed {done} of {wanted} bytes")
        self.done = done
        self.wanted = wanted


def _check(operation: str, call, *args, detail: str = "") -> int:
    while True:
        r = call(*args)
        if r >= 0:
            return r
        if -r != _errno.EINTR:
            raise UffdError(-r, operation, detail)


@dataclass(frozen=True)
class ApiInfo:
    """Result of the UFFDIO_API handshake."""

    api: int
    features: Feature
    ioctls: Ioctl


def open_raw(*, nonblocking: bool = False, allow_device: bool = True) -> int:
    """Open a new userfaultfd and return the raw fd (close-on-exec).

    Tries the userfaultfd(2) syscall first; where it is refused (EPERM with
    vm.unprivileged_userfaultfd=0, or ENOSYS), falls back to /dev/userfaultfd
    with USERFAULTFD_IOC_NEW.  UFFD_USER_MODE_ONLY is not used: we need faults
    from the kernel too (process_vm_writev, read() into registered memory).
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    r = lib.pc_userfaultfd(flags)
    if r >= 0:
        return r
    first = -r
    if allow_device and first in (_errno.EPERM, _errno.ENOSYS, _errno.EACCES):
        r2 = lib.pc_userfaultfd_dev(flags)
        if r2 >= 0:
            return r2
        raise UffdError(first, "userfaultfd", f"and /dev/userfaultfd: {os.strerror(-r2)}")
    raise UffdError(first, "userfaultfd")


class Userfaultfd(Owned):
    """An open userfaultfd.

    ``Userfaultfd()`` opens a new one (see :func:`open_raw`); ``Userfaultfd.adopt(fd)``
    takes ownership of one received from another process.  Use as a context
    manager or call :meth:`close` (safe to call twice).
    """

    def __init__(self, *, nonblocking: bool = False, allow_device: bool = True, _fd: int | None = None):
        self._fd = open_raw(nonblocking=nonblocking, allow_device=allow_device) if _fd is None else _fd
        self.api_info: ApiInfo | None = None

    @classmethod
    def adopt(cls, fd: int) -> "Userfaultfd":
        """Own ``fd``, an already-initialised userfaultfd (e.g. from SCM_RIGHTS)."""
        os.set_inheritable(fd, False)
        return cls(_fd=fd)

    # -- ownership ---------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("I/O operation on closed userfaultfd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self._fd}>"

    def set_blocking(self, blocking: bool) -> None:
        os.set_blocking(self.fileno(), blocking)

    # -- ioctls ------------------------------------------------------------
    def _ioctl(self, name: str, request: int, arg, detail: str = "") -> int:
        return _check(name, lib.pc_ioctl, self.fileno(), request, arg, detail=detail)

    def api(self, features: Feature | int = 0) -> ApiInfo:
        """UFFDIO_API handshake asking for ``features``; returns what the kernel offers."""
        a = ffi.new("struct uffdio_api *", {"api": UFFD_API, "features": int(features)})
        self._ioctl("UFFDIO_API", lib.UFFDIO_API, a, detail=f"features {int(features):#x}")
        self.api_info = ApiInfo(a.api, Feature(a.features), Ioctl(a.ioctls))
        return self.api_info

    def register(self, start: int, length: int, mode: RegisterMode | int = RegisterMode.MISSING) -> Ioctl:
        """UFFDIO_REGISTER [start, start+length); returns the ioctls allowed on the range."""
        r = ffi.new("struct uffdio_register *", {"range": {"start": start, "len": length}, "mode": int(mode)})
        self._ioctl("UFFDIO_REGISTER", lib.UFFDIO_REGISTER, r,
                    detail=f"{start:#x}+{length:#x} mode {RegisterMode(int(mode))!s}")
        return Ioctl(r.ioctls)

    def unregister(self, start: int, length: int) -> None:
        r = ffi.new("struct uffdio_range *", {"start": start, "len": length})
        self._ioctl("UFFDIO_UNREGISTER", lib.UFFDIO_UNREGISTER, r, detail=f"{start:#x}+{length:#x}")

    def wake(self, start: int, length: int) -> None:
        r = ffi.new("struct uffdio_range *", {"start": start, "len": length})
        self._ioctl("UFFDIO_WAKE", lib.UFFDIO_WAKE, r, detail=f"{start:#x}+{length:#x}")

    def _placing(self, name, request, struct_name, fields, count_field, length) -> int:
        arg = ffi.new(struct_name, fields)
        r = lib.pc_ioctl(self.fileno(), request, arg)
        done = getattr(arg, count_field)
        if r >= 0:
            return done
        err = -r
        if err == _errno.EAGAIN and 0 < done < length:
            raise PartialCopy(name, done, length)
        raise UffdError(err, name, f"{fields.get('dst', fields.get('range', {}).get('start', 0)):#x}+{length:#x}")

    def copy(self, dst: int, src: int, length: int, *, dontwake: bool = False, wp: bool = False) -> int:
        """UFFDIO_COPY ``length`` bytes from address ``src`` to ``dst``; returns bytes placed.

        Raises UffdError(EEXIST) when a page is already present and PartialCopy
        when the kernel stopped part-way.
        """
        mode = (lib.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0) | (lib.UFFDIO_COPY_MODE_WP if wp else 0)
        return self._placing("UFFDIO_COPY", lib.UFFDIO_COPY, "struct uffdio_copy *",
                             {"dst": dst, "src": src, "len": length, "mode": mode}, "copy", length)

    def copy_from(self, dst: int, data, *, dontwake: bool = False) -> int:
        """UFFDIO_COPY from a Python buffer (bytes, bytearray, memoryview)."""
        buf = ffi.from_buffer(data)
        return self.copy(dst, int(ffi.cast("uintptr_t", buf)), len(buf), dontwake=dontwake)

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        mode = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        return self._placing("UFFDIO_ZEROPAGE", lib.UFFDIO_ZEROPAGE, "struct uffdio_zeropage *",
                             {"range": {"start": start, "len": length}, "mode": mode}, "zeropage", length)

    def continue_(self, start: int, length: int, *, dontwake: bool = False) -> int:
        mode = lib.UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0
        return self._placing("UFFDIO_CONTINUE", lib.UFFDIO_CONTINUE, "struct uffdio_continue *",
                             {"range": {"start": start, "len": length}, "mode": mode}, "mapped", length)

    def writeprotect(self, start: int, length: int, protect: bool = True, *, dontwake: bool = False) -> None:
        mode = (lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | \
               (lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0)
        r = ffi.new("struct uffdio_writeprotect *", {"range": {"start": start, "len": length}, "mode": mode})
        self._ioctl("UFFDIO_WRITEPROTECT", lib.UFFDIO_WRITEPROTECT, r, detail=f"{start:#x}+{length:#x}")

    # -- messages ----------------------------------------------------------
    def read_raw(self, max_messages: int = 64) -> bytes:
        """read() up to ``max_messages`` uffd_msg; b'' when none is pending (non-blocking fd)."""
        while True:
            try:
                return os.read(self.fileno(), UFFD_MSG_SIZE * max_messages)
            except InterruptedError:
                continue
            except BlockingIOError:
                return b""
            except OSError as e:
                raise UffdError(e.errno, "read(userfaultfd)") from e

    def read_messages(self, max_messages: int = 64) -> list[UffdMsg]:
        return parse_messages(self.read_raw(max_messages))


def offered_features() -> Feature:
    """Features this kernel offers (UFFDIO_API with 0 on a throw-away userfaultfd:
    the handshake may be done once per fd, so it cannot be probed on the real one)."""
    with Userfaultfd() as probe:
        return probe.api(0).features
