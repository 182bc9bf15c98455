"""The router's HTTP face: /metrics, /healthz, /readyz, /api/status and the status page.

``/healthz`` answers 503 with a one-line reason when the router needs a restart (see
``router.status.health_problems``), else 200 ``ok``, followed by a warning worth a look (a stalled
destination, a rebuild waiting for an old consumer) if there is one. ``/readyz`` answers 200
``ready`` once the replica holds its partitions (``Router.readiness``), else 503 ``not ready:
<why>``. Every answer is built from snapshots: none waits on a thread that talks to Kafka or
InfluxDB. No answer holds a secret: ``/api/status`` and ``/healthz`` are scrubbed
(``router.secrets.scrub``) before they are sent, and ``/metrics`` labels are names only (route,
cluster, topic, outcome).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.events import RECENT
from router.metrics import Metrics
from router.secrets import scrub
from router.status import one_line


class Observable(Protocol):
    metrics: Metrics

    def readiness(self) -> str: ...
    def health(self) -> tuple[str, list[str]]: ...
    def status(self) -> dict[str, Any]: ...


def _drop_partitions(body: dict[str, Any]) -> None:
    """The per-partition tables only on demand (``/api/status?partitions``): they grow with
    partitions x destinations, and the page asks for them only while one is open."""
    for route in body.get("routes", ()):
        for dest in route.get("destinations", ()):
            dest.pop("partitions", None)


def _page() -> bytes:
    return files("router").joinpath("static/status.html").read_bytes()


class StatusServer:
    """Binds at construction (so the port is known before the router starts); ``router`` is
    attached before ``start``."""

    def __init__(self, listen: str, router: Observable | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.router = router
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return  # access logs would drown the events

            def do_GET(self) -> None:
                outer.handle(self)

        self._server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        path, _, query = req.path.partition("?")
        r = self.router
        if r is None:
            self._send(req, 503, b"starting\n", "text/plain")
            return
        if path == "/metrics":
            self._send(req, 200, generate_latest(r.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            problem, warnings = r.health()
            problem, warnings = scrub(problem), [scrub(w) for w in warnings]
            if problem:
                self._send(req, 503, f"{problem}\n".encode(), "text/plain; charset=utf-8")
            else:
                note = f"; {one_line(warnings)}" if warnings else ""
                self._send(req, 200, f"ok{note}\n".encode(), "text/plain; charset=utf-8")
        elif path == "/readyz":
            why = r.readiness()
            if why:
                self._send(req, 503, f"not ready: {why}\n".encode(), "text/plain; charset=utf-8")
            else:
                self._send(req, 200, b"ready\n", "text/plain; charset=utf-8")
        elif path == "/api/status":
            body = {**r.status(), "events": RECENT.snapshot()[-50:]}
            if "partitions" not in parse_qs(query, keep_blank_values=True):
                _drop_partitions(body)
            # every reason and event is scrubbed where it is made; this is the last net
            self._send(req, 200, scrub(json.dumps(body)).encode(), "application/json")
        elif path in ("/", "/index.html"):
            self._send(req, 200, _page(), "text/html; charset=utf-8")
        else:
            self._send(req, 404, b"not found\n", "text/plain")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        req.send_response(code)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Cache-Control", "no-store")
        req.end_headers()
        req.wfile.write(body)
