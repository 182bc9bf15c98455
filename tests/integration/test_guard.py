"""The route guard end to end: real Kafka, real InfluxDB 1.6, the router as a process.

What is checked is what an operator would look at: points and series in InfluxDB, records on
the dead-letter topic with their reason, committed offsets, the router's metrics and status.
InfluxDB's own ``max-series-per-database`` needs a server started with it: this module starts
a dedicated ``influxd`` (its own ports and data directory) and fails if it cannot.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from tests.integration.harness import (
    RouterProc,
    Scenario,
    dedicated_influx,
    new_tag,
    read_letters,
    write_yaml,
)
from tests.support import influx_query

pytestmark = pytest.mark.integration

ROUTE = "r"
TS_S = 1_700_000_000  # graphite timestamps are seconds
TS_NS = 1_700_000_000_000_000_000
SERIES_LIMIT = 2000


@pytest.fixture
def sc(stack_env: dict[str, str]) -> Iterator[Scenario]:
    scenario = Scenario(stack_env, new_tag())
    scenario.create_topic()
    yield scenario
    scenario.close()


@pytest.fixture
def routers() -> Iterator[list[RouterProc]]:
    started: list[RouterProc] = []
    yield started
    for router in started:
        if router.proc is not None and router.proc.poll() is None:
            router.stop()


def start(routers: list[RouterProc], tmp: Path, doc: dict[str, Any]) -> RouterProc:
    router = RouterProc(write_yaml(tmp / "router.yaml", doc), tmp).start()
    routers.append(router)
    return router


def produce(sc: Scenario, messages: list[bytes]) -> None:
    """Each message to partition i % P, in order."""
    producer = Producer({"bootstrap.servers": sc.bootstrap, "linger.ms": 5})
    for i, value in enumerate(messages):
        producer.produce(sc.topic, value, partition=i % sc.partitions)
        if i % 500 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0


def chunks(lines: list[bytes], size: int) -> list[bytes]:
    return [b"\n".join(lines[i : i + size]) for i in range(0, len(lines), size)]


def count_of(url: str, db: str, measurement: str, field: str) -> int:
    rows = influx_query(url, db, f'SELECT count("{field}") FROM "{measurement}"')
    return int(rows[0][1]) if rows else 0  # type: ignore[call-overload]


def series_count(url: str, db: str, measurement: str | None = None) -> int:
    """Series InfluxDB holds (in ``measurement``, or in the whole database)."""
    where = f' FROM "{measurement}"' if measurement else ""
    return len(influx_query(url, db, f"SHOW SERIES{where}"))


# --- 1. the cardinality guard ---------------------------------------------------------------


def test_exploding_graphite_stream_is_limited_and_well_behaved_series_are_stored_exactly(
    sc: Scenario, routers: list[RouterProc], tmp_path: Path
) -> None:
    """1,000 well-behaved series and a graphite stream with a timestamp in each name, through
    max_new_series_per_minute 500: every well-behaved point is stored, the stream's series
    beyond the limit are dead-lettered as cardinality:<measurement>, InfluxDB's series count
    stays bounded, and every offset commits."""
    good = [f"{kind}_{sc.tag}" for kind in ("cpu", "mem", "disk", "net")]  # 250 hosts each
    jobs = f"jobs_{sc.tag}"
    exploding = 3000
    lines: list[bytes] = []
    for rnd in range(3):  # three points per well-behaved series
        for h in range(250):
            lines += [f"servers.h{h:04d}.{m}.load {h + rnd} {TS_S + rnd}".encode() for m in good]
    bad = [
        f"jobs.{TS_S * 1000 + i}.{jobs}.duration {i} {TS_S + i}".encode() for i in range(exploding)
    ]
    mixed = [line for pair in zip(lines, bad, strict=False) for line in pair]
    mixed += lines[len(bad) :] + bad[len(lines) :]
    doc = sc.topology(
        format="graphite",
        graphite_templates=[
            "servers.* .host.measurement.field",
            "jobs.* .run.measurement.field",
        ],
        guard={"max_new_series_per_minute": 500, "warmup": "0s"},
    )
    router = start(routers, tmp_path, doc)
    started = time.monotonic()
    produce(sc, chunks(mixed, 20))
    sc.wait_committed_to_end(ROUTE, "a", timeout=90)
    elapsed = time.monotonic() - started

    url, db = sc.url("a"), sc.env["INFLUX_DATABASE"]
    for m in good:
        assert count_of(url, db, m, "load") == 750
        assert series_count(url, db, m) == 250
        rows = influx_query(url, db, f'SELECT sum("load") FROM "{m}"')
        assert rows[0][1] == sum(h + rnd for h in range(250) for rnd in range(3))
    admitted = series_count(url, db, jobs)
    assert count_of(url, db, jobs, "duration") == admitted
    assert 500 <= admitted <= 500 + 500 * elapsed / 60 + 1

    letters = read_letters(sc, exploding - admitted)
    assert len(letters) == exploding - admitted
    assert {h["reason"] for _, h in letters} == {f"cardinality:{jobs}".encode()}
    assert all(v.startswith(f"{jobs},run=".encode()) for v, _ in letters)
    assert {h["source_topic"] for _, h in letters} == {sc.topic.encode()}

    refused = router.metric("frouter_guard_cardinality_refused_lines_total", route=ROUTE)
    assert refused == exploding - admitted
    assert router.metric("frouter_guard_new_series_total", route=ROUTE) == 1000 + admitted
    guard = router.status()["guards"][ROUTE]
    assert guard["top_refused"][0]["measurement"] == jobs
    assert guard["top_refused"][0]["refused"] == exploding - admitted
    assert "measurement" not in router_metric_labels(router)


def router_metric_labels(router: RouterProc) -> set[str]:
    """Every label name of the router's frouter_guard_* series."""
    text = httpx.get(f"{router.url}/metrics", timeout=5).text
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("frouter_guard_") and "{" in line:
            labels = line.split("{", 1)[1].rsplit("}", 1)[0]
            names |= {pair.split("=", 1)[0] for pair in labels.split(",") if pair}
    return names


# --- 2. InfluxDB's own max-series-per-database ------------------------------------------------


@pytest.fixture(scope="module")
def limited_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A dedicated InfluxDB 1.6 with ``max-series-per-database = 2000`` (inmem index) on free
    loopback ports, its own data directory, database ``metrics``; stopped at the end. It
    fails, never skips, when it cannot start."""
    home = tmp_path_factory.mktemp("influx-limited")
    with dedicated_influx(home, max_series=SERIES_LIMIT) as (url, _proc):
        resp = httpx.post(f"{url}/query", data={"q": "CREATE DATABASE metrics"}, timeout=10)
        resp.raise_for_status()
        yield url


def test_influxdb_series_limit_dead_letters_the_lines_over_it_without_a_failover(
    sc: Scenario, routers: list[RouterProc], tmp_path: Path, limited_influx: str
) -> None:
    """Against max-series-per-database = 2000: the lines of series over it are dead-lettered
    with InfluxDB's reason, every point of the other series is stored, the cluster stays UP,
    no failover happens (the standby receives nothing)."""
    m = sc.measurement
    doc = sc.topology()
    doc["clusters"]["influx-a"]["urls"] = [limited_influx]
    doc["clusters"]["influx-a"]["database"] = "metrics"
    router = start(routers, tmp_path, doc)
    first = [f"{m},s=s{i:05d} value={i}i {TS_NS + i}".encode() for i in range(1500)]
    produce(sc, chunks(first, 20))
    sc.wait_committed_to_end(ROUTE, "a", timeout=60)
    # known series keep writing; 1000 new ones, of which 500 fit
    known = [f"{m},s=s{i:05d} value={i}i {TS_NS + 10_000 + i}".encode() for i in range(1500)]
    new = [f"{m},s=s{i:05d} value={i}i {TS_NS + 20_000 + i}".encode() for i in range(1500, 2500)]
    second = [line for pair in zip(known, new, strict=False) for line in pair] + known[1000:]
    produce(sc, chunks(second, 20))
    sc.wait_committed_to_end(ROUTE, "a", timeout=90)

    assert series_count(limited_influx, "metrics") == SERIES_LIMIT
    assert count_of(limited_influx, "metrics", m, "value") == 1500 + 1500 + 500
    letters = read_letters(sc, 500)
    assert len(letters) == 500
    reason = f"max-series-per-database limit exceeded: ({SERIES_LIMIT})".encode()
    assert {h["reason"] for _, h in letters} == {reason}
    assert {h["cluster"] for _, h in letters} == {b"influx-a"}
    assert {v for v, _ in letters} <= set(new)

    status = router.status()
    assert status["clusters"]["influx-a"]["state"] == "up"
    assert router.destination(ROUTE, "a")["active"]
    assert not router.destination(ROUTE, "b")["active"]
    assert not router.events("failover")
    assert router.metric("frouter_failovers_total") == 0
    assert sc.count("b") == 0
    assert router.metric("frouter_dead_letters_total", cluster="influx-a") == 500


# --- 3. block rules ---------------------------------------------------------------------------


def test_block_rules_by_regex_and_tag_key_are_counted_and_dead_lettered_by_name(
    sc: Scenario, routers: list[RouterProc], tmp_path: Path
) -> None:
    """A measurement regex rule and a tag key rule: their lines are dead-lettered with
    blocked:<rule>, counted per rule, never stored; the other lines are; a message whose every
    line was blocked still commits."""
    m = sc.measurement
    tmp = f"tmp_{sc.tag}"
    doc = sc.topology(
        guard={
            "block": [
                {"name": "tmp", "measurement": "^tmp_"},
                {"name": "request-id", "tag": {"key": "^request_id$"}},
            ]
        }
    )
    router = start(routers, tmp_path, doc)
    messages: list[bytes] = []
    for i in range(200):
        lines = [f"{m},src=it value={i}i {TS_NS + i}".encode()]
        if i % 2 == 0:
            lines.append(f"{tmp},src=it value={i}i {TS_NS + i}".encode())
        if i % 5 == 0:
            lines.append(f"{m},src=it,request_id=r{i} value={i}i {TS_NS + i}".encode())
        messages.append(b"\n".join(lines))
    messages += [f"{tmp},src=only value={i}i {TS_NS + i}".encode() for i in range(20)]
    produce(sc, messages)
    sc.wait_committed_to_end(ROUTE, "a", timeout=60)

    assert sc.values("a") == set(range(200))
    assert series_count(sc.url("a"), sc.env["INFLUX_DATABASE"], m) == 1
    assert count_of(sc.url("a"), sc.env["INFLUX_DATABASE"], tmp, "value") == 0
    letters = read_letters(sc, 100 + 20 + 40)
    reasons = [h["reason"] for _, h in letters]
    assert reasons.count(b"blocked:tmp") == 120
    assert reasons.count(b"blocked:request-id") == 40
    assert len(letters) == 160
    assert router.metric("frouter_guard_blocked_lines_total", route=ROUTE, rule="tmp") == 120
    assert router.metric("frouter_guard_blocked_lines_total", route=ROUTE, rule="request-id") == 40
    assert router.status()["guards"][ROUTE]["blocked"] == {"tmp": 120, "request-id": 40}
