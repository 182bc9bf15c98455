"""Benchmarks of the router on the local stack; prints figures, asserts nothing.

    .venv/bin/python -m scripts.bench [--points 1000000] [--lines 20]
    .venv/bin/python -m scripts.bench --guard [--points 1000000]
    .venv/bin/python -m scripts.bench --discard [--points 1000000]

1. throughput: a backlog of --points points (--lines points per Kafka message) is written by
   the router to one InfluxDB (direct URL, no proxy); points/s from start to the last commit.
2. backlog memory: the same number of points piles up in Kafka while the cluster is cut off
   (through Toxiproxy); the router's RSS is sampled while paused and while it replays.

--guard instead measures what the route guard (``router.guard``: block rules and cardinality
limits) costs: the throughput run of 1. with 1-line and 20-line messages, each with the guard
off and on, reporting the router process's CPU time (user + system, from /proc) per point;
then the guard alone, in this process, on the same messages.

--discard measures the router's own cost per point: the same backlog, 1-line and 20-line
messages, written to a discarding sink (a small HTTP server in this process that answers 204 to
every write), reporting the router process's CPU time per point from its first write to its last
(and from ready to the last commit, start-up included) and the points/s.

Run ``./dev stack up`` first (or let ``./dev bench`` do it).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from router.guard import BlockRule, Guard, Limits
from router.kafka import KafkaAdmin

PARTITIONS = 4


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.samples.append(rss_mb(self.pid))
            except OSError:
                return
            time.sleep(0.2)

    def peak(self) -> float:
        return max(self.samples, default=0.0)


def produce(bootstrap: str, topic: str, points: int, lines: int, tag: str) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
        }
    )
    base = 1_700_000_000_000_000_000
    n = 0
    msg = 0
    while n < points:
        body = b"\n".join(
            f"bench_{tag},host=h{(n + k) % 1000:03d} value={n + k}i {base + n + k}".encode()
            for k in range(min(lines, points - n))
        )
        while True:
            try:
                producer.produce(topic, body, partition=msg % PARTITIONS)
                break
            except BufferError:
                producer.poll(0.1)
        n += lines
        msg += 1
        if msg % 1000 == 0:
            producer.poll(0)
    producer.flush(120)


def create_topics(kadmin: AdminClient, topic: str, tag: str) -> None:
    """The data topic and the dead-letter topic (the stack's Kafka never auto-creates one)."""
    futures = kadmin.create_topics(
        [NewTopic(topic, PARTITIONS, 1), NewTopic(f"bench-{tag}.dead-letter", 1, 1)]
    )
    for future in futures.values():
        future.result(15)


# The guard of --guard: two block rules and both limits, none of which the bench's 1000 series
# (one measurement, tag ``host``) trips: what is measured is the cost on lines that pass.
GUARD: dict[str, Any] = {
    "block": [
        {"name": "tmp", "measurement": "^tmp_"},
        {"name": "request-id", "tag": {"key": "^request_id$"}},
    ],
    "max_new_series_per_minute": 2000,
    "max_series": 100_000,
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, every thread included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def topology(
    env: dict[str, str],
    topic: str,
    tag: str,
    url: str,
    port: int,
    *,
    guard: dict[str, Any] | None = None,
) -> dict[str, Any]:
    route_guard = {"guard": guard} if guard is not None else {}
    return {
        "datacenter": "bench",
        "kafka": {"bootstrap": env["KAFKA_BOOTSTRAP"], "group_prefix": f"bench-{tag}"},
        "clusters": {"influx-a": {"urls": [url], "database": env["INFLUX_DATABASE"]}},
        "routes": [
            {
                "name": "bench",
                "topics": [topic],
                "mode": "mirror",
                "clusters": ["influx-a"],
                "batch": {
                    "max_points": 5000,
                    "max_bytes": "1MiB",
                    "linger": "200ms",
                    "max_in_flight": 4,
                },
                **route_guard,
            }
        ],
        "health": {"interval": "1s", "timeout": "2s", "fall": 3, "rise": 2},
        "http": {"listen": f"127.0.0.1:{port}"},
    }


def run_router(doc: dict[str, Any], workdir: Path) -> subprocess.Popen[bytes]:
    path = workdir / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    log = (workdir / "router.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router.cli",
            "run",
            "--topology",
            str(path),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{doc['http']['listen']}/readyz"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("router did not become ready; see " + str(workdir / "router.log"))


def wait_committed(admin: KafkaAdmin, group: str, topic: str, timeout: float) -> float:
    tps = [(topic, p) for p in range(PARTITIONS)]
    end = {tp: wm.high for tp, wm in admin.watermarks(tps).items()}
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if admin.committed(group, tps) == end:
            return time.monotonic() - started
        time.sleep(0.25)
    raise SystemExit(f"group {group} did not commit to the end within {timeout}s")


def free_port() -> int:
    import socket  # noqa: PLC0415 - only here

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def guard_run(
    env: dict[str, str],
    admin: KafkaAdmin,
    kadmin: AdminClient,
    work: Path,
    *,
    points: int,
    lines: int,
    guard: dict[str, Any] | None,
) -> tuple[float, float]:
    """One throughput run: (router CPU seconds, wall seconds) from ready to the last commit."""
    tag = uuid.uuid4().hex[:8]
    topic = f"bench.{tag}"
    create_topics(kadmin, topic, tag)
    produce(env["KAFKA_BOOTSTRAP"], topic, points, lines, tag)
    doc = topology(env, topic, tag, env["INFLUX_A_URL"], free_port(), guard=guard)
    proc = run_router(doc, work)
    cpu0 = cpu_seconds(proc.pid)
    secs = wait_committed(admin, f"bench-{tag}.bench.influx-a", topic, 900)
    cpu = cpu_seconds(proc.pid) - cpu0
    proc.terminate()
    proc.wait(60)
    return cpu, secs


def guard_alone(points: int, lines: int) -> float:
    """CPU microseconds per point of the guard alone on the bench's messages, all series
    known (the steady state: ``Guard.known``, what a destination calls per message), best of
    5."""
    g = GUARD
    guard = Guard(
        [
            BlockRule("tmp", measurement=re.compile(g["block"][0]["measurement"])),
            BlockRule("request-id", tag_key=re.compile(g["block"][1]["tag"]["key"])),
        ],
        Limits(g["max_new_series_per_minute"], g["max_series"], warmup=0.0),
    )
    base = 1_700_000_000_000_000_000
    count = max(1, min(points, 200_000) // lines)
    msgs = [
        b"\n".join(
            b"bench_x,host=h%03d value=%di %d" % ((k + j) % 1000, k + j, base + k + j)
            for j in range(lines)
        )
        for k in range(0, count * lines, lines)
    ]
    for m in msgs:
        guard.check(m)
    known = guard.known
    assert all(known(m) for m in msgs)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for m in msgs:
            known(m)
        best = min(best, time.process_time() - started)
    return best / (count * lines) * 1e6


def guard_bench(env: dict[str, str], admin: KafkaAdmin, kadmin: AdminClient, points: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="frouter-bench-guard-"))
    for lines in (1, 20):
        per_point: dict[str, float] = {}
        for name, guard in (("off", None), ("on", GUARD)):
            cpu, secs = guard_run(env, admin, kadmin, work, points=points, lines=lines, guard=guard)
            per_point[name] = cpu / points * 1e6
            print(
                f"guard {name}: {points} points, {lines} points/message: router CPU "
                f"{cpu:.1f}s = {per_point[name]:.2f} us/point; {points / secs:,.0f} points/s",
                flush=True,
            )
        print(
            f"guard cost, {lines} points/message: {per_point['on'] - per_point['off']:+.2f} "
            f"us/point in the router; the guard alone {guard_alone(points, lines):.2f} us/point",
            flush=True,
        )


class DiscardSink:
    """An InfluxDB stand-in that reads and drops every write (204) and answers /ping; it notes
    the router's CPU time at its first and last write."""

    def __init__(self) -> None:
        import http.server  # noqa: PLC0415 - only the bench needs it

        outer = self
        self.pid = 0
        self.requests = 0
        self.cpu_first = self.cpu_last = 0.0
        self.t_first = self.t_last = 0.0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self._answer()

            def do_HEAD(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()
                if self.path.startswith(("/write", "/api/v2/write")) and outer.pid:
                    cpu, now = cpu_seconds(outer.pid), time.monotonic()
                    if not outer.requests:
                        outer.cpu_first, outer.t_first = cpu, now
                    outer.cpu_last, outer.t_last = cpu, now
                    outer.requests += 1

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def discard_bench(env: dict[str, str], admin: KafkaAdmin, kadmin: AdminClient, points: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="frouter-bench-discard-"))
    for lines, gzip in ((1, True), (1, False), (20, True), (20, False)):
        tag = uuid.uuid4().hex[:8]
        topic = f"bench.{tag}"
        create_topics(kadmin, topic, tag)
        produce(env["KAFKA_BOOTSTRAP"], topic, points, lines, tag)
        sink = DiscardSink()
        doc = topology(env, topic, tag, sink.url, free_port())
        doc["clusters"]["influx-a"]["gzip"] = gzip
        proc = run_router(doc, work)
        cpu0 = cpu_seconds(proc.pid)
        sink.pid = proc.pid
        secs = wait_committed(admin, f"bench-{tag}.bench.influx-a", topic, 900)
        cpu_all = cpu_seconds(proc.pid) - cpu0
        proc.terminate()
        proc.wait(60)
        sink.close()
        writing = sink.cpu_last - sink.cpu_first
        span = max(sink.t_last - sink.t_first, 1e-9)
        print(
            f"discarding sink, {points} points, {lines} points/message, gzip {gzip}: router CPU "
            f"{writing / points * 1e6:.2f} us/point from first to last write "
            f"({cpu_all / points * 1e6:.2f} with start-up); {points / span:,.0f} points/s "
            f"while writing, {points / secs:,.0f} points/s ready-to-commit; "
            f"{sink.requests} writes",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--lines", type=int, default=20, help="points per Kafka message")
    ap.add_argument(
        "--guard",
        action="store_true",
        help="measure the CPU the route guard costs (1- and 20-line messages, off and on)",
    )
    ap.add_argument(
        "--discard",
        action="store_true",
        help="the router's CPU per point into a discarding sink (1- and 20-line messages)",
    )
    args = ap.parse_args()
    env = stack.endpoints()
    admin = KafkaAdmin({"bootstrap.servers": env["KAFKA_BOOTSTRAP"]})
    kadmin = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP"]})
    if args.guard:
        guard_bench(env, admin, kadmin, args.points)
        return
    if args.discard:
        discard_bench(env, admin, kadmin, args.points)
        return
    work = Path(tempfile.mkdtemp(prefix="frouter-bench-"))

    # 1. throughput: backlog first, then the router drains it to influx-a (direct)
    tag = uuid.uuid4().hex[:8]
    topic = f"bench.{tag}"
    create_topics(kadmin, topic, tag)
    t0 = time.monotonic()
    produce(env["KAFKA_BOOTSTRAP"], topic, args.points, args.lines, tag)
    print(f"produced {args.points} points in {time.monotonic() - t0:.1f}s", flush=True)
    proc = run_router(topology(env, topic, tag, env["INFLUX_A_URL"], free_port()), work)
    sampler = RssSampler(proc.pid)
    sampler.start()
    secs = wait_committed(admin, f"bench-{tag}.bench.influx-a", topic, 900)
    sampler.halt.set()
    proc.terminate()
    proc.wait(60)
    print(
        f"throughput: {args.points} points in {secs:.1f}s = {args.points / secs:,.0f} points/s "
        f"({args.lines} points/message, 1 router process, 4 partitions); "
        f"peak RSS {sampler.peak():.0f} MiB"
    )

    # 2. backlog memory: the cluster is cut off while the backlog piles up in Kafka
    tag = uuid.uuid4().hex[:8]
    topic = f"bench.{tag}"
    create_topics(kadmin, topic, tag)
    toxi = Toxiproxy(env["TOXIPROXY_URL"])
    proc = run_router(topology(env, topic, tag, env["INFLUX_A_PROXY_URL"], free_port()), work)
    idle = rss_mb(proc.pid)
    toxi.set_enabled(env["INFLUX_A_PROXY_NAME"], False)
    time.sleep(5)  # let the health checker take the cluster DOWN and pause its partitions
    sampler = RssSampler(proc.pid)
    sampler.start()
    produce(env["KAFKA_BOOTSTRAP"], topic, args.points, args.lines, tag)
    paused_peak = sampler.peak()
    toxi.set_enabled(env["INFLUX_A_PROXY_NAME"], True)
    secs = wait_committed(admin, f"bench-{tag}.bench.influx-a", topic, 900)
    sampler.halt.set()
    proc.terminate()
    proc.wait(60)
    toxi.close()
    print(
        f"backlog: {args.points} points held in Kafka while influx-a was cut off; router RSS "
        f"idle {idle:.0f} MiB, peak while paused {paused_peak:.0f} MiB, peak while replaying "
        f"{sampler.peak():.0f} MiB; replay took {secs:.1f}s"
    )


if __name__ == "__main__":
    main()
