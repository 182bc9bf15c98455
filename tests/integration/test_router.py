"""The router end to end: real Kafka, real InfluxDB, real Toxiproxy, the router as a process.

Counts are distinct points in InfluxDB (each message carries one point with its own value and
timestamp); offsets are read from Kafka per consumer group, as an operator would.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, Scenario, new_tag, wait_paused, write_yaml
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"


class World:
    def __init__(self, env: dict[str, str], tmp: Path, toxiproxy: Toxiproxy) -> None:
        self.sc = Scenario(env, new_tag())
        self.sc.create_topic()
        self.tmp = tmp
        self.toxiproxy = toxiproxy
        self.routers: list[RouterProc] = []

    def start(self, doc: dict[str, Any], name: str = "router") -> RouterProc:
        path = write_yaml(self.tmp / f"{name}.yaml", doc)
        router = RouterProc(path, self.tmp, name).start()
        self.routers.append(router)
        return router

    def edit(self, router: RouterProc, doc: dict[str, Any]) -> None:
        write_yaml(router.topology, doc)

    def offsets_of(self, values: set[int]) -> dict[tuple[str, int], set[int]]:
        """Message i sits at partition i % P, offset i // P (one producer, in order)."""
        p = self.sc.partitions
        out: dict[tuple[str, int], set[int]] = {}
        for i in values:
            out.setdefault((self.sc.topic, i % p), set()).add(i // p)
        return out

    def close(self) -> None:
        """Stop the test's routers and bring back any InfluxDB it killed or froze."""
        for router in self.routers:
            if router.proc is not None and router.proc.poll() is None:
                router.stop()
        self.sc.close()
        for n in ("a", "b", "c"):
            pid = stack.pid_of(f"influx-{n}")
            if pid is None:
                stack.restart(f"influx-{n}")
            else:
                os.kill(pid, signal.SIGCONT)

    def from_offsets(self, committed: dict[tuple[str, int], int], total: int) -> set[int]:
        """The messages at or after ``committed`` per partition, among 0..total-1."""
        p = self.sc.partitions
        return {i for i in range(total) if i // p >= max(committed[(self.sc.topic, i % p)], 0)}


@pytest.fixture
def world(stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[World]:
    w = World(stack_env, tmp_path, toxiproxy)
    yield w
    w.close()


def produce_in_background(
    sc: Scenario, start: int, count: int, chunks: int = 10
) -> threading.Thread:
    """Produce ``count`` messages in ``chunks`` spread over about two seconds."""

    def run() -> None:
        step = count // chunks
        for k in range(chunks):
            sc.produce(start + k * step, step)
            threading.Event().wait(0.2)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_steady_state_primary_gets_everything_standby_nothing(world: World) -> None:
    """N points in: the primary holds exactly N, its group committed the end offsets, the
    standby got nothing, and SIGTERM exits 0."""
    sc = world.sc
    router = world.start(sc.topology())
    sc.produce(0, 2000)
    sc.wait_count("a", 2000)
    sc.wait_committed_to_end(ROUTE, "a")
    assert sc.count("b") == 0
    assert all(o < 0 for o in sc.committed(ROUTE, "b").values())
    assert router.metric("frouter_points_written_total", cluster="influx-a") == 2000
    assert router.stop() == 0
    assert sc.committed(ROUTE, "a") == sc.end_offsets()


def _kill(name: str) -> Callable[[], None]:
    pid = stack.pid_of(name)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return lambda: stack.restart(name)


def _freeze(name: str) -> Callable[[], None]:
    pid = stack.pid_of(name)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    return lambda: os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("fault", [_kill, _freeze], ids=["kill-9", "sigstop"])
def test_primary_failure_fails_over_from_last_commit_and_replays(
    world: World, fault: Callable[[str], Callable[[], None]]
) -> None:
    """A killed or hung primary is paused within the health window, the standby gets every
    point from the primary's last committed offset, and the primary replays all on return."""
    sc = world.sc
    router = world.start(sc.topology())
    sc.produce(0, 1000)
    sc.wait_count("a", 1000)
    bg = produce_in_background(sc, 1000, 2000)
    recover = fault("influx-a")
    wait_paused(router, ROUTE, "a", timeout=20)
    bg.join()
    total = 3000
    committed_a = sc.committed(ROUTE, "a")
    expected_on_b = world.from_offsets(committed_a, total)
    wait_until(
        lambda: expected_on_b <= sc.values("b"),
        timeout=60,
        what="standby holds every point from the primary's last commit on",
    )
    failovers = router.events("failover")
    assert failovers and failovers[0]["from_cluster"] == "influx-a"
    assert failovers[0]["to_cluster"] == "influx-b"

    recover()
    sc.produce(total, 500)
    sc.wait_count("a", total + 500, timeout=90)
    sc.wait_committed_to_end(ROUTE, "a")
    assert sc.values("a") == set(range(total + 500))
    wait_paused(router, ROUTE, "b", timeout=30)  # hand-back once the primary caught up
    assert router.events("handback")


@pytest.mark.parametrize(
    ("kind", "attributes"),
    [("latency", {"latency": 3000}), ("reset_peer", {"timeout": 0})],
    ids=["latency-over-timeout", "connection-reset"],
)
def test_network_faults_behave_like_a_down_cluster(
    world: World, kind: str, attributes: dict[str, int]
) -> None:
    """Latency above the write timeout, or resets, on the primary make the standby take over;
    removing the toxic recovers the primary with no loss."""
    sc = world.sc
    router = world.start(sc.topology())
    sc.produce(0, 500)
    sc.wait_count("a", 500)
    toxic = world.toxiproxy.add_toxic(sc.env["INFLUX_A_PROXY_NAME"], kind, attributes)
    wait_paused(router, ROUTE, "a", timeout=30)
    sc.produce(500, 1000)
    committed_a = sc.committed(ROUTE, "a")
    expected_on_b = world.from_offsets(committed_a, 1500)
    wait_until(lambda: expected_on_b <= sc.values("b"), timeout=60, what="standby caught up")
    world.toxiproxy.remove_toxic(sc.env["INFLUX_A_PROXY_NAME"], toxic)
    sc.wait_count("a", 1500, timeout=90)
    sc.wait_committed_to_end(ROUTE, "a")


def test_drain_by_topology_edit_hands_over_without_duplicates(world: World) -> None:
    """Draining the primary by editing the file while producing: the standby starts exactly
    at the primary's last commit (no duplicates); undrain replays to the primary."""
    sc = world.sc
    doc = sc.topology()
    router = world.start(doc)
    sc.produce(0, 1000)
    sc.wait_count("a", 1000)
    bg = produce_in_background(sc, 1000, 2000)
    world.edit(router, sc.topology(drain=["a"]))
    wait_until(lambda: router.destination(ROUTE, "b")["active"], timeout=30, what="b active")
    bg.join()
    total = 3000
    sc.wait_committed_to_end(ROUTE, "b", timeout=60)
    committed_a = sc.committed(ROUTE, "a")
    starts = [
        e
        for e in router.events("destination_state")
        if e["cluster"] == "influx-b" and e["to_state"] == "active"
    ]
    assert starts, "the standby logged where it started"
    expected = {f"{t}[{p}]": o for (t, p), o in committed_a.items()}
    assert starts[0]["starts"] == expected
    assert sc.count("a") + sc.count("b") == total  # no point written to both
    assert sc.values("a") | sc.values("b") == set(range(total))

    world.edit(router, doc)  # undrain
    sc.wait_count("a", total, timeout=90)
    sc.wait_committed_to_end(ROUTE, "a")
    wait_paused(router, ROUTE, "b", timeout=30)


def test_mirror_three_clusters_one_down_end_identical(world: World) -> None:
    """Mirror mode: a cluster cut off for a while is paused, then replays; all three end equal."""
    sc = world.sc
    router = world.start(sc.topology(mode="mirror"))
    sc.produce(0, 1000)
    for c in "abc":
        sc.wait_count(c, 1000)
    world.toxiproxy.set_enabled(sc.env["INFLUX_C_PROXY_NAME"], False)
    wait_paused(router, ROUTE, "c")
    sc.produce(1000, 1000)
    sc.wait_count("a", 2000)
    sc.wait_count("b", 2000)
    assert sc.count("c") == 1000
    world.toxiproxy.set_enabled(sc.env["INFLUX_C_PROXY_NAME"], True)
    sc.wait_count("c", 2000, timeout=60)
    for c in "abc":
        sc.wait_committed_to_end(ROUTE, c)
    assert sc.values("a") == sc.values("b") == sc.values("c") == set(range(2000))


def test_two_routers_keep_partitions_paused_and_survive_a_kill(world: World) -> None:
    """Two routers in one dc while the primary is down: after the rebalance every partition
    of the primary's group stays paused; kill -9 one router mid-stream: nothing is lost."""
    sc = world.sc
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)
    r1 = world.start(sc.topology(), "r1")
    wait_until(lambda: r1.destination(ROUTE, "b")["active"], timeout=30, what="b active on r1")
    sc.produce(0, 1000)
    r2 = world.start(sc.topology(), "r2")

    def spread_and_paused() -> bool:
        d1, d2 = r1.destination(ROUTE, "a"), r2.destination(ROUTE, "a")
        both_have = d1["assigned"] > 0 and d2["assigned"] > 0
        total = d1["assigned"] + d2["assigned"] == sc.partitions
        paused = d1["paused"] == d1["assigned"] and d2["paused"] == d2["assigned"]
        return bool(both_have and total and paused)

    wait_until(spread_and_paused, timeout=60, what="primary partitions spread and paused")
    bg = produce_in_background(sc, 1000, 2000)
    r1.kill(signal.SIGKILL)
    bg.join()
    wait_until(
        lambda: r2.destination(ROUTE, "b")["assigned"] == sc.partitions,
        timeout=60,
        what="r2 owns every partition after r1 died",
    )

    def r2_holds_primary_paused() -> bool:
        d = r2.destination(ROUTE, "a")
        return bool(d["assigned"] == d["paused"] == sc.partitions)

    wait_until(r2_holds_primary_paused, timeout=60, what="r2 holds the primary's group, paused")
    wait_until(lambda: sc.values("b") == set(range(3000)), timeout=90, what="b has every point")
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], True)
    sc.wait_count("a", 3000, timeout=90)


def test_malformed_lines_go_to_dead_letters_with_headers(world: World) -> None:
    """1% malformed lines: every valid point is written, every malformed line is in the
    dead-letter topic with its headers, and no partition is stuck."""
    sc = world.sc
    router = world.start(sc.topology())
    sc.produce(0, 2000, bad_every=100)
    bad = set(range(0, 2000, 100))
    sc.wait_count("a", 2000 - len(bad))
    sc.wait_committed_to_end(ROUTE, "a")
    assert sc.values("a") == set(range(2000)) - bad

    consumer = Consumer(
        {
            "bootstrap.servers": sc.bootstrap,
            "group.id": f"dlq-{sc.tag}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([sc.dead_letter_topic])
    letters: list[Any] = []

    def read_letters() -> bool:
        letters.extend(consumer.consume(100, 0.5))
        return len(letters) >= len(bad)

    wait_until(read_letters, timeout=30, what="dead letters")
    consumer.close()
    seen = set()
    for msg in letters:
        headers = {k: v.decode() for k, v in msg.headers() or []}
        i = int(headers["source_offset"]) * sc.partitions + int(headers["source_partition"])
        assert i in bad
        assert (
            bytes(msg.value() or b"").decode().startswith(f"{sc.measurement},src=it value=oops{i} ")
        )
        assert headers["source_topic"] == sc.topic
        assert headers["cluster"] == "influx-a"
        assert headers["reason"]
        seen.add(i)
    assert seen == bad
    assert router.metric("frouter_dead_letters_total", cluster="influx-a") == len(bad)


def test_invalid_topology_edit_is_refused_and_router_keeps_going(world: World) -> None:
    """A bad edit is refused with the key path; the router keeps routing on the last good one."""
    sc = world.sc
    doc = sc.topology()
    router = world.start(doc)
    sc.produce(0, 500)
    sc.wait_count("a", 500)
    bad = sc.topology()
    bad["routes"][0]["primary"] = "influx-zzz"
    world.edit(router, bad)
    wait_until(
        lambda: router.metric("frouter_topology_reloads_total", outcome="rejected") == 1,
        timeout=20,
        what="reload rejected",
    )
    assert "routes[0].primary" in router.status()["topology_error"]
    rejected = router.events("topology_rejected")
    assert any("routes[0].primary" in err for err in rejected[0]["errors"])
    sc.produce(500, 500)
    sc.wait_count("a", 1000)
    sc.wait_committed_to_end(ROUTE, "a")


def test_retention_gap_is_counted_exactly(world: World) -> None:
    """Offsets deleted from Kafka while a cluster is down are counted as lost, reported, and
    the destination continues from the earliest offset."""
    sc = world.sc
    router = world.start(sc.topology(mode="mirror", clusters=("a",)))
    sc.produce(0, 400)
    sc.wait_count("a", 400)
    sc.wait_committed_to_end(ROUTE, "a")
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)
    wait_paused(router, ROUTE, "a")
    sc.produce(400, 800)  # 200 more per partition while a is down
    committed = sc.committed(ROUTE, "a")
    admin = AdminClient({"bootstrap.servers": sc.bootstrap})
    cut = [TopicPartition(t, p, committed[(t, p)] + 50) for t, p in sc.tps()]
    for fut in admin.delete_records(cut).values():
        fut.result(15)
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], True)
    lost = 50 * sc.partitions
    wait_until(
        lambda: router.metric("frouter_retention_lost_messages_total", cluster="influx-a") == lost,
        timeout=60,
        what="retention loss counted",
    )
    gaps = router.events("retention_gap")
    assert sorted(e["lost"] for e in gaps) == [50] * sc.partitions
    sc.wait_count("a", 1200 - lost, timeout=60)
    sc.wait_committed_to_end(ROUTE, "a")


def test_skip_missed_primary_jumps_forward_and_records_the_gap(world: World) -> None:
    """With skip_missed the returning primary does not replay: it starts where the standby is,
    and the skipped range is counted exactly, as a metric and as events."""
    sc = world.sc
    router = world.start(sc.topology(skip_missed=True))
    sc.produce(0, 400)
    sc.wait_count("a", 400)
    sc.wait_committed_to_end(ROUTE, "a")
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)
    wait_paused(router, ROUTE, "a")
    sc.produce(400, 800)
    sc.wait_committed_to_end(ROUTE, "b")
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], True)
    wait_until(
        lambda: router.metric("frouter_skipped_messages_total", cluster="influx-a") == 800,
        timeout=60,
        what="the skipped range counted",
    )
    assert sum(e["count"] for e in router.events("skipped_range")) == 800
    sc.wait_committed_to_end(ROUTE, "a")  # the skip is recorded as the group's progress
    sc.produce(1200, 400)
    sc.wait_committed_to_end(ROUTE, "a")
    sc.wait_count("a", 800)
    assert sc.values("a") == set(range(400)) | set(range(1200, 1600))
    wait_paused(router, ROUTE, "b")


def test_misconfigured_primary_is_stopped_loudly_and_never_committed(world: World) -> None:
    """A database InfluxDB does not know stops that destination (no commit past it), says so
    in status, events and metrics, and the route fails over to the standby."""
    sc = world.sc
    doc = sc.topology()
    doc["clusters"]["influx-a"]["database"] = f"missing_{sc.tag}"
    router = world.start(doc)
    sc.produce(0, 500)
    wait_until(
        lambda: router.status()["clusters"]["influx-a"]["misconfigured"],
        timeout=30,
        what="influx-a reported misconfigured",
    )
    wait_until(
        lambda: router.destination(ROUTE, "a")["state"] == "stopped",
        timeout=10,
        what="influx-a destination stopped",
    )
    sc.wait_count("b", 500)
    sc.wait_committed_to_end(ROUTE, "b")
    # at most the start of the log (recorded at activation), never past a point it refused
    assert all(o <= 0 for o in sc.committed(ROUTE, "a").values())
    assert router.events("sink_misconfigured")
    assert router.metric("frouter_destination_misconfigured", cluster="influx-a") == 1


def test_graphite_route_converts_with_templates_and_dead_letters_bad_lines(world: World) -> None:
    """A graphite route turns `path value ts` into points by its templates; a line that is not
    graphite goes to the dead-letter topic and the partition still commits to the end."""
    sc = world.sc
    router = world.start(
        sc.topology(format="graphite", graphite_templates=["measurement.host.field"])
    )
    producer = Producer({"bootstrap.servers": sc.bootstrap})
    for i in range(400):
        value = "not-a-number" if i % 100 == 0 else str(i)
        line = f"{sc.measurement}.h{i % 10}.value {value} {1_700_000_000 + i}"
        producer.produce(sc.topic, line.encode(), partition=i % sc.partitions)
    assert producer.flush(30) == 0
    sc.wait_count("a", 396)
    sc.wait_committed_to_end(ROUTE, "a")
    assert sc.values("a") == set(range(400)) - {0, 100, 200, 300}
    wait_until(
        lambda: router.metric("frouter_dead_letters_total", cluster="influx-a") == 4,
        timeout=20,
        what="four dead letters",
    )


def test_retention_loss_while_reading_is_counted(world: World) -> None:
    """Records deleted ahead of a destination that is still reading (slow cluster, small
    prefetch) are counted exactly as lost; the destination continues after the gap."""
    sc = world.sc
    doc = sc.topology(mode="mirror", clusters=("a",))
    doc["kafka"]["client_config"] = {
        "queued.max.messages.kbytes": "1",
        "message.max.bytes": "1000",
        "fetch.max.bytes": "1024",
        "max.partition.fetch.bytes": "1024",
    }
    doc["clusters"]["influx-a"]["write_timeout"] = "5s"
    doc["health"] = {"interval": "1s", "timeout": "3s", "fall": 3, "rise": 1}
    doc["routes"][0]["batch"] = {"max_points": 20, "linger": "10ms", "max_in_flight": 1}
    router = world.start(doc)
    world.toxiproxy.add_toxic(sc.env["INFLUX_A_PROXY_NAME"], "latency", {"latency": 1000})
    total = 2000
    sc.produce(0, total)  # 500 per partition; the destination reads ~20 messages a second
    wait_until(lambda: sc.count("a") > 0, timeout=30, what="first slow writes")
    cut = 300
    admin = AdminClient({"bootstrap.servers": sc.bootstrap})
    for fut in admin.delete_records([TopicPartition(t, p, cut) for t, p in sc.tps()]).values():
        fut.result(15)
    world.toxiproxy.remove_toxic(sc.env["INFLUX_A_PROXY_NAME"], "latency_downstream")
    sc.wait_committed_to_end(ROUTE, "a", timeout=90)
    stored = sc.values("a")
    lost = total - len(stored)
    assert lost > 0
    assert router.metric("frouter_retention_lost_messages_total", cluster="influx-a") == lost
    assert router.events("offset_out_of_range")
    assert {i for i in range(total) if i // sc.partitions >= cut} <= stored
