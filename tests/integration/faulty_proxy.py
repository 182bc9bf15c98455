"""A tiny reverse proxy in front of one real InfluxDB that breaks its first write answer.

The router's sink talks httpx. A ``Content-Encoding: gzip`` answer whose body is not gzip makes
httpx raise ``httpx.DecodingError`` while it reads the response inside ``Client.post``: that
exception is an ``httpx.RequestError`` but not an ``httpx.TransportError``, so it is none of the
failures the sink sorts (timeout, transport error, invalid URL, an HTTP status) and escapes
``InfluxSink.write`` as it is. The answer is a 200 (InfluxDB answers 204, but a 204 carries no
body by definition: the client would never read the broken bytes), and the broken write is NOT
forwarded, so its points reach InfluxDB only if the router writes that batch again.

Every other request (/ping, /query, later /write) is forwarded unchanged, one upstream
connection per request, on a thread of its own (``ThreadingHTTPServer``).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

BROKEN_BODY = b"this body is not gzip"
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "date",  # send_response writes its own Date and Server
        "server",
    }
)


class FaultyInfluxProxy:
    """``url`` forwards to ``upstream``; the first ``faulty_writes`` /write answers are broken."""

    def __init__(self, upstream: str, *, faulty_writes: int = 1) -> None:
        parts = urlsplit(upstream)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._lock = threading.Lock()
        self._faults_left = faulty_writes
        self.broken: list[str] = []  # request lines answered with the broken body
        self.forwarded = 0
        self.writes_forwarded = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as InfluxDB does

            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                outer._handle(self)

            def do_POST(self) -> None:
                outer._handle(self)

            def do_HEAD(self) -> None:
                outer._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="faulty-proxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultyInfluxProxy:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _take_fault(self, path: str) -> bool:
        if not path.split("?", 1)[0].endswith("/write"):
            return False
        with self._lock:
            if self._faults_left <= 0:
                return False
            self._faults_left -= 1
            return True

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        length = int(req.headers.get("Content-Length") or 0)
        body = req.rfile.read(length) if length else b""
        if self._take_fault(req.path):
            with self._lock:
                self.broken.append(req.requestline)
            req.send_response(200)
            req.send_header("Content-Type", "application/json")
            req.send_header("Content-Encoding", "gzip")
            req.send_header("Content-Length", str(len(BROKEN_BODY)))
            req.end_headers()
            req.wfile.write(BROKEN_BODY)
            return
        headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        try:
            conn.request(req.command, req.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            status, reason, answer_headers = resp.status, resp.reason, resp.getheaders()
        except OSError as exc:  # upstream down: answer like a gateway would
            status, reason, answer_headers = 502, "Bad Gateway", []
            payload = f"upstream unreachable: {exc}".encode()
        finally:
            conn.close()
        with self._lock:
            self.forwarded += 1
            if req.path.split("?", 1)[0].endswith("/write") and status in (200, 204):
                self.writes_forwarded += 1
        req.send_response(status, reason)
        for key, value in answer_headers:
            if key.lower() not in _HOP_BY_HOP:
                req.send_header(key, value)
        if status not in (204, 304) and req.command != "HEAD":
            req.send_header("Content-Length", str(len(payload)))
            req.end_headers()
            req.wfile.write(payload)
        else:
            req.end_headers()
