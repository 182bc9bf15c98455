"""The secured stack (``devstack up --secure``): each secured server refuses what it should.

Raw clients only (confluent_kafka, httpx): Kafka's SASL_SSL (SCRAM-SHA-512) and SSL (client
certificate) listeners and the router user's ACLs, influx-s over https with auth, consul-acl
with ACLs on (default deny) over http and https. What the router makes of them is tested with
the router itself elsewhere; these prove the servers the router's tests stand on. The
``secure_env`` fixture (tests/integration/conftest.py) starts them once per session.
"""

from __future__ import annotations

import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from devstack import stack
from devstack.toxiproxy import Toxiproxy
from tests.support import wait_until

pytestmark = pytest.mark.integration

BASE_TS = 1_700_000_000_000_000_000


def secret(env: dict[str, str], key: str) -> str:
    return Path(env[key]).read_text()


class _Quiet:
    """Keeps librdkafka's lines about refused connections out of the test output."""

    def log(self, level: int, fmt: str, *args: object) -> None:
        pass


def sasl_ssl(env: dict[str, str], user: str, password: str, **extra: Any) -> dict[str, Any]:
    return {
        "bootstrap.servers": env["KAFKA_SASL_SSL_BOOTSTRAP"],
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": env["KAFKA_SASL_MECHANISM"],
        "sasl.username": user,
        "sasl.password": password,
        "ssl.ca.location": env["TLS_CA_FILE"],
        "logger": _Quiet(),
        **extra,
    }


def as_admin(env: dict[str, str], **extra: Any) -> dict[str, Any]:
    user, password = env["KAFKA_ADMIN_USERNAME"], secret(env, "KAFKA_ADMIN_PASSWORD_FILE")
    return sasl_ssl(env, user, password, **extra)


def as_router(env: dict[str, str], **extra: Any) -> dict[str, Any]:
    user, password = env["KAFKA_ROUTER_USERNAME"], secret(env, "KAFKA_ROUTER_PASSWORD_FILE")
    return sasl_ssl(env, user, password, **extra)


def create_topic(env: dict[str, str], name: str, partitions: int = 2) -> None:
    """Made by the admin over SASL_SSL (the router may not create topics)."""
    admin = AdminClient(as_admin(env))
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[
        name
    ].result(15)


def produce(config: dict[str, Any], topic: str, lines: list[str]) -> list[KafkaError | None]:
    """Each message's delivery outcome (None when delivered)."""
    outcomes: list[KafkaError | None] = []
    producer = Producer({**config, "message.timeout.ms": 10000})
    for line in lines:
        producer.produce(topic, line.encode(), on_delivery=lambda err, _msg: outcomes.append(err))
    assert producer.flush(15) == 0
    return outcomes


def consume(config: dict[str, Any], topic: str, group: str, count: int) -> list[str]:
    """``count`` messages read from the start by ``group``, committed."""
    consumer = Consumer(
        {**config, "group.id": group, "enable.auto.commit": False, "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    received: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while len(received) < count and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=100, timeout=0.5):
                err = msg.error()
                assert err is None, err.str()
                received.append(bytes(msg.value() or b"").decode())
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return received


def consume_error(config: dict[str, Any], topic: str, group: str) -> KafkaError:
    """The first error a consumer meets (an ACL refusal), within 30 s."""
    consumer = Consumer({**config, "group.id": group, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    try:

        def first_error() -> KafkaError | None:
            for msg in consumer.consume(num_messages=10, timeout=0.5):
                if msg.error() is not None:
                    return msg.error()
            return None

        err = wait_until(first_error, what=f"an error reading {topic} as {group}")
        assert err is not None
        return err
    finally:
        consumer.close()


def refusal(config: dict[str, Any]) -> KafkaError:
    """Why the broker cannot be used with ``config``: the first error librdkafka reports."""
    errors: list[KafkaError] = []
    settings: dict[str, Any] = {
        **config,
        "error_cb": errors.append,
        "reconnect.backoff.ms": 1000,
        "reconnect.backoff.max.ms": 1000,
    }
    admin = AdminClient(settings)  # it connects to the bootstrap broker at once

    def first() -> KafkaError | None:
        admin.poll(0.2)
        return next((e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN), None)

    err = wait_until(first, timeout=15, what="librdkafka's error")
    assert err is not None
    with pytest.raises(KafkaException):  # and nothing can be asked
        admin.list_topics(timeout=1)
    return err


# --- ports -------------------------------------------------------------------------------------


def test_ports_of_stacks_shifted_by_500_never_meet(monkeypatch: pytest.MonkeyPatch) -> None:
    """No port of a stack at offset 0, 500, ..., 6000 is a port of another such stack."""
    seen: dict[int, tuple[int, str]] = {}
    for offset in range(0, 6001, 500):
        monkeypatch.setenv("FROUTER_PORT_OFFSET", str(offset))
        for name, port in stack.ports().items():
            assert port not in seen, f"{name}@{offset} meets {seen[port]}"
            seen[port] = (offset, name)


# --- Kafka -------------------------------------------------------------------------------------


def test_kafka_sasl_ssl_round_trip_with_scram_and_the_private_ca(
    secure_env: dict[str, str],
) -> None:
    """admin writes over SASL_SSL, router reads and commits in its group, both SCRAM-SHA-512
    with the private CA; the plain listener sees the same topic."""
    env = secure_env
    tag = uuid.uuid4().hex[:8]
    topic = f"{env['KAFKA_ROUTER_TOPIC_PREFIX']}{tag}"
    create_topic(env, topic)
    sent = [f"cpu,host=h{i} value={i}i {BASE_TS + i}" for i in range(50)]
    assert produce(as_admin(env), topic, sent) == [None] * 50

    group = f"{env['KAFKA_ROUTER_GROUP_PREFIX']}{tag}"
    assert sorted(consume(as_router(env), topic, group, 50)) == sorted(sent)
    plain = AdminClient({"bootstrap.servers": env["KAFKA_BOOTSTRAP"]})
    offsets = plain.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])[
        group
    ].result(15)
    assert sum(tp.offset for tp in offsets.topic_partitions) == 50


def test_kafka_wrong_scram_password_is_refused(secure_env: dict[str, str]) -> None:
    """A wrong password is an authentication error that names SCRAM-SHA-512."""
    err = refusal(sasl_ssl(secure_env, secure_env["KAFKA_ROUTER_USERNAME"], "not-the-password"))
    assert err.code() == KafkaError._AUTHENTICATION
    assert (
        "Authentication failed during authentication due to invalid credentials with SASL "
        "mechanism SCRAM-SHA-512" in err.str()
    )


def test_kafka_another_ca_fails_the_tls_handshake(secure_env: dict[str, str]) -> None:
    """Trusting an unrelated CA, the broker's certificate does not verify."""
    err = refusal(as_router(secure_env, **{"ssl.ca.location": secure_env["TLS_OTHER_CA_FILE"]}))
    assert err.code() == KafkaError._SSL
    assert "certificate verify failed" in err.str()


def test_kafka_ssl_listener_takes_the_client_certificate_with_an_encrypted_key(
    secure_env: dict[str, str],
) -> None:
    """On the SSL listener the client certificate (CN=router, key encrypted) is the user
    ``router``, with its ACLs; without a certificate the broker refuses the handshake."""
    env = secure_env
    tls = {
        "bootstrap.servers": env["KAFKA_SSL_BOOTSTRAP"],
        "security.protocol": "SSL",
        "ssl.ca.location": env["TLS_CA_FILE"],
        "logger": _Quiet(),
    }
    err = refusal(tls)
    assert err.code() == KafkaError._TRANSPORT
    assert "alert bad certificate" in err.str()

    mtls = {
        **tls,
        "ssl.certificate.location": env["TLS_CLIENT_CERT_FILE"],
        "ssl.key.location": env["TLS_CLIENT_KEY_FILE"],
        "ssl.key.password": secret(env, "TLS_CLIENT_KEY_PASSWORD_FILE"),
    }
    tag = uuid.uuid4().hex[:8]
    topic = f"{env['KAFKA_ROUTER_TOPIC_PREFIX']}{tag}"
    create_topic(env, topic)
    assert produce(as_admin(env), topic, ["m value=1i 1", "m value=2i 2"]) == [None, None]
    group = f"{env['KAFKA_ROUTER_GROUP_PREFIX']}{tag}"
    assert sorted(consume(mtls, topic, group, 2)) == ["m value=1i 1", "m value=2i 2"]
    denied = produce(mtls, topic, ["m value=3i 3"])  # router reads its topics, never writes
    assert denied[0] is not None
    assert denied[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_kafka_router_user_has_least_privilege(secure_env: dict[str, str]) -> None:
    """router may read its topics in its groups and write its dead-letter topics; any other
    topic, group or write is refused by the authorizer."""
    env = secure_env
    tag = uuid.uuid4().hex[:8]
    ours = f"{env['KAFKA_ROUTER_TOPIC_PREFIX']}{tag}"
    dead = f"{env['KAFKA_ROUTER_DEAD_LETTER_PREFIX']}{tag}"
    other = f"other.{tag}"
    for topic in (ours, dead, other):
        create_topic(env, topic)
    assert produce(as_admin(env), ours, ["m value=1i 1"]) == [None]
    assert produce(as_admin(env), other, ["m value=1i 1"]) == [None]

    assert produce(as_router(env), dead, ["m value=x 1"]) == [None]
    refused = produce(as_router(env), ours, ["m value=2i 2"])
    assert refused[0] is not None
    assert refused[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

    group = f"{env['KAFKA_ROUTER_GROUP_PREFIX']}{tag}"
    err = consume_error(as_router(env), other, group)
    assert err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    err = consume_error(as_router(env), ours, f"not-ours-{tag}")
    assert err.code() == KafkaError.GROUP_AUTHORIZATION_FAILED


# --- influx-s ----------------------------------------------------------------------------------


def ca_context(path: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=path)


def router_auth(env: dict[str, str]) -> httpx.BasicAuth:
    return httpx.BasicAuth(env["INFLUX_S_USERNAME"], secret(env, "INFLUX_S_PASSWORD_FILE"))


def influx_s_write(
    url: str, env: dict[str, str], body: str, auth: httpx.Auth, ca: str
) -> httpx.Response:
    return httpx.post(
        f"{url}/write",
        params={"db": env["INFLUX_S_DATABASE"]},
        content=body,
        auth=auth,
        verify=ca_context(ca),
        timeout=5,
    )


def test_influx_s_https_write_and_query_as_router(secure_env: dict[str, str]) -> None:
    """The router user writes and reads the metrics database over https, directly and through
    its Toxiproxy proxy, trusting only the private CA."""
    env = secure_env
    measurement = f"sec_{uuid.uuid4().hex[:8]}"
    for i, url in enumerate((env["INFLUX_S_URL"], env["INFLUX_S_PROXY_URL"])):
        body = f"{measurement},host=h value={i} {BASE_TS + i}\n"
        resp = influx_s_write(url, env, body, router_auth(env), env["TLS_CA_FILE"])
        assert resp.status_code == 204, resp.text
    assert influx_count_s(env, measurement) == 2


def test_influx_s_refuses_a_wrong_password_and_anonymous_writes(
    secure_env: dict[str, str],
) -> None:
    """401 with a wrong password and without credentials; the router user is no admin."""
    env = secure_env
    ca = env["TLS_CA_FILE"]
    wrong = httpx.BasicAuth(env["INFLUX_S_USERNAME"], "not-the-password")
    resp = influx_s_write(env["INFLUX_S_URL"], env, "m value=1 1\n", wrong, ca)
    assert resp.status_code == 401
    assert "authorization failed" in resp.json()["error"]
    resp = httpx.post(
        f"{env['INFLUX_S_URL']}/write",
        params={"db": env["INFLUX_S_DATABASE"]},
        content="m value=1 1\n",
        verify=ca_context(ca),
        timeout=5,
    )
    assert resp.status_code == 401
    resp = httpx.post(
        f"{env['INFLUX_S_URL']}/query",
        data={"q": "SHOW USERS"},
        auth=router_auth(env),
        verify=ca_context(ca),
        timeout=5,
    )
    assert "requires admin privilege" in resp.json()["error"]


def test_influx_s_with_another_ca_fails_verification(secure_env: dict[str, str]) -> None:
    """Trusting an unrelated CA, the handshake fails on the certificate, before any auth;
    plain http to the https port gets no InfluxDB answer."""
    env = secure_env
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        influx_s_write(
            env["INFLUX_S_URL"], env, "m value=1 1\n", router_auth(env), env["TLS_OTHER_CA_FILE"]
        )
    plain = env["INFLUX_S_URL"].replace("https://", "http://")
    resp = httpx.get(f"{plain}/ping", timeout=5)
    assert resp.status_code == 400  # Go's "client sent an HTTP request to an HTTPS server"
    assert "HTTPS" in resp.text


def test_influx_s_cut_through_toxiproxy(secure_env: dict[str, str], toxiproxy: Toxiproxy) -> None:
    """Toxiproxy passes TLS through as TCP: cut, the proxy refuses; restored, writes work."""
    env = secure_env
    proxy, ca = env["INFLUX_S_PROXY_URL"], env["TLS_CA_FILE"]
    measurement = f"cut_{uuid.uuid4().hex[:8]}"
    toxiproxy.set_enabled(env["INFLUX_S_PROXY_NAME"], False)
    with pytest.raises(httpx.ConnectError):
        influx_s_write(proxy, env, f"{measurement} value=1 {BASE_TS}\n", router_auth(env), ca)
    toxiproxy.set_enabled(env["INFLUX_S_PROXY_NAME"], True)
    resp = influx_s_write(proxy, env, f"{measurement} value=1 {BASE_TS}\n", router_auth(env), ca)
    assert resp.status_code == 204
    assert influx_count_s(env, measurement) == 1


def influx_count_s(env: dict[str, str], measurement: str) -> int:
    resp = httpx.get(
        f"{env['INFLUX_S_URL']}/query",
        params={"db": env["INFLUX_S_DATABASE"], "q": f'SELECT count("value") FROM "{measurement}"'},
        auth=router_auth(env),
        verify=ca_context(env["TLS_CA_FILE"]),
        timeout=5,
    )
    resp.raise_for_status()
    series = resp.json()["results"][0].get("series")
    return int(series[0]["values"][0][1]) if series else 0


# --- consul-acl --------------------------------------------------------------------------------


def consul(env: dict[str, str], token_key: str | None, *, https: bool = False) -> httpx.Client:
    headers = {"X-Consul-Token": secret(env, token_key)} if token_key else {}
    if https:
        return httpx.Client(
            base_url=env["CONSUL_ACL_HTTPS_ADDR"],
            headers=headers,
            verify=ca_context(env["TLS_CA_FILE"]),
            timeout=5,
        )
    return httpx.Client(
        base_url=f"http://{env['CONSUL_ACL_HTTP_ADDR']}", headers=headers, timeout=5
    )


def test_consul_router_token_can_do_what_the_router_does(secure_env: dict[str, str]) -> None:
    """With the router token (over https, private CA): write and lock its KV prefix with a
    session, register its service with a check, read an InfluxDB service's health."""
    env = secure_env
    tag = uuid.uuid4().hex[:8]
    prefix = f"{env['CONSUL_ACL_ROUTER_KV_PREFIX']}{tag}"
    service_id = f"{env['CONSUL_ACL_ROUTER_SERVICE']}-{tag}"
    with (
        consul(env, "CONSUL_ACL_ROUTER_TOKEN_FILE", https=True) as c,
        consul(env, "CONSUL_ACL_BOOTSTRAP_TOKEN_FILE") as boot,
    ):
        assert c.put(f"/v1/kv/{prefix}/dc1/clusters/influx-a", content=b"{}").json() is True
        assert c.get(f"/v1/kv/{prefix}/dc1/clusters/influx-a").status_code == 200

        check = {"HTTP": "http://127.0.0.1:1/healthz", "Interval": "10s", "Status": "passing"}
        reg = {
            "ID": service_id,
            "Name": env["CONSUL_ACL_ROUTER_SERVICE"],
            "Port": 1,
            "Check": check,
        }
        assert c.put("/v1/agent/service/register", json=reg).status_code == 200
        try:
            assert service_id in c.get("/v1/agent/services").json()
            session = c.put(
                "/v1/session/create",
                json={
                    "Name": f"lock-{tag}",
                    "TTL": "10s",
                    "Checks": ["serfHealth", f"service:{service_id}"],
                },
            )
            assert session.status_code == 200, session.text
            sid = session.json()["ID"]
            lock = c.put(f"/v1/kv/{prefix}/dc1/leader", params={"acquire": sid}, content=b"me")
            assert lock.json() is True
            assert c.put(f"/v1/session/destroy/{sid}").status_code == 200

            influx = f"{env['CONSUL_ACL_DISCOVERY_SERVICE_PREFIX']}db-{tag}"
            boot_reg = {"ID": influx, "Name": influx, "Port": 8086, "Address": "127.0.0.1"}
            assert boot.put("/v1/agent/service/register", json=boot_reg).status_code == 200
            try:
                health = c.get(f"/v1/health/service/{influx}")
                assert health.status_code == 200
                assert [e["Service"]["ID"] for e in health.json()] == [influx]
            finally:
                boot.put(f"/v1/agent/service/deregister/{influx}")
        finally:
            assert c.put(f"/v1/agent/service/deregister/{service_id}").status_code == 200
        boot.delete(f"/v1/kv/{prefix}", params={"recurse": ""})


def test_consul_denies_no_token_and_a_token_without_the_permission(
    secure_env: dict[str, str],
) -> None:
    """No token, or the KV-read-only token: 403 on KV writes, sessions and registration; the
    router token: 403 outside its prefix and service."""
    env = secure_env
    tag = uuid.uuid4().hex[:8]
    key = f"/v1/kv/{env['CONSUL_ACL_ROUTER_KV_PREFIX']}{tag}"
    reg = {"ID": f"x-{tag}", "Name": env["CONSUL_ACL_ROUTER_SERVICE"], "Port": 1}
    with consul(env, None) as anon, consul(env, "CONSUL_ACL_DENIED_TOKEN_FILE") as denied:
        for c in (anon, denied):
            resp = c.put(key, content=b"x")
            assert resp.status_code == 403
            assert "lacks permission 'key:write'" in resp.text
            assert c.put("/v1/session/create", json={"TTL": "10s"}).status_code == 403
            assert c.put("/v1/agent/service/register", json=reg).status_code == 403
        assert anon.get(key).status_code == 403
        assert denied.get(key).status_code == 404  # may read: there is just nothing there
    with consul(env, "CONSUL_ACL_ROUTER_TOKEN_FILE") as router:
        assert router.put(f"/v1/kv/elsewhere/{tag}", content=b"x").status_code == 403
        other = {"ID": f"other-{tag}", "Name": f"other-{tag}", "Port": 1}
        assert router.put("/v1/agent/service/register", json=other).status_code == 403
    with consul(env, None) as anon:
        bogus = anon.put(key, content=b"x", headers={"X-Consul-Token": str(uuid.uuid4())})
        assert bogus.status_code == 403
        assert "ACL not found" in bogus.text


def test_consul_https_with_another_ca_fails_verification(secure_env: dict[str, str]) -> None:
    """The https address is served with the private CA's certificate only."""
    env = secure_env
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(
            f"{env['CONSUL_ACL_HTTPS_ADDR']}/v1/status/leader",
            verify=ca_context(env["TLS_OTHER_CA_FILE"]),
            timeout=5,
        )
    resp = httpx.get(
        f"{env['CONSUL_ACL_HTTPS_ADDR']}/v1/status/leader",
        verify=ca_context(env["TLS_CA_FILE"]),
        timeout=5,
    )
    assert resp.status_code == 200
