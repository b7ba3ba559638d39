"""`postcopy probe`: the real host checks, monkeypatched failures, the CLI and an unprivileged run."""
from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from click.testing import CliRunner

from postcopy_cli import probe as probe_mod
from postcopy_cli.cli import cli, run
from postcopy_cli.uffd import ApiInfo, Feature, Ioctl, Userfaultfd

from conftest import IS_ROOT, needs_root

CORE = ["page-size", "userfaultfd", "uffdio-api", "api-ioctls", "anon-register", "munlockall"]
STATUSES = {"pass", "fail", "warn", "skip"}


def _deny_uffd(monkeypatch):
    monkeypatch.setattr(probe_mod, "_sys_userfaultfd", lambda flags: -errno.EPERM)
    monkeypatch.setattr(probe_mod, "_dev_userfaultfd", lambda flags: -errno.EACCES)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_core_checks_pass_here():
    gc.collect()   # an earlier test's garbage closing its fd mid-probe is not a probe leak
    before = _open_fds()
    report = probe_mod.run_probe()
    assert _open_fds() == before, "probe leaked file descriptors"
    assert report.supported
    for name in CORE:
        assert report.check(name).status == "pass", report.check(name)
    assert not report.failed
    for name in ("shmem-register", "thread-id", "wp-async-pagemap-scan", "minor"):
        assert report.check(name).status == "pass", report.check(name)
    assert report.capabilities["postcopy-ram"] and report.capabilities["postcopy-blocktime"]
    assert report.capabilities["background-snapshot"]
    assert report.elapsed_ms < 500
    assert "MISSING_SHMEM" in report.features and "REGISTER" in report.ioctls


def test_json_schema(capsys):
    assert run(["probe", "--json"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert isinstance(doc["supported"], bool) and doc["supported"]
    assert doc["host_page_size"] == os.sysconf("SC_PAGE_SIZE")
    assert doc["kernel"] == os.uname().release
    assert doc["uffd"]["api"] == 0xAA
    assert all(isinstance(n, str) for n in doc["uffd"]["features"] + doc["uffd"]["ioctls"])
    assert isinstance(doc["capabilities"], dict)
    names = [c["name"] for c in doc["checks"]]
    assert len(names) == len(set(names))
    for c in doc["checks"]:
        assert set(c) == {"name", "status", "detail", "remedy"}
        assert c["status"] in STATUSES and c["detail"]
        if c["status"] in ("fail", "warn"):
            assert c["remedy"]


def test_cli_table():
    result = CliRunner().invoke(cli, ["probe"])
    assert result.exit_code == 0, result.output
    for name in CORE + ["hugetlbfs-register", "thp"]:
        assert name in result.output
    assert "postcopy is supported" in result.output


def test_usage_error():
    assert run(["probe", "--no-such-option"]) == 2
    assert run(["probe", "--target-page-size", "abc"]) == 2


def test_userfaultfd_denied(monkeypatch, capsys):
    _deny_uffd(monkeypatch)
    report = probe_mod.run_probe()
    c = report.check("userfaultfd")
    assert c.status == "fail" and not report.supported
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in c.remedy and "/dev/userfaultfd" in c.remedy
    assert "vm.unprivileged_userfaultfd=" in c.detail and "CAP_SYS_PTRACE" in c.detail and "euid=" in c.detail
    assert "EPERM" in c.detail and "EACCES" in c.detail
    assert report.check("anon-register").status == "skip"
    assert report.capabilities["postcopy-ram"] is False

    assert run(["probe", "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # the report is printed before exiting 1
    assert doc["supported"] is False and doc["uffd"]["features"] == []
    assert "userfaultfd" in captured.err and "Traceback" not in captured.err


def test_device_fallback(monkeypatch):
    monkeypatch.setattr(probe_mod, "_sys_userfaultfd", lambda flags: -errno.EPERM)
    report = probe_mod.run_probe()
    assert report.supported and report.uffd_source == "device"
    assert "/dev/userfaultfd" in report.check("userfaultfd").detail


def _mask_features(monkeypatch, drop: int = 0, drop_ioctls: int = 0):
    real = probe_mod._api

    def api(u: Userfaultfd, features: int):
        if features & drop:
            raise OSError(errno.EINVAL, "feature not offered")
        info = real(u, features)
        return ApiInfo(info.api, info.features & ~Feature(drop), info.ioctls & ~Ioctl(drop_ioctls))

    monkeypatch.setattr(probe_mod, "_api", api)


def test_missing_optional_features_warn(monkeypatch):
    _mask_features(monkeypatch, Feature.MISSING_SHMEM | Feature.THREAD_ID | Feature.WP_ASYNC
                   | Feature.MINOR_SHMEM | Feature.MISSING_HUGETLBFS)
    report = probe_mod.run_probe()
    assert report.supported  # anonymous postcopy still works
    for name in ("shmem-feature", "thread-id", "wp-async-pagemap-scan", "minor", "hugetlbfs-feature"):
        c = report.check(name)
        assert c.status == "warn" and c.remedy, c
    assert report.check("shmem-register").status == "skip"
    assert report.check("hugetlbfs-register").status == "skip"
    caps = report.capabilities
    assert caps["postcopy-ram"] and not caps["postcopy-blocktime"] and not caps["background-snapshot"]
    assert not caps["postcopy-ram-shmem"]
    assert "MISSING_SHMEM" not in report.features


def _no_unregister_ioctl(monkeypatch):
    _mask_features(monkeypatch, drop_ioctls=Ioctl.UNREGISTER)


def _no_zeropage_on_register(monkeypatch):
    real = Userfaultfd.register
    monkeypatch.setattr(Userfaultfd, "register",
                        lambda self, *a, **k: real(self, *a, **k) & ~Ioctl.ZEROPAGE)


def _api_einval(monkeypatch):
    def api(u, features):
        raise OSError(errno.EINVAL, "UFFDIO_API: Invalid argument")

    monkeypatch.setattr(probe_mod, "_api", api)


def _munlockall_eperm(monkeypatch):
    def deny():
        raise OSError(errno.EPERM, "munlockall: Operation not permitted")

    monkeypatch.setattr(probe_mod, "_munlockall", deny)


# name: (how the host is made to fail, the core check that fails, a text its detail names or None,
#        a check skipped after it or None)
CORE_FAILURES = {
    "register-ioctl-missing": (_no_unregister_ioctl, "api-ioctls", "UNREGISTER", None),
    "range-ioctl-missing": (_no_zeropage_on_register, "anon-register", "ZEROPAGE", None),
    "api-fails": (_api_einval, "uffdio-api", None, "anon-register"),
    "munlockall-fails": (_munlockall_eperm, "munlockall", None, None),
}


@pytest.mark.parametrize("case", sorted(CORE_FAILURES))
def test_core_check_failure(monkeypatch, capsys, case):
    make_fail, name, text, skipped = CORE_FAILURES[case]
    make_fail(monkeypatch)
    report = probe_mod.run_probe()
    c = report.check(name)
    assert c.status == "fail" and not report.supported, c
    assert text is None or text in c.detail, c
    assert skipped is None or report.check(skipped).status == "skip"
    assert run(["probe", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["supported"] is False


def test_page_size_mismatch():
    report = probe_mod.run_probe(target_page_size=os.sysconf("SC_PAGE_SIZE") * 4)
    assert report.check("page-size").status == "fail" and not report.supported
    assert run(["probe", "--json", "--target-page-size", str(os.sysconf("SC_PAGE_SIZE") * 4)]) == 1


def test_thp_always_warns(monkeypatch, tmp_path):
    f = tmp_path / "enabled"
    f.write_text("[always] madvise never\n")
    monkeypatch.setattr(probe_mod, "THP_ENABLED", str(f))
    c = probe_mod.run_probe().check("thp")
    assert c.status == "warn" and "always" in c.detail and c.remedy
    f.write_text("always [madvise] never\n")
    assert probe_mod.run_probe().check("thp").status == "pass"
    monkeypatch.setattr(probe_mod, "THP_ENABLED", str(tmp_path / "missing"))
    assert probe_mod.run_probe().check("thp").status == "skip"


@needs_root
def test_hugetlbfs_real_registration(hugepages):
    report = probe_mod.run_probe()
    c = report.check("hugetlbfs-register")
    assert c.status == "pass", c
    assert "MAP_HUGETLB" in c.detail
    assert report.capabilities["postcopy-ram-hugetlbfs"]


@needs_root
def test_hugetlbfs_skip_without_reserved_pages(no_hugepages):
    report = probe_mod.run_probe()
    c = report.check("hugetlbfs-register")
    assert c.status == "skip"
    assert "sysctl -w vm.nr_hugepages=N" in c.remedy
    assert report.supported and not report.capabilities["postcopy-ram-hugetlbfs"]


# -- a real unprivileged run --------------------------------------------------

def _unprivileged(argv: list[str], columns: int = 80, **run_kw) -> subprocess.CompletedProcess:
    """Run ``python -m postcopy_cli ARGV`` as uid/gid 65534 with no groups.

    Output is captured as text unless ``run_kw`` says where it goes (e.g. a pty).

    The interpreter may live under a directory nobody cannot enter (/root is
    0700 here), so the run happens in a private mount namespace where that
    directory's path stays the same but its parent is traversable.
    """
    for tool in ("setpriv", "unshare", "mount"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not available")
    exe = os.path.realpath(sys.executable)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", exe, "-m", "postcopy_cli", *argv]
    script = 'exec "$@"'
    with tempfile.TemporaryDirectory() as tmp:
        # find the first ancestor of the interpreter that 65534 cannot traverse
        blocked = None
        path = "/"
        for part in exe.strip("/").split("/")[:-1]:
            path = os.path.join(path, part)
            if not os.stat(path).st_mode & 0o001:
                blocked = path
                break
        if blocked:
            inner = os.listdir(blocked)
            child = exe[len(blocked) + 1:].split("/")[0]
            assert child in inner
            os.chmod(tmp, 0o755)
            os.mkdir(os.path.join(tmp, child))
            script = (f'mount --bind "{blocked}/{child}" "{tmp}/{child}" && '
                      f'mount --rbind "{tmp}" "{blocked}" && exec "$@"')
        full = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME",)}
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env["COLUMNS"] = str(columns)
        return subprocess.run(full, timeout=60, cwd="/", env=env, **(run_kw or {"capture_output": True, "text": True}))


def unprivileged_ready(sysctl) -> None:
    """vm.unprivileged_userfaultfd=0 (restored after) and uid 65534 can run us; else skip."""
    sysctl(probe_mod.SYSCTL_UNPRIV, 0)
    st = os.stat("/dev/userfaultfd") if os.path.exists("/dev/userfaultfd") else None
    if st is not None and st.st_mode & 0o006:
        pytest.skip("/dev/userfaultfd is world-accessible on this host")
    smoke = _unprivileged(["--help"])
    if smoke.returncode != 0:
        pytest.skip(f"cannot run the interpreter as uid 65534 here: {smoke.stderr.strip()[-300:]}")


@needs_root
def test_unprivileged_user_is_told_the_remedies(sysctl):
    unprivileged_ready(sysctl)
    proc = _unprivileged(["probe", "--json"])
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    doc = json.loads(proc.stdout)
    assert doc["supported"] is False
    c = {c["name"]: c for c in doc["checks"]}["userfaultfd"]
    assert c["status"] == "fail"
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in c["remedy"]
    assert "/dev/userfaultfd" in c["remedy"]
    assert "vm.unprivileged_userfaultfd=0" in c["detail"] and "euid=65534" in c["detail"]
    # and the table form says the same without a traceback
    proc = _unprivileged(["probe"], columns=400)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "sysctl -w vm.unprivileged_userfaultfd=1" in proc.stdout and "/dev/userfaultfd" in proc.stdout
