"""TLS on every migration connection (issue 11, DESIGN.md section 8): real TLS over loopback with
certificates made here, by ``postcopy tls-creds create`` and by the openssl command line in QEMU's
tls-creds-x509 layout.  Image restore (every byte checked by ``workload touch``), live migration
(``workload incoming``'s memory check), a recovery with the link cut under TLS; each refusal with
its reason on both sides, a refused connection never ending the waiting serve-dest."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import time

import pytest

from conftest import PROC_TIMEOUT, ServeDestProc, postcopy_cmd, run_postcopy, single_stderr_line, write_image
from test_live import _check_success
from test_recovery import ImageRestore

MiB = 1 << 20
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def ours(path, hostname: str = "localhost", *ips: str) -> str:
    """A directory made by `postcopy tls-creds create`."""
    extra = [a for ip in ips for a in ("--ip", ip)]
    p = run_postcopy("tls-creds", "create", str(path), "--hostname", hostname, *extra)
    assert p.returncode == 0, p.stderr
    return str(path)


def _openssl(*args: str, cwd) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=PROC_TIMEOUT)
    assert p.returncode == 0, p.stderr


def by_openssl(path) -> str:
    """A directory in QEMU's layout made by the openssl command line the way QEMU's documentation does
    (RSA keys, a self-signed CA; the server certificate names localhost and 127.0.0.1).  ca-key.pem
    stays, for the tests that issue more certificates."""
    os.makedirs(path)
    run = lambda *a: _openssl(*a, cwd=path)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
        "-days", "30", "-subj", "/CN=test CA")
    for side, ext in [("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")]:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{side}-key.pem", "-out", f"{side}.csr",
            "-subj", f"/CN={side}")
        with open(os.path.join(path, f"{side}.ext"), "w") as f:
            f.write(ext)
        run("x509", "-req", "-in", f"{side}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{side}-cert.pem", "-days", "30", "-extfile", f"{side}.ext")
    return str(path)


def expired_client(good: str, path) -> str:
    """A copy of openssl-made ``good`` whose client certificate (same CA, same key) expired yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    shutil.copytree(good, path)
    with open(os.path.join(good, "ca-key.pem"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(good, "ca-cert.pem"), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(good, "client-cert.pem"), "rb") as f:
        old = x509.load_pem_x509_certificate(f.read())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(ca.subject)
            .public_key(old.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(now - datetime.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(path, "client-cert.pem"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


@pytest.fixture(scope="module")
def creds(tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("creds")
    made = {"ours": ours(base / "ours", "localhost", "127.0.0.1"), "openssl": by_openssl(base / "openssl")}
    made["other-ca"] = ours(base / "other", "localhost", "127.0.0.1")
    made["expired"] = expired_client(made["openssl"], base / "expired")
    return made


# ---------------------------------------------------------------------------
# migrations over TLS, every byte checked

@pytest.mark.parametrize("maker", ["ours", "openssl"])
@pytest.mark.parametrize("to", ["tcp:localhost:{port}", "tcp:127.0.0.1:{port}"])
def test_image_restore_over_tls(tmp_path, creds, maker, to):
    """Both channels under TLS; the server's name checked as a DNS name and as an IP address SAN."""
    r = ImageRestore(tmp_path, 32 * MiB, dest_args=("--tls-creds", creds[maker]))
    try:
        with r.explained():
            mig = r.migrate("--tls-creds", creds[maker], to=to.format(port=r.dest.port))
            mstats, dstats = r.finish(mig)
        assert dstats["pages"]["received"] == dstats["pages"]["total"], dstats
        assert dstats["postcopy-requests"] > 0, dstats     # the preempt channel answered requests
    finally:
        r.close()


def test_live_migration_over_tls(tmp_path, creds):
    from test_live import Live

    lv = Live(tmp_path)
    try:
        lv.start_dest("--tls-creds", creds["openssl"])
        lv.start_migrate("--postcopy-after", "0.5", "--kill-source", "--tls-creds", creds["openssl"])
        lv.start_incoming("32M")
        lv.start_source("32M")
        stats = _check_success(lv, 32 * MiB, kill_source=True)
        assert stats["postcopy_seconds"] > 0, stats
    finally:
        lv.kill_all()


def test_recovery_after_cuts_under_tls(tmp_path, creds):
    """The proxy cuts the TLS connections (it cannot read them: kind "other"); each time the source
    reconnects with a new handshake and resumes; every byte still right."""
    r = ImageRestore(tmp_path, 64 * MiB, dest_args=("--tls-creds", creds["ours"]))
    try:
        with r.explained():
            mig = r.migrate("--tls-creds", creds["ours"], "--tls-hostname", "localhost", "--single-channel",
                            "--max-bandwidth", "20M")
            for i in range(3):
                # pages flow on the newest connection (after RUN: the image source sends RUN first)
                r.proxy.wait_bytes("other", "c2s", 2 * MiB, timeout=PROC_TIMEOUT)
                r.proxy.cut()
            mstats, dstats = r.finish(mig)
        assert mstats["postcopy-recoveries"] == 3, mstats
        assert dstats["postcopy-recoveries"] == 3, dstats
        assert len(r.proxy.connections("other")) == 4
    finally:
        r.close()


# ---------------------------------------------------------------------------
# refusals: one line on each side, and the waiting serve-dest takes the real source afterwards

def _dest(*extra: str) -> ServeDestProc:
    return ServeDestProc("--listen", "tcp:127.0.0.1:0", "--ram", "mem=4M", "--timeout", "10", *extra)


def _migrate(image, to: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(postcopy_cmd("migrate", "--to", to, "--image", str(image), "--timeout", "10", *extra),
                          capture_output=True, text=True, timeout=PROC_TIMEOUT)


def _then_real_source(dest: ServeDestProc, image, *extra: str) -> str:
    """The real source still migrates to ``dest`` after the refusal; serve-dest's stderr."""
    ok = _migrate(image, dest.address, *extra)
    assert ok.returncode == 0, ok.stderr
    rc, out, err = dest.wait()
    assert rc == 0, err
    assert "Traceback" not in err
    return err


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "WARNING" in line]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "mem.img"
    write_image(path, 4 * MiB)
    return path


@pytest.mark.parametrize("case, source_says, dest_says", [
    ("other-ca", "the peer's certificate: self-signed certificate in certificate chain", "unknown ca"),
    ("wrong-name", "hostname mismatch", "bad certificate"),
    ("expired", "certificate expired", "the peer's certificate: certificate has expired"),
])
def test_refused_handshake(creds, image, case, source_says, dest_says):
    good = creds["openssl"]
    dest = _dest("--tls-creds", good)
    try:
        args = {"other-ca": ["--tls-creds", creds["other-ca"]],
                "wrong-name": ["--tls-creds", good, "--tls-hostname", "elsewhere.example"],
                "expired": ["--tls-creds", creds["expired"]]}[case]
        bad = _migrate(image, dest.address, *args)
        assert bad.returncode == 1, bad.stderr
        line = single_stderr_line(bad.stderr)
        assert "TLS handshake with" in line and source_says in line, line
        err = _then_real_source(dest, image, "--tls-creds", good)
        (warning,) = _warnings(err)
        assert "refused a connection" in warning and dest_says in warning, err
    finally:
        dest.kill()


def test_client_without_a_certificate_is_refused(creds, image):
    """A TLS client that presents no certificate (Python's ssl, trusting the CA) is refused."""
    dest = _dest("--tls-creds", creds["ours"])
    try:
        ctx = ssl.create_default_context(cafile=os.path.join(creds["ours"], "ca-cert.pem"))
        with socket.create_connection(("127.0.0.1", dest.port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(b"x")
                    s.recv(1)   # TLS 1.3: the refusal comes after the client's handshake ends
        assert "certificate required" in str(refused.value).lower(), refused.value
        err = _then_real_source(dest, image, "--tls-creds", creds["ours"])
        (warning,) = _warnings(err)
        assert "peer did not return a certificate" in warning, err
    finally:
        dest.kill()


def test_plaintext_source_to_a_tls_destination(creds, image):
    """It recognises the destination's TLS alert (exit 1, "it expects TLS"); the destination says why."""
    dest = _dest("--tls-creds", creds["ours"])
    try:
        bad = _migrate(image, dest.address)
        assert bad.returncode == 1, bad.stderr
        assert "answered with a TLS alert: it expects TLS (give --tls-creds DIR)" in single_stderr_line(bad.stderr)
        err = _then_real_source(dest, image, "--tls-creds", creds["ours"])
        assert any("sent plaintext, not a TLS handshake" in w for w in _warnings(err)), err
    finally:
        dest.kill()


def test_tls_source_to_a_plaintext_destination(creds, image):
    dest = _dest()
    try:
        bad = _migrate(image, dest.address, "--tls-creds", creds["ours"])
        assert bad.returncode == 1, bad.stderr
        line = single_stderr_line(bad.stderr)
        assert "TLS handshake" in line and "does the destination have --tls-creds?" in line, line
        err = _then_real_source(dest, image)
        (warning,) = _warnings(err)
        assert "begins a TLS handshake and this serve-dest has no --tls-creds" in warning, err
    finally:
        dest.kill()


def test_stalled_handshake_does_not_hold_up_the_source(creds, image):
    """A peer that connects first and never finishes its handshake: the real source migrates meanwhile
    (had serve-dest waited for the stalled one, it would have refused it, with a warning, first)."""
    dest = _dest("--tls-creds", creds["ours"])
    try:
        with socket.create_connection(("127.0.0.1", dest.port), timeout=10) as idle:
            idle.sendall(b"\x16\x03\x01")   # the start of a record, never finished
            err = _then_real_source(dest, image, "--tls-creds", creds["ours"])
            assert _warnings(err) == [], err
    finally:
        dest.kill()


# ---------------------------------------------------------------------------
# options

@pytest.mark.parametrize("command, missing", [("serve-dest", "server-key.pem"), ("serve-dest", "ca-cert.pem"),
                                              ("migrate", "client-cert.pem"), ("migrate", "client-key.pem")])
def test_missing_file_is_a_usage_error_naming_it(tmp_path, creds, image, command, missing):
    d = tmp_path / "partial"
    shutil.copytree(creds["ours"], d)
    os.unlink(d / missing)
    args = (["serve-dest", "--listen", "tcp:127.0.0.1:0", "--ram", "mem=4M"] if command == "serve-dest" else
            ["migrate", "--to", "tcp:127.0.0.1:9", "--image", str(image)])
    p = run_postcopy(*args, "--tls-creds", str(d))
    assert p.returncode == 2, p.stderr
    line = single_stderr_line(p.stderr)
    assert str(d / missing) in line and "No such file" in line, line


def test_unreadable_or_malformed_file_is_a_usage_error(tmp_path, creds, image):
    d = tmp_path / "bad"
    shutil.copytree(creds["ours"], d)
    (d / "client-key.pem").write_text("not a key\n")
    p = run_postcopy("migrate", "--to", "tcp:127.0.0.1:9", "--image", str(image), "--tls-creds", str(d))
    assert p.returncode == 2, p.stderr
    assert str(d / "client-key.pem") in single_stderr_line(p.stderr)


def test_tls_lets_serve_dest_listen_on_any_address(creds):
    plain = run_postcopy("serve-dest", "--listen", "tcp:0.0.0.0:0", "--ram", "mem=4M", "--json")
    assert plain.returncode == 2 and "--tls-creds" in single_stderr_line(plain.stderr)
    dest = ServeDestProc("--listen", "tcp:0.0.0.0:0", "--ram", "mem=4M", "--tls-creds", creds["ours"])
    try:
        assert dest.address.startswith("tcp:0.0.0.0:"), dest.address
    finally:
        dest.kill()


def test_tls_hostname_needs_tls_creds(image):
    p = run_postcopy("migrate", "--to", "tcp:127.0.0.1:9", "--image", str(image), "--tls-hostname", "x")
    assert p.returncode == 2 and "--tls-creds" in single_stderr_line(p.stderr)


def test_tls_creds_create_layout_and_modes(tmp_path):
    d = tmp_path / "new"
    p = run_postcopy("tls-creds", "create", str(d), "--hostname", "dest.example", "--ip", "192.0.2.7", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["files"] == ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
                            "client-key.pem"]
    for name in doc["files"]:
        mode = stat.S_IMODE(os.stat(d / name).st_mode)
        assert mode == (0o600 if name.endswith("-key.pem") else 0o644), (name, oct(mode))
    text = subprocess.run(["openssl", "x509", "-in", str(d / "server-cert.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:dest.example" in text and "IP Address:192.0.2.7" in text, text
    for side in ("server", "client"):
        v = subprocess.run(["openssl", "verify", "-CAfile", str(d / "ca-cert.pem"), str(d / f"{side}-cert.pem")],
                           capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
    again = run_postcopy("tls-creds", "create", str(d), "--hostname", "dest.example")
    assert again.returncode == 2 and "refusing to replace" in single_stderr_line(again.stderr)


def test_probe_reports_tls():
    p = run_postcopy("probe", "--json")
    doc = json.loads(p.stdout)
    (check,) = [c for c in doc["checks"] if c["name"] == "tls"]
    assert check["status"] == "pass" and doc["tls"]["available"] and doc["capabilities"]["tls"], doc["tls"]
    assert doc["tls"]["library"].startswith("OpenSSL ") and doc["tls"]["library"] in check["detail"]
