"""Test certificates for the DICOM TLS checks, made with the `openssl` command line tool.

The `cryptography` package is not in the venv, and `openssl` is what an admin would use too. Keys are
EC P-256 (fast to make; dcmtk's default BCP 195 profile negotiates ECDHE-ECDSA AES-GCM with them).
Made once per test session (a few hundred ms).

- a test CA;
- a server certificate for 127.0.0.1 / localhost (serverAuth), used by the node and the TLS MiniPACS;
- a client certificate (clientAuth), signed by the same CA;
- a "rogue" client certificate signed by another CA the node does not trust.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


@dataclass(frozen=True)
class CertSet:
    folder: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from an unknown CA
    rogue_key: Path

    def client_context(self, with_certificate: bool = True, rogue: bool = False) -> ssl.SSLContext:
        """A pynetdicom SCU context that trusts the test CA, optionally presenting a client certificate."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))
        if rogue:
            context.load_cert_chain(str(self.rogue_cert), str(self.rogue_key))
        elif with_certificate:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def server_context(self, require_client_certificate: bool = False) -> ssl.SSLContext:
        """A server context (the TLS MiniPACS) with the server certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_cert))
        context.load_cert_chain(str(self.server_cert), str(self.server_key))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
        return context


def _openssl(folder: Path, *args: str) -> None:
    done = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def _make_ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "3",
             "-subj", f"/CN={name}", "-extensions", "v3_ca", "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(folder, "req", "-new", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN=ihd-test-{name}")
    (folder / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        + extensions)
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "3", "-extfile", f"{name}.ext")


def make_test_certs(folder: Path) -> CertSet:
    folder.mkdir(parents=True, exist_ok=True)
    _make_ca(folder, "ca")
    _make_ca(folder, "rogue-ca")
    _make_leaf(folder, "server", "ca", "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
               "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _make_leaf(folder, "client", "ca", "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    _make_leaf(folder, "rogue", "rogue-ca", "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    return CertSet(folder, folder / "ca.crt", folder / "server.crt", folder / "server.key",
                     folder / "client.crt", folder / "client.key", folder / "rogue.crt", folder / "rogue.key")
