"""A throwaway CA and a server certificate for 127.0.0.1 / localhost, made with `openssl`."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA clients trust, and the certificate and key servers present."""

    ca: Path
    cert: Path
    key: Path

    def server(self) -> dict[str, Any]:
        """Settings of a service that serves TLS and trusts the CA as a client."""
        return {"tls_cert": self.cert, "tls_key": self.key, "tls_ca": self.ca}

    def client(self) -> dict[str, Any]:
        """Settings of a client that trusts the CA."""
        return {"tls_ca": self.ca}


def make_tls_files(root: Path) -> TlsFiles:
    """A fresh CA under `root` and a server certificate it signed, valid for 127.0.0.1 and
    localhost."""
    root.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(root / "ca.pem", root / "server.pem", root / "server.key")
    ca_key, csr, ext = root / "ca.key", root / "server.csr", root / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", files.ca,
         "-days", "1", "-subj", "/CN=roundhouse-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.key, "-out", csr,
         "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", files.ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", files.cert, "-days", "1", "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return files
