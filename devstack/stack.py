"""The local stack: real Kafka (KRaft), four InfluxDB 1.x, Toxiproxy and Consul on 127.0.0.1.

influx-a, -b and -c are Debian's InfluxDB 1.6 without auth; influx-d is InfluxDB 1.8.3 (built
from the Go module proxy) with auth on, an admin user made by ``up``, and the v2 write API.
VictoriaMetrics is optional: ``up(with_=("victoriametrics",))`` (``devstack up --with
victoriametrics``) starts it too; the tests that need it ask for it.

The secured variant, ``up(secure=True)`` (``devstack up --secure``), adds influx-s (InfluxDB
1.8.3 over https with auth) and consul-acl (a Consul dev agent with ACLs on, http and https);
Kafka always has its SASL_SSL (SCRAM-SHA-512) and SSL (client certificate required) listeners
beside the plain one, and its authorizer on (the plain listener's user is a super user). The
throwaway CA, certificates and credentials are made at the first ``up`` (``devstack.pki``);
``secure_env()`` names every path, port and user.

Every server is a plain child process started from binaries that ``devstack/install.sh``
put in the cache dir (``$FROUTER_CACHE``, default ``~/.cache/failover-router``). Run state
(data dirs, logs, pid files) lives in ``$FROUTER_STACK_DIR`` (default ``$FROUTER_CACHE/stack``).

``up`` is idempotent: a server whose pid file names a live process of ours is left alone.
``down`` stops only the pids it wrote. Ports are fixed (see ``PORTS``) and can be shifted as a
block with ``FROUTER_PORT_OFFSET`` to run a second stack beside the first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from devstack import pki
from devstack import secure as provision

KAFKA_VERSION = "4.1.1"
TOXIPROXY_VERSION = "v2.5.0"
CONSUL_VERSION = "v1.16.3"
INFLUXDB18_VERSION = "v1.8.3"
VICTORIAMETRICS_VERSION = "v1.151.0"
KAFKA_CLUSTER_ID = "ZnJvdXRlci1kZXZzdGFjaw"  # any 22-char base64 uuid; fixed so restarts reuse data
INFLUX_NAMES = ("a", "b", "c", "d")
INFLUX18_NAMES = ("d",)  # InfluxDB 1.8.3 with auth; the others are Debian's 1.6 without
INFLUX18_USERNAME = "admin"  # the admin user `up` creates (a local, throwaway stack)
INFLUX18_PASSWORD = "frouter-admin"
OPTIONAL = ("victoriametrics",)  # started only when asked for
SECURE = ("influx-s", "consul-acl")  # started by up(secure=True)
DATABASE = "metrics"
# The secured stack's users (their passwords are random, in files: see secure_env()).
KAFKA_ADMIN_USER = "admin"  # a super user, like the plain listener's ANONYMOUS
KAFKA_ROUTER_USER = "router"  # least privilege: the ACLs in devstack.secure.router_acls
SCRAM_MECHANISM = "SCRAM-SHA-512"
INFLUX_S_ADMIN_USER = "admin"
INFLUX_S_ROUTER_USER = "router"  # ALL (read + write) on the metrics database only
CONSUL_ACL_NODE = "devstack-acl"

_BASE_PORTS = {
    "kafka": 19092,
    "kafka_controller": 19093,
    "toxiproxy": 18474,
    "influx_a": 18086,
    "influx_b": 18087,
    "influx_c": 18088,
    "influx_d": 18089,
    "influx_a_rpc": 18186,
    "influx_b_rpc": 18187,
    "influx_c_rpc": 18188,
    "influx_d_rpc": 18189,
    "influx_a_proxy": 28086,
    "influx_b_proxy": 28087,
    "influx_c_proxy": 28088,
    "influx_d_proxy": 28089,
    "victoriametrics": 18428,
    "victoriametrics_proxy": 28428,
    "consul_http": 18500,
    "consul_server": 18300,
    "consul_serf_lan": 18301,
    "consul_serf_wan": 18302,
    # The secured stack. Each base port is apart from every other by a number that is not a
    # multiple of 500 up to 6000, so no stack shifted by 500 x N meets another's (test_ports_*).
    "kafka_sasl_ssl": 19094,
    "kafka_ssl": 19095,
    "influx_s": 18090,
    "influx_s_rpc": 18190,
    "influx_s_proxy": 28090,
    "consul_acl_http": 18510,
    "consul_acl_https": 18511,
    "consul_acl_server": 18310,
    "consul_acl_serf_lan": 18311,
    "consul_acl_serf_wan": 18312,
}


# Servers started by this process, kept so that it can reap them (no zombies, no warnings).
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(Exception):
    """A server could not be installed, started, or reached. The message is one line."""


def _port_offset() -> int:
    raw = os.environ.get("FROUTER_PORT_OFFSET", "0")
    try:
        return int(raw)
    except ValueError as exc:
        raise StackError(f"FROUTER_PORT_OFFSET must be an integer, got {raw!r}") from exc


def ports() -> dict[str, int]:
    offset = _port_offset()
    return {name: port + offset for name, port in _BASE_PORTS.items()}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "failover-router"
    return Path(os.environ.get("FROUTER_CACHE", str(default)))


def stack_dir() -> Path:
    return Path(os.environ.get("FROUTER_STACK_DIR", str(cache_dir() / "stack")))


def endpoints() -> dict[str, str]:
    """The KEY=VALUE facts tests and the demo need, all on 127.0.0.1."""
    p = ports()
    env = {
        "KAFKA_BOOTSTRAP": f"127.0.0.1:{p['kafka']}",
        "TOXIPROXY_URL": f"http://127.0.0.1:{p['toxiproxy']}",
    }
    for n in INFLUX_NAMES:
        up = n.upper()
        env[f"INFLUX_{up}_URL"] = f"http://127.0.0.1:{p[f'influx_{n}']}"
        env[f"INFLUX_{up}_PROXY_URL"] = f"http://127.0.0.1:{p[f'influx_{n}_proxy']}"
        env[f"INFLUX_{up}_PROXY_NAME"] = f"influx_{n}"
    for n in INFLUX18_NAMES:
        env[f"INFLUX_{n.upper()}_USERNAME"] = INFLUX18_USERNAME
        env[f"INFLUX_{n.upper()}_PASSWORD"] = INFLUX18_PASSWORD
    env["INFLUX_DATABASE"] = DATABASE
    env["VICTORIAMETRICS_URL"] = f"http://127.0.0.1:{p['victoriametrics']}"
    env["VICTORIAMETRICS_PROXY_URL"] = f"http://127.0.0.1:{p['victoriametrics_proxy']}"
    env["VICTORIAMETRICS_PROXY_NAME"] = "victoriametrics"
    env["CONSUL_HTTP_ADDR"] = f"127.0.0.1:{p['consul_http']}"
    return env


def material() -> pki.Material:
    """The secured stack's CA, certificates and secret files (made if missing)."""
    return pki.ensure(stack_dir() / "secure")


def secure_env() -> dict[str, str]:
    """The KEY=VALUE facts of the secured stack (``up(secure=True)``), all on 127.0.0.1.

    Secrets are given as files only (``*_FILE``, the router reads them so); a test that needs a
    value reads the file. The paths are fixed by ``FROUTER_STACK_DIR``; the files exist once
    ``up`` has run.
    """
    p = ports()
    m = pki.Material(stack_dir() / "secure")
    return {
        # one private CA signed every server certificate (SAN 127.0.0.1, localhost)
        "TLS_CA_FILE": str(m.ca),
        "TLS_OTHER_CA_FILE": str(m.other_ca),  # an unrelated CA: every handshake fails with it
        "TLS_CLIENT_CERT_FILE": str(m.client_cert),  # CN=router, signed by the CA
        "TLS_CLIENT_KEY_FILE": str(m.client_key),  # encrypted (PKCS#8, AES-256)
        "TLS_CLIENT_KEY_PASSWORD_FILE": str(m.client_key_password),
        "TLS_SERVER_CERT_FILE": str(m.server_cert),
        "TLS_SERVER_KEY_FILE": str(m.server_key),
        # Kafka: the same broker as KAFKA_BOOTSTRAP, two more listeners
        "KAFKA_SASL_SSL_BOOTSTRAP": f"127.0.0.1:{p['kafka_sasl_ssl']}",
        "KAFKA_SSL_BOOTSTRAP": f"127.0.0.1:{p['kafka_ssl']}",  # client certificate required
        "KAFKA_SASL_MECHANISM": SCRAM_MECHANISM,
        "KAFKA_ADMIN_USERNAME": KAFKA_ADMIN_USER,
        "KAFKA_ADMIN_PASSWORD_FILE": str(m.path("kafka-admin.password")),
        "KAFKA_ROUTER_USERNAME": KAFKA_ROUTER_USER,
        "KAFKA_ROUTER_PASSWORD_FILE": str(m.path("kafka-router.password")),
        "KAFKA_ROUTER_TOPIC_PREFIX": provision.ROUTER_TOPIC_PREFIX,
        "KAFKA_ROUTER_GROUP_PREFIX": provision.ROUTER_GROUP_PREFIX,
        "KAFKA_ROUTER_DEAD_LETTER_PREFIX": provision.ROUTER_DEAD_LETTER_PREFIX,
        # influx-s: InfluxDB 1.8.3, https + auth
        "INFLUX_S_URL": f"https://127.0.0.1:{p['influx_s']}",
        "INFLUX_S_PROXY_URL": f"https://127.0.0.1:{p['influx_s_proxy']}",
        "INFLUX_S_PROXY_NAME": "influx_s",
        "INFLUX_S_DATABASE": DATABASE,
        "INFLUX_S_ADMIN_USERNAME": INFLUX_S_ADMIN_USER,
        "INFLUX_S_ADMIN_PASSWORD_FILE": str(m.path("influx-s-admin.password")),
        "INFLUX_S_USERNAME": INFLUX_S_ROUTER_USER,
        "INFLUX_S_PASSWORD_FILE": str(m.path("influx-s-router.password")),
        # consul-acl: a dev agent with ACLs on (default deny), http and https
        "CONSUL_ACL_HTTP_ADDR": f"127.0.0.1:{p['consul_acl_http']}",
        "CONSUL_ACL_HTTPS_ADDR": f"https://127.0.0.1:{p['consul_acl_https']}",
        "CONSUL_ACL_NODE": CONSUL_ACL_NODE,
        "CONSUL_ACL_BOOTSTRAP_TOKEN_FILE": str(m.path("consul-acl-bootstrap.token")),
        "CONSUL_ACL_ROUTER_TOKEN_FILE": str(m.path("consul-acl-router.token")),
        "CONSUL_ACL_DENIED_TOKEN_FILE": str(m.path("consul-acl-denied.token")),
        "CONSUL_ACL_ROUTER_KV_PREFIX": provision.CONSUL_KV_PREFIX,
        "CONSUL_ACL_ROUTER_SERVICE": provision.CONSUL_ROUTER_SERVICE,
        "CONSUL_ACL_DISCOVERY_SERVICE_PREFIX": provision.CONSUL_DISCOVERY_PREFIX,
    }


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    ready: Callable[[], bool]
    marker: str  # a substring of /proc/PID/cmdline that proves the pid is still ours
    prepare: Callable[[], None] = field(default=lambda: None)
    stale: Callable[[], bool] = field(default=lambda: False)  # running with outdated settings
    extra_ports: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pidfile(self) -> Path:
        return stack_dir() / "run" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return stack_dir() / "log" / f"{self.name}.log"


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _alive_pid(svc: Service) -> int | None:
    """The pid from the pid file if that process is alive and still ours."""
    try:
        pid = int(svc.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    state = ""
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1]
    if state in ("", "Z", "X"):
        return None
    return pid if svc.marker in _cmdline(pid) else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_ok(
    url: str, status: tuple[int, ...] = (200, 204), verify: ssl.SSLContext | bool = True
) -> bool:
    try:
        return httpx.get(url, timeout=1.0, verify=verify).status_code in status
    except httpx.HTTPError:
        return False


# --- Kafka ------------------------------------------------------------------------------


def _kafka_home() -> Path:
    return cache_dir() / f"kafka-{KAFKA_VERSION}"


def _kafka_properties() -> str:
    """The broker's server.properties. Topics are never created by a produce or a metadata
    request (``auto.create.topics.enable=false``): a missing topic stays missing, as in the
    clusters the router meets in production, so every test and script creates its own.

    Beside the PLAINTEXT listener (the tests' and the demo's, unchanged) the broker always has
    a SASL_SSL listener (SCRAM-SHA-512) and an SSL listener that requires a client certificate
    (its CN is the user: ``CN=router`` is ``User:router``), both with the stack's PEM
    certificates. They cost nothing when unused, and being there from the first start means
    ``up --secure`` never restarts a broker the plain tests are using. ``StandardAuthorizer``
    is on; PLAINTEXT (and the controller) connect as ``User:ANONYMOUS``, a super user like
    ``admin``, so nothing that uses the plain listener needs an ACL.
    """
    p = ports()
    m = material()
    data = stack_dir() / "kafka" / "data"
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{p['kafka_controller']}",
            f"listeners=PLAINTEXT://127.0.0.1:{p['kafka']},"
            f"CONTROLLER://127.0.0.1:{p['kafka_controller']},"
            f"SASL_SSL://127.0.0.1:{p['kafka_sasl_ssl']},SSL://127.0.0.1:{p['kafka_ssl']}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{p['kafka']},"
            f"SASL_SSL://127.0.0.1:{p['kafka_sasl_ssl']},SSL://127.0.0.1:{p['kafka_ssl']}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,"
            "SASL_SSL:SASL_SSL,SSL:SSL",
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"listener.name.sasl_ssl.{SCRAM_MECHANISM.lower()}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={m.server_keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={m.ca}",
            "listener.name.ssl.ssl.client.auth=required",
            "ssl.principal.mapping.rules=RULE:^CN=([^,]+)(,.*)?$/$1/,DEFAULT",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:ANONYMOUS;User:{KAFKA_ADMIN_USER}",
            f"# certificates {m.fingerprint()}",  # new certificates: the broker restarts
            f"log.dirs={data}",
            "num.partitions=4",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=8",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "log.retention.check.interval.ms=5000",
            "",
        ]
    )


def _differs(path: Path, wanted: str) -> bool:
    """The config file a server was started with is not ``wanted`` (or is missing): ``up``
    restarts the server rather than keep settings of an older stack dir."""
    try:
        return path.read_text() != wanted
    except OSError:
        return True


def _kafka_stale() -> bool:
    """The running broker was started with other settings than ``_kafka_properties()`` (an
    older stack dir, say with auto-create on)."""
    return _differs(stack_dir() / "kafka" / "server.properties", _kafka_properties())


def _kafka_prepare() -> None:
    """Written on every start, so a changed setting reaches an existing stack dir too."""
    home = stack_dir() / "kafka"
    data = home / "data"
    props = home / "server.properties"
    home.mkdir(parents=True, exist_ok=True)
    props.write_text(_kafka_properties())
    (home / "log4j2.properties").write_text(
        "\n".join(
            [
                "rootLogger.level=INFO",
                "rootLogger.appenderRef.out.ref=OUT",
                "appender.out.type=Console",
                "appender.out.name=OUT",
                "appender.out.layout.type=PatternLayout",
                "appender.out.layout.pattern=[%d] %p %m (%c)%n",
                "logger.kafka.name=kafka",
                "logger.kafka.level=WARN",
                "logger.state.name=state.change.logger",
                "logger.state.level=WARN",
                "logger.org.name=org.apache.kafka",
                "logger.org.level=WARN",
                "",
            ]
        )
    )
    if not (data / "meta.properties").exists():
        data.mkdir(parents=True, exist_ok=True)
        m = material()
        scram = []  # the SCRAM users, in the metadata log from the start
        for user in (KAFKA_ADMIN_USER, KAFKA_ROUTER_USER):
            password = m.secret(f"kafka-{user}.password")
            scram += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        res = subprocess.run(
            [
                *_java_cmd(home),
                "kafka.tools.StorageTool",
                "format",
                "-t",
                KAFKA_CLUSTER_ID,
                "-c",
                str(props),
                "--ignore-formatted",
                *scram,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise StackError(f"kafka storage format failed: {tail[0]}")


def _java_cmd(home: Path) -> list[str]:
    libs = _kafka_home() / "libs"
    if not (libs / ".complete").exists():
        raise StackError(f"Kafka jars missing in {libs}: run devstack/install.sh (or ./dev setup)")
    java = shutil.which("java")
    if java is None:
        raise StackError("java not found on PATH: run devstack/install.sh (or ./dev setup)")
    return [
        java,
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}",
        "-cp",
        f"{libs}/*",
    ]


def _kafka_ready() -> bool:
    if _port_free(ports()["kafka"]):
        return False
    admin = AdminClient({"bootstrap.servers": endpoints()["KAFKA_BOOTSTRAP"]})
    try:
        md = admin.list_topics(timeout=2)
    except KafkaException:
        return False
    return bool(md.brokers)


# --- InfluxDB ---------------------------------------------------------------------------


def influx_config(
    home: Path,
    http_port: int,
    rpc_port: int,
    *,
    auth: bool = False,
    max_series: int = 0,
    https: tuple[Path, Path] | None = None,
) -> str:
    """The influxdb.conf of a loopback InfluxDB 1.x with its data under ``home`` (also used by
    tests that start a dedicated one: auth on, or a series limit). ``https`` is (certificate,
    private key): the HTTP API is then served over TLS only."""
    limit = f"\n  max-series-per-database = {max_series}" if max_series else ""
    tls = ""
    if https is not None:
        tls = (
            f'\n  https-enabled = true\n  https-certificate = "{https[0]}"'
            f'\n  https-private-key = "{https[1]}"'
        )
    return f"""reporting-disabled = true
bind-address = "127.0.0.1:{rpc_port}"
[meta]
  dir = "{home}/meta"
  logging-enabled = false
[data]
  dir = "{home}/data"
  wal-dir = "{home}/wal"
  query-log-enabled = false
  index-version = "inmem"{limit}
[coordinator]
  log-queries-after = "0s"
[monitor]
  store-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  log-enabled = false
  auth-enabled = {"true" if auth else "false"}{tls}
[subscriber]
  enabled = false
[continuous_queries]
  enabled = false
[logging]
  level = "warn"
"""


def _influx_prepare(n: str) -> Callable[[], None]:
    def prepare() -> None:
        p = ports()
        home = stack_dir() / f"influx-{n}"
        home.mkdir(parents=True, exist_ok=True)
        (home / "influxdb.conf").write_text(
            influx_config(home, p[f"influx_{n}"], p[f"influx_{n}_rpc"], auth=n in INFLUX18_NAMES)
        )

    return prepare


def _influxd18_bin() -> Path:
    return cache_dir() / "bin" / f"influxd-{INFLUXDB18_VERSION}"


def _influx_service(n: str) -> Service:
    p = ports()
    url = endpoints()[f"INFLUX_{n.upper()}_URL"]
    if n in INFLUX18_NAMES:
        influxd = str(_influxd18_bin())
    else:
        influxd = shutil.which("influxd") or "/usr/bin/influxd"
    conf = stack_dir() / f"influx-{n}" / "influxdb.conf"
    return Service(
        name=f"influx-{n}",
        argv=[influxd, "run", "-config", str(conf)],
        port=p[f"influx_{n}"],
        extra_ports=(p[f"influx_{n}_rpc"],),
        ready=lambda: _http_ok(f"{url}/ping"),
        marker=str(conf),
        prepare=_influx_prepare(n),
    )


def _ca_context() -> ssl.SSLContext:
    """Trusts the stack's private CA only."""
    return ssl.create_default_context(cafile=str(material().ca))


def _influx_s_config() -> str:
    """influx-s: InfluxDB 1.8.3, auth on, https only with the stack's server certificate."""
    p = ports()
    m = material()
    home = stack_dir() / "influx-s"
    conf = influx_config(
        home,
        p["influx_s"],
        p["influx_s_rpc"],
        auth=True,
        https=(m.server_cert, m.server_key),
    )
    return f"# certificates {m.fingerprint()}\n{conf}"


def _influx_s_prepare() -> None:
    """The config; and a data dir made with other credentials (the secure material was made
    again) is emptied, so ``up`` can create the users with the passwords of the files."""
    home = stack_dir() / "influx-s"
    home.mkdir(parents=True, exist_ok=True)
    marker = home / "certificates"
    fingerprint = material().fingerprint()
    if not marker.exists() or marker.read_text() != fingerprint:
        for sub in ("meta", "data", "wal"):
            shutil.rmtree(home / sub, ignore_errors=True)
        marker.write_text(fingerprint)
    (home / "influxdb.conf").write_text(_influx_s_config())


def _influx_s_stale() -> bool:
    return _differs(stack_dir() / "influx-s" / "influxdb.conf", _influx_s_config())


def _influx_s_service() -> Service:
    p = ports()
    conf = stack_dir() / "influx-s" / "influxdb.conf"
    url = f"https://127.0.0.1:{p['influx_s']}"
    return Service(
        name="influx-s",
        argv=[str(_influxd18_bin()), "run", "-config", str(conf)],
        port=p["influx_s"],
        extra_ports=(p["influx_s_rpc"],),
        ready=lambda: _http_ok(f"{url}/ping", verify=_ca_context()),
        marker=str(conf),
        prepare=_influx_s_prepare,
        stale=_influx_s_stale,
    )


# --- VictoriaMetrics (optional) ---------------------------------------------------------


def _victoriametrics_bin() -> Path:
    return cache_dir() / "bin" / f"victoria-metrics-{VICTORIAMETRICS_VERSION}"


def _victoriametrics_service() -> Service:
    """Single-node VictoriaMetrics, line protocol on /write.

    ``-retentionPeriod=100y``: the default (1 month) silently drops older points with a 204,
    and the tests write 2023 timestamps. ``-dedup.minScrapeInterval=1ms``: a re-sent point
    (same series, same millisecond) replaces itself, as it does in InfluxDB; VictoriaMetrics
    keeps milliseconds only. ``-search.latencyOffset=0s``: reads see a write at once.
    """
    p = ports()
    data = stack_dir() / "victoriametrics" / "data"
    return Service(
        name="victoriametrics",
        argv=[
            str(_victoriametrics_bin()),
            f"-httpListenAddr=127.0.0.1:{p['victoriametrics']}",
            f"-storageDataPath={data}",
            "-retentionPeriod=100y",
            "-dedup.minScrapeInterval=1ms",
            "-search.latencyOffset=0s",
            "-influxListenAddr=",
            "-loggerLevel=WARN",
        ],
        port=p["victoriametrics"],
        ready=lambda: _http_ok(f"{endpoints()['VICTORIAMETRICS_URL']}/health", (200,)),
        marker=f"-storageDataPath={data}",
    )


# --- Toxiproxy --------------------------------------------------------------------------


def _toxiproxy_bin() -> Path:
    return cache_dir() / "bin" / f"toxiproxy-server-{TOXIPROXY_VERSION}"


def _toxiproxy_service() -> Service:
    p = ports()
    return Service(
        name="toxiproxy",
        argv=[str(_toxiproxy_bin()), "-host", "127.0.0.1", "-port", str(p["toxiproxy"])],
        port=p["toxiproxy"],
        ready=lambda: _http_ok(f"{endpoints()['TOXIPROXY_URL']}/version"),
        marker=f"toxiproxy-server-{TOXIPROXY_VERSION}",
    )


# --- Consul -----------------------------------------------------------------------------


def _consul_bin() -> Path:
    return cache_dir() / "bin" / f"consul-{CONSUL_VERSION}"


def _consul_ready(addr: str | None = None) -> bool:
    addr = addr or endpoints()["CONSUL_HTTP_ADDR"]
    try:
        resp = httpx.get(f"http://{addr}/v1/status/leader", timeout=1)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 and resp.json() not in ("", None)


def _consul_argv(node: str, key: str, *, https: bool) -> list[str]:
    """A dev agent's command line, on the ports ``{key}_http``, ``{key}_server``, ... ."""
    p = {name[len(key) + 1 :]: str(port) for name, port in ports().items() if name.startswith(key)}
    return [
        str(_consul_bin()),
        "agent",
        "-dev",
        "-bind",
        "127.0.0.1",
        "-client",
        "127.0.0.1",
        "-advertise",
        "127.0.0.1",
        "-node",
        node,
        "-http-port",
        p["http"],
        "-server-port",
        p["server"],
        "-serf-lan-port",
        p["serf_lan"],
        "-serf-wan-port",
        p["serf_wan"],
        "-dns-port",
        "-1",
        "-grpc-port",
        "-1",
        "-grpc-tls-port",
        "-1",
        "-https-port",
        p["https"] if https else "-1",
        "-log-level",
        "warn",
    ]


def _consul_service() -> Service:
    """A dev agent (in-memory server, its own leader) on non-default ports, no DNS/gRPC."""
    p = ports()
    return Service(
        name="consul",
        argv=_consul_argv("devstack", "consul", https=False),
        port=p["consul_http"],
        extra_ports=(p["consul_server"], p["consul_serf_lan"], p["consul_serf_wan"]),
        ready=_consul_ready,
        marker=f"consul-{CONSUL_VERSION}",
    )


def _consul_acl_config() -> str:
    """consul-acl's agent config: ACLs on, deny by default, the bootstrap token from the secret
    file (also the agent's own token, so it can register its node), and TLS for the https port
    (no client certificate asked). In a file, not on the command line, so no ``ps`` shows the
    token. A dev agent keeps its state in memory: every start begins with only this token, and
    ``up`` creates the router's policy and tokens again."""
    m = material()
    bootstrap = m.secret("consul-acl-bootstrap.token")
    return f"""# certificates {m.fingerprint()}
acl {{
  enabled = true
  default_policy = "deny"
  enable_token_persistence = false
  tokens {{
    initial_management = "{bootstrap}"
    agent = "{bootstrap}"
  }}
}}
tls {{
  defaults {{
    ca_file = "{m.ca}"
    cert_file = "{m.server_cert}"
    key_file = "{m.server_key}"
    verify_incoming = false
    verify_outgoing = false
  }}
}}
"""


def _consul_acl_prepare() -> None:
    home = stack_dir() / "consul-acl"
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "acl.hcl"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_consul_acl_config())


def _consul_acl_stale() -> bool:
    return _differs(stack_dir() / "consul-acl" / "acl.hcl", _consul_acl_config())


def _consul_acl_ready() -> bool:
    """A leader, and the ACL system answers the bootstrap token (it takes a moment after the
    leader is elected)."""
    if not _consul_ready(secure_env()["CONSUL_ACL_HTTP_ADDR"]):
        return False
    token = material().secret("consul-acl-bootstrap.token")
    addr = secure_env()["CONSUL_ACL_HTTP_ADDR"]
    try:
        resp = httpx.get(
            f"http://{addr}/v1/acl/token/self", headers={"X-Consul-Token": token}, timeout=1
        )
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def _consul_acl_service() -> Service:
    p = ports()
    conf = stack_dir() / "consul-acl" / "acl.hcl"
    return Service(
        name="consul-acl",
        argv=[
            *_consul_argv(CONSUL_ACL_NODE, "consul_acl", https=True),
            "-config-file",
            str(conf),
        ],
        port=p["consul_acl_http"],
        extra_ports=(
            p["consul_acl_https"],
            p["consul_acl_server"],
            p["consul_acl_serf_lan"],
            p["consul_acl_serf_wan"],
        ),
        ready=_consul_acl_ready,
        marker=str(conf),
        prepare=_consul_acl_prepare,
        stale=_consul_acl_stale,
    )


def _kafka_service() -> Service:
    p = ports()
    home = stack_dir() / "kafka"
    props = home / "server.properties"

    def argv() -> list[str]:
        return [*_java_cmd(home), "kafka.Kafka", str(props)]

    svc = Service(
        name="kafka",
        argv=[],
        port=p["kafka"],
        extra_ports=(p["kafka_controller"],),
        ready=_kafka_ready,
        marker=str(props),
        prepare=_kafka_prepare,
        stale=_kafka_stale,
    )
    svc.argv = argv() if (_kafka_home() / "libs" / ".complete").exists() else []
    return svc


def services() -> list[Service]:
    """Every server the stack knows, the optional (``OPTIONAL``) and secured (``SECURE``)
    ones last."""
    return [
        _kafka_service(),
        *(_influx_service(n) for n in INFLUX_NAMES),
        _toxiproxy_service(),
        _consul_service(),
        _victoriametrics_service(),
        _influx_s_service(),
        _consul_acl_service(),
    ]


def _check_installed(with_: tuple[str, ...] = ()) -> None:
    missing = []
    if not _influxd18_bin().exists():
        missing.append(f"influxd {INFLUXDB18_VERSION} ({_influxd18_bin()})")
    if "victoriametrics" in with_ and not _victoriametrics_bin().exists():
        missing.append(f"victoria-metrics ({_victoriametrics_bin()})")
    if not (_kafka_home() / "libs" / ".complete").exists():
        missing.append(f"kafka jars ({_kafka_home()})")
    if shutil.which("influxd") is None:
        missing.append("influxd (Debian package influxdb)")
    if shutil.which("java") is None:
        missing.append("java")
    if not _toxiproxy_bin().exists():
        missing.append(f"toxiproxy-server ({_toxiproxy_bin()})")
    if not _consul_bin().exists():
        missing.append(f"consul ({_consul_bin()})")
    if missing:
        raise StackError(f"missing: {', '.join(missing)}; run ./dev setup (devstack/install.sh)")


def _check_ports(svc: Service) -> None:
    for port in (svc.port, *svc.extra_ports):
        if not _port_free(port):
            raise StackError(
                f"port 127.0.0.1:{port} for {svc.name} is taken by a process devstack did not "
                f"start (stop it or set FROUTER_PORT_OFFSET)"
            )


def _start(svc: Service) -> None:
    for pid, proc in list(_children.items()):  # reap servers a test killed with SIGKILL
        if proc.poll() is not None:
            del _children[pid]
    _check_ports(svc)
    svc.prepare()
    svc.pidfile.parent.mkdir(parents=True, exist_ok=True)
    svc.logfile.parent.mkdir(parents=True, exist_ok=True)
    with svc.logfile.open("ab") as log:
        proc = subprocess.Popen(
            svc.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **svc.env},
        )
    svc.pidfile.write_text(f"{proc.pid}\n")
    _children[proc.pid] = proc


def _wait_ready(svc: Service, deadline: float) -> None:
    while time.monotonic() < deadline:
        if svc.ready():
            return
        if _alive_pid(svc) is None:
            raise StackError(f"{svc.name} exited during start-up; see {svc.logfile}")
        time.sleep(0.2)
    raise StackError(f"{svc.name} did not answer on port {svc.port} in time; see {svc.logfile}")


def _populate_toxiproxy() -> None:
    p = ports()
    proxies = [
        {
            "name": f"influx_{n}",
            "listen": f"127.0.0.1:{p[f'influx_{n}_proxy']}",
            "upstream": f"127.0.0.1:{p[f'influx_{n}']}",
            "enabled": True,
        }
        for n in INFLUX_NAMES
    ]
    for name in ("victoriametrics", "influx_s"):  # there even when the server is not: a proxy
        proxies.append(  # to nothing refuses, as a cut (TLS to influx-s passes through as TCP)
            {
                "name": name,
                "listen": f"127.0.0.1:{p[f'{name}_proxy']}",
                "upstream": f"127.0.0.1:{p[name]}",
                "enabled": True,
            }
        )
    base = endpoints()["TOXIPROXY_URL"]
    resp = httpx.post(f"{base}/populate", content=json.dumps(proxies), timeout=5)
    if resp.status_code >= 300:
        raise StackError(f"toxiproxy populate failed: HTTP {resp.status_code} {resp.text.strip()}")


def _create_databases() -> None:
    """The database everywhere; on the servers with auth, the admin user first.

    InfluxDB 1.x lets anyone create the first admin user while none exists; once it does,
    the same statement with its credentials is a no-op. So this is idempotent."""
    for n in INFLUX_NAMES:
        url = endpoints()[f"INFLUX_{n.upper()}_URL"]
        auth: httpx.BasicAuth | None = None
        if n in INFLUX18_NAMES:
            auth = httpx.BasicAuth(INFLUX18_USERNAME, INFLUX18_PASSWORD)
            q = (
                f'CREATE USER "{INFLUX18_USERNAME}" WITH PASSWORD '
                f"'{INFLUX18_PASSWORD}' WITH ALL PRIVILEGES"
            )
            resp = httpx.post(f"{url}/query", params={"q": q}, auth=auth, timeout=5)
            if resp.status_code != 200 or "error" in resp.text:
                raise StackError(f"influx-{n}: CREATE USER failed: HTTP {resp.status_code}")
        q = f'CREATE DATABASE "{DATABASE}"'
        resp = httpx.post(f"{url}/query", params={"q": q}, auth=auth, timeout=5)
        if resp.status_code != 200:
            raise StackError(f"influx-{n}: CREATE DATABASE failed: HTTP {resp.status_code}")


def _provision_secure(timeout: float, only: str | None = None) -> None:
    """Users, grants, ACLs and tokens of the secured stack (idempotent; ``devstack.secure``).
    ``only`` names the one server to provision (after ``restart``): consul-acl keeps its state
    in memory and forgets the router's token at every start; Kafka and influx-s keep theirs."""
    env, m = secure_env(), material()
    try:
        if only in (None, "kafka"):
            users = (KAFKA_ADMIN_USER, KAFKA_ROUTER_USER)
            provision.kafka(
                endpoints()["KAFKA_BOOTSTRAP"],
                env["KAFKA_SASL_SSL_BOOTSTRAP"],
                str(m.ca),
                {u: m.secret(f"kafka-{u}.password") for u in users},
                KAFKA_ROUTER_USER,
                timeout=timeout,
            )
        if only in (None, "influx-s"):
            provision.influx(
                env["INFLUX_S_URL"],
                _ca_context(),
                DATABASE,
                (INFLUX_S_ADMIN_USER, m.secret("influx-s-admin.password")),
                (INFLUX_S_ROUTER_USER, m.secret("influx-s-router.password")),
            )
        if only in (None, "consul-acl"):
            provision.consul(
                env["CONSUL_ACL_HTTP_ADDR"],
                m.secret("consul-acl-bootstrap.token"),
                m.secret("consul-acl-router.token"),
                m.secret("consul-acl-denied.token"),
                CONSUL_ACL_NODE,
            )
    except (provision.ProvisionError, httpx.HTTPError) as exc:
        raise StackError(str(exc)) from exc


def up(timeout: float = 120.0, with_: tuple[str, ...] = (), *, secure: bool = False) -> list[str]:
    """Start every server that is not already running; wait until all answer.

    Optional servers (``OPTIONAL``) are started only when named in ``with_``; the secured ones
    (``SECURE``) with ``secure=True``, which also creates their users, grants, Kafka's SCRAM
    users and ACLs, and the Consul tokens (see ``secure_env()``). Returns the names of the
    services this call started (empty when all were running). A running server whose settings
    changed (Kafka's server.properties, say an old stack dir with topic auto-creation on) is
    restarted with the new ones; it is not in the returned list.
    """
    unknown = sorted(set(with_) - set(OPTIONAL))
    if unknown:
        raise StackError(f"no optional server named {', '.join(unknown)} (known: {OPTIONAL})")
    _check_installed(with_)
    try:
        material()  # the certificates Kafka's TLS listeners need, made at the first up
    except pki.PkiError as exc:
        raise StackError(str(exc)) from exc
    wanted = {*with_, *(SECURE if secure else ())}
    svcs = [svc for svc in services() if svc.name not in (*OPTIONAL, *SECURE) or svc.name in wanted]
    restarted: set[str] = set()  # running with outdated settings: started again, not "started" here
    for svc in svcs:
        pid = _alive_pid(svc)
        if pid is not None and svc.stale():
            _stop_pid(pid, 30.0)
            restarted.add(svc.name)
    to_start = [svc for svc in svcs if _alive_pid(svc) is None]
    for svc in to_start:  # all ports first: a taken port must not leave half a stack behind
        _check_ports(svc)
    for svc in to_start:
        _start(svc)
    started = [svc.name for svc in to_start if svc.name not in restarted]
    deadline = time.monotonic() + timeout
    for svc in svcs:
        _wait_ready(svc, deadline)
    _populate_toxiproxy()
    _create_databases()
    if secure:
        _provision_secure(max(deadline - time.monotonic(), 30.0))
    return started


def _stop_pid(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)  # a SIGSTOPped server cannot handle SIGTERM
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            _reap(pid)
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    proc = _children.pop(pid, None)
    if proc is not None:
        proc.wait(timeout=10)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def down(names: list[str] | None = None, timeout: float = 30.0) -> list[str]:
    """Stop the servers devstack started (by their pid files). Returns the names stopped."""
    stopped = []
    for svc in reversed(services()):
        if names is not None and svc.name not in names:
            continue
        pid = _alive_pid(svc)
        if pid is not None:
            _stop_pid(pid, timeout)
            stopped.append(svc.name)
        svc.pidfile.unlink(missing_ok=True)
    return stopped


def service(name: str) -> Service:
    for svc in services():
        if svc.name == name:
            return svc
    raise StackError(f"no service named {name!r}")


def pid_of(name: str) -> int | None:
    """The pid of a running stack server (tests use it to kill -9 or SIGSTOP one)."""
    return _alive_pid(service(name))


def restart(name: str, timeout: float = 60.0) -> None:
    """Start one server again after a test killed it, and wait until it answers. consul-acl
    gets the router's policy and tokens again (a dev agent forgets them)."""
    svc = service(name)
    pid = _alive_pid(svc)
    if pid is not None:
        _stop_pid(pid, timeout)
    _start(svc)
    _wait_ready(svc, time.monotonic() + timeout)
    if name == "consul-acl":
        _provision_secure(timeout, only=name)


def status() -> Iterator[tuple[str, int | None]]:
    for svc in services():
        yield svc.name, _alive_pid(svc)
