"""Consul with ACLs (the secured stack's consul-acl agent, default deny), over https.

The router talks to consul-acl with the private CA and a token file; Kafka and InfluxDB are
the plain ones (what is tested here is Consul). With the router's least-privilege token every
Consul feature works: discovery of an ``influx...`` service, the leader lock, the verdict
published under the KV prefix, a KV drain, the router's own registration; a denied
``CONSUL_HTTP_TOKEN`` in the environment changes nothing (the file wins). Without a token, or
with a token lacking the permissions, the router says so (``consul_permission_denied``),
keeps routing on its local verdicts (a cut primary still fails over, nothing lost) and
``/healthz`` stays ok (a restart would not help with a Consul policy).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, wait_paused, write_yaml
from tests.integration.test_router import ROUTE, World
from tests.support import wait_until

pytestmark = pytest.mark.integration


def _token(env: dict[str, str], key: str) -> str:
    return Path(env[key]).read_text().strip()


class AclWorld(World):
    """A test's topic and clusters, the consul-acl agent as the bootstrap token sees it."""

    def __init__(self, env: dict[str, str], tmp: Path, toxiproxy: Toxiproxy) -> None:
        super().__init__(env, tmp, toxiproxy)
        self.env = env
        self.boot = httpx.Client(
            base_url=f"http://{env['CONSUL_ACL_HTTP_ADDR']}",
            headers={"X-Consul-Token": _token(env, "CONSUL_ACL_BOOTSTRAP_TOKEN_FILE")},
            timeout=10,
        )
        self.prefix = env["CONSUL_ACL_ROUTER_KV_PREFIX"].rstrip("/")  # failover-router
        self.dc = f"dc-{self.sc.tag}"
        self.services: list[str] = []

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.dc}"

    def start_acl_router(
        self, doc: dict[str, Any], token_file: str | None, name: str = "router"
    ) -> RouterProc:
        """The router on consul-acl's https address, trusting the private CA only."""
        path = write_yaml(self.tmp / f"{name}.yaml", doc)
        args = [
            "--consul-addr",
            self.env["CONSUL_ACL_HTTPS_ADDR"],
            "--consul-ca-file",
            self.env["TLS_CA_FILE"],
            "--consul-prefix",
            self.prefix,
            "--advertise-address",
            "127.0.0.1",
        ]
        if token_file is not None:
            args += ["--consul-token-file", token_file]
        router = RouterProc(path, self.tmp, name, args=tuple(args)).start()
        self.routers.append(router)
        return router

    def register_influx(self, port: int) -> tuple[str, str]:
        """An InfluxDB instance registered (bootstrap token) as a service ``influx-<tag>`` with
        a TTL check, passing; returns (service name, check id)."""
        service = f"{self.env['CONSUL_ACL_DISCOVERY_SERVICE_PREFIX']}-{self.sc.tag}"
        sid = f"{service}-1"
        reg = {
            "ID": sid,
            "Name": service,
            "Address": "127.0.0.1",
            "Port": port,
            "Check": {"TTL": "600s"},
        }
        self.boot.put("/v1/agent/service/register", json=reg).raise_for_status()
        self.services.append(sid)
        check = f"service:{sid}"
        self.boot.put(f"/v1/agent/check/pass/{check}").raise_for_status()
        return service, check

    def kv(self, key: str) -> Any:
        """The JSON stored at ``key`` (None when absent)."""
        resp = self.boot.get(f"/v1/kv/{key}", params={"raw": ""})
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return json.loads(resp.content)

    def passing_routers(self) -> list[str]:
        resp = self.boot.get(
            f"/v1/health/service/{self.env['CONSUL_ACL_ROUTER_SERVICE']}",
            params={"passing": "", "tag": self.dc},
        )
        resp.raise_for_status()
        return sorted(e["Service"]["ID"] for e in resp.json())

    def cleanup(self) -> None:
        self.close()
        for sid in self.services:
            self.boot.put(f"/v1/agent/service/deregister/{sid}")
        self.boot.delete(f"/v1/kv/{self.base}", params={"recurse": ""})
        self.boot.close()


@pytest.fixture
def aworld(secure_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[AclWorld]:
    w = AclWorld(secure_env, tmp_path, toxiproxy)
    yield w
    w.cleanup()


def _healthz(router: RouterProc) -> httpx.Response:
    return httpx.get(f"{router.url}/healthz", timeout=5)


def _standby_then_restore(aworld: AclWorld, held: int, *, what: str) -> None:
    """With influx-a cut and messages 0..held-1 in it: ``held`` more messages reach the
    standby from influx-a's committed offsets on; influx-a restored then holds all of them."""
    sc, total = aworld.sc, 2 * held
    sc.produce(held, held)
    wait_until(
        lambda: sc.values("b") >= aworld.from_offsets(sc.committed(ROUTE, "a"), total),
        timeout=60,
        what=what,
    )
    aworld.toxiproxy.set_enabled(aworld.env["INFLUX_A_PROXY_NAME"], True)
    sc.wait_count("a", total, timeout=90)
    sc.wait_committed_to_end(ROUTE, "a")
    assert sc.values("a") == set(range(total))  # nothing lost


@pytest.mark.parametrize("environment", ["clean", "denied-CONSUL_HTTP_TOKEN"])
def test_router_token_over_https_runs_every_consul_feature(
    aworld: AclWorld, monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    """With the router's least-privilege token over https: the cluster found as a Consul
    service takes the writes, the replica holds the lock and publishes its verdict under the
    prefix, registers itself with a passing check, and a KV drain moves the points to the
    standby and back. With CONSUL_HTTP_TOKEN set to the denied token, the token file wins."""
    env = aworld.env
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    if environment != "clean":
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", _token(env, "CONSUL_ACL_DENIED_TOKEN_FILE"))
    sc = aworld.sc
    port = int(env["INFLUX_A_PROXY_URL"].rpartition(":")[2])
    service, _ = aworld.register_influx(port)
    doc = sc.topology()
    doc["datacenter"] = aworld.dc
    doc["clusters"]["influx-a"] = {
        "consul_service": service,
        "database": env["INFLUX_DATABASE"],
        "write_timeout": "1s",
        "max_retries": 1,
    }
    router = aworld.start_acl_router(doc, env["CONSUL_ACL_ROUTER_TOKEN_FILE"])

    def shared_leader() -> bool:
        v = router.status()["verdict"]
        return bool(v["is_leader"]) and v["source"] == "shared"

    wait_until(shared_leader, timeout=30, what="leader on the shared verdict")
    sc.produce(0, 500)
    sc.wait_count("a", 500)
    sc.wait_committed_to_end(ROUTE, "a")
    cluster_a = router.status()["clusters"]["influx-a"]
    assert cluster_a["nodes"] == 0 and cluster_a["healthy_nodes"] == 1  # discovered only

    replica = router.status()["verdict"]["replica"]
    wait_until(
        lambda: (aworld.kv(f"{aworld.base}/clusters/influx-a") or {}).get("state") == "up",
        timeout=15,
        what="influx-a's verdict published under the prefix",
    )
    published = aworld.kv(f"{aworld.base}/clusters/influx-a")
    assert published["leader"] == replica
    wait_until(lambda: len(aworld.passing_routers()) == 1, timeout=30, what="registered")
    assert aworld.passing_routers()[0].endswith(router.url.rpartition(":")[2])

    drain = f"{aworld.base}/drain/influx-a"
    aworld.boot.put(f"/v1/kv/{drain}", content=b"true").raise_for_status()
    wait_until(lambda: router.destination(ROUTE, "b")["active"], timeout=30, what="b active")
    assert router.status()["clusters"]["influx-a"]["drain_source"] == "consul"
    sc.produce(500, 500)
    sc.wait_committed_to_end(ROUTE, "b")
    assert sc.count("a") + sc.count("b") == 1000  # drained gracefully: nothing twice
    aworld.boot.delete(f"/v1/kv/{drain}").raise_for_status()
    sc.wait_count("a", 1000, timeout=60)
    sc.wait_committed_to_end(ROUTE, "a")
    wait_paused(router, ROUTE, "b")

    assert router.events("consul_permission_denied") == []
    assert _healthz(router).text.startswith("ok")
    assert router.stop() == 0
    wait_until(lambda: aworld.passing_routers() == [], timeout=10, what="deregistered")


@pytest.mark.parametrize("token", ["no-token", "denied-token"])
def test_refused_consul_means_local_verdicts_and_no_loss(
    aworld: AclWorld, monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """No token, or a token without the policy: consul_permission_denied names the refused
    call and the token's source, the replica decides on its own probes (a cut primary fails
    over to the standby, nothing lost), /healthz stays ok and SIGTERM exits 0."""
    env = aworld.env
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    token_file = env["CONSUL_ACL_DENIED_TOKEN_FILE"] if token == "denied-token" else None
    sc = aworld.sc
    doc = sc.topology()
    doc["datacenter"] = aworld.dc
    router = aworld.start_acl_router(doc, token_file)

    def denied_ops() -> set[str]:
        return {e["op"] for e in router.events("consul_permission_denied")}

    wait_until(lambda: {"register", "election"} <= denied_ops(), timeout=30, what="refusals named")
    source = f"token from --consul-token-file {token_file}" if token_file else "no token"
    for ev in router.events("consul_permission_denied"):
        assert ev["reason"].startswith(f"consul: permission denied ({source}) for "), ev
        assert re.search(r"\) for [a-z_.]+: ", ev["reason"]), ev  # the call that was refused
        assert "Permission denied" in ev["reason"] or "ACL not found" in ev["reason"], ev
    # the watch is a recursive KV read: Consul filters what the token may not see instead of
    # refusing it, so it answers (empty) even without a token; the refused calls decide
    wait_until(lambda: router.status()["verdict"]["source"] == "local", timeout=15, what="local")
    assert router.metric("frouter_verdict_local") == 1
    assert not router.status()["verdict"]["is_leader"]
    health = _healthz(router)
    assert health.status_code == 200 and health.text.startswith("ok"), health.text

    sc.produce(0, 300)
    sc.wait_count("a", 300)
    aworld.toxiproxy.set_enabled(env["INFLUX_A_PROXY_NAME"], False)
    wait_paused(router, ROUTE, "a")
    assert router.events("failover")
    _standby_then_restore(aworld, 300, what="the standby took over on the local verdict")

    assert router.proc is not None and router.proc.poll() is None
    assert router.status()["verdict"]["source"] == "local"
    assert _healthz(router).status_code == 200
    assert aworld.kv(f"{aworld.base}/clusters/influx-a") is None  # nothing published
    assert router.stop() == 0
    assert not [e for e in router.events() if e.get("level") in ("critical", "exception")]


def test_two_replicas_share_one_verdict_and_pass_the_lock_on_under_acls(
    aworld: AclWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas of one datacenter with the router's least-privilege token over https: one
    holds the lock and publishes, the other's verdict source is ``shared`` and names that
    leader; both register; the primary cut (for both: one proxy) is published DOWN by the
    leader and DOWN for the follower, both fail over and back with nothing lost; when the
    leader stops, the other takes the lock, publishes and keeps routing. (A fault only one
    replica sees: test_multireplica, over the plain Consul agent.)"""
    env = aworld.env
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    sc = aworld.sc
    token = env["CONSUL_ACL_ROUTER_TOKEN_FILE"]
    routers = []
    for name in ("r1", "r2"):
        doc = sc.topology()
        doc["datacenter"] = aworld.dc
        routers.append(aworld.start_acl_router(doc, token, name=name))

    def verdicts() -> list[dict[str, Any]]:
        return [r.status()["verdict"] for r in routers if r.proc and r.proc.poll() is None]

    def one_leader_shared() -> bool:
        vs = verdicts()
        leaders = {v["replica"] for v in vs if v["is_leader"]}
        return (
            len(leaders) == 1
            and all(v["source"] == "shared" and v["leader"] in leaders for v in vs)
            and all(r.destination(ROUTE, "a")["assigned"] > 0 for r in routers)
        )

    wait_until(one_leader_shared, timeout=60, what="one leader, both on the shared verdict")
    wait_until(lambda: len(aworld.passing_routers()) == 2, timeout=30, what="both registered")
    leader = next(r for r in routers if r.status()["verdict"]["is_leader"])
    follower = next(r for r in routers if r is not leader)
    leader_id = leader.status()["verdict"]["replica"]

    sc.produce(0, 600)
    sc.wait_count("a", 600)
    sc.wait_committed_to_end(ROUTE, "a")

    aworld.toxiproxy.set_enabled(env["INFLUX_A_PROXY_NAME"], False)
    for r in routers:
        wait_paused(r, ROUTE, "a")

    def published_down() -> bool:
        v = aworld.kv(f"{aworld.base}/clusters/influx-a") or {}
        return bool(v.get("state") == "down" and v.get("leader") == leader_id)

    wait_until(published_down, timeout=15, what="influx-a published DOWN by the leader")
    wait_until(
        lambda: follower.status()["clusters"]["influx-a"]["state"] == "down",
        timeout=15,
        what="the follower sees influx-a DOWN",
    )
    assert all(r.events("failover") for r in routers)
    _standby_then_restore(aworld, 600, what="the standby took over on both replicas")
    for r in routers:
        wait_paused(r, ROUTE, "b")

    assert leader.stop() == 0
    wait_until(
        lambda: follower.status()["verdict"]["is_leader"], timeout=60, what="the lock passed on"
    )
    wait_until(lambda: len(aworld.passing_routers()) == 1, timeout=30, what="leader deregistered")
    wait_until(
        lambda: (
            (aworld.kv(f"{aworld.base}/clusters/influx-a") or {}).get("leader")
            == follower.status()["verdict"]["replica"]
        ),
        timeout=30,
        what="the new leader publishes",
    )
    sc.produce(1200, 300)
    sc.wait_count("a", 1500, timeout=60)
    sc.wait_committed_to_end(ROUTE, "a")
    assert all(r.events("consul_permission_denied") == [] for r in routers)
    assert follower.stop() == 0
