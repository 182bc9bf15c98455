"""The secured stack end to end: exact in steady state and through a cut with two replicas; wrong
credentials and a wrong CA each named, none loses a point.

Kafka over SASL_SSL (SCRAM-SHA-512, the private CA, a client certificate with an encrypted key),
influx-s (https + auth through its proxy) as primary and influx-b as standby; the users and
secret files are the ones ``test_secret_leak.Secrets`` makes for a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devstack.toxiproxy import Toxiproxy
from router.kafka import KafkaAdmin
from router.offsets import TopicPart
from tests.integration import test_secret_leak
from tests.integration.harness import RouterProc, free_port, wait_paused, write_yaml
from tests.integration.test_secret_leak import ROUTE, Secrets, _lines, _topology
from tests.integration.test_secure_stack import as_admin, influx_count_s, produce
from tests.support import influx_count, wait_until

pytestmark = pytest.mark.integration

secrets = test_secret_leak.secrets  # the fixture that makes the users and secret files


@pytest.fixture
def users(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Secrets:
    made: Secrets = request.getfixturevalue("secrets")
    monkeypatch.setenv("LEAK_KAFKA_USERNAME", made.kafka_user)
    monkeypatch.setenv("LEAK_INFLUX_USERNAME", made.influx_user)
    return made


def _standby_count(s: Secrets) -> int:
    return influx_count(s.env["INFLUX_B_URL"], s.env["INFLUX_DATABASE"], s.measurement)


def _offsets(s: Secrets, cluster: str) -> tuple[dict[TopicPart, int], dict[TopicPart, int]]:
    """(what the cluster's group committed, the end offsets) of the test's topic."""
    admin = KafkaAdmin(as_admin(s.env))
    try:
        tps = admin.partitions([s.topic])
        committed = admin.committed(f"{s.group_prefix}.{ROUTE}.{cluster}", tps)
        return committed, {tp: wm.high for tp, wm in admin.watermarks(tps).items()}
    finally:
        admin.close()


def _committed_to_end(s: Secrets, cluster: str) -> bool:
    committed, end = _offsets(s, cluster)
    return committed == end and sum(end.values()) > 0


def test_sasl_ssl_to_https_influxdb_is_exact_and_a_cut_loses_nothing_with_two_replicas(
    users: Secrets, toxiproxy: Toxiproxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas read the SASL_SSL listener (SCRAM-SHA-512, client certificate with an
    encrypted key) and write to influx-s (https + auth) through the private CA, while the
    environment's SSL_CERT_FILE names an unrelated CA: probes and writes both use the
    topology's CA. Steady state: N in, N stored, committed == end. influx-s cut: both replicas
    pause it and fail over to influx-b; restored: it replays the window, holds every point, and
    its group commits to the end again."""
    s = users
    monkeypatch.setenv("SSL_CERT_FILE", s.env["TLS_OTHER_CA_FILE"])
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", s.env["TLS_OTHER_CA_FILE"])
    routers: list[RouterProc] = []
    try:
        for n in ("r1", "r2"):
            path = write_yaml(tmp_path / f"{n}.yaml", _topology(s, free_port()))
            routers.append(RouterProc(path, tmp_path, n).start())
        wait_until(
            lambda: all(r.destination(ROUTE, "s")["assigned"] == 1 for r in routers),
            timeout=60,
            what="one partition of influx-s on each replica",
        )

        assert produce(as_admin(s.env), s.topic, _lines(s, 0, 1000)) == [None] * 1000
        wait_until(lambda: influx_count_s(s.env, s.measurement) == 1000, timeout=60, what="1000")
        wait_until(lambda: _committed_to_end(s, "influx-s"), timeout=30, what="s committed")
        committed, end = _offsets(s, "influx-s")
        assert sum(end.values()) == 1000 and committed == end
        assert _standby_count(s) == 0
        assert not any(r.events("failover") for r in routers)
        for r in routers:  # probed for seconds by now: UP means the probes passed the CA check
            cluster = r.status()["clusters"]["influx-s"]
            assert (cluster["state"], cluster["healthy_nodes"]) == ("up", 1), cluster

        toxiproxy.set_enabled(s.env["INFLUX_S_PROXY_NAME"], False)
        for r in routers:
            wait_paused(r, ROUTE, "s")
        assert produce(as_admin(s.env), s.topic, _lines(s, 1000, 1000)) == [None] * 1000
        wait_until(lambda: _committed_to_end(s, "influx-b"), timeout=60, what="b committed")
        assert _standby_count(s) == 1000  # the window from influx-s's commits on, exactly
        for r in routers:
            failovers = r.events("failover")
            assert failovers and all(
                (f["from_cluster"], f["to_cluster"]) == ("influx-s", "influx-b") for f in failovers
            ), failovers

        toxiproxy.set_enabled(s.env["INFLUX_S_PROXY_NAME"], True)
        wait_until(lambda: influx_count_s(s.env, s.measurement) == 2000, timeout=90, what="2000")
        wait_until(lambda: _committed_to_end(s, "influx-s"), timeout=30, what="s committed again")
        wait_until(
            lambda: all(r.events("handback") for r in routers), timeout=60, what="handed back"
        )
        for r in routers:
            cluster = r.status()["clusters"]["influx-s"]
            assert (cluster["state"], cluster["healthy_nodes"]) == ("up", 1), cluster
            assert r.events("tls_error") == []
    finally:
        codes = _stop_all(routers)
    assert codes == [0, 0]


def _stop_all(routers: list[RouterProc]) -> list[int | str]:
    """Stop every router, even when one of them does not stop: its exit code, or why not."""
    codes: list[int | str] = []
    for r in routers:
        try:
            codes.append(r.stop())
        except AssertionError as exc:
            codes.append(str(exc)[:200])
    return codes


def test_a_wrong_kafka_password_stops_the_start_with_exit_2_naming_the_mechanism(
    users: Secrets, tmp_path: Path
) -> None:
    """The brokers refuse the SCRAM password: exit code 2 at start, the brokers and the
    mechanism named, the password itself never printed."""
    s = users
    s.kafka_password_file.write_text(s.kafka_wrong)
    path = write_yaml(tmp_path / "topology.yaml", _topology(s, free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "run", "--topology", str(path)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-2000:]
    assert "SCRAM-SHA-512" in out
    assert s.env["KAFKA_SASL_SSL_BOOTSTRAP"] in out
    assert s.kafka_wrong not in out


def test_a_wrong_influxdb_password_stops_the_destination_and_the_route_fails_over(
    users: Secrets, tmp_path: Path
) -> None:
    """influx-s answers 401: the destination stops with an event and a metric, nothing is
    committed for it, and the standby gets every point."""
    s = users
    s.influx_password_file.write_text("not-the-password-Zq7")
    path = write_yaml(tmp_path / "topology.yaml", _topology(s, free_port()))
    router = RouterProc(path, tmp_path, "router").start()
    try:
        assert produce(as_admin(s.env), s.topic, _lines(s, 0, 300)) == [None] * 300
        wait_until(lambda: _standby_count(s) == 300, timeout=60, what="300 points on influx-b")
        wait_until(
            lambda: router.metric("frouter_destination_misconfigured", cluster="influx-s") == 1,
            timeout=30,
            what="influx-s misconfigured",
        )
        assert any("401" in str(e) for e in router.events("sink_misconfigured"))
        admin = KafkaAdmin(as_admin(s.env))
        try:
            tps = admin.partitions([s.topic])
            committed = admin.committed(f"{s.group_prefix}.{ROUTE}.influx-s", tps)
        finally:
            admin.close()
        assert all(offset <= 0 for offset in committed.values()), committed
    finally:
        router.stop()


def test_a_wrong_ca_is_a_tls_error_naming_the_cluster_and_the_route_fails_over(
    users: Secrets, tmp_path: Path
) -> None:
    """influx-s checked against an unrelated CA: the cluster goes DOWN with the verification
    failure as its reason (not a timeout), the failover names it, every point on the standby.
    (Probes fail before any write is sent; a write that meets it is a ``tls_error`` event.)"""
    s = users
    doc = _topology(s, free_port())
    doc["clusters"]["influx-s"]["tls"] = {"ca_file": s.env["TLS_OTHER_CA_FILE"]}
    path = write_yaml(tmp_path / "topology.yaml", doc)
    router = RouterProc(path, tmp_path, "router").start()
    try:
        assert produce(as_admin(s.env), s.topic, _lines(s, 0, 300)) == [None] * 300
        wait_until(lambda: _standby_count(s) == 300, timeout=60, what="300 points on influx-b")
        downs = [e for e in router.events("cluster_state") if e.get("to_state") == "down"]
        assert downs and all(e["cluster"] == "influx-s" for e in downs), router.tail(50)
        assert all("TLS: certificate verify failed" in e["reason"] for e in downs)
        (failover,) = router.events("failover")
        assert failover["from_cluster"] == "influx-s"
        assert "TLS: certificate verify failed" in failover["reason"]
        assert "no answer" not in failover["reason"]
    finally:
        router.stop()
