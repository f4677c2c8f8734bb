"""Fixtures: a real redis-server, certificates made in the test (openssl CLI), the swaserve CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.redis_server import RedisServer
from tests.router.conftest import model_dir, toy  # noqa: F401  (fixtures: the SmolLM2 tokenizer's dir, the fakes' model)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def swaserve(*args: str) -> subprocess.CompletedProcess[str]:
    """`swaserve ARGS` in a fresh process (the installed CLI's entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "swaserve", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def add_key(*where: str, name: str, rpm: int = 0, tpm: int = 0) -> str:
    """`swaserve keys add WHERE --name NAME`: the key it printed last."""
    out = swaserve("keys", "add", *where, "--name", name, "--rpm", str(rpm), "--tpm", str(tpm))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA every service trusts
    server_cert: Path  # SANs: localhost, 127.0.0.1, swaserve-internal
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # an unrelated CA (its own client cert: other_client_*)
    other_client_cert: Path
    other_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "1", "-subj", f"/CN={name}",
             cwd=d)  # fmt: skip


def _leaf(d: Path, name: str, ca: str, sans: str, usage: str) -> None:
    (d / f"{name}.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage={usage}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext",
             cwd=d)  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server and a client certificate it signed, and a second CA with its own client."""
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "DNS:localhost,IP:127.0.0.1,DNS:swaserve-internal", "serverAuth,clientAuth")
    _leaf(d, "client", "ca", "DNS:swaserve-client", "clientAuth")
    _leaf(d, "other-client", "other-ca", "DNS:swaserve-client", "clientAuth")
    return Certs(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
        d / "other-ca.pem", d / "other-client.pem", d / "other-client.key",
    )  # fmt: skip
