"""Lines without a timestamp on the real stack: a re-sent line overwrites itself.

Each line has its own series (tag ``k``), no timestamp, and rides in a message produced with an
explicit CreateTime; every message goes to partition 0, so the batch order is the produce order.
A type conflict in a batch makes the sink bisect it (InfluxDB does not name the line), so the good
lines are written more than once; answers lost to latency make the router write them again after
a failover. Counts are distinct points in InfluxDB; offsets are read from Kafka per group.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Producer

from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, Scenario, wait_paused
from tests.integration.test_router import World
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"
MESSAGES = 10  # per phase, 100 lines each
LINES = 100
ONE_BATCH = {"max_points": 5000, "linger": "1s", "max_in_flight": 2}


@pytest.fixture
def world(stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[World]:
    w = World(stack_env, tmp_path, toxiproxy)
    yield w
    w.close()


def produce(sc: Scenario, messages: list[bytes], first_ms: int) -> list[int]:
    """Produce ``messages`` to partition 0, message j with CreateTime ``first_ms + j``; their
    timestamps in ns."""
    producer = Producer({"bootstrap.servers": sc.bootstrap, "linger.ms": 5})
    for j, value in enumerate(messages):
        producer.produce(sc.topic, value, partition=0, timestamp=first_ms + j)
    assert producer.flush(30) == 0
    return [(first_ms + j) * 1_000_000 for j in range(len(messages))]


def line_messages(sc: Scenario, first_k: int, conflict_at: int | None = None) -> list[bytes]:
    """MESSAGES messages of LINES lines ``m,k=<k> value=<k>i`` without a timestamp; line
    ``conflict_at`` has a string value instead (a type conflict)."""
    out = []
    for j in range(MESSAGES):
        lines = []
        for k in range(first_k + j * LINES, first_k + (j + 1) * LINES):
            value = '"str"' if k == conflict_at else f"{k}i"
            lines.append(f"{sc.measurement},k={k} value={value}")
        out.append("\n".join(lines).encode())
    return out


def stored_times_ns(sc: Scenario, cluster: str) -> set[int]:
    """The distinct timestamps (ns) of the points stored in a cluster."""
    resp = httpx.get(
        f"{sc.url(cluster)}/query",
        params={
            "db": sc.env["INFLUX_DATABASE"],
            "q": f'SELECT "value" FROM "{sc.measurement}"',
            "epoch": "ns",
        },
        timeout=30,
    )
    resp.raise_for_status()
    series = resp.json()["results"][0].get("series") or []
    return {int(row[0]) for row in series[0]["values"]} if series else set()


def wait_committed_to_end(sc: Scenario, cluster: str, timeout: float = 60.0) -> None:
    """The cluster's group committed partition 0 (the only one written to) up to its end."""
    tp = (sc.topic, 0)
    wait_until(
        lambda: sc.committed(ROUTE, cluster)[tp] == sc.end_offsets()[tp],
        timeout=timeout,
        what=f"group of influx-{cluster} to commit partition 0 up to its end",
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def dead_letters(router: RouterProc) -> float:
    return router.metric("frouter_dead_letters_total", cluster="influx-a")


def test_a_bisected_batch_stores_each_timestampless_line_once_and_a_failover_keeps_it(
    world: World,
) -> None:
    """1,000 lines without timestamps and one type conflict in one batch: exactly 999 points,
    at their messages' timestamps; answers lost to latency, a failover and the primary's
    replay: still one point per line in the primary, the standby holds its window once."""
    sc = world.sc
    doc = sc.topology(batch=ONE_BATCH)
    # influx-a goes DOWN 4 s after its last good answer, well after the batch (linger 1 s)
    # reached it through the latency below, so the write surely lands before the failover
    doc["health"].update({"fall": 20, "down_after": "4s"})
    router = world.start(doc)

    times = produce(sc, line_messages(sc, 0, conflict_at=550), now_ms())
    sc.wait_count("a", 999)
    wait_committed_to_end(sc, "a")
    wait_until(lambda: dead_letters(router) == 1, timeout=20, what="one dead letter")
    assert router.metric("frouter_batches_total", cluster="influx-a", outcome="ok") == 1
    assert sc.count("a") == 999
    assert stored_times_ns(sc, "a") == set(times)
    assert sc.committed(ROUTE, "a")[(sc.topic, 0)] == MESSAGES

    # Answers lost: writes land in influx-a, the router never hears of it, fails over to
    # influx-b, and influx-a replays the same messages once it is back.
    toxic = world.toxiproxy.add_toxic(sc.env["INFLUX_A_PROXY_NAME"], "latency", {"latency": 2500})
    times += produce(sc, line_messages(sc, 1000), now_ms())
    wait_until(lambda: sc.count("a") > 999, timeout=20, what="writes to land in influx-a")
    wait_paused(router, ROUTE, "a", timeout=30)
    sc.wait_count("b", 1000, timeout=60)
    wait_committed_to_end(sc, "b")
    world.toxiproxy.remove_toxic(sc.env["INFLUX_A_PROXY_NAME"], toxic)

    wait_committed_to_end(sc, "a", timeout=90)
    wait_paused(router, ROUTE, "b", timeout=30)  # handed back
    assert router.events("failover") and router.events("handback")
    assert sc.count("a") == 1999
    assert sc.count("b") == 1000
    assert stored_times_ns(sc, "a") == set(times)
    assert sc.committed(ROUTE, "a")[(sc.topic, 0)] == 2 * MESSAGES
    assert sc.committed(ROUTE, "b")[(sc.topic, 0)] == 2 * MESSAGES


def test_with_stamping_off_a_re_send_stores_the_lines_again(world: World) -> None:
    """``stamp_missing_timestamps: false``: InfluxDB stamps on arrival, so the bisection's
    re-sends store the good lines more than once (what the default prevents)."""
    sc = world.sc
    world.start(sc.topology(batch=ONE_BATCH, stamp_missing_timestamps=False))
    produce(sc, line_messages(sc, 0, conflict_at=550), now_ms())
    wait_committed_to_end(sc, "a")
    assert sc.count("a") > 999


def test_graphite_lines_without_a_timestamp_get_the_message_time(world: World) -> None:
    """A graphite route: 1,000 lines without timestamps, one of them in conflict with a field
    already stored as integer: exactly 999 points, at their messages' timestamps."""
    sc = world.sc
    conflicting = f"{sc.measurement}_x"
    resp = httpx.post(
        f"{sc.url('a')}/write",
        params={"db": sc.env["INFLUX_DATABASE"]},
        content=f"{conflicting},host=h0 value=1i".encode(),
        timeout=10,
    )
    assert resp.status_code == 204, resp.text
    router = world.start(
        sc.topology(
            batch=ONE_BATCH, format="graphite", graphite_templates=["measurement.host.field"]
        )
    )
    messages = []
    for j in range(MESSAGES):
        lines = [
            f"{conflicting if k == 550 else sc.measurement}.h{k}.value {k}"
            for k in range(j * LINES, (j + 1) * LINES)
        ]
        messages.append("\n".join(lines).encode())
    times = produce(sc, messages, now_ms())
    sc.wait_count("a", 999)
    wait_committed_to_end(sc, "a")
    wait_until(lambda: dead_letters(router) == 1, timeout=20, what="one dead letter")
    assert sc.count("a") == 999
    assert stored_times_ns(sc, "a") == set(times)
