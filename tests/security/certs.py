"""A throwaway PKI for the TLS tests, made with the ``openssl`` command line.

One CA signs a server certificate for ``127.0.0.1``/``localhost`` and client certificates
(``agent``, ``scheduler``, ``intruder``, ...); a second, unrelated CA ("rogue") signs a client
certificate the broker must refuse. Keys are EC P-256 (instant to make, unlike RSA), every
certificate is valid for two days, and every key file is mode 0600, as in production.

The ``cryptography`` package is not a dependency of this project, and the ``openssl`` binary is
on every machine that has mosquitto, so the command line it is.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KeyPair", "Pki", "make_pki"]

DAYS = "2"
CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Pki:
    directory: Path
    ca: Path
    server: KeyPair
    #: Client certificates by name (signed by ``ca``).
    clients: dict[str, KeyPair]
    #: A CA nobody trusts, and a client certificate it signed.
    rogue_ca: Path
    rogue_client: KeyPair


def _openssl(*args: str | Path, cwd: Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise FileNotFoundError("openssl")
    subprocess.run([binary, *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *CURVE, "-keyout", pair.key, "-out", pair.cert, "-days", DAYS,
        "-subj", f"/O=asyncmigfra tests/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    pair.key.chmod(0o600)
    return pair


def _leaf(directory: Path, ca: KeyPair, name: str, *, server: bool) -> KeyPair:
    pair = KeyPair(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature"]
    if server:
        lines += ["extendedKeyUsage=serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    else:
        lines += ["extendedKeyUsage=clientAuth"]
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-new", *CURVE, "-keyout", pair.key, "-out", csr,
        "-subj", f"/O=asyncmigfra tests/CN={name}", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-out", pair.cert, "-days", DAYS, "-extfile", ext, cwd=directory,
    )  # fmt: skip
    pair.key.chmod(0o600)
    csr.unlink()
    ext.unlink()
    return pair


def make_pki(directory: Path, clients: tuple[str, ...]) -> Pki:
    """Make the CA, the server certificate and one client certificate per name."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    rogue = _ca(directory, "rogue-ca")
    return Pki(
        directory=directory,
        ca=ca.cert,
        server=_leaf(directory, ca, "server", server=True),
        clients={name: _leaf(directory, ca, name, server=False) for name in clients},
        rogue_ca=rogue.cert,
        rogue_client=_leaf(directory, rogue, "rogue-client", server=False),
    )
