"""TLS for the rig's migrations: one rig CA, and for each host the x509 files QEMU's
migration TLS (``VIR_MIGRATE_TLS``, and with it the NBD stream of a storage copy) reads from
``migrate_tls_x509_cert_dir``.

Each host's directory holds ``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` (the
incoming side: names the host's name and address) and ``client-cert.pem``/``client-key.pem``
(the outgoing side), as libvirt documents for that directory. EC keys (P-256): they are made
in milliseconds, and GnuTLS accepts them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["CERT_DIR", "issue_host_certs", "make_ca"]

#: Where each host's files live, inside the host (its /etc/libvirt is its own).
CERT_DIR = "/etc/libvirt/pki/qemu"

_DAYS = "7"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _key(path: Path) -> None:
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path))
    path.chmod(0o600)


def make_ca(directory: Path) -> tuple[Path, Path]:
    """A self-signed CA in ``directory``: ``(certificate, key)``."""
    directory.mkdir(parents=True, exist_ok=True)
    key, cert = directory / "ca-key.pem", directory / "ca-cert.pem"
    _key(key)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", _DAYS,
        "-subj", "/O=asyncmigfra rig/CN=asyncmigfra rig CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _issue(ca: tuple[Path, Path], directory: Path, role: str, name: str, address: str) -> None:
    key, csr, cert = (directory / f"{role}-{part}.pem" for part in ("key", "csr", "cert"))
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/O=rig/CN={name}")
    usage = "serverAuth" if role == "server" else "clientAuth"
    extensions = directory / f"{role}.ext"
    extensions.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n"
        f"subjectAltName=DNS:{name},IP:{address}\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", _DAYS, "-extfile", str(extensions),
    )  # fmt: skip
    csr.unlink()
    extensions.unlink()


def issue_host_certs(ca: tuple[Path, Path], directory: Path, name: str, address: str) -> None:
    """The server and client certificates of host ``name`` (reached at ``address``) and the
    CA certificate, in ``directory`` (the host's ``CERT_DIR`` seen from outside)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes(ca[0].read_bytes())
    for role in ("server", "client"):
        _issue(ca, directory, role, name, address)
