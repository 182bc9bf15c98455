"""Consul: discovery, one shared verdict per datacenter, KV drains, self-registration.

Real Consul dev agent, real Kafka and InfluxDB, routers as processes. Each test has its own
KV prefix, datacenter name and service names, so tests share the agent without meeting.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import consul
import pytest

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, wait_paused, write_yaml
from tests.integration.test_router import ROUTE, World
from tests.support import wait_until

pytestmark = pytest.mark.integration


class ConsulWorld(World):
    def __init__(self, env: dict[str, str], tmp: Path, toxiproxy: Toxiproxy) -> None:
        super().__init__(env, tmp, toxiproxy)
        host, _, port = env["CONSUL_HTTP_ADDR"].rpartition(":")
        self.consul = consul.Consul(host=host, port=int(port))
        self.prefix = f"frt-{self.sc.tag}"
        self.services: list[str] = []

    @property
    def base(self) -> str:
        return f"{self.prefix}/dc-{self.sc.tag}"

    def start_consul_router(self, doc: dict[str, Any], name: str = "router") -> RouterProc:
        path = write_yaml(self.tmp / f"{name}.yaml", doc)
        args = ("--consul-addr", self.sc.env["CONSUL_HTTP_ADDR"], "--consul-prefix", self.prefix)
        router = RouterProc(path, self.tmp, name, args=args).start()
        self.routers.append(router)
        return router

    def register_influx(self, service: str, port: int) -> str:
        """An InfluxDB instance in the catalog with a TTL check the test passes or fails."""
        sid = f"{service}-1"
        self.consul.agent.service.register(
            service,
            service_id=sid,
            address="127.0.0.1",
            port=port,
            check=consul.Check.ttl("600s"),
        )
        self.services.append(sid)
        check = f"service:{sid}"
        self.consul.agent.check.ttl_pass(check)
        return check


@pytest.fixture
def cworld(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path
) -> Iterator[ConsulWorld]:
    w = ConsulWorld(stack_env, tmp_path, toxiproxy)
    yield w
    w.close()
    if stack.pid_of("consul") is None:
        stack.restart("consul")
    for sid in w.services:
        w.consul.agent.service.deregister(sid)
    w.consul.kv.delete(w.prefix, recurse=True)


def _leaders(routers: list[RouterProc]) -> list[RouterProc]:
    return [r for r in routers if r.status()["verdict"]["is_leader"]]


def test_cluster_from_consul_service_fails_over_and_replays(cworld: ConsulWorld) -> None:
    """A cluster named only by a Consul service is discovered; failing its Consul check fails
    the route over, passing again makes it replay."""
    sc = cworld.sc
    service = f"influx-{sc.tag}"
    check = cworld.register_influx(service, int(sc.env["INFLUX_A_PROXY_URL"].rpartition(":")[2]))
    doc = sc.topology()
    doc["clusters"]["influx-a"] = {
        "consul_service": service,
        "database": sc.env["INFLUX_DATABASE"],
        "write_timeout": "1s",
        "max_retries": 1,
    }
    router = cworld.start_consul_router(doc)
    sc.produce(0, 500)
    sc.wait_count("a", 500)
    sc.wait_committed_to_end(ROUTE, "a")
    assert router.status()["clusters"]["influx-a"]["nodes"] == 0  # no static URLs
    assert router.status()["clusters"]["influx-a"]["healthy_nodes"] == 1  # the discovered one

    cworld.consul.agent.check.ttl_fail(check, "test: instance unhealthy")
    wait_paused(router, ROUTE, "a")
    sc.produce(500, 500)
    committed_a = sc.committed(ROUTE, "a")
    expected_on_b = cworld.from_offsets(committed_a, 1000)
    wait_until(lambda: expected_on_b <= sc.values("b"), timeout=60, what="standby caught up")
    assert router.events("failover")

    cworld.consul.agent.check.ttl_pass(check)
    sc.wait_count("a", 1000, timeout=60)
    sc.wait_committed_to_end(ROUTE, "a")


def test_three_replicas_share_one_verdict_and_survive_leader_kill(cworld: ConsulWorld) -> None:
    """Three replicas: exactly one leader; a cut cluster fails over every partition on every
    replica on the leader's verdict; kill -9 of the leader: a new one within the TTL, no flap."""
    sc = cworld.sc
    routers = [cworld.start_consul_router(sc.topology(), f"r{i}") for i in range(3)]
    wait_until(lambda: len(_leaders(routers)) == 1, timeout=30, what="exactly one leader")
    leader = _leaders(routers)[0]
    names = {r.status()["verdict"]["leader"] for r in routers}
    assert names == {leader.status()["verdict"]["replica"]}
    sc.produce(0, 400)
    sc.wait_count("a", 400)

    cworld.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)

    def all_failed_over() -> bool:
        a = [r.destination(ROUTE, "a") for r in routers]
        b = [r.destination(ROUTE, "b") for r in routers]
        a_paused = all(d["paused"] == d["assigned"] for d in a)
        b_live = sum(d["assigned"] - d["paused"] for d in b)
        return a_paused and b_live == sc.partitions and all(d["active"] for d in b)

    wait_until(all_failed_over, timeout=60, what="every partition on b, none left on a")
    since = {r.status()["clusters"]["influx-a"]["since"] for r in routers}
    assert len(since) == 1, "followers act on the leader's published verdict"
    sc.produce(400, 400)
    wait_until(
        lambda: sc.values("b") >= cworld.from_offsets(sc.committed(ROUTE, "a"), 800),
        timeout=60,
        what="standby holds the stream",
    )

    followers = [r for r in routers if r is not leader]
    leader.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    states: list[str] = []

    def new_leader() -> bool:
        for r in followers:
            states.append(r.status()["clusters"]["influx-a"]["state"])
        return len(_leaders(followers)) == 1

    wait_until(new_leader, timeout=20, interval=0.1, what="a new leader")
    took = time.monotonic() - killed_at
    print(f"new leader {took:.2f}s after kill -9 of the old one")  # shown with pytest -rP
    assert took < 10.0, f"new leader after {took:.1f}s, session TTL is 10s"
    for _ in range(20):  # no flapping while and after the lock moves
        states.extend(r.status()["clusters"]["influx-a"]["state"] for r in followers)
        time.sleep(0.1)
    assert set(states) == {"down"}

    cworld.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], True)
    sc.wait_count("a", 800, timeout=90)
    sc.wait_committed_to_end(ROUTE, "a")


def test_consul_down_falls_back_to_local_verdicts_without_loss(cworld: ConsulWorld) -> None:
    """Consul stopped while routing: routing goes on on local verdicts (even a failover), no
    point lost; Consul back: the shared verdict again."""
    sc = cworld.sc
    router = cworld.start_consul_router(sc.topology())
    wait_until(lambda: router.status()["verdict"]["is_leader"], timeout=30, what="leader")
    sc.produce(0, 300)
    sc.wait_count("a", 300)

    stack.down(["consul"])
    wait_until(
        lambda: router.status()["verdict"]["source"] == "local", timeout=30, what="local verdict"
    )
    wait_until(lambda: router.metric("frouter_verdict_local") == 1, timeout=5, what="metric")
    assert any(e["to_state"] == "local" for e in router.events("verdict_source"))
    sc.produce(300, 300)
    sc.wait_count("a", 600)
    cworld.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)  # fail over, locally
    wait_paused(router, ROUTE, "a")
    sc.produce(600, 300)
    wait_until(
        lambda: sc.values("b") >= cworld.from_offsets(sc.committed(ROUTE, "a"), 900),
        timeout=60,
        what="standby took over on the local verdict",
    )
    cworld.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], True)
    sc.wait_count("a", 900, timeout=60)

    stack.restart("consul")
    wait_until(
        lambda: router.status()["verdict"]["source"] == "shared",
        timeout=60,
        what="shared verdict again",
    )
    wait_until(lambda: router.status()["verdict"]["is_leader"], timeout=30, what="leader again")
    wait_until(lambda: router.metric("frouter_verdict_local") == 0, timeout=5, what="metric")
    sc.wait_committed_to_end(ROUTE, "a")


def test_drain_through_consul_kv_is_reversible(cworld: ConsulWorld) -> None:
    """Setting {prefix}/{dc}/drain/{cluster} drains gracefully (no duplicates); deleting the
    key undrains and the primary replays."""
    sc = cworld.sc
    router = cworld.start_consul_router(sc.topology())
    sc.produce(0, 500)
    sc.wait_count("a", 500)
    key = f"{cworld.base}/drain/influx-a"
    cworld.consul.kv.put(key, "true")
    wait_until(lambda: router.destination(ROUTE, "b")["active"], timeout=30, what="b active")
    assert router.status()["clusters"]["influx-a"]["drain_source"] == "consul"
    sc.produce(500, 500)
    sc.wait_committed_to_end(ROUTE, "b")
    assert sc.count("a") + sc.count("b") == 1000  # graceful: no point written twice
    cworld.consul.kv.delete(key)
    sc.wait_count("a", 1000, timeout=60)
    sc.wait_committed_to_end(ROUTE, "a")
    wait_paused(router, ROUTE, "b")


def test_replicas_register_with_passing_check_and_leave_on_sigterm(cworld: ConsulWorld) -> None:
    """Each replica is in Consul's catalog with a passing check on /healthz; SIGTERM removes it."""
    sc = cworld.sc
    routers = [cworld.start_consul_router(sc.topology(), f"r{i}") for i in range(2)]
    dc = f"dc-{sc.tag}"

    def passing() -> list[str]:
        _, entries = cworld.consul.health.service("failover-router", passing=True, tag=dc)
        return sorted(e["Service"]["ID"] for e in entries)

    wait_until(lambda: len(passing()) == 2, timeout=30, what="two passing replicas")
    ids = passing()
    ports = sorted(r.url.rpartition(":")[2] for r in routers)
    assert sorted(i.rpartition("-")[2] for i in ids) == ports
    assert routers[0].stop() == 0
    wait_until(lambda: len(passing()) == 1, timeout=10, what="one replica left")
    assert routers[1].stop() == 0
    wait_until(lambda: passing() == [], timeout=10, what="no replica left")
    _, all_entries = cworld.consul.catalog.service("failover-router", tag=dc)
    assert all_entries == []


def test_devstack_consul_is_a_real_agent(stack_env: dict[str, str]) -> None:
    """The devstack's Consul answers as a real agent with an elected leader, on loopback."""
    host, _, port = stack_env["CONSUL_HTTP_ADDR"].rpartition(":")
    assert host == "127.0.0.1"
    client = consul.Consul(host=host, port=int(port))
    assert client.status.leader()
    pid = stack.pid_of("consul")
    assert pid is not None and os.path.exists(f"/proc/{pid}")
