"""Host checks for post-copy migration (DESIGN.md section 3).

:func:`run_probe` runs every check of QEMU's ``postcopy_ram_supported_by_host``
and a few more, each a :class:`Check` with status pass / fail / warn / skip, a
detail line and a remedy, and returns a :class:`ProbeReport`.  Only the core
checks (page size, a userfaultfd, the API handshake, REGISTER/UNREGISTER and a
real anonymous registration) decide ``supported``; the others say which
optional kinds of memory and which QEMU capabilities the host can do, and are
reported as warn or skip when missing.

Every fd and mapping opened here is closed before the function returns.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import Callable

from . import memory
from ._native import lib
from .codec.constants import TARGET_PAGE_SIZE
from .memory.pagemap import PagemapScanner
from .uffd import Feature, Ioctl, RegisterMode, UffdError, Userfaultfd, flag_names


PASS, FAIL, WARN, SKIP = "pass", "fail", "warn", "skip"

CAP_SYS_PTRACE = 19

SYSCTL_UNPRIV = "/proc/sys/vm/unprivileged_userfaultfd"
SYSCTL_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
DEV_UFFD = "/dev/userfaultfd"

REMEDY_UFFD = (f"either `sysctl -w vm.unprivileged_userfaultfd=1` (or run with CAP_SYS_PTRACE), "
               f"or give this user read/write access to {DEV_UFFD} "
               f"(e.g. `chgrp kvm {DEV_UFFD} && chmod 0660 {DEV_UFFD}` and add the user to that group)")

# The ioctls QEMU requires on a registered range (UFFD_API_RANGE_IOCTLS minus WP).
RANGE_IOCTLS = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE


@dataclass
class Check:
    name: str
    status: str
    detail: str
    remedy: str = ""
    core: bool = False

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "remedy": self.remedy}


@dataclass
class ProbeReport:
    supported: bool
    host_page_size: int
    target_page_size: int
    kernel: str
    uffd_api: int | None
    features: list[str]
    ioctls: list[str]
    checks: list[Check]
    capabilities: dict[str, bool]
    elapsed_ms: float = 0.0
    uffd_source: str | None = None
    tls_library: str | None = None

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def why_unsupported(self) -> str:
        """One line: each failed check, its detail and its remedy."""
        return "; ".join(f"the {c.name} check failed: {c.detail}" + (f"; remedy: {c.remedy}" if c.remedy else "")
                         for c in self.failed) or "a core check did not pass"

    def to_json(self) -> dict:
        return {
            "supported": self.supported,
            "host_page_size": self.host_page_size,
            "target_page_size": self.target_page_size,
            "kernel": self.kernel,
            "uffd": {"api": self.uffd_api, "features": self.features, "ioctls": self.ioctls,
                     "source": self.uffd_source},
            "checks": [c.to_json() for c in self.checks],
            "capabilities": self.capabilities,
            "tls": {"available": self.capabilities.get("tls", False), "library": self.tls_library},
            "elapsed_ms": round(self.elapsed_ms, 3),
        }


# -- raw hooks (tests monkeypatch these) ------------------------------------

def _sys_userfaultfd(flags: int) -> int:
    """userfaultfd(2): fd or -errno."""
    return lib.pc_userfaultfd(flags)


def _dev_userfaultfd(flags: int) -> int:
    """/dev/userfaultfd + USERFAULTFD_IOC_NEW: fd or -errno."""
    return lib.pc_userfaultfd_dev(flags)


def _api(uffd: Userfaultfd, features: int):
    """The UFFDIO_API handshake (a hook so tests can simulate older kernels)."""
    return uffd.api(features)


def _munlockall() -> None:
    memory.munlockall()


# -- host facts --------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _has_cap(cap: int) -> bool:
    text = _read("/proc/self/status") or ""
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _dev_access() -> str:
    try:
        st = os.stat(DEV_UFFD)
    except FileNotFoundError:
        return f"{DEV_UFFD} does not exist (kernel < 6.1 or not built)"
    except OSError as e:
        return f"{DEV_UFFD}: {e.strerror}"
    return f"{DEV_UFFD} is mode {st.st_mode & 0o777:04o} owner {st.st_uid}:{st.st_gid}"


class _Ctx:
    """State shared between checks: the opener that worked and the kernel's features."""

    def __init__(self) -> None:
        self.opener: Callable[[int], int] | None = None
        self.source: str | None = None
        self.features = Feature(0)
        self.ioctls = Ioctl(0)
        self.api: int | None = None

    def open(self) -> Userfaultfd:
        fd = self.opener(os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise UffdError(-fd, "userfaultfd")
        return Userfaultfd.adopt(fd)

    def registration(self, mapping: memory.Mapping, features: int, mode: int) -> Ioctl:
        """Open a uffd asking for ``features``, register ``mapping`` in ``mode``, unregister; ioctls."""
        with self.open() as u:
            _api(u, features)
            ioctls = u.register(mapping.addr, mapping.size, mode)
            u.unregister(mapping.addr, mapping.size)
            return ioctls


# -- the checks --------------------------------------------------------------

def _check_page_size(host: int, target: int) -> Check:
    if host == target:
        return Check("page-size", PASS, f"host page size {host} = target page size {target}", core=True)
    return Check("page-size", FAIL, f"host page size {host} differs from target page size {target}",
                 "postcopy places whole host pages; run on a host whose base page size is "
                 f"{target} bytes (e.g. a 4K-page kernel)", core=True)


def _check_userfaultfd(ctx: _Ctx) -> Check:
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    r = _sys_userfaultfd(flags)
    r2 = _dev_userfaultfd(flags)
    for fd in (r, r2):
        if fd >= 0:
            os.close(fd)
    if r >= 0:
        ctx.opener, ctx.source = _sys_userfaultfd, "syscall"
        dev = "also works" if r2 >= 0 else f"not usable ({errno.errorcode.get(-r2, -r2)}), not needed"
        return Check("userfaultfd", PASS, f"userfaultfd(2) syscall opens a userfaultfd; {DEV_UFFD} {dev}",
                     core=True)
    sys_err = -r
    if r2 >= 0:
        ctx.opener, ctx.source = _dev_userfaultfd, "device"
        return Check("userfaultfd", PASS,
                     f"userfaultfd(2) refused ({errno.errorcode.get(sys_err, sys_err)}), "
                     f"{DEV_UFFD} works and is used instead", core=True)
    dev_err = -r2
    unpriv = _read(SYSCTL_UNPRIV)
    ptrace = _has_cap(CAP_SYS_PTRACE)
    detail = (f"userfaultfd(2): {os.strerror(sys_err)} ({errno.errorcode.get(sys_err, sys_err)}); "
              f"{DEV_UFFD}: {os.strerror(dev_err)} ({errno.errorcode.get(dev_err, dev_err)}); "
              f"vm.unprivileged_userfaultfd={unpriv if unpriv is not None else 'unknown'}; "
              f"euid={os.geteuid()}; CAP_SYS_PTRACE {'held' if ptrace else 'not held'}; "
              f"{_dev_access()}")
    if sys_err == errno.ENOSYS and dev_err == errno.ENOENT:
        remedy = "the kernel has no userfaultfd: build it with CONFIG_USERFAULTFD=y (Linux >= 4.3)"
    else:
        remedy = REMEDY_UFFD
    return Check("userfaultfd", FAIL, detail, remedy, core=True)


def _check_api(ctx: _Ctx) -> Check:
    try:
        with ctx.open() as u:
            info = _api(u, 0)
    except OSError as e:
        return Check("uffdio-api", FAIL, f"UFFDIO_API handshake failed: {e}",
                     "the kernel's userfaultfd API is not usable; upgrade the kernel", core=True)
    ctx.api, ctx.features, ctx.ioctls = info.api, info.features, info.ioctls
    names = flag_names(info.features)
    return Check("uffdio-api", PASS,
                 f"api {info.api:#x}, features {int(info.features):#x}: {', '.join(names) or 'none'}",
                 core=True)


def _check_api_ioctls(ctx: _Ctx) -> Check:
    need = Ioctl.REGISTER | Ioctl.UNREGISTER
    missing = need & ~ctx.ioctls
    detail = f"API ioctls: {', '.join(flag_names(ctx.ioctls))}"
    if missing:
        return Check("api-ioctls", FAIL, f"{detail}; missing {', '.join(flag_names(missing))}",
                     "upgrade the kernel (userfaultfd REGISTER/UNREGISTER are in Linux >= 4.3)", core=True)
    return Check("api-ioctls", PASS, detail + " (REGISTER and UNREGISTER present)", core=True)


def _check_anon_register(ctx: _Ctx, page: int) -> Check:
    try:
        with memory.anonymous(page) as m:
            ioctls = ctx.registration(m, 0, RegisterMode.MISSING)
    except OSError as e:
        return Check("anon-register", FAIL, f"registering an anonymous test area failed: {e}",
                     "check ulimits and seccomp policy; the kernel must allow UFFDIO_REGISTER "
                     "on private anonymous memory", core=True)
    missing = RANGE_IOCTLS & ~ioctls
    detail = f"anonymous {page}-byte area registered (MISSING) and unregistered; range ioctls: " \
             f"{', '.join(flag_names(ioctls))}"
    if missing:
        return Check("anon-register", FAIL, f"{detail}; missing {', '.join(flag_names(missing))}",
                     "upgrade the kernel: postcopy needs WAKE, COPY and ZEROPAGE on anonymous memory",
                     core=True)
    return Check("anon-register", PASS, detail, core=True)


def _check_munlockall() -> Check:
    before = memory.locked_kib()
    try:
        _munlockall()
    except OSError as e:
        return Check("munlockall", FAIL, f"munlockall failed: {e}",
                     "postcopy must unlock memory while it runs; allow munlockall(2) "
                     "(seccomp policy)", core=True)
    note = ("postcopy and mlock don't mix: locked memory is faulted in at once, defeating "
            "userfaultfd, so memory is munlocked while postcopy runs and re-locked after")
    return Check("munlockall", PASS, f"munlockall works ({before} KiB were locked); {note}", core=True)


def _check_hugetlbfs(ctx: _Ctx) -> list[Check]:
    out = []
    if Feature.MISSING_HUGETLBFS in ctx.features:
        out.append(Check("hugetlbfs-feature", PASS, "MISSING_HUGETLBFS: hugetlbfs-backed RAM can be postcopied"))
    else:
        out.append(Check("hugetlbfs-feature", WARN, "MISSING_HUGETLBFS not offered: hugetlbfs-backed RAM "
                         "cannot be postcopied (anonymous and shared memory can)",
                         "upgrade the kernel (Linux >= 4.11) to postcopy huge-page RAM"))
        out.append(Check("hugetlbfs-register", SKIP, "needs MISSING_HUGETLBFS"))
        return out
    size = memory.default_hugepage_size()
    free = memory.free_hugepages()
    total = _read(SYSCTL_HUGEPAGES) or "?"
    if not size or free <= 0:
        out.append(Check("hugetlbfs-register", SKIP,
                         f"no free huge pages to test with (vm.nr_hugepages={total}, "
                         f"Hugepagesize {size // 1024} KiB)",
                         "reserve some to test and to back RAM with them: `sysctl -w vm.nr_hugepages=N` "
                         "(N huge pages of the default size)"))
        return out
    try:
        with memory.hugetlb() as m:
            ioctls = ctx.registration(m, Feature.MISSING_HUGETLBFS, RegisterMode.MISSING)
    except OSError as e:
        out.append(Check("hugetlbfs-register", WARN, f"registering a {size // 1024} KiB hugetlbfs area failed: {e}",
                         "check vm.nr_hugepages and that huge pages are free (/proc/meminfo)"))
        return out
    need = Ioctl.WAKE | Ioctl.COPY
    missing = need & ~ioctls
    detail = (f"{size // 1024} KiB MAP_HUGETLB area registered and unregistered; range ioctls: "
              f"{', '.join(flag_names(ioctls))}")
    if missing:
        out.append(Check("hugetlbfs-register", WARN, f"{detail}; missing {', '.join(flag_names(missing))}",
                         "upgrade the kernel to postcopy huge-page RAM"))
    else:
        extra = "" if Ioctl.ZEROPAGE in ioctls else " (no ZEROPAGE on hugetlbfs: zero pages are copied)"
        out.append(Check("hugetlbfs-register", PASS, detail + extra))
    return out


def _check_shmem(ctx: _Ctx, page: int) -> list[Check]:
    out = []
    if Feature.MISSING_SHMEM not in ctx.features:
        out.append(Check("shmem-feature", WARN, "MISSING_SHMEM not offered: shared-memory (memfd, shmem) RAM "
                         "cannot be postcopied", "upgrade the kernel (Linux >= 4.11)"))
        out.append(Check("shmem-register", SKIP, "needs MISSING_SHMEM"))
        return out
    out.append(Check("shmem-feature", PASS, "MISSING_SHMEM: shared memory (memfd, shmem) can be postcopied"))
    try:
        with memory.memfd(page, "postcopy-probe") as m:
            ioctls = ctx.registration(m, Feature.MISSING_SHMEM, RegisterMode.MISSING)
    except OSError as e:
        out.append(Check("shmem-register", WARN, f"registering a memfd area failed: {e}",
                         "check that memfd_create is allowed (seccomp) and shmem is available"))
        return out
    missing = RANGE_IOCTLS & ~ioctls
    detail = f"memfd MAP_SHARED area registered and unregistered; range ioctls: {', '.join(flag_names(ioctls))}"
    if missing:
        out.append(Check("shmem-register", WARN, f"{detail}; missing {', '.join(flag_names(missing))}",
                         "upgrade the kernel to postcopy shared memory"))
    else:
        out.append(Check("shmem-register", PASS, detail))
    return out


def _check_thread_id(ctx: _Ctx) -> Check:
    if Feature.THREAD_ID in ctx.features:
        return Check("thread-id", PASS, "THREAD_ID: faults name the faulting thread (postcopy-blocktime per vCPU)")
    return Check("thread-id", WARN, "THREAD_ID not offered: blocktime cannot be attributed to threads",
                 "upgrade the kernel (Linux >= 4.14) for postcopy-blocktime")


def _check_wp_async(ctx: _Ctx, page: int) -> Check:
    name = "wp-async-pagemap-scan"
    have = ctx.features & (Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.PAGEFAULT_FLAG_WP)
    if Feature.WP_ASYNC not in have:
        return Check(name, WARN, "WP_ASYNC not offered: no live dirty tracking of an attached process",
                     "upgrade the kernel (Linux >= 6.7 for WP_ASYNC and PAGEMAP_SCAN) for `migrate --attach`")
    pages = 4
    try:
        with memory.anonymous(pages * page) as m, ctx.open() as u:
            _api(u, Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
            u.register(m.addr, m.size, RegisterMode.WP)
            try:
                with PagemapScanner(os.getpid()) as scanner:
                    start, end = m.addr, m.addr + m.size
                    # protect everything (and reset written state), dirty page 2, look for it
                    scanner.written(start, end)
                    if scanner.written(start, end, reprotect=False):
                        raise OSError(errno.EIO, "pages still written after re-protecting")
                    m.map[2 * page] = 1
                    got = [((a - start) // page, (b - start) // page)
                           for a, b in scanner.written(start, end, reprotect=False)]
            finally:
                u.unregister(m.addr, m.size)
    except OSError as e:
        return Check(name, WARN, f"WP_ASYNC offered but live dirty tracking failed: {e}",
                     "upgrade the kernel (Linux >= 6.7) for PAGEMAP_SCAN on /proc/PID/pagemap")
    if got != [(2, 3)]:
        return Check(name, WARN, f"PAGEMAP_SCAN reported written pages {got}, expected [(2, 3)]",
                     "the kernel's WP_ASYNC dirty tracking is unreliable; do not use `migrate --attach`")
    return Check(name, PASS, f"WP_ASYNC area registered; PAGEMAP_SCAN on /proc/self/pagemap re-protected "
                             f"{pages} pages and found exactly the one written")


def _check_minor(ctx: _Ctx, page: int) -> Check:
    kinds = [n for n in ("MINOR_SHMEM", "MINOR_HUGETLBFS") if Feature[n] in ctx.features]
    if Feature.MINOR_SHMEM not in ctx.features:
        return Check("minor", WARN, f"MINOR_SHMEM not offered (have: {', '.join(kinds) or 'none'}); "
                                    "no UFFDIO_CONTINUE on shared memory",
                     "upgrade the kernel (Linux >= 5.13) for minor-fault (page cache) postcopy")
    try:
        with memory.memfd(page, "postcopy-probe-minor") as m:
            ioctls = ctx.registration(m, Feature.MINOR_SHMEM, RegisterMode.MINOR)
    except OSError as e:
        return Check("minor", WARN, f"MINOR registration of a memfd area failed: {e}", "upgrade the kernel")
    if Ioctl.CONTINUE not in ioctls:
        return Check("minor", WARN, f"MINOR-registered memfd range lacks CONTINUE (ioctls: "
                                    f"{', '.join(flag_names(ioctls))})", "upgrade the kernel")
    return Check("minor", PASS, f"{', '.join(kinds)}; memfd area registered MINOR with UFFDIO_CONTINUE")


def _check_thp() -> Check:
    text = _read(THP_ENABLED)
    if text is None:
        return Check("thp", SKIP, "transparent huge pages not available (no " + THP_ENABLED + ")")
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text
    if mode == "always":
        return Check("thp", WARN, "THP enabled=always: RAM may be backed by huge pages; postcopy turns THP "
                                  "off per block (MADV_NOHUGEPAGE) so faults stay one page",
                     f"optional: `echo madvise > {THP_ENABLED}`")
    return Check("thp", PASS, f"THP enabled={mode}")


def _check_tls() -> Check:
    """--tls-creds: the TLS library the native layer is linked with, and that it makes both sides'
    contexts (TLS 1.2 minimum; kernel TLS is not used, see channels/tls.py)."""
    name = _tls_library()
    if name is None:
        return Check("tls", WARN, "no TLS in the native layer", "rebuild with libssl-dev installed")
    if not name.startswith("OpenSSL 3") and not name.startswith("OpenSSL 1.1"):
        return Check("tls", WARN, f"{name}: older than OpenSSL 1.1.1, no TLS 1.3", "upgrade OpenSSL")
    return Check("tls", PASS, f"{name}: --tls-creds available (TLS 1.3 records sealed in the native threads; "
                              f"1.2 minimum, relayed)")


def run_probe(target_page_size: int = TARGET_PAGE_SIZE) -> ProbeReport:
    """Run every check and return the report (never raises for host problems)."""
    t0 = time.perf_counter()
    host_page = memory.page_size()
    ctx = _Ctx()
    checks: list[Check] = [_check_page_size(host_page, target_page_size), _check_userfaultfd(ctx)]
    if ctx.opener is None:
        for name in ("uffdio-api", "api-ioctls", "anon-register"):
            checks.append(Check(name, SKIP, "needs a userfaultfd", core=True))
        checks.append(_check_munlockall())
        for name in ("hugetlbfs-feature", "hugetlbfs-register", "shmem-feature", "shmem-register",
                     "thread-id", "wp-async-pagemap-scan", "minor"):
            checks.append(Check(name, SKIP, "needs a userfaultfd"))
    else:
        api = _check_api(ctx)
        checks.append(api)
        if api.status == PASS:
            checks.append(_check_api_ioctls(ctx))
            checks.append(_check_anon_register(ctx, host_page))
        else:
            checks += [Check(n, SKIP, "needs the UFFDIO_API handshake", core=True)
                       for n in ("api-ioctls", "anon-register")]
        checks.append(_check_munlockall())
        if api.status == PASS:
            checks += _check_hugetlbfs(ctx)
            checks += _check_shmem(ctx, host_page)
            checks.append(_check_thread_id(ctx))
            checks.append(_check_wp_async(ctx, host_page))
            checks.append(_check_minor(ctx, host_page))
    checks.append(_check_thp())
    checks.append(_check_tls())

    by = {c.name: c.status for c in checks}
    supported = all(c.status == PASS for c in checks if c.core)
    capabilities = {
        "postcopy-ram": supported,
        "postcopy-ram-shmem": supported and by.get("shmem-register") == PASS,
        "postcopy-ram-hugetlbfs": supported and by.get("hugetlbfs-register") == PASS,
        "postcopy-blocktime": supported and by.get("thread-id") == PASS,
        "background-snapshot": (by.get("wp-async-pagemap-scan") == PASS
                                and Feature.PAGEFAULT_FLAG_WP in ctx.features),
        "live-dirty-tracking": by.get("wp-async-pagemap-scan") == PASS,
        "minor-fault-postcopy": supported and by.get("minor") == PASS,
        "tls": by.get("tls") == PASS,
    }
    return ProbeReport(
        supported=supported,
        host_page_size=host_page,
        target_page_size=target_page_size,
        kernel=os.uname().release,
        uffd_api=ctx.api,
        features=flag_names(ctx.features),
        ioctls=flag_names(ctx.ioctls),
        checks=checks,
        capabilities=capabilities,
        elapsed_ms=(time.perf_counter() - t0) * 1000,
        uffd_source=ctx.source,
        tls_library=_tls_library(),
    )


def _tls_library() -> str | None:
    """The TLS library and version the native layer is linked with, or None (built without it)."""
    from .channels import tls

    try:
        return tls.library()
    except AttributeError:
        return None
