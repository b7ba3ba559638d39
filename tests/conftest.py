"""Shared fixtures: root-only markers and sysctls that are restored after the test."""
from __future__ import annotations

import os

import pytest

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
    from postcopy_cli import hostmem

    if hostmem.free_hugepages() < 1:
        pytest.skip("could not reserve huge pages on this host")
    return 4


@pytest.fixture
def no_hugepages(sysctl):
    """No huge pages reserved for the test (vm.nr_hugepages restored after)."""
    sysctl("/proc/sys/vm/nr_hugepages", 0)
    from postcopy_cli import hostmem

    if hostmem.free_hugepages() > 0:
        pytest.skip("huge pages remain reserved (surplus or in use)")
