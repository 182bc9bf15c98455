"""Run the real router as a process against the real stack, and look at what a user would.

Each test gets its own topic, measurement and consumer-group prefix, so tests never see each
other's data even though they share one Kafka and three InfluxDBs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from devstack.stack import influx_config
from router.kafka import KafkaAdmin
from router.offsets import TopicPart
from tests.support import influx_count, wait_until

BASE_TS = 1_700_000_000_000_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Scenario:
    """Names and endpoints of one test's world."""

    env: Mapping[str, str]
    tag: str
    partitions: int = 4

    @property
    def topic(self) -> str:
        return f"it.{self.tag}"

    @property
    def measurement(self) -> str:
        return f"m_{self.tag}"

    @property
    def group_prefix(self) -> str:
        return f"it-{self.tag}"

    @property
    def dead_letter_topic(self) -> str:
        return f"it.{self.tag}.dead"

    @property
    def bootstrap(self) -> str:
        return self.env["KAFKA_BOOTSTRAP"]

    def url(self, cluster: str) -> str:
        """Direct URL of cluster 'a', 'b' or 'c' (for counting)."""
        return self.env[f"INFLUX_{cluster.upper()}_URL"]

    def group(self, route: str, cluster: str) -> str:
        return f"{self.group_prefix}.{route}.influx-{cluster}"

    def create_topic(self) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for t in (self.topic, self.dead_letter_topic):
            admin.create_topics(
                [NewTopic(t, num_partitions=self.partitions, replication_factor=1)]
            )[t].result(15)

    def topology(
        self,
        *,
        mode: str = "failover",
        primary: str = "a",
        standby: Iterable[str] = ("b",),
        clusters: Iterable[str] = ("a", "b", "c"),
        drain: Iterable[str] = (),
        route: str = "r",
        listen: int = 0,
        **route_extra: Any,
    ) -> dict[str, Any]:
        drained = set(drain)
        names = ("a", "b", "c")
        doc: dict[str, Any] = {
            "datacenter": f"dc-{self.tag}",
            "kafka": {
                "bootstrap": self.bootstrap,
                "group_prefix": self.group_prefix,
                "dead_letter_topic": self.dead_letter_topic,
            },
            "clusters": {
                f"influx-{n}": {
                    "urls": [self.env[f"INFLUX_{n.upper()}_PROXY_URL"]],
                    "database": self.env["INFLUX_DATABASE"],
                    "write_timeout": "1s",
                    "max_retries": 1,
                    "drain": n in drained,
                }
                for n in names
            },
            "routes": [
                {
                    "name": route,
                    "topics": [self.topic],
                    "mode": mode,
                    "batch": {"max_points": 500, "linger": "50ms", "max_in_flight": 2},
                    **route_extra,
                }
            ],
            "health": {"interval": "200ms", "timeout": "500ms", "fall": 3, "rise": 3},
            "http": {"listen": f"127.0.0.1:{listen or free_port()}"},
        }
        if mode == "failover":
            doc["routes"][0]["handback_lag"] = 50
            doc["routes"][0]["primary"] = f"influx-{primary}"
            doc["routes"][0]["standby"] = [f"influx-{s}" for s in standby]
        else:
            doc["routes"][0]["clusters"] = [f"influx-{c}" for c in clusters]
        return doc

    # --- data ---------------------------------------------------------------------------

    def produce(self, start: int, count: int, *, bad_every: int = 0) -> None:
        """Messages ``start``..``start+count-1``, one point each, round-robin over partitions.

        With ``bad_every`` = k, every k-th message is a malformed line instead of a point.
        """
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for i in range(start, start + count):
            if bad_every and i % bad_every == 0:
                line = f"{self.measurement},src=it value=oops{i} {BASE_TS + i}"
            else:
                line = f"{self.measurement},src=it value={i}i {BASE_TS + i}"
            producer.produce(self.topic, line.encode(), partition=i % self.partitions)
            if i % 1000 == 0:
                producer.poll(0)
        assert producer.flush(30) == 0

    def count(self, cluster: str) -> int:
        return influx_count(self.url(cluster), self.env["INFLUX_DATABASE"], self.measurement)

    def values(self, cluster: str) -> set[int]:
        """The distinct ``value`` fields stored in a cluster (each message has its own)."""
        resp = httpx.get(
            f"{self.url(cluster)}/query",
            params={
                "db": self.env["INFLUX_DATABASE"],
                "q": f'SELECT "value" FROM "{self.measurement}"',
                "epoch": "ns",
            },
            timeout=30,
        )
        resp.raise_for_status()
        series = resp.json()["results"][0].get("series") or []
        return {int(row[1]) for row in series[0]["values"]} if series else set()

    def wait_count(self, cluster: str, expected: int, timeout: float = 60.0) -> None:
        wait_until(
            lambda: self.count(cluster) == expected,
            timeout=timeout,
            what=f"influx-{cluster} to hold {expected} points (has {self.count(cluster)})",
        )

    # --- offsets ------------------------------------------------------------------------

    def tps(self) -> list[TopicPart]:
        return [(self.topic, p) for p in range(self.partitions)]

    @functools.cached_property
    def _admin(self) -> KafkaAdmin:
        return KafkaAdmin({"bootstrap.servers": self.bootstrap})

    def admin(self) -> KafkaAdmin:
        return self._admin

    def close(self) -> None:
        if "_admin" in self.__dict__:
            self._admin.close()

    def committed(self, route: str, cluster: str) -> dict[TopicPart, int]:
        return self.admin().committed(self.group(route, cluster), self.tps())

    def end_offsets(self) -> dict[TopicPart, int]:
        return {tp: wm.high for tp, wm in self.admin().watermarks(self.tps()).items()}

    def wait_committed_to_end(self, route: str, cluster: str, timeout: float = 60.0) -> None:
        wait_until(
            lambda: self.committed(route, cluster) == self.end_offsets(),
            timeout=timeout,
            what=f"group of influx-{cluster} to commit up to the end offsets",
        )


class RouterProc:
    """The router as a user runs it: `failover-router run --topology FILE`."""

    def __init__(
        self, topology: Path, workdir: Path, name: str = "router", args: tuple[str, ...] = ()
    ) -> None:
        self.topology = topology
        self.args = args
        self.log_path = workdir / f"{name}.log"
        doc = yaml.safe_load(topology.read_text())
        self.url = f"http://{doc['http']['listen']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RouterProc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *os.environ.get("FROUTER_TEST_WRAP", "").split(),
                    sys.executable,
                    "-m",
                    "router.cli",
                    "run",
                    "--topology",
                    str(self.topology),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "FROUTER_LOG_LEVEL": "info"},
            )
        wait_until(self._ready, timeout=30, what=f"router /readyz ({self.log_path})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"router exited {self.proc.returncode}: {self.tail()}")
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/api/status", timeout=5).json())

    def destination(self, route: str, cluster: str) -> dict[str, Any]:
        for r in self.status()["routes"]:
            if r["name"] == route:
                for d in r["destinations"]:
                    if d["cluster"] == f"influx-{cluster}":
                        return dict(d)
        raise AssertionError(f"no destination {route}/{cluster}")

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for line in text.splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.proc.wait(90)

    def stop(self) -> int:
        """SIGTERM and wait: returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"router ignored SIGTERM for 90s: {self.tail()}") from None
        return int(self.proc.returncode)


def new_tag() -> str:
    return uuid.uuid4().hex[:10]


def write_yaml(path: Path, doc: Mapping[str, Any]) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(dict(doc), sort_keys=False))
    tmp.replace(path)  # atomic, as a ConfigMap update is
    return path


def wait_paused(router: RouterProc, route: str, cluster: str, timeout: float = 30.0) -> None:
    def paused() -> bool:
        d = router.destination(route, cluster)
        return bool(d["assigned"]) and d["paused"] == d["assigned"] and not d["active"]

    wait_until(paused, timeout=timeout, what=f"every partition of influx-{cluster} paused")


# --- extra Toxiproxy proxies (one per replica, for faults only one replica sees) --------------


def add_proxy(toxiproxy_url: str, name: str, upstream_url: str) -> str:
    """A new Toxiproxy proxy to ``upstream_url`` on a free loopback port; returns its URL.

    ``Toxiproxy.reset`` enables it and clears its toxics like any other; delete it with
    ``delete_proxy`` (a reset does not).
    """
    upstream = httpx.URL(upstream_url)
    body = {
        "name": name,
        "listen": "127.0.0.1:0",
        "upstream": f"{upstream.host}:{upstream.port}",
        "enabled": True,
    }
    resp = httpx.post(f"{toxiproxy_url}/proxies", json=body, timeout=5)
    resp.raise_for_status()
    return f"http://{resp.json()['listen']}"


def delete_proxy(toxiproxy_url: str, name: str) -> None:
    """Remove a proxy made by ``add_proxy`` (one that is already gone is fine)."""
    resp = httpx.delete(f"{toxiproxy_url}/proxies/{name}", timeout=5)
    if resp.status_code != 404:
        resp.raise_for_status()


@contextlib.contextmanager
def dedicated_influx(
    home: Path, *, auth: bool = False, max_series: int = 0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A loopback InfluxDB 1.6 of one test module (its own ports and data under ``home``):
    yields (URL, process) once it answers /ping; stopped at the end. Fails, never skips, when
    it cannot start."""
    http_port, rpc_port = free_port(), free_port()
    conf = home / "influxdb.conf"
    conf.write_text(influx_config(home, http_port, rpc_port, auth=auth, max_series=max_series))
    influxd = shutil.which("influxd") or "/usr/bin/influxd"
    url = f"http://127.0.0.1:{http_port}"
    with (home / "influxd.log").open("ab") as log:
        proc = subprocess.Popen(
            [influxd, "run", "-config", str(conf)], stdout=log, stderr=subprocess.STDOUT
        )
    try:

        def up() -> bool:
            if proc.poll() is not None:
                text = (home / "influxd.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"influxd exited {proc.returncode}: {text}")
            try:
                return httpx.get(f"{url}/ping", timeout=1).status_code == 204
            except httpx.HTTPError:
                return False

        wait_until(up, timeout=30, what=f"dedicated influxd on {url}")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def read_letters(sc: Scenario, count: int) -> list[tuple[bytes, dict[str, bytes]]]:
    """The records of the test's dead-letter topic, (value, headers), once there are at least
    ``count``; a further second of reading catches any beyond it."""
    consumer = Consumer(
        {
            "bootstrap.servers": sc.bootstrap,
            "group.id": f"dlq-read-{sc.tag}-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "false",
        }
    )
    consumer.subscribe([sc.dead_letter_topic])
    got: list[Any] = []

    def enough() -> bool:
        got.extend(m for m in consumer.consume(500, 0.5) if m.error() is None)
        return len(got) >= count

    try:
        wait_until(enough, timeout=30, what=f"{count} records in {sc.dead_letter_topic}")
        got.extend(m for m in consumer.consume(500, 1.0) if m.error() is None)
    finally:
        consumer.close()
    return [(bytes(m.value() or b""), dict(m.headers() or [])) for m in got]
