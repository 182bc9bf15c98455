"""Certificates made as the secured devstack makes them (in a temporary folder), and small
HTTPS servers on 127.0.0.1 that answer like InfluxDB (``/ping``, ``/health``, ``/write``) or
capture what a client sent (Consul's ``X-Consul-Token``). Real TLS, in process: no mock of
``ssl``."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from devstack.pki import Material, ensure

KEY_PASSWORD = "key-pass-4711"


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is needed to make test certificates"
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pki(Material):
    """The secured devstack's material (``devstack.pki.ensure``: a CA, a server certificate for
    127.0.0.1/localhost, a client certificate, a second CA that signed none of these), with
    the client key both plain (``client_key``: unlike ``Material.client_key``, which is
    encrypted with ``client_key_password``) and encrypted with ``KEY_PASSWORD``
    (``client_key_encrypted``)."""

    @property
    def client_key(self) -> Path:
        return self.folder / "client-plain.key"

    @property
    def client_key_encrypted(self) -> Path:
        return self.folder / "client-enc.key"


def make_pki(folder: Path) -> Pki:
    ensure(folder)
    _openssl(
        "pkey", "-in", "client.key", "-passin", "file:client-key.password",
        "-out", "client-plain.key",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "pkey", "-in", "client-plain.key", "-aes256", "-passout", f"pass:{KEY_PASSWORD}",
        "-out", "client-enc.key",
        cwd=folder,
    )  # fmt: skip
    return Pki(folder)


@dataclass
class Seen:
    """What the server received: one (method, path, headers) per request."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


Answer = Callable[[str, str], tuple[int, bytes]]  # (method, path) -> (status, body)


def influx_answer(method: str, path: str) -> tuple[int, bytes]:
    """InfluxDB 1.x's answers to a ping, a health check and a write."""
    if path.startswith("/ping"):
        return 204, b""
    if path.startswith("/health"):
        return 200, json.dumps({"status": "pass"}).encode()
    if method == "POST" and path.startswith(("/write", "/api/v2/write")):
        return 204, b""
    return 404, b"{}"


@contextmanager
def https_server(
    pki: Pki,
    answer: Answer = influx_answer,
    *,
    client_ca: Path | None = None,
    tls: bool = True,
    host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> Iterator[tuple[str, Seen]]:
    """An HTTP(S) server on ``host`` (loopback) with the server certificate of ``pki``; with
    ``client_ca`` it requires a client certificate signed by that CA; ``headers`` go with every
    answer. Yields (base URL, seen)."""
    seen = Seen()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen.requests.append((self.command, self.path, dict(self.headers)))
            status, body = answer(self.command, self.path)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/json")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815 (http.server's names)

    server = ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        if client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(client_ca)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    try:
        yield f"{scheme}://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
