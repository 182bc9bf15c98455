"""Secrets never leave the process: every secret read is remembered and cut out of the logs
(every level, librdkafka's own lines included), the status page and /api/status, /healthz,
error messages and check-topology's output."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from confluent_kafka import Consumer, KafkaError
from structlog.testing import capture_logs

from router import secrets
from router.errors import SinkMisconfigured, SinkUnavailable, SourceError
from router.events import RECENT, log_processors
from router.http import StatusServer
from router.kafka import KAFKA_LOG, KafkaAdmin, _refusal, _refused, client_config
from router.metrics import Metrics
from router.sink import InfluxSink, InfluxTarget
from router.topology import check_topology_main, parse_topology
from tests.unit.test_topology import MINIMAL

SECRET = "s3cret-value-4711"


class Output(io.StringIO):
    """A buffer and a logger writing JSON lines into it through the router's processors (as
    ``configure_logging`` sets them up, without touching the global configuration)."""

    def __init__(self) -> None:
        super().__init__()
        self.log = structlog.wrap_logger(
            structlog.PrintLogger(self),
            processors=log_processors(),
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        )


@pytest.fixture
def output() -> Output:
    return Output()


@pytest.fixture
def remembered(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """SECRET read the way the topology reads one (an environment variable)."""
    secrets.forget_all()
    monkeypatch.setenv("FROUTER_TEST_SECRET", SECRET)
    assert secrets.env_secret("FROUTER_TEST_SECRET") == SECRET
    yield SECRET
    secrets.forget_all()


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_secret_read_is_cut_out_of_every_log_field_at_every_level(
    output: Output, remembered: str
) -> None:
    """A secret in a field, inside a list or a dict, or in an exception's traceback, at debug
    and at error level, is written as ***."""
    log = output.log
    log.debug("thing", detail=f"password={remembered}", nested={"a": [remembered]})
    try:
        raise RuntimeError(f"connect failed with {remembered}")
    except RuntimeError:
        log.error("failed", exc_info=True)
    text = output.getvalue()
    assert remembered not in text
    first, second = lines(output)
    assert first["detail"] == "password=***" and first["nested"] == {"a": ["***"]}
    assert "connect failed with ***" in second["exception"]


def test_the_status_pages_recent_events_are_scrubbed(output: Output, remembered: str) -> None:
    """The events kept for the status page are scrubbed before they are kept."""
    output.log.error("sink_misconfigured", reason=f"401 for {remembered}")
    kept = [e for e in RECENT.snapshot() if e.get("event") == "sink_misconfigured"]
    assert kept and kept[-1]["reason"] == "401 for ***"


def test_librdkafkas_own_lines_go_through_structlog_scrubbed(remembered: str) -> None:
    """A real librdkafka client built with client_config logs through structlog (event
    kafka_log, its level, facility and client), and a secret in its line is cut out: here
    the broker's name is the remembered value, and librdkafka cannot resolve it."""
    consumer = Consumer(
        client_config({"bootstrap.servers": f"{remembered}.invalid:9092", "group.id": "g"})
    )
    with capture_logs() as events:
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not events:
                consumer.poll(0.1)
        finally:
            consumer.close()
    logged = [e for e in events if e["event"] == "kafka_log"]
    assert logged, "librdkafka logged nothing through structlog"
    assert remembered not in repr(logged)
    assert any("***.invalid:9092" in e["message"] for e in logged)
    assert {e["log_level"] for e in logged} <= {"error", "warning", "info", "debug"}
    assert all(e["client"].startswith("rdkafka#consumer") for e in logged)


def test_the_lines_of_handles_that_never_fetch_are_served() -> None:
    """An offset reader never polls by itself: KafkaAdmin.serve delivers what librdkafka
    queued for it (so nothing piles up in its queue)."""
    admin = KafkaAdmin({"bootstrap.servers": "127.0.0.1:1"}, timeout=0.5)
    try:
        with capture_logs() as events:
            with pytest.raises(SourceError, match="committed offsets"):
                admin.committed("g", [("t", 0)])
            before = len(events)
            time.sleep(0.3)
            admin.serve()
            assert len(events) > before
        assert {e["event"] for e in events} == {"kafka_log"}
    finally:
        admin.close()


def test_the_kafka_log_bridge_maps_levels_and_never_raises() -> None:
    """confluent-kafka's (level, "%s [%s] %s", facility, client, line) becomes one event at
    the matching level; an unexpected call shape is still logged, not raised."""
    with capture_logs() as events:
        KAFKA_LOG.log(40, "%s [%s] %s", "FAIL", "rdkafka#producer-1", "broker down")
        KAFKA_LOG.log(30, "%s [%s] %s", "CONFWARN", "rdkafka#producer-1", "odd setting")
        KAFKA_LOG.log(10, "%s [%s] %s", "BROKER", "rdkafka#producer-1", "details")
        KAFKA_LOG.log(20, "%d %d", "not", "numbers")
    got = [(e["log_level"], e["facility"], e["message"]) for e in events]
    assert got[:3] == [
        ("error", "FAIL", "broker down"),
        ("warning", "CONFWARN", "odd setting"),
        ("debug", "BROKER", "details"),
    ]
    assert got[3][0] == "info" and "numbers" in got[3][2]


def test_status_json_and_healthz_are_scrubbed(remembered: str) -> None:
    """/api/status and /healthz are scrubbed as a whole before they are sent."""

    class Router:
        metrics = Metrics()

        def readiness(self) -> str:
            return ""

        def health(self) -> tuple[str, list[str]]:
            return f"influx-a: {remembered}", []

        def status(self) -> dict[str, Any]:
            return {"topology_error": f"kafka: refused {remembered}", "routes": []}

    server = StatusServer("127.0.0.1:0", router=Router())
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        status = httpx.get(f"{base}/api/status", timeout=5).text
        healthz = httpx.get(f"{base}/healthz", timeout=5).text
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
    finally:
        server.stop()
    assert "kafka: refused ***" in status
    assert healthz == "influx-a: ***\n"
    for text in (status, healthz, metrics):
        assert remembered not in text


def test_a_sink_error_never_quotes_a_secret(remembered: str) -> None:
    """A server answer that echoes a secret (its own credentials, or any other secret the
    process read) is scrubbed from the exception the sink raises."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/write" and "p" in request.url.params.get("db", ""):
            return httpx.Response(500, json={"error": f"backend said {remembered}"})
        return httpx.Response(401, json={"error": f"bad password {remembered}"})

    for db, kind in (("m", SinkMisconfigured), ("p", SinkUnavailable)):
        target = InfluxTarget(cluster="a", api="v1", database=db, max_retries=0)
        with (
            InfluxSink(
                target, nodes=lambda: ["http://a:8086"], transport=httpx.MockTransport(answer)
            ) as sink,
            pytest.raises(kind) as failure,
        ):
            sink.write([b"cpu v=1 1"])
        assert remembered not in str(failure.value)
        assert "***" in str(failure.value)


def test_a_kafka_refusal_names_the_brokers_and_the_mechanism_not_the_password(
    remembered: str,
) -> None:
    """The start-up error of a refused SASL login says which brokers, which mechanism, and
    librdkafka's words, scrubbed."""
    config = {
        "bootstrap.servers": "k1:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.password": remembered,
    }
    err = KafkaError(
        KafkaError._AUTHENTICATION,
        "SASL authentication error: Authentication failed during authentication due to invalid "
        f"credentials with SASL mechanism SCRAM-SHA-512 ({remembered})",
    )
    refused = _refused(config, err, "dc1")
    assert refused.mechanism == "SCRAM-SHA-512" and refused.code == "_AUTHENTICATION"
    assert str(refused).startswith("kafka k1:9093 (datacenter dc1): the brokers refused")
    assert "SASL SCRAM-SHA-512" in str(refused)
    assert remembered not in str(refused)


@pytest.mark.parametrize(
    ("code", "text", "refused"),
    [
        (KafkaError._AUTHENTICATION, "SASL authentication error", True),
        (KafkaError._SSL, "SSL handshake failed: certificate verify failed", True),
        (
            KafkaError._TRANSPORT,
            "Receive failed: SSL routines::ssl/tls alert bad certificate",
            True,
        ),
        (KafkaError._TRANSPORT, "Connect to ipv4#127.0.0.1:1 failed: Connection refused", False),
        (KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down", False),
    ],
)
def test_which_librdkafka_errors_mean_refused(code: int, text: str, refused: bool) -> None:
    """Refused credentials and failed TLS (also an alert from the broker: our client
    certificate) are refusals; a broker that is down is not."""
    assert (_refusal(KafkaError(code, text)) is not None) is refused


def test_check_topology_never_prints_a_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A secret pasted where a variable name belongs, an inline key password: check-topology
    names the keys and prints neither value."""
    text = MINIMAL.replace(
        "    database: metrics\n",
        f"    database: metrics\n    username_env: U\n    password_env: {SECRET}\n",
        1,
    ).replace("kafka:\n", f"kafka:\n  tls: {{key_password: {SECRET}}}\n", 1)
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    assert check_topology_main(str(path), None) == 1
    out = capsys.readouterr()
    assert "clusters.influx-a.password_env" in out.err
    assert "kafka.tls.key_password: inline secrets are not allowed" in out.err
    assert SECRET not in out.err + out.out


def test_short_values_and_names_are_not_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value under 6 characters is not remembered (cutting it from every line would garble
    the logs), nor is a username read from its variable."""
    secrets.forget_all()
    monkeypatch.setenv("FROUTER_TEST_SHORT", "abc")
    monkeypatch.setenv("FROUTER_TEST_USER", "frouter-writer")
    secrets.env_secret("FROUTER_TEST_SHORT")
    parse_topology(
        MINIMAL.replace(
            "    database: metrics\n",
            "    database: metrics\n    username_env: FROUTER_TEST_USER\n"
            "    password_env: FROUTER_TEST_SHORT\n",
            1,
        )
    )
    assert secrets.scrub("abc frouter-writer") == "abc frouter-writer"
    secrets.forget_all()


def test_a_rotated_out_secret_stays_scrubbed(tmp_path: Path) -> None:
    """After a rotation both the old and the new value are cut out (old lines may still
    quote the old one)."""
    secrets.forget_all()
    path = tmp_path / "pw"
    path.write_text("first-secret-1\n")
    secrets.file_secret(str(path))
    replacement = tmp_path / "pw.new"
    replacement.write_text("second-secret-2\n")
    os.replace(replacement, path)
    secrets.file_secret(str(path))
    assert secrets.scrub("first-secret-1 second-secret-2") == "*** ***"
    secrets.forget_all()
