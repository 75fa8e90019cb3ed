"""TLS for the tests: a throwaway CA, server and client certificates made with ``openssl``, and
``redis-server`` processes serving TLS with them.

The server certificate is for the address ``127.0.0.1`` only (no DNS name), so the same server
reached as ``localhost`` fails the host name check; ``other_ca`` signed nothing the server has,
so a client trusting only it fails verification.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from redis_server import RedisServer, free_port

__all__ = ["TlsFiles", "TlsRedis", "make_tls_files", "start_tls_redis"]


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the test PKI's PEM files."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
        "-days", "2", "-subj", f"/CN=hvobs test {name}",
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, name: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(extensions + "\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request),
        "-subj", f"/CN=hvobs test {name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext_file),
    )  # fmt: skip
    return cert, key


def make_tls_files(directory: Path) -> TlsFiles:
    """Make a CA, a server certificate for ``127.0.0.1`` and a client certificate it signed,
    and another CA that signed nothing, in ``directory``."""
    ca = _ca(directory, "ca")
    other_ca, _ = _ca(directory, "other-ca")
    server = _signed(directory, "server", ca, "subjectAltName=IP:127.0.0.1")
    client = _signed(directory, "client", ca, "extendedKeyUsage=clientAuth")
    return TlsFiles(ca[0], other_ca, server[0], server[1], client[0], client[1])


@dataclass
class TlsRedis:
    """A ``redis-server`` with a plain port (for the tests' own checks) and a TLS port."""

    server: RedisServer
    tls_port: int
    files: TlsFiles

    def url(self, host: str = "127.0.0.1") -> str:
        """The ``rediss://`` URL of the TLS port, reached as ``host``."""
        return f"rediss://{host}:{self.tls_port}/0"


def start_tls_redis(files: TlsFiles, *, client_certs: bool = False) -> Iterator[TlsRedis]:
    """Run a TLS ``redis-server`` (requiring client certificates when ``client_certs``) for a
    fixture; skip when ``openssl``-made files are missing or the binary has no TLS."""
    tls_port = free_port()
    server = RedisServer(
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(files.server_cert),
        "--tls-key-file", str(files.server_key),
        "--tls-ca-cert-file", str(files.ca),
        "--tls-auth-clients", "yes" if client_certs else "no",
    )  # fmt: skip
    try:
        server.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS: {exc}")
        raise
    try:
        yield TlsRedis(server, tls_port, files)
    finally:
        server.close()


def openssl_available() -> bool:
    """Whether the ``openssl`` command is installed."""
    return shutil.which("openssl") is not None
