"""Wrong credentials and a wrong CA on the secured stack: each is named, none loses a point.

Kafka over SASL_SSL (SCRAM-SHA-512, the private CA, a client certificate with an encrypted key),
influx-s (https + auth through its proxy) as primary and influx-b as standby; the users and
secret files are the ones ``test_secret_leak.Secrets`` makes for a test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.kafka import KafkaAdmin
from tests.integration import test_secret_leak
from tests.integration.harness import RouterProc, free_port, write_yaml
from tests.integration.test_secret_leak import ROUTE, Secrets, _lines, _topology
from tests.integration.test_secure_stack import as_admin, produce
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
