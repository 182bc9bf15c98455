"""Secrets are read when used: a file again only when it changed, and the sink sends whatever
the credentials are now (httpx.MockTransport plays InfluxDB; no delivery is claimed here)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from health.consul import ConsulAPI, ConsulSettings
from router import secrets
from router.engine import Router
from router.errors import ConfigError, ConsulError, SinkMisconfigured, SinkUnavailable
from router.metrics import Metrics
from router.sink import Credentials, InfluxSink, InfluxTarget
from router.topology import parse_topology
from tests.support import wait_until
from tests.unit.test_engine import Factory
from tests.unit.test_engine_status import Verdicts

NODE = "http://a:8086"


def rotate(path: Path, value: str) -> None:
    """Replace the file by a rename, as the kubelet swaps a mounted Secret."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(value + "\n")
    tmp.replace(path)


def kubelet_mount(folder: Path, value: str, version: int) -> Path:
    """``folder/password`` -> ``..data/password``, ``..data`` -> ``..v<version>``."""
    data = folder / f"..v{version}"
    data.mkdir()
    (data / "password").write_text(value)
    link = folder / "..data_tmp"
    link.symlink_to(data.name)
    link.replace(folder / "..data")
    key = folder / "password"
    if not key.is_symlink():
        key.symlink_to("..data/password")
    return key


# --- the file reader ---------------------------------------------------------------------


def test_a_file_secret_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    """The value is the file's text with the trailing newline dropped."""
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    assert secrets.file_secret(str(path)) == "s3cret"


def test_an_unchanged_file_is_not_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While inode, size and mtime stay the same, the cached value is returned."""
    path = tmp_path / "pw"
    path.write_text("one")
    assert secrets.file_secret(str(path)) == "one"
    reads: list[str] = []
    real = secrets._read

    def counted(p: str) -> str:
        reads.append(p)
        return real(p)

    monkeypatch.setattr(secrets, "_read", counted)
    for _ in range(3):
        assert secrets.file_secret(str(path)) == "one"
    assert reads == []


def test_a_file_replaced_by_a_rename_is_read_again(tmp_path: Path) -> None:
    """A new inode at the path (an atomic replace) gives the new value at the next call."""
    path = tmp_path / "pw"
    path.write_text("old")
    assert secrets.file_secret(str(path)) == "old"
    rotate(path, "new")
    assert secrets.file_secret(str(path)) == "new"


def test_a_file_edited_in_place_is_read_again(tmp_path: Path) -> None:
    """Same inode and same size, but a new mtime: read again."""
    path = tmp_path / "pw"
    path.write_text("aaaa")
    assert secrets.file_secret(str(path)) == "aaaa"
    path.write_text("bbbb")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert secrets.file_secret(str(path)) == "bbbb"


def test_a_kubelet_secret_swap_is_seen(tmp_path: Path) -> None:
    """The kubelet swaps the ``..data`` symlink: the path now resolves to a new file."""
    key = kubelet_mount(tmp_path, "v1-pass", 1)
    assert secrets.file_secret(str(key)) == "v1-pass"
    kubelet_mount(tmp_path, "v2-pass", 2)
    assert secrets.file_secret(str(key)) == "v2-pass"


def test_an_emptied_file_keeps_the_last_value_and_says_so_once(tmp_path: Path) -> None:
    """A file truncated mid-rotation keeps the last value; one secret_unreadable event."""
    path = tmp_path / "pw"
    path.write_text("good")
    assert secrets.file_secret(str(path)) == "good"
    path.write_text("")
    with capture_logs() as events:
        assert secrets.file_secret(str(path)) == "good"
        assert secrets.file_secret(str(path)) == "good"
    assert [e["event"] for e in events] == ["secret_unreadable"]
    assert events[0]["path"] == str(path)
    assert "good" not in repr(events)
    path.write_text("better")
    assert secrets.file_secret(str(path)) == "better"


def test_a_file_never_read_raises(tmp_path: Path) -> None:
    """A missing file that was never read is an error naming the path."""
    with pytest.raises(ValueError, match="cannot read"):
        secrets.file_secret(str(tmp_path / "missing"))


def test_an_env_secret_is_read_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """An environment variable is looked up on every call."""
    monkeypatch.setenv("FROUTER_TEST_SECRET", "one")
    assert secrets.env_secret("FROUTER_TEST_SECRET") == "one"
    monkeypatch.setenv("FROUTER_TEST_SECRET", "two")
    assert secrets.env_secret("FROUTER_TEST_SECRET") == "two"


# --- the topology's credentials ------------------------------------------------------------


TOPOLOGY = """
datacenter: dc1
kafka:
  bootstrap: "127.0.0.1:1"
  security_protocol: SASL_PLAINTEXT
  sasl_mechanism: SCRAM-SHA-256
  sasl_username_env: FROUTER_TEST_KAFKA_USER
  sasl_password_file: {kafka}
clusters:
  a:
    urls: ["http://127.0.0.1:1"]
    database: m
    username_env: FROUTER_TEST_INFLUX_USER
    password_file: {influx}
routes:
  - {{name: r, topics: [t], primary: a}}
"""


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    monkeypatch.setenv("FROUTER_TEST_KAFKA_USER", "router")
    monkeypatch.setenv("FROUTER_TEST_INFLUX_USER", "writer")
    kafka, influx = tmp_path / "kafka-pw", tmp_path / "influx-pw"
    kafka.write_text("k1\n")
    influx.write_text("i1\n")
    yield kafka, influx


def test_credentials_follow_a_rotated_password_file(files: tuple[Path, Path]) -> None:
    """credentials() and librdkafka_config() give the file's current value."""
    kafka, influx = files
    topo = parse_topology(TOPOLOGY.format(kafka=kafka, influx=influx))
    assert topo.cluster("a").credentials() == ("writer", "i1")
    assert topo.kafka.librdkafka_config()["sasl.password"] == "k1"
    rotate(influx, "i2")
    rotate(kafka, "k2")
    assert topo.cluster("a").credentials() == ("writer", "i2")
    assert topo.kafka.librdkafka_config()["sasl.password"] == "k2"


def test_a_deleted_secret_file_keeps_its_last_value(files: tuple[Path, Path]) -> None:
    """A secret file removed after load: the value read last is still used."""
    kafka, influx = files
    topo = parse_topology(TOPOLOGY.format(kafka=kafka, influx=influx))
    influx.unlink()
    assert topo.cluster("a").credentials() == ("writer", "i1")


def test_an_unset_variable_is_a_config_error(
    files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable gone since load raises ConfigError naming the key, not a value."""
    kafka, influx = files
    topo = parse_topology(TOPOLOGY.format(kafka=kafka, influx=influx))
    monkeypatch.delenv("FROUTER_TEST_INFLUX_USER")
    with pytest.raises(ConfigError, match="username_env"):
        topo.cluster("a").credentials()


# --- the sink asks for credentials per request --------------------------------------------


class Server:
    """Accepts one password (``self.password``); 401 for any other, like InfluxDB 1.x."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != httpx.BasicAuth("u", self.password)._auth_header:
            return httpx.Response(401, json={"error": "authorization failed"})
        return httpx.Response(204)


class Provider:
    """Credentials that a test rotates; counts how often the sink asks."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.calls = 0
        self.after_calls: tuple[int, str] | None = None  # (call number, password from then on)

    def __call__(self) -> Credentials:
        self.calls += 1
        if self.after_calls is not None and self.calls >= self.after_calls[0]:
            self.password = self.after_calls[1]
        return Credentials("u", self.password)


def sink_for(server: Server, provider: Provider, **fields: object) -> InfluxSink:
    target = InfluxTarget(
        cluster="influx-a",
        api="v1",
        database="metrics",
        credentials=provider,
        max_retries=0,
        **fields,  # type: ignore[arg-type]
    )
    return InfluxSink(target, lambda: [NODE], transport=httpx.MockTransport(server))


def test_the_next_request_sends_the_rotated_password() -> None:
    """A rotated password is what the next request sends: no rebuild of the sink."""
    server, provider = Server("p1"), Provider("p1")
    with sink_for(server, provider) as sink:
        sink.write([b"m v=1 1"])
        server.password = provider.password = "p2"
        sink.write([b"m v=2 2"])
    assert len(server.requests) == 2


def test_a_401_after_the_credentials_changed_is_sent_once_more() -> None:
    """Credentials rotated while a request was under way: it is sent again with the new ones."""
    server, provider = Server("p2"), Provider("p1")
    provider.after_calls = (3, "p2")  # the request read p1; the 401 finds p2
    with sink_for(server, provider) as sink:
        assert sink.write([b"m v=1 1"]) == []
    assert len(server.requests) == 2


def test_a_401_with_unchanged_credentials_is_misconfiguration() -> None:
    """Refused with the current credentials: SinkMisconfigured after one request."""
    server, provider = Server("right"), Provider("wrong")
    with sink_for(server, provider) as sink, pytest.raises(SinkMisconfigured, match="HTTP 401"):
        sink.write([b"m v=1 1"])
    assert len(server.requests) == 1


def test_unreadable_credentials_are_misconfiguration_without_a_request() -> None:
    """A provider that cannot read its secret: SinkMisconfigured naming the key, no request."""

    def broken() -> Credentials:
        raise ConfigError(["password_file: cannot read /run/pw: No such file"], source="secrets")

    requests: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(204)

    target = InfluxTarget(cluster="influx-a", api="v1", database="m", credentials=broken)
    transport = httpx.MockTransport(server)
    with (
        InfluxSink(target, lambda: [NODE], transport=transport) as sink,
        pytest.raises(SinkMisconfigured, match="password_file"),
    ):
        sink.write([b"m v=1 1"])
    assert requests == []


def test_a_rotated_secret_never_reaches_an_error_message() -> None:
    """Old and new passwords are both scrubbed from an error that quotes them."""
    provider = Provider("pw-OLD-1")
    answers = iter(["", "pw-OLD-1 and pw-NEW-2 refused"])

    def server(request: httpx.Request) -> httpx.Response:
        text = next(answers)
        return httpx.Response(204) if not text else httpx.Response(503, text=text)

    target = InfluxTarget(
        cluster="influx-a", api="v1", database="m", credentials=provider, max_retries=0
    )
    with InfluxSink(target, lambda: [NODE], transport=httpx.MockTransport(server)) as sink:
        sink.write([b"m v=1 1"])
        provider.password = "pw-NEW-2"
        with pytest.raises(SinkUnavailable) as caught:
            sink.write([b"m v=2 2"])
    assert "pw-OLD-1" not in str(caught.value)
    assert "pw-NEW-2" not in str(caught.value)


# --- probe: an empty write -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (httpx.Response(204), None),
        (httpx.Response(400, json={"message": "writing requires points"}), None),
        (httpx.Response(401, json={"error": "authorization failed"}), SinkMisconfigured),
        (httpx.Response(403, json={"error": "not authorized to write"}), SinkMisconfigured),
        (httpx.Response(404, json={"error": 'database not found: "m"'}), SinkMisconfigured),
        (httpx.Response(503, text="overloaded"), SinkUnavailable),
    ],
    ids=["204", "v2-400-no-points", "401", "403", "404-db", "503"],
)
def test_a_probe_sorts_the_answer_like_a_write(
    answer: httpx.Response, outcome: type[Exception] | None
) -> None:
    """probe() posts an empty body with the credentials and sorts the answer as a write."""
    requests: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answer

    target = InfluxTarget(
        cluster="influx-a",
        api="v1",
        database="m",
        credentials=lambda: Credentials("u", "p"),
        max_retries=0,
        compression="none",
    )
    with InfluxSink(target, lambda: [NODE], transport=httpx.MockTransport(server)) as sink:
        if outcome is None:
            sink.probe()
        else:
            with pytest.raises(outcome):
                sink.probe()
    assert len(requests) == 1
    assert requests[0].content == b""
    assert requests[0].url.path == "/write"
    assert requests[0].headers["authorization"] == httpx.BasicAuth("u", "p")._auth_header


# --- the router: kafka: changes and rotated Kafka secrets rebuild the Kafka clients ------------


def make_router(text: str) -> tuple[Router, Factory]:
    factory = Factory()
    router = Router(
        parse_topology(text),
        verdicts=Verdicts(),
        destinations=factory,
        metrics=Metrics(CollectorRegistry()),
        tick=0.02,
        lag_interval=0.1,
        lag_timeout=0.1,
    )
    return router, factory


def gauge(router: Router, name: str, **labels: str) -> float | None:
    return router.metrics.registry.get_sample_value(name, labels)


def leave_all(factory: Factory, built_before: int) -> None:
    """The old destinations finish leaving their groups (the fakes wait for the test)."""
    for d in factory.built[:built_before]:
        d.left.set()


def test_a_valid_topology_reads_ok_before_any_reload() -> None:
    """frouter_topology_last_reload_ok is 1 from the start with a valid topology."""
    router, _ = make_router(ENGINE_TOPOLOGY)
    try:
        assert gauge(router, "frouter_topology_last_reload_ok") == 1
    finally:
        router.stop(timeout=1.0)


def test_a_new_dead_letter_topic_rebuilds_the_clients_and_every_route() -> None:
    """A kafka: change builds a new producer for the new topic, rebuilds every route, and
    closes the old clients once the old destinations left."""
    router, factory = make_router(ENGINE_TOPOLOGY)
    router.start()
    try:
        wait_until(lambda: len(factory.built) == 4, timeout=5, what="4 destinations")
        old = router._kafka
        with capture_logs() as events:
            router.apply(parse_topology(ENGINE_TOPOLOGY.replace("dead-1", "dead-2")))
            wait_until(lambda: router._dlq.topic == "dead-2", timeout=5, what="new producer")
        assert router._kafka.generation == old.generation + 1
        assert any(e["event"] == "kafka_clients_rebuilt" for e in events)
        wait_until(
            lambda: all(("request_stop", True) in d.calls for d in factory.built[:4]),
            timeout=5,
            what="every old destination asked to leave",
        )
        assert len(router._retired_kafka) == 1  # still used by the leaving destinations
        leave_all(factory, 4)
        wait_until(lambda: len(factory.built) == 8, timeout=5, what="every route rebuilt")
        wait_until(lambda: len(router._retired_kafka) == 0, timeout=5, what="old clients closed")
    finally:
        router.stop(timeout=1.0)


def test_a_comment_only_edit_rebuilds_nothing() -> None:
    """Same kafka: section and secrets: the clients and the routes stay as they are."""
    router, factory = make_router(ENGINE_TOPOLOGY)
    router.start()
    try:
        wait_until(lambda: len(factory.built) == 4, timeout=5, what="4 destinations")
        old = router._kafka
        router.apply(parse_topology("# a comment\n" + ENGINE_TOPOLOGY))
        wait_until(lambda: router.reload_error == "", timeout=5)
        time.sleep(0.3)
        assert router._kafka is old
        assert len(factory.built) == 4
    finally:
        router.stop(timeout=1.0)


def test_a_rotated_sasl_password_file_rebuilds_the_clients(
    files: tuple[Path, Path],
) -> None:
    """The SASL password file changes under an unchanged topology: new clients, every route
    rebuilt with them (the reload thread watches the secret)."""
    kafka, _ = files
    router, factory = make_router(SASL_TOPOLOGY.format(kafka=kafka))
    router.start()
    try:
        wait_until(lambda: len(factory.built) == 2, timeout=5, what="2 destinations")
        assert router._kafka_config["sasl.password"] == "k1"
        rotate(kafka, "k2")
        wait_until(lambda: router._kafka.generation == 1, timeout=5, what="clients rebuilt")
        assert router._kafka_config["sasl.password"] == "k2"
        leave_all(factory, 2)
        wait_until(lambda: len(factory.built) == 4, timeout=5, what="routes rebuilt")
    finally:
        router.stop(timeout=1.0)


def test_a_kafka_section_librdkafka_refuses_keeps_the_previous_one() -> None:
    """A client_config librdkafka refuses: reported (status, metric, event), the previous
    kafka settings and clients stay, nothing is rebuilt for it; reverted, the error clears."""
    router, factory = make_router(ENGINE_TOPOLOGY)
    router.start()
    try:
        wait_until(lambda: len(factory.built) == 4, timeout=5, what="4 destinations")
        bad = ENGINE_TOPOLOGY.replace(
            "dead_letter_topic: dead-1", 'dead_letter_topic: dead-2, client_config: {"no.such": 1}'
        )
        with capture_logs() as events:
            router.apply(parse_topology(bad))
            wait_until(lambda: router.reload_error, timeout=5, what="error reported")
        assert "no.such" in router.reload_error
        assert any(e["event"] == "kafka_clients_failed" for e in events)
        assert gauge(router, "frouter_topology_last_reload_ok") == 0
        assert router._dlq.topic == "dead-1"
        assert router.topology.kafka.dead_letters == "dead-1"
        time.sleep(0.3)
        assert len(factory.built) == 4
        router.apply(parse_topology(ENGINE_TOPOLOGY))  # reverted: the error clears
        wait_until(lambda: router.reload_error == "", timeout=5, what="error cleared")
    finally:
        router.stop(timeout=1.0)


ENGINE_TOPOLOGY = """
datacenter: dc1
kafka: {bootstrap: "127.0.0.1:1", group_prefix: g, dead_letter_topic: dead-1}
clusters:
  a: {urls: ["http://127.0.0.1:1"], database: m}
  b: {urls: ["http://127.0.0.1:2"], database: m}
  c: {urls: ["http://127.0.0.1:3"], database: m}
routes:
  - {name: r, topics: [t], primary: a, standby: [b]}
  - {name: s, topics: [u], primary: c, standby: [b]}
"""

SASL_TOPOLOGY = """
datacenter: dc1
kafka:
  bootstrap: "127.0.0.1:1"
  security_protocol: SASL_PLAINTEXT
  sasl_mechanism: SCRAM-SHA-256
  sasl_username_env: FROUTER_TEST_KAFKA_USER
  sasl_password_file: {kafka}
clusters:
  a: {{urls: ["http://127.0.0.1:1"], database: m}}
  b: {{urls: ["http://127.0.0.1:2"], database: m}}
routes:
  - {{name: r, topics: [t], primary: a, standby: [b]}}
"""


# --- the Consul ACL token file ----------------------------------------------------------------


def test_a_rotated_consul_token_file_is_sent_with_the_next_call(tmp_path: Path) -> None:
    """The Consul client takes its token from the file before every call."""
    token = tmp_path / "consul-token"
    token.write_text("tok-1\n")
    api = ConsulAPI(ConsulSettings(address="127.0.0.1:1", token_file=str(token)))
    seen: list[str | None] = []
    api._call("test", lambda: seen.append(api._client.token))
    rotate(token, "tok-2")
    api._call("test", lambda: seen.append(api._client.token))
    assert seen == ["tok-1", "tok-2"]


def test_an_unreadable_consul_token_file_is_a_consul_error(tmp_path: Path) -> None:
    """A token file never readable fails the call as ConsulError (never fatal), naming it."""
    api = ConsulAPI(ConsulSettings(address="127.0.0.1:1", token_file=str(tmp_path / "nope")))
    with pytest.raises(ConsulError, match="token file"):
        api._call("test", lambda: None)
