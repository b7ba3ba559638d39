"""`postcopy tls-creds create`: a CA and the certificates of both sides, in QEMU's tls-creds-x509 layout."""
from __future__ import annotations

import datetime
import ipaddress
import os
import sys

import click

from ..errors import UsageError
from ._common import common_options, emit_json

# what each file is, in the order written; keys are 0600
_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


@click.group("tls-creds")
def tls_creds():
    """TLS credentials for --tls-creds DIR (QEMU's tls-creds-x509 layout)."""


def _ip(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"--ip {text!r}: not an IP address") from None


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


@tls_creds.command("create")
@click.argument("directory", metavar="DIR")
@click.option("--hostname", required=True, metavar="NAME",
              help="The destination host's name as the source names it (migrate --to tcp:NAME:PORT or "
                   "--tls-hostname NAME): the server certificate carries it.")
@click.option("--ip", "ips", multiple=True, metavar="ADDR",
              help="An IP address of the destination for the server certificate too (repeatable), for a "
                   "source that connects to tcp:ADDR:PORT.")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True,
              help="How long the certificates are valid.")
@common_options
def create(as_json, directory, hostname, ips, days):
    """Make a CA and a server and a client certificate signed by it in DIR:
    ca-cert.pem; server-cert.pem + server-key.pem (for serve-dest --tls-creds DIR);
    client-cert.pem + client-key.pem (for migrate --tls-creds DIR). Keys are
    ECDSA P-256, written 0600; the CA's own key is not kept (make a new
    directory to add hosts). Existing files are never replaced (exit 2)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    addresses = [_ip(a) for a in ips]
    try:
        addresses.append(ipaddress.ip_address(hostname))
    except ValueError:
        pass
    os.makedirs(directory, mode=0o755, exist_ok=True)
    for name in _FILES:
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            raise UsageError(f"tls-creds create: {path} exists; refusing to replace it")

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject, key, issuer, signer, *, ca: bool, usage=None, sans=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                                          key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                                          decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(signer, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def pem_cert(cert) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"postcopy CA for {hostname}")
    ca = issue(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(a) for a in addresses]
    if not any(str(a) == hostname for a in addresses):
        sans.insert(0, x509.DNSName(hostname))
    server = issue(name(hostname), server_key, ca_name, ca_key, ca=False, usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   sans=sans)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = issue(name(f"postcopy source for {hostname}"), client_key, ca_name, ca_key, ca=False,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    contents = {"ca-cert.pem": (pem_cert(ca), 0o644), "server-cert.pem": (pem_cert(server), 0o644),
                "server-key.pem": (pem_key(server_key), 0o600), "client-cert.pem": (pem_cert(client), 0o644),
                "client-key.pem": (pem_key(client_key), 0o600)}
    for file in _FILES:
        data, mode = contents[file]
        try:
            _write(os.path.join(directory, file), data, mode)
        except OSError as e:
            raise UsageError(f"tls-creds create: {os.path.join(directory, file)}: {e.strerror}") from None
    if as_json:
        emit_json({"directory": os.path.abspath(directory), "hostname": hostname,
                   "ip": [str(a) for a in addresses], "files": list(_FILES), "not-after": until.isoformat()})
    else:
        print(f"postcopy: wrote {', '.join(_FILES)} to {directory} (valid until {until:%Y-%m-%d}): give "
              f"serve-dest and migrate --tls-creds {directory}", file=sys.stderr)
