"""What ``up(secure=True)`` creates inside the running servers: users, grants, ACLs, tokens.

Every step is idempotent (run by each ``up --secure``) and takes its endpoints and secrets as
arguments: ``devstack.stack`` knows where things are, this module only talks to the servers.

- Kafka: the SCRAM users (``admin``, a super user, and ``router``) upserted with the passwords
  of their files (``kafka-storage format --add-scram`` made them in a new stack dir; an older
  one, or a changed file, is repaired here), and the router's least-privilege ACLs
  (``router_acls``), through the PLAINTEXT listener, whose user is a super user.
- influx-s: the admin user, the ``metrics`` database, the ``router`` user with ALL on it only.
- consul-acl: the router's policy (``router_policy``) and token, and a "denied" token that
  may only read the KV, both with the secret ids of their files.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import httpx
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

# confluent_kafka.admin re-exports these without __all__; mypy wants them from their modules
from confluent_kafka.admin._acl import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
)
from confluent_kafka.admin._resource import ResourcePatternType, ResourceType
from confluent_kafka.admin._scram import (
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)

# What the router user may touch in Kafka (prefixes, so each test makes its own names).
ROUTER_TOPIC_PREFIX = "secure."  # Read (and so Describe): the topics routes read
ROUTER_GROUP_PREFIX = "secure-"  # Read: its destination groups, memberships, backfills
ROUTER_DEAD_LETTER_PREFIX = "secure-dead."  # Write: dead-letter topics
SCRAM_ITERATIONS = 4096  # Kafka's minimum (and kafka-storage's default)

# What the router's Consul token may touch.
CONSUL_KV_PREFIX = "failover-router/"  # --consul-prefix failover-router[/anything]
CONSUL_ROUTER_SERVICE = "failover-router"  # the service each replica registers
CONSUL_DISCOVERY_PREFIX = "influx"  # consul_service names the router may discover
CONSUL_ROUTER_POLICY = "failover-router"
CONSUL_DENIED_POLICY = "failover-router-kv-read"


class ProvisionError(Exception):
    """A server refused a provisioning step. The message is one line."""


def _wait(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise ProvisionError(f"{what}: not done after {timeout:.0f} s")


# --- Kafka -----------------------------------------------------------------------------------


def router_acls(user: str) -> list[AclBinding]:
    """The router's least privilege: Read the topics of its routes, Read its groups (commits,
    offset reads, memberships), Write its dead-letter topics. Nothing on the cluster."""
    principal = f"User:{user}"

    def allow(kind: ResourceType, prefix: str, op: AclOperation) -> AclBinding:
        return AclBinding(
            kind,
            prefix,
            ResourcePatternType.PREFIXED,
            principal,
            "*",
            op,
            AclPermissionType.ALLOW,
        )

    return [
        allow(ResourceType.TOPIC, ROUTER_TOPIC_PREFIX, AclOperation.READ),
        allow(ResourceType.GROUP, ROUTER_GROUP_PREFIX, AclOperation.READ),
        allow(ResourceType.TOPIC, ROUTER_DEAD_LETTER_PREFIX, AclOperation.WRITE),
    ]


def kafka(  # noqa: PLR0917
    plain_bootstrap: str,
    sasl_ssl_bootstrap: str,
    ca_file: str,
    users: dict[str, str],
    router_user: str,
    timeout: float = 60.0,
) -> None:
    """Upsert the SCRAM-SHA-512 users, create the router's ACLs, and wait until each user can
    log in over SASL_SSL and the broker serves the ACLs."""
    admin = AdminClient({"bootstrap.servers": plain_bootstrap})
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(user, info, password.encode())
        for user, password in users.items()
    ]
    acls = router_acls(router_user)
    try:
        for user, fut in admin.alter_user_scram_credentials(upserts).items():
            _result(f"kafka: SCRAM user {user}", fut.result)
        for binding, fut in admin.create_acls(acls).items():
            _result(f"kafka: ACL {binding}", fut.result)
    except KafkaException as exc:
        raise ProvisionError(f"kafka provisioning failed: {exc}") from exc

    anything = cast(str, None)  # None matches any name or host (typed as str in the library)
    query = AclBindingFilter(
        ResourceType.ANY,
        anything,
        ResourcePatternType.ANY,
        f"User:{router_user}",
        anything,
        AclOperation.ANY,
        AclPermissionType.ANY,
    )

    def acls_served() -> bool:
        try:
            found = admin.describe_acls(query, request_timeout=5).result()
        except KafkaException:
            return False
        return {str(b) for b in acls} <= {str(b) for b in found}

    _wait("kafka: the router's ACLs", acls_served, timeout)
    for user, password in users.items():
        _wait(
            f"kafka: SASL_SSL login of {user}",
            functools.partial(_sasl_login, sasl_ssl_bootstrap, ca_file, user, password),
            timeout,
        )


def _result(what: str, get: Callable[[], object]) -> None:
    try:
        get()
    except KafkaException as exc:
        raise ProvisionError(f"{what}: {exc.args[0].str()}") from exc


def _sasl_login(bootstrap: str, ca_file: str, user: str, password: str) -> bool:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": user,
        "sasl.password": password,
        "ssl.ca.location": ca_file,
        "logger": _Quiet(),
    }
    admin = AdminClient(config)
    try:
        return bool(admin.list_topics(timeout=3).brokers)
    except KafkaException:
        return False


class _Quiet:
    """A librdkafka logger that drops the lines of a login tried too early."""

    def log(self, level: int, fmt: str, *args: object) -> None:
        pass


# --- InfluxDB ------------------------------------------------------------------------------


def influx(
    url: str,
    ca: ssl.SSLContext,
    database: str,
    admin: tuple[str, str],
    router: tuple[str, str],
) -> None:
    """The admin user (InfluxDB 1.x lets anyone create the first admin while there is none),
    the database, the router user with ALL on it, passwords as in the files."""

    def query(q: str, *, tolerate: str = "") -> None:
        resp = httpx.post(
            f"{url}/query",
            data={"q": q},
            auth=httpx.BasicAuth(*admin),
            verify=ca,
            timeout=10,
        )
        if resp.status_code != 200:
            error = f"HTTP {resp.status_code} {resp.text.strip()[:200]}"
        else:
            results = resp.json().get("results", [])
            error = "; ".join(str(r["error"]) for r in results if r.get("error"))
        if error and not (tolerate and tolerate in error):
            verb = " ".join(q.split()[:2])
            raise ProvisionError(f"influx-s: {verb} failed: {error}")

    query(f"CREATE USER \"{admin[0]}\" WITH PASSWORD '{admin[1]}' WITH ALL PRIVILEGES")
    query(f'CREATE DATABASE "{database}"')
    query(f"CREATE USER \"{router[0]}\" WITH PASSWORD '{router[1]}'", tolerate="already exists")
    query(f"SET PASSWORD FOR \"{router[0]}\" = '{router[1]}'")
    query(f'GRANT ALL ON "{database}" TO "{router[0]}"')


# --- Consul --------------------------------------------------------------------------------


def router_policy(node: str) -> str:
    """What health/consul.py calls, and nothing more: the KV under its prefix (leader lock,
    verdicts, drain keys), sessions on the agent's node, its own service and check, and the
    health of the InfluxDB services it discovers (which lists their nodes)."""
    return f"""key_prefix "{CONSUL_KV_PREFIX}" {{
  policy = "write"
}}
session "{node}" {{
  policy = "write"
}}
service "{CONSUL_ROUTER_SERVICE}" {{
  policy = "write"
}}
service_prefix "{CONSUL_DISCOVERY_PREFIX}" {{
  policy = "read"
}}
node "{node}" {{
  policy = "read"
}}
"""


def denied_policy() -> str:
    """A token that may read the router's KV and nothing else (no session, no registration)."""
    return f'key_prefix "{CONSUL_KV_PREFIX}" {{\n  policy = "read"\n}}\n'


def consul(addr: str, bootstrap: str, router_token: str, denied_token: str, node: str) -> None:
    """The two policies (made or updated) and the two tokens (made unless they exist)."""
    with httpx.Client(
        base_url=f"http://{addr}", headers={"X-Consul-Token": bootstrap}, timeout=10
    ) as http:

        def call(method: str, path: str, body: object = None) -> httpx.Response:
            resp = http.request(method, path, json=body)
            if resp.status_code != 200:
                raise ProvisionError(
                    f"consul-acl: {method} {path}: HTTP {resp.status_code} {resp.text.strip()}"
                )
            return resp

        for name, rules in (
            (CONSUL_ROUTER_POLICY, router_policy(node)),
            (CONSUL_DENIED_POLICY, denied_policy()),
        ):
            found = http.get(f"/v1/acl/policy/name/{name}")
            if found.status_code == 200:
                if found.json().get("Rules") != rules:
                    doc: dict[str, object] = {"Name": name, "Rules": rules}
                    call("PUT", f"/v1/acl/policy/{found.json()['ID']}", doc)
            else:
                call("PUT", "/v1/acl/policy", {"Name": name, "Rules": rules})
        for token, policy, text in (
            (router_token, CONSUL_ROUTER_POLICY, "failover-router (devstack)"),
            (denied_token, CONSUL_DENIED_POLICY, "KV read only (devstack)"),
        ):
            self_ = http.get("/v1/acl/token/self", headers={"X-Consul-Token": token})
            if self_.status_code == 200:
                continue
            body = {"SecretID": token, "Description": text, "Policies": [{"Name": policy}]}
            call("PUT", "/v1/acl/token", body)
