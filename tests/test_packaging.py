"""Packaging: an isolated build gives a wheel with the license, py.typed, every package and the man pages;
the installed man pages are found by `man`; the package has a version and no deprecated click calls."""
from __future__ import annotations

import email
import glob
import os
import shutil
import subprocess
import sys
import warnings
import zipfile

import click
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPL2 = "/usr/share/common-licenses/GPL-2"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """A wheel built by pip (build isolation: setuptools>=77 and cffi fetched fresh) from a copy of the tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # a copy without build/ and compiled files, as a clean clone has
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "*.so", "*.o",
                                                             "__pycache__", ".pytest_cache", ".venv"))
    out = tmp / "dist"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SetuptoolsDeprecationWarning" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    (path,) = glob.glob(str(out / "postcopy-*.whl"))
    return path


def _metadata(zf: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(zf.read(name))


def test_license_file_and_expression(wheel):
    with open(os.path.join(ROOT, "LICENSE"), "rb") as f, open(GPL2, "rb") as g:
        assert f.read() == g.read(), "LICENSE is the GPL-2 text"
    with zipfile.ZipFile(wheel) as zf:
        meta = _metadata(zf)
        assert meta["License-Expression"] == "GPL-2.0-or-later"
        assert meta.get_all("License-File") == ["LICENSE"]
        assert not [c for c in meta.get_all("Classifier") if c.startswith("License ::")]
        (lic,) = [n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        with open(GPL2, "rb") as g:
            assert zf.read(lic) == g.read()


def test_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = _metadata(zf)
    classifiers = meta.get_all("Classifier")
    assert "Operating System :: POSIX :: Linux" in classifiers and "Typing :: Typed" in classifiers
    assert "click<9,>=8.1" in meta.get_all("Requires-Dist")
    assert meta["Requires-Python"] == ">=3.10"


def test_every_package_and_data_file_is_in_the_wheel(wheel):
    packages = sorted(os.path.relpath(d, ROOT) for d, _, files in os.walk(os.path.join(ROOT, "postcopy_cli"))
                      if "__init__.py" in files)
    assert len(packages) >= 4
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for pkg in packages:
        assert f"{pkg}/__init__.py" in names, f"{pkg} missing from the wheel"
    assert "postcopy_cli/py.typed" in names
    for src in glob.glob(os.path.join(ROOT, "postcopy_cli", "native", "*.[ch]")):
        assert f"postcopy_cli/native/{os.path.basename(src)}" in names
    pages = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "man", "*.1")))
    assert "postcopy.1" in pages
    for page in pages:
        assert any(n.endswith(f".data/data/share/man/man1/{page}") for n in names), page


def test_abi3_tag_matches_the_extension(wheel):
    """The wheel says abi3 exactly when the extension is built for the stable ABI (cffi's Py_LIMITED_API)."""
    with zipfile.ZipFile(wheel) as zf:
        (ext,) = [n for n in zf.namelist() if n.startswith("postcopy_cli/_native.") and n.endswith(".so")]
        tag = [line.split(": ", 1)[1] for line in zf.read(next(n for n in zf.namelist()
                                                               if n.endswith(".dist-info/WHEEL"))).decode().splitlines()
               if line.startswith("Tag: ")]
    abi3 = ext.endswith(".abi3.so")
    assert all(("-abi3-" in t) == abi3 for t in tag), (ext, tag)
    if sys.implementation.name == "cpython" and not hasattr(sys, "gettotalrefcount"):
        assert abi3 and tag == ["cp310-abi3-linux_x86_64"] or not os.uname().machine == "x86_64", (ext, tag)


@pytest.mark.skipif(not shutil.which("man"), reason="man not installed")
def test_man_finds_the_pages_of_a_venv_install(wheel, tmp_path):
    """`pip install` puts the pages in PREFIX/share/man/man1; man derives that from PREFIX/bin on PATH."""
    venv = tmp_path / "venv"
    # not conftest's PYTHONPATH: pip would see the postcopy under test there as installed already
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "PYTHONPATH", "PYTHONSAFEPATH")}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120, env=env)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                           "--no-deps", "--no-index", wheel], capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode and "no such option: --python" in proc.stderr:
        pytest.skip("pip too old for --python")
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(venv / "share" / "man" / "man1" / "postcopy.1"), proc.stdout
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    for page in ("postcopy", "postcopy-probe", "postcopy-workload"):
        found = subprocess.run(["man", "-w", page], env=env, capture_output=True, text=True, timeout=60)
        assert found.returncode == 0, found.stderr
        assert found.stdout.strip() == str(venv / "share" / "man" / "man1" / f"{page}.1")


def test_version_and_docstring():
    import importlib.metadata

    import postcopy_cli
    from postcopy_cli.cli import run

    assert postcopy_cli.__doc__ and "userfaultfd" in postcopy_cli.__doc__
    try:
        expected = importlib.metadata.version("postcopy")
    except importlib.metadata.PackageNotFoundError:
        expected = "0+unknown"
    assert postcopy_cli.__version__ == expected
    proc = subprocess.run([sys.executable, "-m", "postcopy_cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"postcopy, version {expected}"
    assert run(["--version"]) == 0


def test_no_deprecated_click_calls(capsys):
    """Building every command's help and the man pages warns about nothing deprecated."""
    sys.path.insert(0, os.path.join(ROOT, "man"))
    import generate

    from postcopy_cli.cli import cli, run

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", PendingDeprecationWarning)
        generate.generate()
        ctx = click.Context(cli, info_name="postcopy")
        argvs = [["--help"], ["--version"]]
        for name in cli.list_commands(ctx):
            argvs.append([name, "--help"])
            sub = cli.get_command(ctx, name)
            if isinstance(sub, click.Group):
                argvs += [[name, s, "--help"] for s in sub.list_commands(ctx)]
        for argv in argvs:
            assert run(argv) == 0, argv
        assert run(["send-discards", "--block", "mem", "--pages", "3"]) == 0
    capsys.readouterr()


# -- README set-up, verbatim, in a fresh venv of the system Python ---------------------

from conftest import needs_root  # noqa: E402

README = os.path.join(ROOT, "README.md")
SETUP_MARK = "<!-- setup-command -->"
SYSTEM_PYTHON = "/usr/bin/python3"


def readme_setup_commands() -> list[str]:
    """The shell blocks of README.md that follow the set-up marker, verbatim."""
    with open(README, encoding="utf-8") as f:
        parts = f.read().split(SETUP_MARK)[1:]
    commands = []
    for part in parts:
        block = part.lstrip("\n")
        assert block.startswith("```sh\n"), block[:80]
        commands.append(block[len("```sh\n"):block.index("\n```")].strip())
    return commands


def test_readme_has_two_setup_commands_using_a_venv():
    install, tests = readme_setup_commands()
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && ") and "postcopy probe" in install
    assert tests.startswith("python3 -m venv .venv && . .venv/bin/activate && ") and tests.endswith("pytest")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    # .ci/run installs the way the README says and runs its test command
    install_part, test_part = tests.rsplit(" && ", 1)
    assert f"\n{install_part}\n" in ci and f"\n{test_part} -q\n" in ci


def test_no_link_or_path_outside_the_repository():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert "../shared/DESIGN.md" not in text and "DESIGN.md" not in text
    for target in re_links(text):
        assert not target.startswith(("..", "/")), target
    for name in ("restore_bench.py", "qemu_compare.py"):
        with open(os.path.join(ROOT, "benchmarks", name)) as f:
            assert "/work/" not in f.read(), name


def re_links(text: str) -> list[str]:
    import re

    return re.findall(r"\]\(([^)]+)\)", text)


def test_benchmark_without_anchors_says_so_and_measures_our_side(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "restore_bench.py"),
                           "--anchors", str(tmp_path / "none"), "--size", "1M", "--runs", "0", "--idle-wait", "0",
                           "--image-dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "POSTCOPY_ANCHORS": "/nonexistent"})
    assert f"C floor skipped: no uffd_floor.c in {tmp_path / 'none'}" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "qemu_compare.py"), "--skip-ours",
                           "--scenarios", "nocap", "--idle-wait", "0"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "POSTCOPY_ANCHORS": str(tmp_path / "none")})
    assert f"QEMU side skipped: no qemu/postcopy_run.py in {tmp_path / 'none'}" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr


@needs_root
@pytest.mark.slow
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason="no system Python at /usr/bin/python3")
def test_readme_setup_commands_work_verbatim_in_a_fresh_venv(tmp_path):
    """A fresh clone, `python3` = the system Python (externally managed on Debian), nothing installed by hand.

    The test command runs verbatim too; PYTEST_ADDOPTS narrows its pytest to a few quick files (the
    whole suite, this test included, is what CI runs).
    """
    install, tests = readme_setup_commands()
    src = tmp_path / "postcopy"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "*.so", "*.o",
                                                             "__pycache__", ".pytest_cache", ".venv"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    os.symlink(SYSTEM_PYTHON, bindir / "python3")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_ADDOPTS", "MANPATH")
           and not k.startswith("PYENV")}
    env["PATH"] = f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

    proc = subprocess.run(["bash", "-c", install], cwd=src, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "postcopy is supported on this host" in proc.stdout
    base = subprocess.run([src / ".venv" / "bin" / "python3", "-c", "import sys; print(sys.base_prefix)"],
                          capture_output=True, text=True, timeout=60)
    assert base.stdout.strip() == "/usr", "the venv is the system Python's"
    found = subprocess.run(["man", "-w", "postcopy-probe"], env={**env, "PATH": f"{src / '.venv' / 'bin'}:{env['PATH']}"},
                           capture_output=True, text=True, timeout=60) if shutil.which("man") else None
    assert found is None or found.stdout.strip() == str(src / ".venv/share/man/man1/postcopy-probe.1"), found

    env["PYTEST_ADDOPTS"] = "-q -p no:cacheprovider -m 'not slow' tests/test_probe.py tests/test_probe_output.py"
    proc = subprocess.run(["bash", "-c", tests], cwd=src, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-1000:]
