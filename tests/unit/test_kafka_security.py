"""What the router does when the brokers refuse its credentials or TLS: exit 2 at start with an
error naming the brokers and the mechanism; on a live reload (a rotated SASL password file the
brokers refuse) the clients it has keep running, the refusal is reported once, and putting the
secret back clears it. (A real SCRAM-SHA-512 refusal by Kafka 4.1 is what librdkafka reports as
``_AUTHENTICATION``; which errors count as a refusal is pinned in test_scrub.py.)"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from router import cli
from router.clients import KafkaClients
from router.engine import Router
from router.errors import KafkaRefused
from router.kafka import check_access
from router.topology import parse_topology
from tests.support import wait_until
from tests.unit.test_engine import Factory
from tests.unit.test_secrets import make_router, rotate
from tests.unit.tls_support import make_pki

TOPOLOGY = """
datacenter: dc1
kafka:
  bootstrap: "127.0.0.1:1"
  security_protocol: SASL_PLAINTEXT
  sasl_mechanism: SCRAM-SHA-512
  sasl_username_env: FROUTER_TEST_KAFKA_USER
  sasl_password_file: {password}
clusters:
  a: {{urls: ["http://127.0.0.1:1"], database: m}}
  b: {{urls: ["http://127.0.0.1:2"], database: m}}
routes:
  - {{name: r, topics: [t], primary: a, standby: [b]}}
http: {{listen: "127.0.0.1:0"}}
"""

REFUSAL = (
    "kafka 127.0.0.1:1 (datacenter dc1): the brokers refused the router's credentials "
    "(SASL SCRAM-SHA-512): SASL authentication error: Authentication failed during "
    "authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
)


@pytest.fixture
def password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FROUTER_TEST_KAFKA_USER", "router")
    path = tmp_path / "kafka-password"
    path.write_text("good-password-1\n")
    return path


class Brokers:
    """Stands in for the brokers' verdict on a set of clients (``KafkaClients.check``): they
    refuse every password in ``refused``. Counts the checks."""

    def __init__(self) -> None:
        self.refused = {"bad-password-2"}
        self.checks = 0

    def check(self, clients: KafkaClients, *, datacenter: str = "", timeout: float = 10.0) -> str:
        self.checks += 1
        if clients.config.get("sasl.password") in self.refused:
            raise KafkaRefused(REFUSAL, mechanism="SCRAM-SHA-512", code="_AUTHENTICATION")
        return "ok"


@pytest.fixture
def brokers(monkeypatch: pytest.MonkeyPatch) -> Brokers:
    fake = Brokers()

    def check(clients: KafkaClients, *, datacenter: str = "", timeout: float = 10.0) -> str:
        return fake.check(clients, datacenter=datacenter, timeout=timeout)

    monkeypatch.setattr(KafkaClients, "check", check)
    return fake


@pytest.fixture
def router(password: Path) -> Iterator[tuple[Router, Factory]]:
    r, factory = make_router(TOPOLOGY.format(password=password))
    r.start()
    try:
        yield r, factory
    finally:
        r.stop(timeout=1.0)


def reload_ok(r: Router) -> float | None:
    return r.metrics.registry.get_sample_value("frouter_topology_last_reload_ok")


def test_a_rotated_password_the_brokers_refuse_keeps_the_clients_that_work(
    router: tuple[Router, Factory], password: Path, brokers: Brokers
) -> None:
    """The SASL password file is rotated to a value the brokers refuse: kafka_refused names
    the mechanism, the router keeps the clients (and routes) it has, the status says why,
    and the refused value is not tried again on every pass."""
    r, factory = router
    wait_until(lambda: len(factory.built) == 2, timeout=5, what="2 destinations")
    with capture_logs() as events:
        rotate(password, "bad-password-2")
        wait_until(lambda: r.reload_error, timeout=5, what="the refusal reported")
        checks = brokers.checks
        time.sleep(0.3)  # many reload passes
    assert brokers.checks == checks == 1
    refused = [e for e in events if e["event"] == "kafka_refused"]
    assert len(refused) == 1
    assert refused[0]["mechanism"] == "SCRAM-SHA-512" and refused[0]["code"] == "_AUTHENTICATION"
    assert "still using the previous kafka settings" in r.reload_error
    assert "SCRAM-SHA-512" in r.reload_error
    assert r._kafka.generation == 0 and r._kafka_config["sasl.password"] == "good-password-1"
    assert len(factory.built) == 2  # nothing rebuilt
    assert reload_ok(r) == 0
    assert "bad-password-2" not in repr(events) + r.reload_error


def test_putting_the_refused_secret_back_clears_the_error(
    router: tuple[Router, Factory], password: Path, brokers: Brokers
) -> None:
    """The old password back in the file: the error clears with no rebuild."""
    r, factory = router
    wait_until(lambda: len(factory.built) == 2, timeout=5, what="2 destinations")
    rotate(password, "bad-password-2")
    wait_until(lambda: r.reload_error, timeout=5, what="the refusal reported")
    rotate(password, "good-password-1")
    wait_until(lambda: r.reload_error == "", timeout=5, what="the error cleared")
    assert reload_ok(r) == 1
    assert r._kafka.generation == 0 and len(factory.built) == 2


def test_a_new_password_the_brokers_accept_moves_every_route_to_it(
    router: tuple[Router, Factory], password: Path, brokers: Brokers
) -> None:
    """After a refused rotation, a password the brokers accept builds new clients and clears
    the error, as any rotation does."""
    r, factory = router
    wait_until(lambda: len(factory.built) == 2, timeout=5, what="2 destinations")
    rotate(password, "bad-password-2")
    wait_until(lambda: r.reload_error, timeout=5, what="the refusal reported")
    rotate(password, "good-password-3")
    wait_until(lambda: r._kafka.generation == 1, timeout=5, what="new clients")
    assert r._kafka_config["sasl.password"] == "good-password-3"
    assert r.reload_error == "" and reload_ok(r) == 1


def run_args(topology: Path) -> argparse.Namespace:
    return argparse.Namespace(
        topology=str(topology),
        datacenter=None,
        listen="127.0.0.1:0",
        advertise_address=None,
        consul_addr=None,
        consul_token_file=None,
        consul_ca_file=None,
        consul_prefix="failover-router",
        consul_session_ttl=10.0,
    )


def test_refused_credentials_at_start_exit_2_naming_brokers_and_mechanism(
    password: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`failover-router run` whose brokers refuse the credentials: nothing starts, exit code
    2, the error on stderr names the brokers and the mechanism, never the password."""
    topology = password.parent / "topology.yaml"
    topology.write_text(TOPOLOGY.format(password=password))

    def refuse(config: dict[str, str], *, datacenter: str = "", timeout: float = 10.0) -> str:
        raise KafkaRefused(REFUSAL, mechanism="SCRAM-SHA-512", code="_AUTHENTICATION")

    monkeypatch.setattr(cli, "check_access", refuse)
    with capture_logs() as events:
        assert cli.run(run_args(topology)) == cli.EXIT_KAFKA_REFUSED == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "failover-router: kafka 127.0.0.1:1 (datacenter dc1): the brokers refused"
    )
    assert "SASL SCRAM-SHA-512" in err and "good-password-1" not in err
    assert [e["event"] for e in events] == ["kafka_refused"]


def test_an_unreachable_kafka_at_start_is_only_a_warning() -> None:
    """No broker answers (connection refused): the check says so at once and the router
    would start anyway (as before: it connects once Kafka is there)."""
    topology = parse_topology(
        TOPOLOGY.format(password="/dev/null").replace(
            "  security_protocol: SASL_PLAINTEXT\n  sasl_mechanism: SCRAM-SHA-512\n"
            "  sasl_username_env: FROUTER_TEST_KAFKA_USER\n  sasl_password_file: /dev/null\n",
            "",
        )
    )
    started = time.monotonic()
    with capture_logs() as events:
        cli.check_kafka(topology, timeout=10)
    assert time.monotonic() - started < 5
    warnings = [e for e in events if e["event"] == "kafka_unverified"]
    assert len(warnings) == 1 and warnings[0]["outcome"] == "unreachable"


def test_check_access_of_a_broker_that_does_not_exist_is_unreachable() -> None:
    """check_access with a real librdkafka client and nothing listening: "unreachable"."""
    assert check_access({"bootstrap.servers": "127.0.0.1:1"}, timeout=5) == "unreachable"


def test_a_rotated_kafka_ca_file_rebuilds_the_clients(
    tmp_path: Path, brokers: Brokers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka reads its CA file when a client is built: a CA bundle replaced at the same
    path (the topology unchanged) builds new clients, as a rotated password does."""
    pki = make_pki(tmp_path / "pki")
    ca = tmp_path / "kafka-ca.pem"
    shutil.copy(pki.ca, ca)
    text = TOPOLOGY.format(password="/dev/null").replace(
        "  security_protocol: SASL_PLAINTEXT\n  sasl_mechanism: SCRAM-SHA-512\n"
        "  sasl_username_env: FROUTER_TEST_KAFKA_USER\n  sasl_password_file: /dev/null\n",
        f"  security_protocol: SSL\n  tls: {{ca_file: {ca}}}\n",
    )
    r, factory = make_router(text)
    r.start()
    try:
        wait_until(lambda: len(factory.built) == 2, timeout=5, what="2 destinations")
        assert r._kafka_config["ssl.ca.location"] == str(ca)
        replacement = tmp_path / "kafka-ca.new"
        shutil.copy(pki.other_ca, replacement)
        os.replace(replacement, ca)
        wait_until(lambda: r._kafka.generation == 1, timeout=5, what="clients rebuilt")
        assert brokers.checks == 1
    finally:
        r.stop(timeout=1.0)
