"""The discarding sink of the benchmarks: an InfluxDB stand-in that reads and drops every write.

Run as its own process (``python -m scripts.bench.sink --impl asyncio|threaded``), so its CPU is
measured apart from the router's and from the bench's own; it prints its port on stdout, then
serves until stdin closes (the bench that started it went away) or SIGTERM.

Every request is answered 204 with no body: ``GET /ping`` (the health probe), ``POST
[/label]/write`` (a router's or the ceiling's write; ``label`` names the writer, so several
routers can share one sink). Two control requests:

- ``POST /_bench/watch`` with ``{"pids": {"label": pid, ...}, "hold": n}``: the processes
  whose CPU (``/proc/<pid>/stat``, user + system) is sampled at every write from now on; it
  forgets every write counted so far; ``hold`` > 0 holds the answers back until every label has
  ``n`` writes waiting, then answers them all at once (``Stats``);
- ``GET /_bench/stats``: what was counted, as JSON (``Stats.as_json``).

At each write the sink notes, per label, the time the request began (its headers read) and
ended (its body read), and once over all labels: the first write's beginning and the last
write's end, and at those two moments the CPU time of every watched process and of the sink
itself. Lines are counted (the body's newlines) when the body is not compressed.

``asyncio`` is one event loop with a hand-written HTTP/1.1 reader (Content-Length bodies only,
keep-alive), cheap enough not to be the bottleneck; ``threaded`` is ``http.server``'s
``ThreadingHTTPServer``, kept to show what the standard library's server costs.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
_CONTROL = "/_bench/"
HOLD_TIMEOUT = 10.0  # seconds a hold waits for every label at most (a router's write_timeout
# must be longer: the bench's scale runs set 60 s)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (every thread), from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class _Writer:
    requests: int = 0
    bytes: int = 0
    lines: int = 0  # of uncompressed bodies only
    compressed: int = 0  # requests whose body was compressed (lines not counted)
    held: int = 0  # requests held until the release (``hold``)
    t_first: float = 0.0  # monotonic: the first write began (or the release)
    t_last: float = 0.0  # monotonic: the last write ended


Answer = Callable[[], None]


@dataclass
class Stats:
    """What the sink counted since the last ``watch``; one lock around it.

    With ``hold`` > 0 the answers to writes are held back until every watched label has
    ``hold`` writes waiting (or ``HOLD_TIMEOUT`` after the first one): then all are answered at
    once, and that moment counts as the first write of every label. Several routers whose
    drains were lifted a few hundred milliseconds apart thus start writing at the same instant.
    """

    pids: dict[str, int] = field(default_factory=dict)
    writers: dict[str, _Writer] = field(default_factory=dict)
    t_first: float = 0.0
    t_last: float = 0.0
    cpu_first: dict[str, float] = field(default_factory=dict)  # label -> CPU at the first write
    cpu_last: dict[str, float] = field(default_factory=dict)  # label -> CPU at the last write
    own_first: float = 0.0
    own_last: float = 0.0
    hold: int = 0
    released: str = ""  # "all" | "timeout" once a hold was released
    waiting: list[Answer] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    generation: int = 0

    def watch(self, pids: dict[str, int], hold: int = 0) -> None:
        with self.lock:
            self.pids = dict(pids)
            self.writers = {}
            self.t_first = self.t_last = 0.0
            self.cpu_first, self.cpu_last = {}, {}
            self.own_first = self.own_last = 0.0
            self.hold, self.released = hold, ""
            waiting, self.waiting = self.waiting, []
            self.generation += 1
        for answer in waiting:  # a previous hold never released: let those writes go
            answer()

    def _cpus(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, pid in self.pids.items():
            try:
                out[label] = cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                continue  # that process has gone: its last sample stays
        return out

    def _holding(self) -> bool:
        return self.hold > 0 and not self.released

    def began(self, label: str, now: float) -> None:
        """A write's headers were read."""
        with self.lock:
            w = self.writers.get(label)
            if w is None:
                self.writers[label] = w = _Writer(t_first=now)
            if not self.t_first and not self._holding():
                self.t_first = now
                self.cpu_first = self._cpus()
                self.own_first = _own_cpu()

    def ended(
        self, label: str, now: float, *, size: int, lines: int, compressed: bool, answer: Answer
    ) -> None:
        """A write's body was read (and is dropped); ``answer`` sends its 204, now or at the
        release of a hold."""
        release: list[Answer] = []
        with self.lock:
            w = self.writers[label]
            w.requests += 1
            w.bytes += size
            if compressed:
                w.compressed += 1
            else:
                w.lines += lines
            if self._holding():
                w.held += 1
                self.waiting.append(answer)
                if len(self.waiting) == 1:
                    generation = self.generation
                    timer = threading.Timer(HOLD_TIMEOUT, self._overdue, (generation,))
                    timer.daemon = True
                    timer.start()
                held = {k: v.held for k, v in self.writers.items()}
                if all(held.get(k, 0) >= self.hold for k in self.pids):
                    release = self._release("all")
            else:
                w.t_last = now
                self.t_last = now
                self.cpu_last.update(self._cpus())
                self.own_last = _own_cpu()
                release = [answer]
        for send in release:
            send()

    def _release(self, why: str) -> list[Answer]:
        """Under the lock: the hold ends now; returns the answers to send."""
        now = time.monotonic()
        self.released = why
        self.t_first = self.t_last = now
        self.cpu_first = self._cpus()
        self.cpu_last = dict(self.cpu_first)
        self.own_first = self.own_last = _own_cpu()
        for w in self.writers.values():
            w.t_first = w.t_last = now
        waiting, self.waiting = self.waiting, []
        return waiting

    def _overdue(self, generation: int) -> None:
        with self.lock:
            if generation != self.generation or not self._holding() or not self.waiting:
                return
            release = self._release("timeout")
        for send in release:
            send()

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "t_first": self.t_first,
                "t_last": self.t_last,
                "cpu_first": dict(self.cpu_first),
                "cpu_last": dict(self.cpu_last),
                "own_first": self.own_first,
                "own_last": self.own_last,
                "own_now": _own_cpu(),
                "released": self.released,
                "writers": {k: vars(w) for k, w in self.writers.items()},
            }


def _label(path: str) -> str | None:
    """``/r0/write?db=x`` -> ``r0``; ``/write`` -> ``-``; not a write -> None."""
    path = path.split("?", 1)[0]
    for suffix in ("/write", "/api/v2/write"):
        if path.endswith(suffix):
            return path[: -len(suffix)].strip("/") or "-"
    return None


def _control(stats: Stats, method: str, path: str, body: bytes) -> bytes:
    """Answer a ``/_bench/`` request: the whole HTTP response."""
    if method == "POST" and path == "/_bench/watch":
        doc = json.loads(body or b"{}")
        pids = {str(k): int(v) for k, v in doc.get("pids", {}).items()}
        stats.watch(pids, int(doc.get("hold", 0)))
        return _NO_CONTENT
    if method == "GET" and path == "/_bench/stats":
        doc = json.dumps(stats.as_json()).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(doc)}\r\n\r\n"
        )
        return head.encode() + doc
    return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class _Connection(asyncio.Protocol):
    """One keep-alive connection: requests with Content-Length bodies, one after another."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = 0  # body bytes still to read of the current request (-1: reading headers)
        self.reset()

    def reset(self) -> None:
        self.need = -1
        self.method = self.path = ""
        self.label: str | None = None
        self.size = self.lines = 0
        self.compressed = False
        self.body = bytearray()  # control requests only

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.need > 0 and not self.buf:  # the usual case: a slice of a body, no copy
            take = min(self.need, len(data))
            self._body(data, take)
            if take == len(data):
                return
            data = data[take:]
        self.buf += data
        while self.buf:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head(bytes(self.buf[:end]))
                del self.buf[: end + 4]
                if self.need == 0:
                    self._done()
                continue
            take = min(self.need, len(self.buf))
            self._body(self.buf, take)
            del self.buf[:take]

    def _answer(self) -> Answer:
        """Sends this request's 204: at once from the loop's thread, else through the loop."""
        transport, loop = self.transport, asyncio.get_running_loop()
        assert transport is not None
        here = threading.get_ident()

        def send() -> None:
            if threading.get_ident() == here:
                transport.write(_NO_CONTENT)
            else:
                loop.call_soon_threadsafe(transport.write, _NO_CONTENT)

        return send

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        self.method, self.path = parts[0].decode(), parts[1].decode()
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value)
            elif key == b"content-encoding":
                self.compressed = value.strip().lower() != b"identity"
        self.need = length
        self.label = _label(self.path) if self.method == "POST" else None
        if self.label is not None:
            self.stats.began(self.label, time.monotonic())

    def _body(self, data: bytes | bytearray, n: int) -> None:
        """The first ``n`` bytes of ``data`` belong to the current body."""
        self.size += n
        self.need -= n
        if self.label is not None:
            if not self.compressed:
                self.lines += data.count(b"\n", 0, n)
        elif self.path.startswith(_CONTROL):
            self.body += data[:n]
        if self.need == 0:
            self._done()

    def _done(self) -> None:
        assert self.transport is not None
        if self.label is not None:
            self.stats.ended(
                self.label,
                time.monotonic(),
                size=self.size,
                lines=self.lines,
                compressed=self.compressed,
                answer=self._answer(),
            )
        elif self.path.startswith(_CONTROL):
            self.transport.write(_control(self.stats, self.method, self.path, bytes(self.body)))
        else:
            self.transport.write(_NO_CONTENT)  # /ping, /health, anything else
        self.reset()


def _serve_asyncio(stats: Stats, ready: threading.Event, port: list[int]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(stats), "127.0.0.1", 0, backlog=256)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        await asyncio.Event().wait()  # until the process ends

    asyncio.run(main())


def _serve_threaded(stats: Stats, ready: threading.Event, port: list[int]) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _answer(self) -> None:
            label = _label(self.path) if self.command == "POST" else None
            if label is not None:
                stats.began(label, time.monotonic())
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            if label is not None:
                encoding = (self.headers.get("Content-Encoding") or "identity").lower()
                compressed = encoding != "identity"
                lines = 0 if compressed else body.count(b"\n")
                answered = threading.Event()
                stats.ended(
                    label,
                    time.monotonic(),
                    size=n,
                    lines=lines,
                    compressed=compressed,
                    answer=answered.set,
                )
                answered.wait()
                self.wfile.write(_NO_CONTENT)
            elif self.path.startswith(_CONTROL):
                self.wfile.write(_control(stats, self.command, self.path, body))
            else:
                self.wfile.write(_NO_CONTENT)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port.append(int(server.server_address[1]))
    ready.set()
    server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--impl", choices=("asyncio", "threaded"), default="asyncio")
    args = ap.parse_args()
    stats = Stats()
    ready = threading.Event()
    port: list[int] = []
    serve = _serve_asyncio if args.impl == "asyncio" else _serve_threaded
    threading.Thread(target=serve, args=(stats, ready, port), daemon=True).start()
    if not ready.wait(10):
        raise SystemExit("sink: did not start")
    print(port[0], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sys.stdin.read()  # EOF: the bench that started us has gone


if __name__ == "__main__":
    main()
