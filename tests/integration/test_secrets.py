"""Rotated secrets and a live kafka: change, end to end: the router as a process, real Kafka,
a real InfluxDB 1.6 with authentication, the stack's InfluxDBs as standbys.

The stack's InfluxDBs run without authentication, so ``auth_influx`` starts one more influxd
of its own (``auth-enabled = true``, an admin user and a ``writer`` user that may only write)
on free ports, and stops it at the end.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from router.reprobe import CAP
from tests.integration.harness import (
    RouterProc,
    Scenario,
    dedicated_influx,
    new_tag,
    wait_paused,
    write_yaml,
)
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"
DATABASE = "metrics"
ADMIN = ("admin", "admin-pw")
USER_ENV = "FROUTER_IT_INFLUX_USER"


@dataclass
class AuthInflux:
    """An InfluxDB 1.x that wants credentials; ``writer`` may write to ``metrics``."""

    url: str
    proc: subprocess.Popen[bytes]

    def query(self, q: str, *, db: str = "") -> dict[str, Any]:
        resp = httpx.post(
            f"{self.url}/query", params={"db": db} if db else {}, data={"q": q}, auth=ADMIN
        )
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()["results"][0]
        if "error" in result:
            raise AssertionError(f"{q!r}: {result['error']}")
        return result

    def set_password(self, user: str, password: str) -> None:
        self.query(f"SET PASSWORD FOR {user} = '{password}'")

    def values(self, measurement: str) -> set[int]:
        series = self.query(f'SELECT "value" FROM "{measurement}"', db=DATABASE).get("series")
        return {int(row[1]) for row in series[0]["values"]} if series else set()

    def accepts(self, user: str, password: str) -> int:
        """The status of an empty write as ``user``: 204 accepted, 401 refused."""
        resp = httpx.post(f"{self.url}/write", params={"db": DATABASE}, auth=(user, password))
        return resp.status_code


@pytest.fixture(scope="module")
def auth_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthInflux]:
    """A dedicated InfluxDB 1.6 with authentication on (the devstack's 1.6 run without it), an
    admin user and the test database; stopped at the end."""
    home = tmp_path_factory.mktemp("auth-influx")
    with dedicated_influx(home, auth=True) as (url, proc):
        server = AuthInflux(url, proc)
        # the first user may be created without credentials, and must be an admin
        resp = httpx.post(
            f"{server.url}/query",
            data={"q": f"CREATE USER {ADMIN[0]} WITH PASSWORD '{ADMIN[1]}' WITH ALL PRIVILEGES"},
        )
        resp.raise_for_status()
        server.query(f"CREATE DATABASE {DATABASE}")
        yield server


class World:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.sc = Scenario(env, new_tag())
        self.sc.create_topic()
        self.tmp = tmp
        self.routers: list[RouterProc] = []

    def start(self, doc: dict[str, Any]) -> RouterProc:
        path = write_yaml(self.tmp / "router.yaml", doc)
        router = RouterProc(path, self.tmp).start()
        self.routers.append(router)
        return router

    def close(self) -> None:
        for router in self.routers:
            if router.proc is not None and router.proc.poll() is None:
                router.stop()
        self.sc.close()


@pytest.fixture
def world(stack_env: dict[str, str], tmp_path: Path) -> Iterator[World]:
    w = World(stack_env, tmp_path)
    yield w
    w.close()


def write_secret(path: Path, value: str) -> None:
    """Replace the file atomically, as the kubelet rotates a mounted Secret."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(value + "\n")
    tmp.replace(path)


def produce_spread(sc: Scenario, start: int, count: int, chunks: int = 10) -> None:
    step = count // chunks
    for k in range(chunks):
        sc.produce(start + k * step, step)
        time.sleep(0.2)


def test_a_rotated_influx_password_recovers_by_itself_and_loses_nothing(
    world: World,
    auth_influx: AuthInflux,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's password changes: writes get 401, the destination stops and the route fails
    over; the new password written to password_file brings it back by itself (at once: the
    file change triggers a probe). Then the file first and the server later: back within the
    back-off cap. The primary replays everything, hands back, nothing is lost, the gauge is 0."""
    sc = world.sc
    user = f"w_{sc.tag}"
    auth_influx.query(f"CREATE USER {user} WITH PASSWORD 'pw-1'")
    auth_influx.query(f"GRANT WRITE ON {DATABASE} TO {user}")
    monkeypatch.setenv(USER_ENV, user)
    password_file = world.tmp / "influx-password"
    write_secret(password_file, "pw-1")
    doc = sc.topology()
    doc["clusters"]["influx-a"] = {
        "urls": [auth_influx.url],
        "database": DATABASE,
        "username_env": USER_ENV,
        "password_file": str(password_file),
        "write_timeout": "1s",
        "max_retries": 1,
    }
    router = world.start(doc)
    sc.produce(0, 1000)
    wait_until(
        lambda: len(auth_influx.values(sc.measurement)) == 1000, timeout=60, what="a has 1000"
    )

    # 1. the server first: 401, stopped, failover
    auth_influx.set_password(user, "pw-2")
    produce_spread(sc, 1000, 1000)
    wait_until(
        lambda: router.destination(ROUTE, "a")["state"] == "stopped",
        timeout=30,
        what="influx-a stopped on 401",
    )
    assert router.metric("frouter_destination_misconfigured", cluster="influx-a") == 1
    wait_until(lambda: router.events("failover"), timeout=30, what="failover to influx-b")
    assert router.events("failover")[0]["to_cluster"] == "influx-b"
    wait_until(lambda: sc.count("b") > 0, timeout=30, what="the standby writes")

    # ... then the file: recovered by itself, within the cap (in fact at once)
    began = time.monotonic()
    write_secret(password_file, "pw-2")
    wait_until(lambda: router.events("sink_recovered"), timeout=CAP + 5, what="sink_recovered")
    first_recovery = time.monotonic() - began
    sc.produce(2000, 500)
    wait_until(
        lambda: auth_influx.values(sc.measurement) == set(range(2500)),
        timeout=90,
        what="the primary replays everything",
    )
    sc.wait_committed_to_end(ROUTE, "a")
    wait_paused(router, ROUTE, "b", timeout=60)  # handed back
    assert router.metric("frouter_destination_misconfigured", cluster="influx-a") == 0
    assert router.destination(ROUTE, "a")["state"] == "active"

    # 2. the file first (refused until the server follows), then the server: within the cap
    write_secret(password_file, "pw-3")
    sc.produce(2500, 500)
    wait_until(
        lambda: router.metric("frouter_destination_misconfigured", cluster="influx-a") == 1,
        timeout=30,
        what="influx-a refused again",
    )
    refused = len(router.events("reprobe_failed"))
    wait_until(
        lambda: len(router.events("reprobe_failed")) >= refused + 2,
        timeout=CAP,
        what="two probes refused with the new password",
    )
    began = time.monotonic()
    auth_influx.set_password(user, "pw-3")
    wait_until(
        lambda: len(router.events("sink_recovered")) == 2,
        timeout=CAP + 5,
        what="recovered within the back-off cap",
    )
    second_recovery = time.monotonic() - began
    sc.produce(3000, 500)
    wait_until(
        lambda: auth_influx.values(sc.measurement) == set(range(3500)),
        timeout=90,
        what="the primary holds every point",
    )
    sc.wait_committed_to_end(ROUTE, "a")
    wait_paused(router, ROUTE, "b", timeout=60)
    assert router.metric("frouter_destination_misconfigured", cluster="influx-a") == 0
    assert auth_influx.values(sc.measurement) | sc.values("b") == set(range(3500))
    assert router.events("reprobe_failed")
    assert first_recovery < 5  # the file change itself triggered the probe
    assert second_recovery < CAP + 5
    logged = router.log_path.read_text()
    assert not [p for p in ("pw-1", "pw-2", "pw-3") if p in logged]  # never logged
    assert router.stop() == 0


def read_topic(bootstrap: str, topic: str) -> list[bytes]:
    """Every record of ``topic`` now (read up to the high watermarks)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"it-read-{new_tag()}"})
    try:
        md = consumer.list_topics(topic, timeout=10)
        parts = [TopicPartition(topic, p, 0) for p in md.topics[topic].partitions]
        highs = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
        consumer.assign(parts)
        want = sum(highs.values())
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < want and time.monotonic() < deadline:
            got += [bytes(m.value() or b"") for m in consumer.consume(100, 0.5) if not m.error()]
        return got
    finally:
        consumer.close()


def test_a_live_dead_letter_topic_change_takes_the_next_bad_line(world: World) -> None:
    """Editing kafka.dead_letter_topic rebuilds the producer and every route: the next bad
    line lands in the new topic, none in the old one, and the reload counts as applied."""
    sc = world.sc
    new_topic = f"it.{sc.tag}.dead2"
    admin = AdminClient({"bootstrap.servers": sc.bootstrap})
    admin.create_topics([NewTopic(new_topic, num_partitions=1, replication_factor=1)])[
        new_topic
    ].result(15)
    doc = sc.topology()
    router = world.start(doc)
    assert router.metric("frouter_topology_last_reload_ok") == 1  # valid, before any reload
    sc.produce(0, 100, bad_every=50)  # 0 and 50 are bad
    sc.wait_count("a", 98)
    sc.wait_committed_to_end(ROUTE, "a")
    assert len(read_topic(sc.bootstrap, sc.dead_letter_topic)) == 2

    doc["kafka"]["dead_letter_topic"] = new_topic
    write_yaml(router.topology, doc)
    wait_until(
        lambda: router.metric("frouter_topology_reloads_total", outcome="applied") == 1,
        timeout=20,
        what="the reload applied",
    )
    wait_until(lambda: router.events("kafka_clients_rebuilt"), timeout=20, what="new clients")
    wait_until(
        lambda: router.destination(ROUTE, "a")["state"] == "active",
        timeout=30,
        what="the route rebuilt and active",
    )
    sc.produce(100, 100, bad_every=50)  # 100 and 150 are bad
    sc.wait_count("a", 196)
    sc.wait_committed_to_end(ROUTE, "a")
    letters = read_topic(sc.bootstrap, new_topic)
    assert sorted(letters) == sorted(
        f"{sc.measurement},src=it value=oops{i} {1_700_000_000_000_000_000 + i}".encode()
        for i in (100, 150)
    )
    assert len(read_topic(sc.bootstrap, sc.dead_letter_topic)) == 2
    assert router.metric("frouter_topology_last_reload_ok") == 1
    assert router.stop() == 0
