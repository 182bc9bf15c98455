"""`failover-router backfill` on the real stack: refill a wiped cluster from Kafka, resume
after Ctrl-C, refuse a range Kafka no longer holds.

Each test writes to a database of its own on influx-a, so wiping it touches no other test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from devstack.toxiproxy import Toxiproxy
from router.kafka import KafkaAdmin
from tests.integration.harness import RouterProc, Scenario, new_tag, write_yaml
from tests.support import influx_count, wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"
POINTS = 100_000


class Refill:
    """One test's topic, its own database on influx-a, and the router that filled it."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.sc = Scenario(env, new_tag())
        self.sc.create_topic()
        self.tmp = tmp
        self.database = f"bf_{self.sc.tag}"
        self.query(f'CREATE DATABASE "{self.database}"')
        doc = self.sc.topology(mode="mirror", clusters=("a",))
        doc["clusters"]["influx-a"]["database"] = self.database
        doc["clusters"]["influx-a"]["write_timeout"] = "10s"
        doc["routes"][0]["batch"] = {"max_points": 2000, "linger": "50ms", "max_in_flight": 2}
        self.path = write_yaml(tmp / "router.yaml", doc)

    def query(self, q: str) -> None:
        resp = httpx.post(f"{self.sc.url('a')}/query", params={"q": q}, timeout=30)
        resp.raise_for_status()
        assert "error" not in resp.json()["results"][0], resp.text

    def count(self) -> int:
        return influx_count(self.sc.url("a"), self.database, self.sc.measurement)

    def route_everything(self) -> None:
        """POINTS points through the router into influx-a, then the router stops."""
        router = RouterProc(self.path, self.tmp).start()
        try:
            self.sc.produce(0, POINTS)
            wait_until(lambda: self.count() == POINTS, timeout=180, what=f"{POINTS} points")
        finally:
            assert router.stop() == 0

    def wipe(self) -> None:
        self.query(f'DROP DATABASE "{self.database}"')
        self.query(f'CREATE DATABASE "{self.database}"')
        assert self.count() == 0

    def backfill(self, *extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "router.cli",
                "backfill",
                "--topology",
                str(self.path),
                "--route",
                ROUTE,
                "--cluster",
                "influx-a",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )

    def backfill_group(self) -> dict[tuple[str, int], int]:
        admin = KafkaAdmin({"bootstrap.servers": self.sc.bootstrap})
        try:
            return admin.committed(f"{self.sc.group(ROUTE, 'a')}.backfill", self.sc.tps())
        finally:
            admin.close()


@pytest.fixture
def refill(stack_env: dict[str, str], tmp_path: Path) -> Iterator[Refill]:
    r = Refill(stack_env, tmp_path)
    yield r
    r.query(f'DROP DATABASE "{r.database}"')
    r.sc.close()


def progress_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def since_arg(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_backfill_refills_a_wiped_cluster_and_resumes_after_ctrl_c(
    refill: Refill, toxiproxy: Toxiproxy
) -> None:
    """100k points routed, the database dropped and recreated; a backfill from the start,
    interrupted with SIGINT halfway (exit 130, progress committed to its own group, the live
    group untouched), run again: it resumes from its commits and the cluster holds all 100k
    points again."""
    started = time.time() - 5
    refill.route_everything()
    live = refill.sc.committed(ROUTE, "a")
    refill.wipe()
    since = ("--since", since_arg(started), "--progress-interval", "0.2")
    proxy = refill.sc.env["INFLUX_A_PROXY_NAME"]
    toxiproxy.add_toxic(proxy, "latency", {"latency": 300})  # about 15 s for the whole range
    first = refill.backfill(*since)
    assert first.stdout is not None
    seen: list[dict[str, Any]] = []
    for line in first.stdout:
        if line.startswith("{"):
            seen.append(json.loads(line))
            if seen[-1]["done"] >= POINTS // 2:
                first.send_signal(signal.SIGINT)
                break
    out, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "run the same command again to resume" in err
    lines = seen + progress_lines(out)
    assert lines[0]["total"] == POINTS and not lines[0]["resumed"]
    assert lines[-1]["state"] == "interrupted"
    # a partition whose batches were all still in flight at the interrupt has no commit yet
    # (NO_OFFSET, -1001): it resumes from the start of the range, i.e. offset 0 here
    half = sum(max(offset, 0) for offset in refill.backfill_group().values())
    assert POINTS // 2 <= half < POINTS
    assert lines[-1]["done"] == half
    assert refill.sc.committed(ROUTE, "a") == live  # the live group never moves

    toxiproxy.remove_toxic(proxy, "latency_downstream")
    second = refill.backfill(*since)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    lines = progress_lines(out)
    assert lines[0]["resumed"] and lines[0]["done"] == half
    assert lines[-1]["state"] == "done" and lines[-1]["done"] == POINTS
    assert lines[-1]["points"] <= POINTS - half + 2 * 2000  # resumed: not everything again
    wait_until(lambda: refill.count() == POINTS, timeout=60, what=f"{POINTS} points again")
    assert refill.backfill_group() == refill.sc.end_offsets()


def test_since_before_retention_is_a_clear_error(refill: Refill) -> None:
    """When Kafka deleted part of the range, the backfill refuses and says per partition how
    much is gone and from when data is left; it writes nothing."""
    sc = refill.sc
    started = time.time() - 5
    sc.produce(0, 400)
    time.sleep(1.1)  # the messages left after the cut are younger than --since by > 1 s
    sc.produce(400, 400)
    admin = AdminClient({"bootstrap.servers": sc.bootstrap})
    cut = [TopicPartition(t, p, 100) for t, p in sc.tps()]  # the first 400 messages
    for fut in admin.delete_records(cut).values():
        fut.result(15)
    proc = refill.backfill("--since", since_arg(started))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err
    assert "older than Kafka's retention" in err
    assert f"{sc.topic}[0]: the earliest message Kafka still holds is from" in err
    assert "100 earlier messages were deleted" in err
    assert "Backfill what is left with --since" in err
    assert refill.count() == 0


def test_unknown_route_is_a_clear_error(refill: Refill) -> None:
    """A route the topology does not have: exit 1, naming the routes it has."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "router.cli",
            "backfill",
            "--topology",
            str(refill.path),
            "--route",
            "nope",
            "--cluster",
            "influx-a",
            "--since",
            "1h",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "unknown route 'nope' (routes: r)" in proc.stderr
