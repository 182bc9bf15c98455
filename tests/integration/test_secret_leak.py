"""No secret leaves the router: every output channel grepped for every secret it was given.

The secured stack with recognisable secrets made for the test: a Kafka SCRAM user (made by the
admin with the router user's ACLs on this test's names), an influx-s user, a Consul token with
the router's policy, the client key re-encrypted with a password of ours. The router runs at
debug level with librdkafka's ``security,broker,conf`` debug lines on, fails over (influx-s cut),
reloads a changed batch setting and a rotated wrong Kafka password; then its stdout/stderr,
``/``, ``/api/status`` (with its events), ``/metrics``, ``/healthz``, ``/readyz``,
``failover-router status`` and ``check-topology`` (a good topology and a broken one) are read.
Each must be non-empty and have seen the failover where it shows one, and contain no secret.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka.admin import AdminClient

# confluent_kafka.admin re-exports these without __all__; mypy wants them from their modules
from confluent_kafka.admin._acl import AclBinding, AclBindingFilter
from confluent_kafka.admin._scram import (
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from devstack.secure import SCRAM_ITERATIONS, router_acls
from devstack.toxiproxy import Toxiproxy
from tests.integration.harness import RouterProc, free_port, wait_paused, write_yaml
from tests.integration.test_secure_stack import as_admin, create_topic, influx_count_s, produce
from tests.support import influx_count, wait_until

pytestmark = pytest.mark.integration

BASE_TS = 1_700_000_000_000_000_000
ROUTE = "r"


def _read(path: str) -> str:
    return Path(path).read_text().strip()


@dataclass
class Secrets:
    """The test's own users and secrets (files in ``tmp``), removed again by ``close``."""

    env: dict[str, str]
    tmp: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self) -> None:
        t = self.tag
        self.kafka_user = f"leak-{t}"
        self.kafka_password = f"kafka-pw-{t}-Zq7"
        self.kafka_wrong = f"wrong-kafka-pw-{t}-Zq7"
        self.influx_user = f"leak_{t}"
        self.influx_password = f"influx-pw-{t}-Zq7"
        self.key_password = f"key-pw-{t}-Zq7"
        self.consul_token = str(uuid.uuid4())
        self.topic = f"{self.env['KAFKA_ROUTER_TOPIC_PREFIX']}{t}"
        self.group_prefix = f"{self.env['KAFKA_ROUTER_GROUP_PREFIX']}{t}"
        self.dead = f"{self.env['KAFKA_ROUTER_DEAD_LETTER_PREFIX']}{t}"
        self.measurement = f"leak_{t}"
        self.kafka_password_file = self.tmp / "kafka.password"
        self.influx_password_file = self.tmp / "influx.password"
        self.key_password_file = self.tmp / "key.password"
        self.consul_token_file = self.tmp / "consul.token"
        self.key_file = self.tmp / "client.key"
        self._consul_accessor = ""
        self._acls: list[AclBinding] = []

    def all(self) -> dict[str, str]:
        return {
            "kafka password": self.kafka_password,
            "wrong kafka password": self.kafka_wrong,
            "influx password": self.influx_password,
            "client key password": self.key_password,
            "consul token": self.consul_token,
        }

    # --- Kafka ---------------------------------------------------------------------------

    def make_kafka_user(self) -> None:
        admin = AdminClient(as_admin(self.env))
        info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
        upsert = UserScramCredentialUpsertion(self.kafka_user, info, self.kafka_password.encode())
        for fut in admin.alter_user_scram_credentials([upsert]).values():
            fut.result(15)
        self._acls = router_acls(self.kafka_user)  # the router user's, for our user
        for fut in admin.create_acls(self._acls).values():
            fut.result(15)
        create_topic(self.env, self.topic, partitions=2)
        create_topic(self.env, self.dead, partitions=1)
        self.kafka_password_file.write_text(self.kafka_password)

    def drop_kafka_user(self) -> None:
        admin = AdminClient(as_admin(self.env))
        filters = [
            AclBindingFilter(
                a.restype,
                a.name,
                a.resource_pattern_type,
                a.principal,
                a.host,
                a.operation,
                a.permission_type,
            )
            for a in self._acls
        ]
        if filters:
            for fut in admin.delete_acls(filters).values():
                fut.result(15)
        gone = UserScramCredentialDeletion(self.kafka_user, ScramMechanism.SCRAM_SHA_512)
        for fut in admin.alter_user_scram_credentials([gone]).values():
            fut.result(15)

    def make_client_key(self) -> None:
        """The stack's client key, encrypted again with our password (openssl, as pki.py)."""
        self.key_password_file.write_text(self.key_password)
        openssl = shutil.which("openssl") or "/usr/bin/openssl"
        subprocess.run(
            [
                openssl,
                "pkey",
                "-in",
                self.env["TLS_CLIENT_KEY_FILE"],
                "-passin",
                f"file:{self.env['TLS_CLIENT_KEY_PASSWORD_FILE']}",
                "-aes256",
                "-passout",
                f"file:{self.key_password_file}",
                "-out",
                str(self.key_file),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

    # --- influx-s ------------------------------------------------------------------------

    def _influx_admin(self, q: str) -> None:
        auth = httpx.BasicAuth(
            self.env["INFLUX_S_ADMIN_USERNAME"], _read(self.env["INFLUX_S_ADMIN_PASSWORD_FILE"])
        )
        resp = httpx.post(
            f"{self.env['INFLUX_S_URL']}/query",
            data={"q": q},
            auth=auth,
            verify=ssl.create_default_context(cafile=self.env["TLS_CA_FILE"]),
            timeout=10,
        )
        resp.raise_for_status()
        assert "error" not in resp.json()["results"][0], resp.text

    def make_influx_user(self) -> None:
        db = self.env["INFLUX_S_DATABASE"]
        self._influx_admin(
            f"CREATE USER \"{self.influx_user}\" WITH PASSWORD '{self.influx_password}'"
        )
        self._influx_admin(f'GRANT ALL ON "{db}" TO "{self.influx_user}"')
        self.influx_password_file.write_text(self.influx_password)

    # --- Consul --------------------------------------------------------------------------

    def _consul(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://{self.env['CONSUL_ACL_HTTP_ADDR']}",
            headers={"X-Consul-Token": _read(self.env["CONSUL_ACL_BOOTSTRAP_TOKEN_FILE"])},
            timeout=10,
        )

    def make_consul_token(self) -> None:
        """A token whose SecretID is ours, with the router token's policies."""
        router = httpx.get(
            f"http://{self.env['CONSUL_ACL_HTTP_ADDR']}/v1/acl/token/self",
            headers={"X-Consul-Token": _read(self.env["CONSUL_ACL_ROUTER_TOKEN_FILE"])},
            timeout=10,
        )
        router.raise_for_status()
        policies = [{"ID": p["ID"]} for p in router.json()["Policies"]]
        with self._consul() as c:
            body = {"SecretID": self.consul_token, "Description": "leak", "Policies": policies}
            resp = c.put("/v1/acl/token", json=body)
            resp.raise_for_status()
            self._consul_accessor = resp.json()["AccessorID"]
        self.consul_token_file.write_text(self.consul_token)

    def close(self) -> None:
        with self._consul() as c:
            if self._consul_accessor:
                c.delete(f"/v1/acl/token/{self._consul_accessor}")
            c.delete(f"/v1/kv/failover-router/dc-{self.tag}", params={"recurse": ""})
        try:
            self._influx_admin(f'DROP USER "{self.influx_user}"')
        finally:
            self.drop_kafka_user()


@pytest.fixture
def secrets(secure_env: dict[str, str], tmp_path: Path) -> Iterator[Secrets]:
    s = Secrets(dict(secure_env), tmp_path)
    try:
        s.make_kafka_user()
        s.make_client_key()
        s.make_influx_user()
        s.make_consul_token()
        yield s
    finally:
        s.close()


def _topology(s: Secrets, listen: int, max_points: int = 500) -> dict[str, Any]:
    env = s.env
    return {
        "datacenter": f"dc-{s.tag}",
        "kafka": {
            "bootstrap": env["KAFKA_SASL_SSL_BOOTSTRAP"],
            "group_prefix": s.group_prefix,
            "dead_letter_topic": s.dead,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": env["KAFKA_SASL_MECHANISM"],
            "sasl_username_env": "LEAK_KAFKA_USERNAME",
            "sasl_password_file": str(s.kafka_password_file),
            "tls": {
                "ca_file": env["TLS_CA_FILE"],
                "cert_file": env["TLS_CLIENT_CERT_FILE"],
                "key_file": str(s.key_file),
                "key_password_file": str(s.key_password_file),
            },
            "client_config": {"debug": "security,broker,conf"},
        },
        "clusters": {
            "influx-s": {
                "urls": [env["INFLUX_S_PROXY_URL"]],
                "database": env["INFLUX_S_DATABASE"],
                "username_env": "LEAK_INFLUX_USERNAME",
                "password_file": str(s.influx_password_file),
                "tls": {"ca_file": env["TLS_CA_FILE"]},
                "write_timeout": "1s",
                "max_retries": 1,
            },
            "influx-b": {
                "urls": [env["INFLUX_B_PROXY_URL"]],
                "database": env["INFLUX_DATABASE"],
                "write_timeout": "1s",
                "max_retries": 1,
            },
        },
        "routes": [
            {
                "name": ROUTE,
                "topics": [s.topic],
                "mode": "failover",
                "primary": "influx-s",
                "standby": ["influx-b"],
                "handback_lag": 50,
                "batch": {"max_points": max_points, "linger": "50ms", "max_in_flight": 2},
            }
        ],
        "health": {"interval": "200ms", "timeout": "500ms", "fall": 3, "rise": 3},
        "http": {"listen": f"127.0.0.1:{listen}"},
    }


def _lines(s: Secrets, start: int, count: int) -> list[str]:
    return [
        f"{s.measurement},src=leak value={i}i {BASE_TS + i}" for i in range(start, start + count)
    ]


def _cli(*args: str) -> tuple[int, str]:
    """``failover-router ARGS``: exit code and stdout+stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_no_secret_in_any_output(
    secrets: Secrets,
    toxiproxy: Toxiproxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s, env = secrets, secrets.env
    monkeypatch.setenv("LEAK_KAFKA_USERNAME", s.kafka_user)
    monkeypatch.setenv("LEAK_INFLUX_USERNAME", s.influx_user)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    listen = free_port()
    path = write_yaml(tmp_path / "topology.yaml", _topology(s, listen))
    args = (
        "--log-level",
        "debug",
        "--consul-addr",
        env["CONSUL_ACL_HTTPS_ADDR"],
        "--consul-ca-file",
        env["TLS_CA_FILE"],
        "--consul-token-file",
        str(s.consul_token_file),
        "--consul-prefix",
        "failover-router",
        "--advertise-address",
        "127.0.0.1",
    )
    router = RouterProc(path, tmp_path, "router", args=args).start()
    outputs: dict[str, str] = {}
    try:
        wait_until(
            lambda: router.status()["verdict"]["is_leader"], timeout=30, what="consul leader"
        )
        assert produce(as_admin(env), s.topic, _lines(s, 0, 200)) == [None] * 200
        wait_until(lambda: influx_count_s(env, s.measurement) == 200, timeout=60, what="200 on s")

        # a topology reload: a changed batch setting
        write_yaml(path, _topology(s, listen, max_points=300))
        wait_until(
            lambda: any(
                e["reason"] == "topology changed" for e in router.events("topology_reloaded")
            ),
            timeout=30,
            what="the batch change reloaded",
        )

        # a failover: influx-s cut
        toxiproxy.set_enabled(env["INFLUX_S_PROXY_NAME"], False)
        wait_paused(router, ROUTE, "s")
        assert produce(as_admin(env), s.topic, _lines(s, 200, 200)) == [None] * 200
        wait_until(
            lambda: influx_count(env["INFLUX_B_URL"], env["INFLUX_DATABASE"], s.measurement) > 0,
            timeout=60,
            what="the standby took over",
        )
        assert router.events("failover")
        api_during = httpx.get(f"{router.url}/api/status", timeout=5).text
        toxiproxy.set_enabled(env["INFLUX_S_PROXY_NAME"], True)
        wait_until(lambda: influx_count_s(env, s.measurement) == 400, timeout=90, what="s replayed")

        # a wrong Kafka password rotated in: refused, the router keeps its clients
        s.kafka_password_file.write_text(s.kafka_wrong)
        wait_until(lambda: router.events("kafka_refused"), timeout=60, what="kafka_refused")
        s.kafka_password_file.write_text(s.kafka_password)
        assert produce(as_admin(env), s.topic, _lines(s, 400, 100)) == [None] * 100
        wait_until(lambda: influx_count_s(env, s.measurement) == 500, timeout=60, what="500 on s")

        for name, url in (
            ("status page /", "/"),
            ("/api/status", "/api/status"),
            ("/api/status?partitions", "/api/status?partitions"),
            ("/metrics", "/metrics"),
            ("/healthz", "/healthz"),
            ("/readyz", "/readyz"),
        ):
            outputs[name] = httpx.get(f"{router.url}{url}", timeout=5).text
        outputs["/api/status during the failover"] = api_during
        code, outputs["failover-router status"] = _cli("status", "--url", router.url)
        assert code == 0, outputs["failover-router status"]
        code, outputs["failover-router status --json"] = _cli(
            "status", "--url", router.url, "--json"
        )
        assert code == 0
    finally:
        exit_code = router.stop()
    assert exit_code == 0

    code, outputs["check-topology (good)"] = _cli("check-topology", str(path))
    assert code == 0, outputs["check-topology (good)"]
    broken = _topology(s, listen)
    del broken["kafka"]["sasl_password_file"]
    broken["kafka"]["sasl_password"] = s.kafka_password  # an inline secret is refused
    wrong_key = tmp_path / "wrong-key.password"
    wrong_key.write_text(s.kafka_wrong)
    broken["kafka"]["tls"]["key_password_file"] = str(wrong_key)
    bad = write_yaml(tmp_path / "broken.yaml", broken)
    code, outputs["check-topology (broken)"] = _cli("check-topology", str(bad))
    assert code == 1, outputs["check-topology (broken)"]
    assert "sasl_password" in outputs["check-topology (broken)"]
    assert "key_password_file" in outputs["check-topology (broken)"]
    outputs["router stdout/stderr"] = router.log_path.read_text(errors="replace")

    # the channels saw what happened, so the grep below proves something
    for name, text in outputs.items():
        assert text.strip(), f"{name} is empty"
    log = outputs["router stdout/stderr"]
    for event in ("failover", "topology_reloaded", "kafka_refused", "kafka_log"):
        assert f'"event": "{event}"' in log, event
    assert '"level": "debug"' in log
    assert '"event": "failover"' in outputs["/api/status during the failover"]
    failovers = [
        float(line.rpartition(" ")[2])
        for line in outputs["/metrics"].splitlines()
        if line.startswith("frouter_failovers_total{")
    ]
    assert sum(failovers) >= 1, "the failover is counted in /metrics"
    assert '"facility": "SSLPASSWD"' in log  # librdkafka's debug lines on the key password
    assert outputs["/healthz"].startswith("ok")
    assert "influx-s" in outputs["failover-router status"]

    leaks = [
        f"{what} in {name}"
        for name, text in outputs.items()
        for what, value in s.all().items()
        if value in text
    ]
    assert leaks == []
