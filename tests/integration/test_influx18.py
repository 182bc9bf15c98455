"""Newer servers for real: InfluxDB 1.8.3 over the v2 write API (influx-d, auth on) and
VictoriaMetrics (``flavor: victoriametrics``), beside the 1.6 clusters of the stack.

The v1 versions of these tests are in test_router.py and test_sink_influx.py; these reuse their
helpers. influx-d is read back with its admin user; VictoriaMetrics through /api/v1/export (its
/query is not InfluxQL), where measurement ``m`` with field ``value`` is the metric
``m_value``. Timestamps here are a millisecond apart: VictoriaMetrics keeps milliseconds.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from health.checker import ClusterSpec, HealthChecker
from health.verdict import ClusterState
from router.errors import SinkMisconfigured
from router.sink import InfluxSink, InfluxTarget, Rejected
from tests.integration.harness import (
    BASE_TS,
    RouterProc,
    Scenario,
    new_tag,
    read_letters,
    wait_paused,
)
from tests.integration.test_router import World, produce_in_background
from tests.support import wait_until

pytestmark = pytest.mark.integration

ROUTE = "r"
MS = 1_000_000  # ns


@pytest.fixture(scope="session")
def victoriametrics(stack_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[str]:
    """The stack's optional VictoriaMetrics, started for these tests; its direct URL."""
    started = stack.up(with_=("victoriametrics",))
    yield stack.endpoints()["VICTORIAMETRICS_URL"]
    if started and not request.config.getoption("--keep-stack"):
        stack.down(started)


def influx_d_auth(env: dict[str, str]) -> httpx.BasicAuth:
    return httpx.BasicAuth(env["INFLUX_D_USERNAME"], env["INFLUX_D_PASSWORD"])


def influx_d_token(env: dict[str, str]) -> str:
    """InfluxDB 1.8 takes "username:password" as the v2 API token."""
    return f"{env['INFLUX_D_USERNAME']}:{env['INFLUX_D_PASSWORD']}"


def vm_export(url: str, metric: str) -> list[tuple[int, float]]:
    """Every (timestamp ms, value) VictoriaMetrics holds for ``metric``, all series."""
    resp = httpx.get(f"{url}/api/v1/export", params={"match[]": metric}, timeout=30)
    resp.raise_for_status()
    samples: list[tuple[int, float]] = []
    for line in resp.text.splitlines():
        doc = json.loads(line)
        samples += zip(doc["timestamps"], doc["values"], strict=True)
    return samples


class Scenario18(Scenario):
    """A Scenario that also knows influx-d (v2 API, token file) and influx-vm."""

    def __init__(self, env: dict[str, str], tag: str, token_file: Path) -> None:
        super().__init__(env, tag)
        self.token_file = token_file
        token_file.write_text(influx_d_token(dict(env)) + "\n")

    def url(self, cluster: str) -> str:
        if cluster == "vm":
            return self.env["VICTORIAMETRICS_URL"]
        return super().url(cluster)

    def topology(self, **kwargs: Any) -> dict[str, Any]:
        doc = super().topology(**kwargs)
        doc["clusters"]["influx-d"] = {
            "urls": [self.env["INFLUX_D_PROXY_URL"]],
            "api": "v2",
            "org": "it",
            "bucket": f"{self.env['INFLUX_DATABASE']}/autogen",
            "token_file": str(self.token_file),
            "write_timeout": "1s",
            "max_retries": 1,
        }
        doc["clusters"]["influx-vm"] = {
            "urls": [self.env["VICTORIAMETRICS_PROXY_URL"]],
            "flavor": "victoriametrics",
            "database": self.env["INFLUX_DATABASE"],
            "write_timeout": "1s",
            "max_retries": 1,
        }
        return doc

    def line(self, i: int, value: str | None = None) -> str:
        return f"{self.measurement},src=it value={value or f'{i}i'} {BASE_TS + i * MS}"

    def produce(self, start: int, count: int, *, bad_every: int = 0) -> None:
        """Messages ``start``..``start+count-1``, one point each, a millisecond apart;
        every ``bad_every``-th (at ``bad_every // 2``) alternates between a line that does not
        parse and a type conflict (a string in an integer field)."""
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        for i in range(start, start + count):
            line = self.line(i)
            if bad_every and i % bad_every == bad_every // 2:
                line = self.line(i, f"oops{i}" if i // bad_every % 2 else f'"s{i}"')
            producer.produce(self.topic, line.encode(), partition=i % self.partitions)
            if i % 1000 == 0:
                producer.poll(0)
        assert producer.flush(30) == 0

    def values(self, cluster: str) -> set[int]:
        return set(self.samples(cluster))

    def samples(self, cluster: str) -> list[int]:
        """Every stored value (one per point; a duplicate point would show twice in VM)."""
        if cluster == "vm":
            return [int(v) for _, v in vm_export(self.url("vm"), f"{self.measurement}_value")]
        auth = influx_d_auth(dict(self.env)) if cluster == "d" else None
        resp = httpx.get(
            f"{self.url(cluster)}/query",
            params={
                "db": self.env["INFLUX_DATABASE"],
                "q": f'SELECT "value" FROM "{self.measurement}"',
            },
            auth=auth,
            timeout=30,
        )
        resp.raise_for_status()
        series = resp.json()["results"][0].get("series") or []
        return [int(row[1]) for row in series[0]["values"]] if series else []

    def count(self, cluster: str) -> int:
        return len(self.samples(cluster))


class World18(World):
    sc: Scenario18

    def __init__(self, env: dict[str, str], tmp: Path, toxiproxy: Toxiproxy) -> None:
        self.sc = Scenario18(env, new_tag(), tmp / "influx-d.token")
        self.sc.create_topic()
        self.tmp = tmp
        self.toxiproxy = toxiproxy
        self.routers: list[RouterProc] = []


@pytest.fixture
def world(stack_env: dict[str, str], toxiproxy: Toxiproxy, tmp_path: Path) -> Iterator[World18]:
    w = World18(stack_env, tmp_path, toxiproxy)
    yield w
    w.close()


# --- the servers' own answers ---------------------------------------------------------------


def test_influx18_answers_in_1x_words_on_both_apis(stack_env: dict[str, str]) -> None:
    """InfluxDB 1.8.3 answers /write and /api/v2/write alike, in 1.x's JSON (pins what
    tests/unit/test_sink_answers.py feeds the sink); /health passes, auth is on."""
    url, db = stack_env["INFLUX_D_URL"], stack_env["INFLUX_DATABASE"]
    m = f"pin_{uuid.uuid4().hex[:8]}"
    token = {"Authorization": f"Token {influx_d_token(stack_env)}"}

    def v2(
        body: str, headers: dict[str, str] = token, bucket: str = f"{db}/autogen"
    ) -> httpx.Response:
        params = {"bucket": bucket, "org": "it", "precision": "ns"}
        return httpx.post(
            f"{url}/api/v2/write", params=params, headers=headers, content=body, timeout=5
        )

    def v1(body: str) -> httpx.Response:
        return httpx.post(
            f"{url}/write",
            params={"db": db},
            auth=influx_d_auth(stack_env),
            content=body,
            timeout=5,
        )

    health = httpx.get(f"{url}/health", timeout=5).json()
    assert (health["status"], health["version"]) == ("pass", "1.8.3")
    some_bad = f"{m} value=1 1\n  {m} value= 2\n{m} value=3 3\n{m} nofield 4\n"
    expected = {
        "error": f"partial write: unable to parse '{m} value= 2': missing field value\n"
        f"unable to parse '{m} nofield 4': invalid field format dropped=0"
    }
    for send in (v1, v2):
        answer = send(some_bad)
        assert (answer.status_code, answer.json()) == (400, expected)
    all_bad = v2(f"{m} value= 1\n{m}\n")
    assert all_bad.json() == {
        "error": f"unable to parse '{m} value= 1': missing field value\n"
        f"unable to parse '{m}': missing fields"
    }
    conflict = v2(f'{m} value="text" 5\n{m} value=6 6\n')
    assert (conflict.status_code, conflict.json()) == (
        400,
        {
            "error": 'partial write: field type conflict: input field "value" on measurement '
            f'"{m}" is type string, already exists as type float dropped=1'
        },
    )
    wrong = v2(f"{m} value=1 1\n", headers={"Authorization": "Token admin:wrong"})
    assert (wrong.status_code, wrong.json()) == (401, {"error": "authorization failed"})
    nosuch = v2(f"{m} value=1 1\n", bucket="nosuch")
    assert (nosuch.status_code, nosuch.json()) == (404, {"error": 'database not found: "nosuch"'})
    assert v2("").status_code == 204  # the sink's probe: an empty write


def test_victoriametrics_answers_as_the_sink_reads_them(victoriametrics: str) -> None:
    """VictoriaMetrics refuses a whole request at its first bad line, quoting the rest; a
    string field is stored as a number (no type conflicts); /health says OK."""
    m = f"pin_{uuid.uuid4().hex[:8]}"
    t = BASE_TS

    def post(body: str) -> httpx.Response:
        params = {"db": "metrics", "precision": "ns"}
        return httpx.post(f"{victoriametrics}/write", params=params, content=body, timeout=5)

    assert httpx.get(f"{victoriametrics}/health", timeout=5).text == "OK"
    answer = post(f"{m} value=1 {t}\n  {m} value= 2\n{m} value=3 {t + 3 * MS}\n")
    assert answer.status_code == 400
    assert answer.text == (
        "cannot process influx line protocol data: incorrect influx line "
        f'"  {m} value= 2\\n{m} value=3 {t + 3 * MS}\\n": missing field value for "{m}"; '
        "see https://docs.victoriametrics.com/victoriametrics/integrations/influxdb/\n"
    )
    assert post(f'{m} value="text" {t + 5 * MS}\n').status_code == 204
    wait_until(lambda: vm_export(victoriametrics, f"{m}_value"), what="the string point")
    assert vm_export(victoriametrics, f"{m}_value") == [((t + 5 * MS) // MS, 0.0)]


# --- health probes --------------------------------------------------------------------------


def test_probes_of_influx18_v2_and_victoriametrics(
    stack_env: dict[str, str], victoriametrics: str
) -> None:
    """influx-d is UP on /health (v2) and /ping (v1, no auth needed); VictoriaMetrics is UP on
    its /health; InfluxDB 1.6 probed as VictoriaMetrics (no /health) goes DOWN."""
    specs = {
        "d-v2": ClusterSpec(api="v2", nodes=(stack_env["INFLUX_D_PROXY_URL"],)),
        "d-v1": ClusterSpec(api="v1", nodes=(stack_env["INFLUX_D_URL"],)),
        "vm": ClusterSpec(api="v1", nodes=(victoriametrics,), flavor="victoriametrics"),
        "a-as-vm": ClusterSpec(
            api="v1", nodes=(stack_env["INFLUX_A_URL"],), flavor="victoriametrics"
        ),
    }
    checker = HealthChecker(specs, interval=1, timeout=1, fall=1, rise=1)
    try:
        checker.probe_once()
        verdicts = {name: checker.verdict(name) for name in specs}
    finally:
        checker.stop()
    up = [name for name, v in verdicts.items() if v.state is ClusterState.UP]
    assert up == ["d-v2", "d-v1", "vm"]
    assert verdicts["a-as-vm"].reason.endswith("/health answered HTTP 404")


# --- the sink against InfluxDB 1.8.3's v2 API -----------------------------------------------


@pytest.fixture
def v2_sink(stack_env: dict[str, str]) -> Iterator[InfluxSink]:
    target = InfluxTarget(
        cluster="influx-d",
        api="v2",
        org="it",
        bucket=f"{stack_env['INFLUX_DATABASE']}/autogen",
        token=influx_d_token(stack_env),
    )
    with InfluxSink(target, lambda: [stack_env["INFLUX_D_URL"]]) as sink:
        yield sink


def influx_d_count(env: dict[str, str], m: str) -> int:
    resp = httpx.get(
        f"{env['INFLUX_D_URL']}/query",
        params={"db": env["INFLUX_DATABASE"], "q": f'SELECT count("value") FROM "{m}"'},
        auth=influx_d_auth(env),
        timeout=10,
    )
    series = resp.json()["results"][0].get("series") or []
    return int(series[0]["values"][0][1]) if series else 0


def test_v2_sink_rejects_malformed_lines_from_one_answer(
    stack_env: dict[str, str], v2_sink: InfluxSink
) -> None:
    """Over the v2 API, 1% malformed lines are rejected with their payload index from a
    single answer; every other point is stored."""
    m = f"sink_{uuid.uuid4().hex[:8]}"
    payloads = [f"{m},host=h{p % 5} value={p}.5 {p + 1}".encode() for p in range(1000)]
    expected = []
    for p in range(7, 1000, 100):
        payloads[p] = f"{m} value= {p + 1}".encode()
        expected.append(
            Rejected(p, payloads[p], f"unable to parse '{m} value= {p + 1}': missing field value")
        )
    assert v2_sink.write(payloads) == expected
    assert influx_d_count(stack_env, m) == 990


def test_v2_sink_finds_type_conflicts_by_bisection(
    stack_env: dict[str, str], v2_sink: InfluxSink
) -> None:
    """Lines dropped for a type conflict are bisected out; the rest is stored."""
    m = f"sink_{uuid.uuid4().hex[:8]}"
    assert v2_sink.write([f"{m} value=0 1".encode()]) == []
    payloads = [f"{m},n=n{i} value={i} {i + 10}".encode() for i in range(32)]
    for i in (4, 19):
        payloads[i] = f'{m},n=n{i} value="text" {i + 10}'.encode()
    rejected = v2_sink.write(payloads)
    assert [(r.index, r.line) for r in rejected] == [(4, payloads[4]), (19, payloads[19])]
    assert all(r.reason.startswith("field type conflict: ") for r in rejected)
    assert influx_d_count(stack_env, m) == 1 + 30


def test_v2_sink_wrong_token_and_unknown_bucket_are_misconfiguration(
    stack_env: dict[str, str],
) -> None:
    """A wrong password in the token (401) and an unknown bucket (404) raise SinkMisconfigured
    without a retry, and the token never shows in the error."""
    url = stack_env["INFLUX_D_URL"]
    for fields, words in (
        ({"token": "admin:wrong-secret", "bucket": "metrics"}, "HTTP 401: authorization failed"),
        ({"token": influx_d_token(stack_env), "bucket": "nosuch"}, "database not found"),
    ):
        target = InfluxTarget(cluster="influx-d", api="v2", org="it", **fields)  # type: ignore[arg-type]
        sink = InfluxSink(target, lambda: [url], backoff=lambda a: 0.0)
        with sink, pytest.raises(SinkMisconfigured, match=words) as caught:
            sink.write([b"m value=1 1"])
        assert "wrong-secret" not in str(caught.value)


# --- the router: a route whose primary is influx-d over the v2 API -------------------------


def test_v2_primary_steady_state_is_exact(world: World18) -> None:
    """N points in: influx-d (v2 API) holds exactly N, its group committed the end offsets,
    the standby got nothing."""
    sc = world.sc
    router = world.start(sc.topology(primary="d", standby=("b",)))
    sc.produce(0, 2000)
    wait_until(lambda: sc.count("d") == 2000, timeout=60, what="influx-d holds 2000")
    sc.wait_committed_to_end(ROUTE, "d")
    assert sc.values("d") == set(range(2000))
    assert sc.count("b") == 0
    assert router.metric("frouter_points_written_total", cluster="influx-d") == 2000
    assert router.status()["clusters"]["influx-d"]["state"] == "up"
    assert router.stop() == 0


def test_v2_primary_cut_fails_over_and_replays_on_restore(world: World18) -> None:
    """influx-d cut off: the standby gets every point from influx-d's last commit; restored,
    influx-d replays everything it missed and the standby hands back."""
    sc = world.sc
    router = world.start(sc.topology(primary="d", standby=("b",)))
    sc.produce(0, 1000)
    wait_until(lambda: sc.count("d") == 1000, timeout=60, what="influx-d holds 1000")
    bg = produce_in_background(sc, 1000, 2000)
    world.toxiproxy.set_enabled(sc.env["INFLUX_D_PROXY_NAME"], False)
    wait_paused(router, ROUTE, "d", timeout=20)
    bg.join()
    expected_on_b = world.from_offsets(sc.committed(ROUTE, "d"), 3000)
    wait_until(lambda: expected_on_b <= sc.values("b"), timeout=60, what="standby caught up")
    failovers = router.events("failover")
    assert (failovers[0]["from_cluster"], failovers[0]["to_cluster"]) == ("influx-d", "influx-b")

    world.toxiproxy.set_enabled(sc.env["INFLUX_D_PROXY_NAME"], True)
    sc.produce(3000, 500)
    wait_until(lambda: sc.count("d") == 3500, timeout=90, what="influx-d replayed")
    sc.wait_committed_to_end(ROUTE, "d")
    assert sc.values("d") == set(range(3500))
    wait_paused(router, ROUTE, "b", timeout=30)
    assert router.events("handback")


def test_v2_partial_writes_and_type_conflicts_go_to_dead_letters(world: World18) -> None:
    """Over the v2 API, lines 1.8 cannot parse and lines in type conflict go to the dead-letter
    topic with their headers; every other point is written and committed."""
    sc = world.sc
    router = world.start(sc.topology(primary="d", standby=("b",)))
    sc.produce(0, 1)  # the field's type (integer) is set before any conflict arrives
    wait_until(lambda: sc.count("d") == 1, timeout=30, what="first point")
    sc.produce(1, 1999, bad_every=100)
    bad = set(range(50, 2000, 100))
    wait_until(lambda: sc.count("d") == 2000 - len(bad), timeout=60, what="good points stored")
    sc.wait_committed_to_end(ROUTE, "d")
    assert sc.values("d") == set(range(2000)) - bad

    reasons: dict[str, int] = {}
    seen = set()  # 10 lines 1.8 cannot parse (i // 100 odd), 10 type conflicts (even)
    for value, raw in read_letters(sc, len(bad)):
        headers = {k: v.decode() for k, v in raw.items()}
        i = int(headers["source_offset"]) * sc.partitions + int(headers["source_partition"])
        assert value.decode() == sc.line(i, f"oops{i}" if i // 100 % 2 else f'"s{i}"')
        assert (headers["cluster"], headers["route"]) == ("influx-d", ROUTE)
        kind = "parse" if i // 100 % 2 else "conflict"
        prefix = "unable to parse '" if kind == "parse" else "field type conflict: "
        assert headers["reason"].startswith(prefix), headers["reason"]
        reasons[kind] = reasons.get(kind, 0) + 1
        seen.add(i)
    assert seen == bad
    assert reasons == {"parse": 10, "conflict": 10}
    assert router.metric("frouter_dead_letters_total", cluster="influx-d") == len(bad)


def test_v2_wrong_token_stops_the_primary_and_fails_over(world: World18) -> None:
    """A token 1.8 refuses (401) stops influx-d loudly, commits nothing, and the standby
    takes the stream."""
    sc = world.sc
    sc.token_file.write_text("admin:wrong\n")
    router = world.start(sc.topology(primary="d", standby=("b",)))
    sc.produce(0, 500)
    wait_until(
        lambda: router.status()["clusters"]["influx-d"]["misconfigured"],
        timeout=30,
        what="influx-d reported misconfigured",
    )
    sc.wait_count("b", 500)
    sc.wait_committed_to_end(ROUTE, "b")
    assert all(o <= 0 for o in sc.committed(ROUTE, "d").values())
    events = router.events("sink_misconfigured")
    assert events and "401" in str(events[0]) and "admin:wrong" not in router.log_path.read_text()
    assert router.metric("frouter_destination_misconfigured", cluster="influx-d") == 1


def test_mirror_of_influx16_v1_and_influx18_v2_ends_identical(world: World18) -> None:
    """A mirror route over 1.6 (v1 API) and 1.8 (v2 API), 1.8 cut off for a while: both end
    with the same points."""
    sc = world.sc
    router = world.start(sc.topology(mode="mirror", clusters=("a", "d")))
    sc.produce(0, 1000)
    wait_until(lambda: sc.count("d") == 1000, timeout=60, what="influx-d holds 1000")
    world.toxiproxy.set_enabled(sc.env["INFLUX_D_PROXY_NAME"], False)
    wait_paused(router, ROUTE, "d")
    sc.produce(1000, 1000)
    sc.wait_count("a", 2000)
    world.toxiproxy.set_enabled(sc.env["INFLUX_D_PROXY_NAME"], True)
    wait_until(lambda: sc.count("d") == 2000, timeout=60, what="influx-d replayed")
    for c in ("a", "d"):
        sc.wait_committed_to_end(ROUTE, c)
    assert sc.values("a") == sc.values("d") == set(range(2000))


# --- VictoriaMetrics -------------------------------------------------------------------------


def test_victoriametrics_sink_rejects_bad_lines_and_stores_the_rest(victoriametrics: str) -> None:
    """The sink names VictoriaMetrics' bad lines one answer at a time; the rest is stored."""
    m = f"sink_{uuid.uuid4().hex[:8]}"
    target = InfluxTarget(
        cluster="influx-vm", api="v1", flavor="victoriametrics", database="metrics"
    )
    payloads = [f"{m},host=h{p % 3} value={p} {BASE_TS + p * MS}".encode() for p in range(300)]
    for p in (10, 150, 299):
        payloads[p] = f"{m},host=h value= {BASE_TS + p * MS}".encode()
    with InfluxSink(target, lambda: [victoriametrics]) as sink:
        rejected = sink.write(payloads)
    assert [r.index for r in rejected] == [10, 150, 299]
    assert rejected[0].reason == (
        f"unable to parse '{m},host=h value= {BASE_TS + 10 * MS}': "
        'cannot parse field value for "value": field value cannot be empty'
    )
    want = sorted(set(range(300)) - {10, 150, 299})
    wait_until(
        lambda: sorted(int(v) for _, v in vm_export(victoriametrics, f"{m}_value")) == want,
        timeout=30,
        what="VictoriaMetrics holds the good points",
    )


def test_failover_from_influxdb_to_victoriametrics_and_back_is_exact(
    world: World18, victoriametrics: str
) -> None:
    """influx-a cut off: VictoriaMetrics takes over from influx-a's last commit; restored,
    influx-a replays all and VictoriaMetrics hands back. Counted exactly on both."""
    sc = world.sc
    router = world.start(sc.topology(primary="a", standby=("vm",)))
    sc.produce(0, 1000)
    sc.wait_count("a", 1000)
    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], False)
    wait_paused(router, ROUTE, "a", timeout=20)
    sc.produce(1000, 1000)
    committed_a = sc.committed(ROUTE, "a")
    expected_on_vm = world.from_offsets(committed_a, 2000)
    wait_until(
        lambda: sorted(sc.samples("vm")) == sorted(expected_on_vm),
        timeout=60,
        what="VictoriaMetrics holds exactly what influx-a had not committed",
    )
    sc.wait_committed_to_end(ROUTE, "vm")
    assert router.events("failover")[0]["to_cluster"] == "influx-vm"

    world.toxiproxy.set_enabled(sc.env["INFLUX_A_PROXY_NAME"], True)
    sc.produce(2000, 500)
    sc.wait_count("a", 2500, timeout=90)
    sc.wait_committed_to_end(ROUTE, "a")
    assert sorted(sc.samples("a")) == list(range(2500))
    wait_paused(router, ROUTE, "vm", timeout=30)
    assert router.events("handback")
    on_vm = sc.samples("vm")
    assert len(on_vm) == len(set(on_vm))  # no point twice
    assert set(on_vm) >= expected_on_vm
