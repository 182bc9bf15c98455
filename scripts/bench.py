"""Benchmarks of the router on the local stack; prints figures, asserts nothing.

    .venv/bin/python -m scripts.bench [--points 1000000] [--lines 20]

1. throughput: a backlog of --points points (--lines points per Kafka message) is written by
   the router to one InfluxDB (direct URL, no proxy); points/s from start to the last commit.
2. backlog memory: the same number of points piles up in Kafka while the cluster is cut off
   (through Toxiproxy); the router's RSS is sampled while paused and while it replays.

Run ``./dev stack up`` first (or let ``./dev bench`` do it).
"""

from __future__ import annotations

import argparse
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


def topology(env: dict[str, str], topic: str, tag: str, url: str, port: int) -> dict[str, Any]:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", type=int, default=1_000_000)
    ap.add_argument("--lines", type=int, default=20, help="points per Kafka message")
    args = ap.parse_args()
    env = stack.endpoints()
    admin = KafkaAdmin({"bootstrap.servers": env["KAFKA_BOOTSTRAP"]})
    kadmin = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP"]})
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
