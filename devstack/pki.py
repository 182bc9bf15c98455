"""The throwaway keys, certificates and credentials of the secured stack (``up --secure``).

Made once per stack dir by the ``openssl`` command line (Debian's; the ``cryptography`` package
is not a dependency of the project), in a temporary folder renamed into place when complete, so
a crash half-way leaves nothing half-made. ``ensure(folder)`` is idempotent: a folder that is
complete is left alone (every ``up`` calls it; the first one pays ~0.3 s).

What it holds (``Material`` names every path):

- ``ca.pem`` / ``ca.key``: the private CA that signed everything below;
- ``server.pem`` / ``server.key``: the servers' certificate (SAN ``IP:127.0.0.1`` and
  ``DNS:localhost``, serverAuth), shared by Kafka, influx-s and consul-acl; ``server-keystore.pem``
  is key + certificate in one file, Kafka's PEM keystore;
- ``client.pem`` / ``client.key``: a client certificate (CN ``router``, clientAuth) whose key is
  encrypted (PKCS#8, AES-256) with the password in ``client-key.password``;
- ``other-ca.pem``: a second, unrelated CA that signed nothing here ("wrong CA" tests);
- ``*.password`` / ``*.token``: one random secret per user (Kafka SCRAM, InfluxDB, Consul ACL
  tokens), a file each, mode 0600, no trailing newline.

Keys are EC P-256: made in milliseconds, and read by every server and client of the stack
(Kafka's PEM keystore, Go's crypto/tls in InfluxDB and Consul, librdkafka, Python's ssl).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

DAYS = 3650  # a throwaway stack: the certificates never expire under a test
CLIENT_CN = "router"

# One random secret per file: 32 hex digits (safe in every config syntax), or a UUID
_PASSWORDS = (
    "kafka-admin.password",
    "kafka-router.password",
    "influx-s-admin.password",
    "influx-s-router.password",
    "client-key.password",
)
_TOKENS = (  # Consul ACL secret ids are UUIDs
    "consul-acl-bootstrap.token",
    "consul-acl-router.token",
    "consul-acl-denied.token",
)
_COMPLETE = ".complete"


class PkiError(Exception):
    """openssl is missing or refused a step. The message is one line."""


@dataclass(frozen=True)
class Material:
    """The paths of everything ``ensure`` makes in ``folder``."""

    folder: Path

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def ca(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def other_ca(self) -> Path:
        return self.folder / "other-ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def server_keystore(self) -> Path:
        return self.folder / "server-keystore.pem"

    @property
    def client_cert(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def client_key_password(self) -> Path:
        return self.folder / "client-key.password"

    def secret(self, name: str) -> str:
        """The value of one of the ``*.password`` / ``*.token`` files."""
        return (self.folder / name).read_text()

    def fingerprint(self) -> str:
        """Changes when the material is made again (a new CA): servers started with the old
        files are then stale and restarted."""
        return (self.folder / _COMPLETE).read_text().strip()


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise PkiError("openssl not found on PATH (Debian package openssl)")
    res = subprocess.run(
        [openssl, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise PkiError(f"openssl {args[0]} failed: {tail[0]}")


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)


def _make_ca(tmp: Path, name: str, cn: str) -> None:
    _openssl(
        "req", "-x509", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", str(DAYS),
        "-subj", f"/O=failover-router devstack/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        cwd=tmp,
    )  # fmt: skip


def _make_leaf(tmp: Path, name: str, cn: str, extensions: list[str]) -> None:
    """``name.key`` (PKCS#8, plain) and ``name.pem`` signed by ``ca``."""
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/O=failover-router devstack/CN={cn}",
        cwd=tmp,
    )  # fmt: skip
    (tmp / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(DAYS), "-sha256",
        "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        cwd=tmp,
    )  # fmt: skip
    (tmp / f"{name}.csr").unlink()
    (tmp / f"{name}.ext").unlink()


def _generate(tmp: Path) -> None:
    for name in _PASSWORDS:
        _write_secret(tmp / name, secrets.token_hex(16))  # [0-9a-f]: safe in every config
    for name in _TOKENS:
        _write_secret(tmp / name, str(uuid.uuid4()))
    _make_ca(tmp, "ca", "failover-router devstack CA")
    _make_ca(tmp, "other-ca", "unrelated CA")
    (tmp / "other-ca.key").unlink()  # nobody signs with it
    common = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
    ]
    _make_leaf(
        tmp,
        "server",
        "localhost",
        [
            *common,
            "extendedKeyUsage=serverAuth,clientAuth",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
    )
    _make_leaf(tmp, "client", CLIENT_CN, [*common, "extendedKeyUsage=clientAuth"])
    _openssl(
        "pkcs8", "-topk8", "-in", "client.key", "-out", "client-enc.key",
        "-v2", "aes-256-cbc", "-passout", "file:client-key.password",
        cwd=tmp,
    )  # fmt: skip
    (tmp / "client-enc.key").replace(tmp / "client.key")
    keystore = (tmp / "server.key").read_text() + (tmp / "server.pem").read_text()
    _write_secret(tmp / "server-keystore.pem", keystore)
    for key in ("ca.key", "server.key", "client.key"):
        (tmp / key).chmod(0o600)
    (tmp / _COMPLETE).write_text(f"{secrets.token_hex(8)}\n")


def ensure(folder: Path) -> Material:
    """The material in ``folder``, made first if it is not complete. Two processes calling it
    at once (``devstack up`` and a test session) make it once: the second waits for a lock."""
    material = Material(folder)
    if (folder / _COMPLETE).exists():
        return material
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / f".{folder.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / _COMPLETE).exists():
            return material
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            _generate(tmp)
            if folder.exists():  # an incomplete folder from a crash: made again as a whole
                shutil.rmtree(folder)
            tmp.replace(folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return material
