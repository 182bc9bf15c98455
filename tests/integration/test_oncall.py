"""The operator's view on the real stack: the status page in a real browser (Playwright
driving Debian's chromium), /metrics through promtool, and the status/drain/undrain commands.

Screenshots are saved in each test's pytest tmp dir (``*.png``), beside the router's log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from playwright.sync_api import Browser, Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, Scenario, new_tag, write_yaml
from tests.integration.test_consul import ConsulWorld
from tests.integration.test_router import ROUTE, World
from tests.support import wait_until

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
PROMTOOL_VERSION = "v0.316.0"  # devstack/install.sh builds it


@pytest.fixture
def world(stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[World]:
    w = World(stack_env, tmp_path, toxiproxy)
    yield w
    w.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    """Debian's chromium through Playwright (never a browser Playwright downloads)."""
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: run ./dev setup (apt chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Watched:
    """A page with every console error and uncaught exception recorded."""

    def __init__(self, browser: Browser, url: str, shots: Path) -> None:
        self.page: Page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.shots = shots
        self.page.goto(url)
        self.page.wait_for_selector("tr.dest")

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def dest_row(self, cluster: str) -> Any:
        return self.page.locator(f'tr.dest[data-cluster="{cluster}"]')

    def stalled(self) -> int:
        return int(self.page.locator("tr.dest.stalled").count())

    def active(self) -> str:
        return str(self.page.locator(".active-line").first.get_attribute("data-active"))


def with_deadline(doc: dict[str, Any], deadline: str) -> dict[str, Any]:
    for cluster in doc["clusters"].values():
        cluster["write_deadline"] = deadline
    return doc


def produce_for(sc: Scenario, start: int, seconds: float) -> threading.Thread:
    """Messages from ``start`` on, 100 every 0.2 s, for about ``seconds``."""

    def run() -> None:
        for k in range(int(seconds / 0.2)):
            sc.produce(start + 100 * k, 100)
            time.sleep(0.2)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_page_loads_clean_shows_idle_standby_and_follows_a_cut_cluster(
    world: World, browser: Browser, tmp_path: Path
) -> None:
    """The page loads with no console error; while data flows nothing is shown stalled for
    more than twice the write deadline; the idle standby says so; cutting the primary moves
    the route's active cluster on the page, with the reason."""
    sc = world.sc
    router = world.start(with_deadline(sc.topology(), "4s"))
    sc.produce(0, 500)
    sc.wait_count("a", 500)
    page = Watched(browser, router.url, tmp_path)
    wait_until(lambda: page.active() == "influx-a", timeout=10, what="influx-a active on the page")
    flowing = produce_for(sc, 500, 9.0)
    deadline = time.monotonic() + 9.0
    while time.monotonic() < deadline:  # 2 x the write deadline and more, with traffic
        assert page.stalled() == 0, page.shot("unexpected-stall")
        time.sleep(0.5)
    flowing.join()
    assert "idle (expected)" in page.dest_row("influx-b").inner_text()
    assert "serving" in str(page.dest_row("influx-a").get_attribute("class"))
    page.page.locator('button.parts[data-key="r/influx-a"]').click()
    page.page.wait_for_selector("tr.part")
    assert page.page.locator("tr.part").count() == sc.partitions
    assert page.page.locator("tr.part.stalled").count() == 0
    page.shot("healthy")

    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)
    wait_until(lambda: page.active() == "influx-b", timeout=30, what="influx-b active on page")
    line = page.page.locator(".active-line").first.inner_text()
    assert "failed over to influx-b" in line and "influx-a down" in line
    assert page.page.locator('#clusters tr[data-cluster="influx-a"] td.down').count() == 1
    # the exact time is on hover of every relative time
    assert page.page.locator(".active-line .time").first.get_attribute("title")
    page.shot("failed-over")
    assert page.errors == []


def test_a_stalled_partition_is_red_within_twice_the_write_deadline(
    stack_env: dict[str, str], browser: Browser, tmp_path: Path
) -> None:
    """A partition held by a bad line whose dead-letter topic does not exist (auto-create
    off) is shown stalled, in red, on the destination and in its partition table, within
    twice the write deadline of the partition being assigned."""
    deadline = 8.0
    sc = Scenario(stack_env, new_tag())
    admin = AdminClient({"bootstrap.servers": sc.bootstrap})
    admin.create_topics([NewTopic(sc.topic, num_partitions=sc.partitions, replication_factor=1)])[
        sc.topic
    ].result(15)
    doc = with_deadline(sc.topology(), f"{deadline:g}s")
    router = RouterProc(write_yaml(tmp_path / "r.yaml", doc), tmp_path)
    try:
        sc.produce(0, 400, bad_every=400)  # message 0 (partition 0, offset 0) is malformed
        router.start()
        wait_until(
            lambda: router.destination(ROUTE, "a")["assigned"] > 0, timeout=30, what="assigned"
        )
        assigned_at = time.monotonic()
        page = Watched(browser, router.url, tmp_path)
        page.page.wait_for_selector(
            'tr.dest.stalled[data-cluster="influx-a"]', timeout=2 * deadline * 1000
        )
        took = time.monotonic() - assigned_at
        assert took <= 2 * deadline, took
        row = page.dest_row("influx-a")
        assert "STALLED" in row.inner_text()
        red = row.locator("td").first.evaluate("e => getComputedStyle(e).backgroundColor")
        assert red == "rgb(255, 214, 214)"
        page.page.locator('button.parts[data-key="r/influx-a"]').click()
        page.page.wait_for_selector("tr.part.stalled")
        part = page.page.locator("tr.part.stalled").first
        assert part.locator("td").first.evaluate("e => getComputedStyle(e).color") == (
            "rgb(160, 0, 0)"
        )
        assert "blocked" in row.inner_text()
        page.shot("stalled")
        assert page.errors == []
    finally:
        router.stop()
        sc.close()


def promtool() -> Path:
    return stack.cache_dir() / "bin" / f"promtool-{PROMTOOL_VERSION}"


def test_fresh_router_metrics_pass_promtool_with_a_zero_for_every_destination(
    world: World,
) -> None:
    """/metrics of a router that has not written anything passes `promtool check metrics`,
    and every labelled counter has a 0 sample for each (route, cluster) of the route."""
    sc = world.sc
    router = world.start(sc.topology())
    wait_until(
        lambda: router.destination(ROUTE, "a")["assigned"] == sc.partitions,
        timeout=30,
        what="partitions assigned",
    )
    text = httpx.get(f"{router.url}/metrics", timeout=5).text
    tool = promtool()
    assert tool.exists(), f"{tool} missing: run ./dev setup (devstack/install.sh builds it)"
    res = subprocess.run(
        [str(tool), "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    counters = 0
    for fam in text_string_to_metric_families(text):
        if fam.type != "counter" or not any("route" in s.labels for s in fam.samples):
            continue
        counters += 1
        for cluster in ("influx-a", "influx-b"):
            mine = [
                s
                for s in fam.samples
                if s.name.endswith("_total")
                and s.labels.get("route") == ROUTE
                and s.labels.get("cluster") == cluster
            ]
            assert mine and all(s.value == 0 for s in mine), (fam.name, cluster, mine)
    assert counters >= 9


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env if env is not None else dict(os.environ),
    )


def test_status_command_exits_0_with_a_usable_cluster_and_1_without(world: World) -> None:
    """`status` prints the route and exits 0; with both of the route's clusters cut it exits 1
    and says why; an unreachable router is exit 1 too."""
    sc = world.sc
    router = world.start(sc.topology())
    sc.produce(0, 200)
    sc.wait_count("a", 200)
    ok = cli("status", "--url", router.url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "healthy" in ok.stdout and "route r (failover)" in ok.stdout
    for name in ("A", "B"):
        world.toxiproxy.set_enabled(sc.env[f"INFLUX_{name}_PROXY_NAME"], False)
    wait_until(
        lambda: not router.status()["routes"][0]["has_usable_cluster"],
        timeout=30,
        what="no usable cluster",
    )
    bad = cli("status", "--url", router.url)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "no usable cluster" in bad.stdout
    gone = cli("status", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert gone.returncode == 1 and "cannot read" in gone.stderr


@pytest.fixture
def cworld(
    stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path
) -> Iterator[ConsulWorld]:
    w = ConsulWorld(stack_env, tmp_path, toxiproxy)
    yield w
    w.close()
    w.consul.kv.delete(w.prefix, recurse=True)


def test_drain_and_undrain_commands_move_traffic_through_consul_kv(cworld: ConsulWorld) -> None:
    """`drain influx-a` hands the route to influx-b gracefully (the next 500 points land on b
    only, none twice); `undrain` gives it back and influx-a replays what it missed. Without
    Consul the command prints the topology edit and exits 3."""
    sc = cworld.sc
    router = cworld.start_consul_router(sc.topology())
    path = str(router.topology)
    consul = ("--consul-addr", sc.env["CONSUL_HTTP_ADDR"], "--consul-prefix", cworld.prefix)
    sc.produce(0, 500)
    sc.wait_count("a", 500)
    sc.wait_committed_to_end(ROUTE, "a")

    drained = cli("drain", "influx-a", "--topology", path, *consul)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert f"{cworld.base}/drain/influx-a" in drained.stdout
    wait_until(
        lambda: router.status()["routes"][0]["active"] == ["influx-b"],
        timeout=30,
        what="influx-b active",
    )
    sc.produce(500, 500)
    sc.wait_count("b", 500)
    sc.wait_committed_to_end(ROUTE, "b")
    assert sc.count("a") == 500  # drained: nothing new reached it, nothing written twice

    undrained = cli("undrain", "influx-a", "--topology", path, *consul)
    assert undrained.returncode == 0, undrained.stdout + undrained.stderr
    sc.wait_count("a", 1000, timeout=60)
    wait_until(
        lambda: router.status()["routes"][0]["active"] == ["influx-a"],
        timeout=60,
        what="handed back to influx-a",
    )
    assert "handed back to influx-a" in router.status()["routes"][0]["active_reason"]

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    edit = cli("drain", "influx-a", "--topology", path, env=env)
    assert edit.returncode == 3, edit.stdout + edit.stderr
    assert "drain: true" in edit.stdout and "nothing was changed" in edit.stdout
    unknown = cli("drain", "influx-x", "--topology", path, *consul)
    assert unknown.returncode == 1 and "unknown cluster 'influx-x'" in unknown.stderr
