"""The dashboard and the alerts against a real Prometheus scraping two real routers during a
failover.

Prometheus (built from the Go module proxy by ./dev setup) scrapes two replicas of one
datacenter every second and evaluates the chart's alert rules (their ``for:`` shortened to 2 s,
nothing else changed). The story: two routes with influx-a as primary (``r``: standby influx-b;
``s``: standby influx-c, skip_missed), a steady stream with some malformed lines; influx-a is
cut (both routes fail over), Kafka's retention deletes part of what influx-a has not read,
influx-c is cut too (route ``s`` has no usable cluster) and restored, influx-a is restored
(``r`` replays and counts the loss, ``s`` skips, both hand back). Then every query of the
dashboard (panels, variables, annotations) and every alert expression goes through
Prometheus's HTTP API: each answers, each panel has data, and the values tell the story. The
panels are drawn with matplotlib into the test's output (``dashboard.png``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from dashboards import generate, render
from devstack.tools import tool
from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, Scenario, free_port, new_tag, write_yaml
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "helm" / "failover-router" / "files" / "alerts.yaml"
DATACENTER = "dc-it"
SHORT_FOR = "2s"


class PrometheusProc:
    """A Prometheus server scraping the given targets every second, with the alert rules."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        rules = yaml.safe_load(ALERTS.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = SHORT_FOR
        (workdir / "alerts.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "900ms",
                "evaluation_interval": "1s",
            },
            "rule_files": ["alerts.yaml"],
            "scrape_configs": [
                {
                    "job_name": "failover-router",
                    "static_configs": [{"targets": targets, "labels": {"datacenter": DATACENTER}}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> PrometheusProc:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(tool("prometheus")),
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        wait_until(self._ready, timeout=60, what=f"prometheus ready ({self.log})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text()[-2000:]}")
        try:
            return self.client.get("/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        body = self.client.get("/api/v1/query", params=params).json()
        assert body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def firing(self, alertname: str) -> list[dict[str, str]]:
        body = self.client.get("/api/v1/alerts").json()
        return [
            a["labels"]
            for a in body["data"]["alerts"]
            if a["labels"]["alertname"] == alertname and a["state"] == "firing"
        ]

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Stream:
    """A steady producer on both topics (a malformed line every 50th message of ``r``)."""

    def __init__(self, r: Scenario, s: Scenario) -> None:
        self.r, self.s = r, s
        self.next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.r.produce(self.next, 200, bad_every=50)
            self.s.produce(self.next, 200)
            self.next += 200
            self._stop.wait(0.5)

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture
def routes(stack_env: dict[str, str]) -> Iterator[tuple[Scenario, Scenario]]:
    r, s = Scenario(stack_env, new_tag()), Scenario(stack_env, new_tag())
    r.create_topic()
    s.create_topic()
    yield r, s
    r.close()
    s.close()


def _topology(r: Scenario, s: Scenario, port: int) -> dict[str, Any]:
    doc = r.topology(route="r", listen=port)
    doc["datacenter"] = DATACENTER
    doc["routes"].append(
        {
            **doc["routes"][0],
            "name": "s",
            "topics": [s.topic],
            "standby": ["influx-c"],
            "skip_missed": True,
        }
    )
    return doc


def _active(routers: list[RouterProc], route: str, cluster: str) -> bool:
    """Some replica has the destination active, and none has another cluster of it active."""
    actives = {
        d["cluster"]
        for router in routers
        for rt in router.status()["routes"]
        if rt["name"] == route
        for d in rt["destinations"]
        if d["active"]
    }
    return actives == {f"influx-{cluster}"}


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bfrouter_[a-z_]+", expr))


def test_dashboard_and_alerts_tell_the_failover_story(
    routes: tuple[Scenario, Scenario], toxiproxy: Toxiproxy, tmp_path: Path
) -> None:
    """Prometheus scraping two routers through a failover: every dashboard query and alert
    expression answers with data; the active cluster moves to the standby and back; the DOWN
    alert fires and resolves; retention loss, skipped ranges, dead letters and the route with
    no usable cluster all show; `promtool check metrics` accepts the router's /metrics."""
    r, s = routes
    ports = [free_port(), free_port()]
    routers = [
        RouterProc(write_yaml(tmp_path / f"r{i}.yaml", _topology(r, s, p)), tmp_path, f"r{i}")
        for i, p in enumerate(ports)
    ]
    (tmp_path / "prom").mkdir()
    prom = PrometheusProc(tmp_path / "prom", [f"127.0.0.1:{p}" for p in ports])
    env = r.env
    try:
        for router in routers:
            router.start()
        prom.start()
        start = time.time()
        wait_until(
            lambda: len(prom.query('up{job="failover-router"} == 1')) == 2,
            timeout=30,
            what="both routers scraped",
        )
        with Stream(r, s) as stream:
            wait_until(lambda: r.count("a") > 0 and s.count("a") > 0, timeout=60, what="a written")
            time.sleep(8)  # a steady stretch on the dashboard

            # influx-a goes away: both routes fail over.
            toxiproxy.set_enabled(env["INFLUX_A_PROXY_NAME"], False)
            cut_at = time.time()
            wait_until(lambda: _active(routers, "r", "b"), timeout=60, what="r on influx-b")
            wait_until(lambda: _active(routers, "s", "c"), timeout=60, what="s on influx-c")
            wait_until(
                lambda: prom.firing("FrouterClusterDown"), timeout=60, what="FrouterClusterDown"
            )
            assert {a["cluster"] for a in prom.firing("FrouterClusterDown")} == {"influx-a"}

            # Kafka's retention deletes 50 messages per partition that influx-a has not read
            # (influx-b, the active standby, has them already).
            committed_a = r.committed("r", "a")
            wait_until(
                lambda: all(r.committed("r", "b")[tp] >= committed_a[tp] + 50 for tp in r.tps()),
                timeout=60,
                what="influx-b past the range to delete",
            )
            admin = AdminClient({"bootstrap.servers": r.bootstrap})
            cut = [TopicPartition(t, p, committed_a[(t, p)] + 50) for t, p in r.tps()]
            for fut in admin.delete_records(cut).values():
                fut.result(15)

            # influx-c too: route s has no usable cluster left, then gets influx-c back.
            toxiproxy.set_enabled(env["INFLUX_C_PROXY_NAME"], False)
            wait_until(
                lambda: prom.firing("FrouterRouteNoUsableCluster"),
                timeout=60,
                what="FrouterRouteNoUsableCluster",
            )
            assert {a["route"] for a in prom.firing("FrouterRouteNoUsableCluster")} == {"s"}
            toxiproxy.set_enabled(env["INFLUX_C_PROXY_NAME"], True)
            wait_until(
                lambda: not prom.firing("FrouterRouteNoUsableCluster"),
                timeout=60,
                what="FrouterRouteNoUsableCluster resolved",
            )
            wait_until(lambda: _active(routers, "s", "c"), timeout=60, what="s back on influx-c")
            time.sleep(5)

            # influx-a is back: r replays (and counts the loss), s skips; both hand back.
            toxiproxy.set_enabled(env["INFLUX_A_PROXY_NAME"], True)
            restored_at = time.time()
            wait_until(lambda: _active(routers, "r", "a"), timeout=90, what="r back on influx-a")
            wait_until(lambda: _active(routers, "s", "a"), timeout=90, what="s back on influx-a")
            wait_until(
                lambda: not prom.firing("FrouterClusterDown"),
                timeout=60,
                what="FrouterClusterDown resolved",
            )
            wait_until(
                lambda: prom.firing("FrouterRetentionLoss"), timeout=30, what="FrouterRetentionLoss"
            )
            wait_until(
                lambda: prom.firing("FrouterDeadLettersRising"),
                timeout=30,
                what="FrouterDeadLettersRising",
            )
            time.sleep(8)  # the calm after
            produced = stream.next
        end = time.time()
        assert produced > 0

        # --- every dashboard query answers with data ---------------------------------------
        dashboard = generate.build()
        data = render.fetch(prom.client, dashboard, start, end, step=1.0)
        for title, targets in data.items():
            for i, series in enumerate(targets):
                assert series, f"panel {title!r} target {i} returned no data"
        for query in generate.queries(dashboard):
            if query.where.startswith("variable"):
                m = re.fullmatch(r"label_values\((.*), (\w+)\)", query.expr)
                assert m, query.expr
                body = prom.client.get(
                    f"/api/v1/label/{m[2]}/values",
                    params={"match[]": render.substitute(m[1]), "start": start, "end": end},
                ).json()
                assert body["status"] == "success" and body["data"], query.where
            elif query.where.startswith("annotation"):
                got = render.query_range(
                    prom.client, render.substitute(query.expr), start, end, step=1.0
                )
                assert got, f"{query.where}: no event in the failover"

        # --- the values tell the story -----------------------------------------------------
        def value_at(series: render.Series, t: float) -> float:
            return next(v for ts, v in zip(series.times, series.values, strict=True) if ts >= t)

        active = {
            (x.labels["route"], x.labels["cluster"]): x for x in data["Active cluster per route"][0]
        }
        during = (cut_at + restored_at) / 2
        assert value_at(active[("r", "influx-a")], start) == 1
        assert value_at(active[("r", "influx-b")], during) == 1
        assert value_at(active[("r", "influx-a")], during) == 0
        assert active[("r", "influx-a")].values[-1] == 1
        assert active[("r", "influx-b")].values[-1] == 0
        health = {x.labels["cluster"]: x for x in data["Cluster health verdict"][0]}
        assert value_at(health["influx-a"], during) == 0
        assert health["influx-a"].values[-1] == 1 and health["influx-b"].values[-1] == 1
        now_active = {(x.labels["route"], x.labels["cluster"]) for x in data["Active now"][0]}
        assert now_active == {("r", "influx-a"), ("s", "influx-a")}
        written = {x.legend: x for x in data["Points written per cluster"][0]}
        assert max(written["influx-b"].values) > 0  # the standby took the stream
        lost, skipped = data["Retention loss and skipped ranges (messages)"]
        assert sum(max(x.values) for x in lost if x.labels["cluster"] == "influx-a") > 0
        assert sum(max(x.values) for x in skipped if x.labels["cluster"] == "influx-a") > 0
        assert sum(sum(x.values) for x in data["Dead letters"][0]) > 0
        total_lost = sum(
            float(x["value"][1])
            for x in prom.query('sum(frouter_retention_lost_messages_total{cluster="influx-a"})')
        )
        assert total_lost == 50 * r.partitions

        # --- every alert expression answers; every series it reads exists --------------------
        rules = [rule for g in yaml.safe_load(ALERTS.read_text())["groups"] for rule in g["rules"]]
        window = f"{int(end - start) + 60}s"
        fired = {
            x["metric"]["alertname"]
            for x in prom.query(
                f'count by (alertname) (max_over_time(ALERTS{{alertstate="firing"}}[{window}]))'
            )
        }
        for rule in rules:
            prom.query(rule["expr"])  # answers (status success), firing or not
            for name in _metric_names(rule["expr"]):
                assert prom.query(f'count({name}{{datacenter="{DATACENTER}"}})'), (
                    f"{rule['alert']} reads {name}, which no router exposes"
                )
        assert fired >= {
            "FrouterClusterDown",
            "FrouterRouteNoUsableCluster",
            "FrouterRetentionLoss",
            "FrouterDeadLettersRising",
        }, fired
        # Nothing stalled, nothing misconfigured, the topology stayed valid.
        assert not fired & {
            "FrouterDestinationStalled",
            "FrouterDestinationMisconfigured",
            "FrouterTopologyInvalid",
        }, fired
        assert not prom.firing("FrouterClusterDown")
        assert not prom.firing("FrouterRouteNoUsableCluster")

        # --- promtool accepts the exposition format ----------------------------------------
        exposition = httpx.get(f"{routers[0].url}/metrics", timeout=5).content
        check = subprocess.run(
            [str(tool("promtool")), "check", "metrics"],
            input=exposition,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()

        png = render.plot(
            dashboard,
            data,
            start,
            tmp_path / "dashboard.png",
            subtitle=f"datacenter {DATACENTER}: influx-a cut at {cut_at - start:.0f}s, "
            f"restored at {restored_at - start:.0f}s (2 routers, real Prometheus)",
        )
        assert png.stat().st_size > 10_000
        if out := _screenshot_target():
            shutil.copy(png, out)
    finally:
        prom.stop()
        for router in routers:
            if router.proc is not None and router.proc.poll() is None:
                router.stop()


def _screenshot_target() -> Path | None:
    """FROUTER_DASHBOARD_PNG=path keeps a copy of the rendered dashboard (for the README)."""
    value = os.environ.get("FROUTER_DASHBOARD_PNG")
    return Path(value) if value else None
