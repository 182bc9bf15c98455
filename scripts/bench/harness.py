"""What every part of the benchmark uses: /proc readings, the Kafka backlog, the topology, the
router processes, the discarding sink's process and the direct-write ceiling.

Nothing here asserts a figure; a step that cannot happen (a router that does not become ready,
a group that does not commit to the end in time) ends the run with ``SystemExit`` and says why.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from devstack import stack
from router.errors import SourceError
from router.kafka import KafkaAdmin
from router.topology import BatchConfig, ClusterConfig
from scripts.bench.sink import cpu_seconds

# The route's batch settings are the product's defaults: the bench measures what ships.
BATCH = BatchConfig()
BASE_TS = 1_700_000_000_000_000_000
SERIES = 1000  # distinct ``host`` tags per measurement


def note(text: str) -> None:
    """Progress, on stderr (stdout carries only the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def load() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the process started) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    """Samples a process's RSS every 0.2 s; ``phase(name)`` starts a new series of samples."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: dict[str, list[float]] = {}
        self._current: list[float] = []
        self._halt = threading.Event()

    def phase(self, name: str) -> None:
        self._current = self.samples.setdefault(name, [])

    def peak(self, name: str) -> float:
        return max(self.samples.get(name) or [0.0])

    def run(self) -> None:
        while not self._halt.wait(0.2):
            try:
                self._current.append(rss_mib(self.pid))
            except OSError:
                return

    def stop(self) -> None:
        self._halt.set()


# --- compression and the topology ----------------------------------------------------------


@dataclass(frozen=True)
class Compression:
    """A cluster's request-body compression: ``none`` or ``gzip`` at a level (1..9)."""

    kind: str  # "none" | "gzip"
    level: int = 1

    @classmethod
    def parse(cls, text: str) -> Compression:
        """``none``, ``gzip`` (level 1) or ``gzip:N``."""
        kind, _, level = text.partition(":")
        if kind not in ("none", "gzip") or (kind == "none" and level):
            raise ValueError(f"compression {text!r}: use none, gzip or gzip:1..9")
        n = int(level) if level else 1
        if not 1 <= n <= 9:
            raise ValueError(f"compression {text!r}: the level is 1..9")
        return cls(kind, n)

    @classmethod
    def default(cls) -> Compression:
        """What a cluster that names no compression gets (the topology's default)."""
        fields = ClusterConfig.model_fields
        if "compression" in fields:
            return cls(str(fields["compression"].default), int(fields["compression_level"].default))
        return cls("gzip" if fields["gzip"].default else "none")  # the older ``gzip: bool``

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"gzip:{self.level}"

    def encode(self, body: bytes) -> bytes:
        if self.kind == "gzip":
            return gzip.compress(body, compresslevel=self.level, mtime=0)
        return body


def cluster_doc(url: str, database: str, compression: Compression) -> dict[str, Any]:
    """One cluster of the bench's topology. The only place that spells compression."""
    doc: dict[str, Any] = {"urls": [url], "database": database}
    if "compression" in ClusterConfig.model_fields:
        doc["compression"] = compression.kind
        doc["compression_level"] = compression.level
    else:  # the older topology: ``gzip: true|false`` (level 1 in the sink)
        doc["gzip"] = compression.kind == "gzip"
    return doc


def topology(
    env: Env,
    topic: str,
    tag: str,
    cluster: dict[str, Any],
    *,
    port: int,
    drain: bool = False,
    guard: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A mirror route of one cluster (``influx-a``) reading ``topic``; groups ``bench-{tag}.*``."""
    route: dict[str, Any] = {
        "name": "bench",
        "topics": [topic],
        "mode": "mirror",
        "clusters": ["influx-a"],
        "batch": {
            "max_points": BATCH.max_points,
            "max_bytes": BATCH.max_bytes,
            "linger": f"{BATCH.linger * 1000:g}ms",
            "max_in_flight": BATCH.max_in_flight,
        },
    }
    if guard is not None:
        route["guard"] = guard
    return {
        "datacenter": "bench",
        "kafka": {
            "bootstrap": env.kafka,
            "group_prefix": f"bench-{tag}",
            "dead_letter_topic": f"{topic}.dead-letter",
            **({"client_config": dict(env.client_config)} if env.client_config else {}),
        },
        "clusters": {"influx-a": {**cluster, "drain": drain}},
        "routes": [route],
        "health": {"interval": "1s", "timeout": "2s", "fall": 3, "rise": 2},
        "http": {"listen": f"127.0.0.1:{port}"},
    }


def stack_pid(name: str) -> int:
    """The pid of one of the stack's servers (``kafka``, ``influx-a``, ...)."""
    return int((stack.stack_dir() / "run" / f"{name}.pid").read_text().strip())


def settle(names: tuple[str, ...], quiet: float = 0.1, limit: float = 30.0) -> None:
    """Wait (at most ``limit`` s) until the named servers together use less than ``quiet`` of
    a core over half a second: Kafka flushing a backlog just produced, or InfluxDB compacting
    what the previous run wrote, would otherwise be measured with the next run."""
    pids = [stack_pid(n) for n in names]
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = sum(cpu_seconds(p) for p in pids)
        time.sleep(0.5)
        if sum(cpu_seconds(p) for p in pids) - before < quiet * 0.5:
            return
    note(f"  {', '.join(names)} still busy after {limit:.0f} s; measuring anyway")


# --- Kafka: topics, the backlog, commits ----------------------------------------------------


@dataclass
class Env:
    """The stack's endpoints and one Kafka admin of each kind."""

    endpoints: dict[str, str]
    partitions: int
    client_config: dict[str, str] = field(default_factory=dict)  # the routers' kafka settings
    admin: KafkaAdmin = field(init=False)
    kadmin: AdminClient = field(init=False)

    def __post_init__(self) -> None:
        self.admin = KafkaAdmin({"bootstrap.servers": self.kafka})
        self.kadmin = AdminClient({"bootstrap.servers": self.kafka})

    @property
    def kafka(self) -> str:
        return self.endpoints["KAFKA_BOOTSTRAP"]

    @property
    def database(self) -> str:
        return self.endpoints["INFLUX_DATABASE"]


def new_topic(env: Env) -> tuple[str, str]:
    """A fresh data topic and its dead-letter topic; returns (topic, tag)."""
    tag = uuid.uuid4().hex[:8]
    topic = f"bench.{tag}"
    futures = env.kadmin.create_topics(
        [NewTopic(topic, env.partitions, 1), NewTopic(f"{topic}.dead-letter", 1, 1)]
    )
    for future in futures.values():
        future.result(15)
    return topic, tag


def lines_of(measurement: str, first: int, count: int) -> list[bytes]:
    """Points ``first`` .. ``first+count-1`` as line protocol: ``SERIES`` series of one
    measurement, every timestamp distinct (so InfluxDB stores each one)."""
    m = measurement.encode()
    return [
        b"%s,host=h%03d value=%di %d" % (m, i % SERIES, i, BASE_TS + i)
        for i in range(first, first + count)
    ]


def produce(env: Env, topic: str, points: int, lines: int, measurement: str) -> float:
    """``points`` points, ``lines`` per Kafka message, round-robin over the partitions, as fast
    as the producer goes (big lz4 batches); progress on stderr. Returns the seconds it took."""
    producer = Producer(
        {
            "bootstrap.servers": env.kafka,
            "linger.ms": 100,
            "batch.size": 1_000_000,
            "batch.num.messages": 100_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
            "compression.type": "lz4",
        }
    )
    started = time.monotonic()
    step = max(points // 10, 1_000_000)
    shown = 0
    msg = 0
    chunk = 20_000 - 20_000 % lines  # points generated at once
    for first in range(0, points, chunk):
        block = lines_of(measurement, first, min(chunk, points - first))
        for k in range(0, len(block), lines):
            body = b"\n".join(block[k : k + lines])
            while True:
                try:
                    producer.produce(topic, body, partition=msg % env.partitions)
                    break
                except BufferError:
                    producer.poll(0.05)
            msg += 1
        producer.poll(0)
        done = first + len(block)
        if done - shown >= step and done < points:
            shown = done
            secs = time.monotonic() - started
            note(f"  produced {done:,}/{points:,} points ({done / secs:,.0f}/s)")
    if producer.flush(600) != 0:
        raise SystemExit(f"producing to {topic}: messages left undelivered after 600 s")
    secs = time.monotonic() - started
    note(f"  produced {points:,} points in {secs:.1f} s ({points / secs:,.0f}/s)")
    return secs


class CommitWatch:
    """Polls a destination group's committed offsets (every 0.1 s) until they reach the end of
    the topic, noting when they first moved and when they got there, and the CPU time of the
    given processes at both moments: the first->last write span of a sink that records nothing
    itself (InfluxDB), to within the poll interval."""

    def __init__(self, env: Env, group: str, topic: str, lines: int) -> None:
        self.env, self.group, self.lines = env, group, lines
        self.tps = [(topic, p) for p in range(env.partitions)]
        self.end = sum(w.high for w in env.admin.watermarks(self.tps).values())
        self.base = self._committed()
        self.t_first = self.t_last = 0.0
        self.points_moved = 0  # points committed between the two moments
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}

    def _committed(self) -> int:
        """The sum of the committed offsets; retried a while on a transient error of a fresh
        group (``NOT_COORDINATOR``, ``COORDINATOR_LOAD_IN_PROGRESS``)."""
        for attempt in range(50):
            try:
                offsets = self.env.admin.committed(self.group, self.tps)
            except SourceError:
                if attempt == 49:
                    raise
                time.sleep(0.2)
                continue
            return sum(max(o, 0) for o in offsets.values())
        raise AssertionError("unreachable")

    def wait(
        self, pids: list[int], timeout: float, tick: Callable[[], None] = lambda: None
    ) -> None:
        deadline = time.monotonic() + timeout
        first_at = 0
        while time.monotonic() < deadline:
            now_committed = self._committed()
            now = time.monotonic()
            if now_committed > self.base and not self.t_first:
                self.t_first, first_at = now, now_committed
                self.cpu_first = {p: cpu_seconds(p) for p in pids}
            if now_committed >= self.end:
                self.t_last = now
                self.cpu_last = {p: cpu_seconds(p) for p in pids}
                self.points_moved = (now_committed - first_at) * self.lines
                return
            tick()
            time.sleep(0.1)
        raise SystemExit(
            f"group {self.group} did not commit to the end ({self.end}) within {timeout:.0f} s"
        )

    @property
    def rate(self) -> float:
        """Points/s between the first and the last commit."""
        return self.points_moved / max(self.t_last - self.t_first, 1e-9)


# --- the router ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Router:
    """One ``failover-router run`` process on a topology file of its own."""

    def __init__(self, doc: dict[str, Any], workdir: Path, name: str = "router") -> None:
        self.doc = doc
        self.path = workdir / f"{name}.yaml"
        self.log = workdir / f"{name}.log"
        self.write(doc)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router.cli",
                "run",
                "--topology",
                str(self.path),
                "--log-level",
                "warning",
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self.url = f"http://{doc['http']['listen']}"

    def write(self, doc: dict[str, Any]) -> None:
        """Replace the topology file in one rename (the router watches it)."""
        self.doc = doc
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.path)

    def set_drain(self, drain: bool) -> None:
        doc = json.loads(json.dumps(self.doc))
        doc["clusters"]["influx-a"]["drain"] = drain
        self.write(doc)

    def wait_ready(self, timeout: float = 60, *, path: str = "/readyz") -> None:
        """Until ``path`` answers 200: ``/readyz`` (the replica holds its partitions), or
        ``/api/status`` (it serves; a replica whose one cluster is drained is not ready)."""
        deadline = time.monotonic() + timeout
        why = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"router exited with {self.proc.returncode}; see {self.log}")
            try:
                resp = httpx.get(self.url + path, timeout=1)
                if resp.status_code == 200:
                    return
                why = f"HTTP {resp.status_code} {resp.text.strip()[:200]}"
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"router: {path} not 200 within {timeout:.0f} s ({why}); see {self.log}")

    def destination(self) -> dict[str, Any]:
        """The status of the route's one destination (``/api/status``)."""
        doc = httpx.get(self.url + "/api/status", timeout=5).json()
        for route in doc.get("routes", []):
            if route["name"] == "bench" and route["destinations"]:
                return dict(route["destinations"][0])
        raise LookupError("the route has no destination yet")

    def cluster_state(self) -> str:
        doc = httpx.get(self.url + "/api/status", timeout=5).json()
        return str(doc["clusters"]["influx-a"]["state"])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def peak_rss(self) -> float:
        return rss_mib(self.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, LookupError):  # not serving yet, the route not built yet
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the discarding sink's process -----------------------------------------------------------


class SinkProcess:
    """The discarding sink (``scripts.bench.sink``) as a child process."""

    def __init__(self, impl: str) -> None:
        self.impl = impl
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.bench.sink", "--impl", impl],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        if not port:
            raise SystemExit("the discarding sink did not start")
        self.url = f"http://127.0.0.1:{int(port)}"
        self._http = httpx.Client(base_url=self.url, timeout=10)

    def watch(self, pids: dict[str, int], hold: int = 0) -> None:
        """Forget what was counted; sample these processes' CPU at every write from now on;
        ``hold`` > 0: answer no write until each of them has that many waiting."""
        doc = {"pids": pids, "hold": hold}
        self._http.post("/_bench/watch", content=json.dumps(doc)).raise_for_status()

    def stats(self) -> dict[str, Any]:
        resp = self._http.get("/_bench/stats")
        resp.raise_for_status()
        return dict(resp.json())

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close(self) -> None:
        self._http.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.terminate()
        self.proc.wait(10)


# --- the direct-write ceiling ----------------------------------------------------------------


def bodies(measurement: str, points: int) -> list[bytes]:
    """The backlog cut into request bodies of ``BATCH.max_points`` lines, as the router's batches
    are (each line ends with a newline, as the router's join leaves it)."""
    size = BATCH.max_points
    return [
        b"\n".join(lines_of(measurement, first, min(size, points - first))) + b"\n"
        for first in range(0, points, size)
    ]


@dataclass
class Ceiling:
    """What this process alone gets through one httpx client and ``threads`` threads writing
    the same batches to the same URL, compressing each body as the router does."""

    points: int
    seconds: float
    cpu: float  # this process's CPU time over the run

    @property
    def rate(self) -> float:
        return self.points / max(self.seconds, 1e-9)

    @property
    def us_per_point(self) -> float:
        return self.cpu / max(self.points, 1) * 1e6

    @classmethod
    def run(
        cls,
        url: str,
        database: str,
        batches: list[bytes],
        compression: Compression,
        threads: int = BATCH.max_in_flight,
    ) -> Ceiling:
        headers = {"Content-Type": "text/plain; charset=utf-8", "User-Agent": "frouter-bench"}
        if compression.kind == "gzip":
            headers["Content-Encoding"] = "gzip"
        params = {"db": database, "precision": "n"}
        points = sum(b.count(b"\n") for b in batches)
        index = iter(range(len(batches)))
        lock = threading.Lock()
        errors: list[str] = []
        start = threading.Barrier(threads + 1)
        with httpx.Client(headers=headers, timeout=httpx.Timeout(30, pool=None)) as client:

            def work() -> None:
                start.wait()
                while not errors:
                    with lock:
                        i = next(index, None)
                    if i is None:
                        return
                    resp = client.post(
                        url + "/write", params=params, content=compression.encode(batches[i])
                    )
                    if resp.status_code != 204:
                        errors.append(f"HTTP {resp.status_code}: {resp.text[:200]}")

            pool = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
            for t in pool:
                t.start()
            cpu0 = _own_cpu()
            start.wait()
            t0 = time.monotonic()
            for t in pool:
                t.join()
            secs = time.monotonic() - t0
            cpu = _own_cpu() - cpu0
        if errors:
            raise SystemExit(f"ceiling writes to {url} failed: {errors[0]}")
        return cls(points, secs, cpu)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system
