"""Shared fixtures: root-only markers and sysctls that are restored after the test."""
from __future__ import annotations

import os

import pytest

from postcopy_cli.selftest import harness as _harness

# The programs the tests start (python -m postcopy_cli, python -c ...) import the
# postcopy_cli under test (selftest.harness.child_env says how).
os.environ.update(_harness.child_env())
# migrate --image's resume records (source/record.py) go to a directory of this test run, not /run/postcopy
import tempfile as _tempfile
os.environ.setdefault("POSTCOPY_STATE_DIR", _tempfile.mkdtemp(prefix="postcopy-test-state-"))

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")


def _sysctl(path: str, value: str | None = None) -> str:
    if value is not None:
        with open(path, "w") as f:
            f.write(value)
    with open(path) as f:
        return f.read().strip()


@pytest.fixture
def sysctl():
    """``sysctl(path, value)`` writes a /proc/sys value; every one is restored at teardown."""
    if not IS_ROOT:
        pytest.skip("needs root to change sysctls")
    saved: dict[str, str] = {}

    def set_(path: str, value) -> str:
        if path not in saved:
            saved[path] = _sysctl(path)
        return _sysctl(path, str(value))

    yield set_
    for path, value in saved.items():
        _sysctl(path, value)


@pytest.fixture
def hugepages(sysctl):
    """Reserve 4 default-size huge pages for the test (vm.nr_hugepages restored after)."""
    sysctl("/proc/sys/vm/nr_hugepages", 4)
    from postcopy_cli import memory

    if memory.free_hugepages() < 1:
        pytest.skip("could not reserve huge pages on this host")
    return 4


@pytest.fixture
def no_hugepages(sysctl):
    """No huge pages reserved for the test (vm.nr_hugepages restored after)."""
    sysctl("/proc/sys/vm/nr_hugepages", 0)
    from postcopy_cli import memory

    if memory.free_hugepages() > 0:
        pytest.skip("huge pages remain reserved (surplus or in use)")


# ---------------------------------------------------------------------------
# helpers for the migration tests (serve-dest / migrate / workload touch as
# real subprocesses over loopback)

import random as _random
import subprocess as _subprocess

PROC_TIMEOUT = 60


postcopy_cmd = _harness.postcopy_argv   # argv running the ``postcopy`` CLI with this interpreter


def run_postcopy(*args: str, timeout: float = PROC_TIMEOUT) -> _subprocess.CompletedProcess:
    return _subprocess.run(postcopy_cmd(*args), capture_output=True, text=True, timeout=timeout)


class ServeDestProc:
    """A ``postcopy serve-dest --json`` subprocess (--json added if not given); ``address`` comes from
    its first stdout line, the JSON listening event."""

    def __init__(self, *args: str):
        from postcopy_cli.selftest.harness import NotListening, read_listening

        if "--json" not in args:
            args = (*args, "--json")
        self.proc = _subprocess.Popen(postcopy_cmd("serve-dest", *args), stdout=_subprocess.PIPE,
                                      stderr=_subprocess.PIPE, text=True)
        try:
            self.listening = read_listening(self.proc, PROC_TIMEOUT)
        except NotListening as e:
            self.proc.kill()
            out, err = self.proc.communicate(timeout=PROC_TIMEOUT)
            raise AssertionError(f"serve-dest did not start (rc {self.proc.returncode}, {e}): {e.output}{out} {err}")
        self.address = self.listening["address"]

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def wait(self, timeout: float = PROC_TIMEOUT) -> tuple[int, str, str]:
        """(exit code, stdout after the listening event, stderr without its human 'listening on' line)."""
        out, err = self.proc.communicate(timeout=timeout)
        err = "".join(l for l in err.splitlines(keepends=True) if not l.startswith("postcopy: listening on "))
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=PROC_TIMEOUT)


@pytest.fixture
def serve_dest():
    """``serve_dest(*args)`` starts serve-dest (killed at teardown if still running)."""
    started: list[ServeDestProc] = []

    def start(*args: str) -> ServeDestProc:
        s = ServeDestProc(*args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def write_image(path, size: int, *, seed: int = 1, zero_runs=((16, 40), (100, 1))) -> bytes:
    """A random image of ``size`` bytes with runs of zero pages (first page, count); returns its bytes."""
    rnd = _random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    for first, count in zero_runs:
        start = first * 4096
        if start < size:
            end = min(size, start + count * 4096)
            data[start:end] = bytes(end - start)
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


def touch_restore(uffd_sock, address: str, image, size: int, *migrate_args: str, order: str = "random",
                  seed: int = 1, wait_run: bool = False) -> tuple[_subprocess.CompletedProcess, ...]:
    """An image restore into ``workload touch`` attached to serve-dest's ``uffd_sock`` (serve-dest listening
    on ``address``): (migrate's run, the toucher's); the toucher is reaped whatever happens."""
    from postcopy_cli.selftest.harness import kill_and_reap

    toucher = _subprocess.Popen(postcopy_cmd("workload", "touch", "--size", str(size), "--attach", str(uffd_sock),
                                             "--image", str(image), "--order", order, "--seed", str(seed), "--json",
                                             *(("--wait-run",) if wait_run else ())),
                                stdout=_subprocess.PIPE, stderr=_subprocess.PIPE, text=True)
    try:
        mig = run_postcopy("migrate", "--to", address, "--image", str(image), "--json", *migrate_args)
        t_out, t_err = toucher.communicate(timeout=PROC_TIMEOUT)
    finally:
        kill_and_reap(toucher)
    return mig, _subprocess.CompletedProcess(toucher.args, toucher.returncode, t_out, t_err)


def zero_pages_of(data: bytes) -> int:
    """Target pages (the last one padded with zeros) that are all zero."""
    z = bytes(4096)
    n = 0
    for off in range(0, len(data), 4096):
        page = data[off:off + 4096]
        if page == z[:len(page)]:
            n += 1
    return n


def single_stderr_line(err: str) -> str:
    """The one non-empty stderr line (asserts there is exactly one and no traceback)."""
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    return lines[0]


def waits_in_userfault(pid: int) -> bool:
    """True if a thread of ``pid`` sleeps in the kernel waiting for a missing page (fs/userfaultfd.c)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read().strip() == "handle_userfault":
                    return True
        except OSError:
            pass
    return False


def wait_until(cond, what: str, timeout: float = PROC_TIMEOUT) -> None:
    """Poll ``cond()`` until true; fail naming ``what`` after ``timeout`` (a hang detector, not a timing)."""
    import time as _time

    deadline = _time.monotonic() + timeout
    while not cond():
        if _time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        _time.sleep(0.02)


def finish(proc: _subprocess.Popen, timeout: float = PROC_TIMEOUT) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a subprocess; it is killed, and the test fails, if it does not end in time."""
    import time as _time

    done = _harness.finish(" ".join(map(str, proc.args[:5])), proc, _time.monotonic() + timeout)
    assert done.rc is not None, f"{done.name} did not end within {timeout} s: {done.err[-2000:]}"
    return done.rc, done.out, done.err


def read_pty(master: int) -> bytes:
    """Everything written to a pty until every slave end is closed (read then fails with EIO)."""
    out = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            return out
        if not data:
            return out
        out += data
