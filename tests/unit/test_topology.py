"""The topology: loading, every validation rule, error paths and lines, check-topology."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from pydantic import ValidationError

from router.errors import ConfigError
from router.topology import (
    ClusterConfig,
    KafkaConfig,
    check_topology_main,
    load_topology,
    parse_byte_size,
    parse_duration,
    parse_topology,
)

REPO = Path(__file__).resolve().parents[2]

# Line numbers matter: tests below name them.
MINIMAL = """\
datacenter: dc1
kafka:
  bootstrap: "127.0.0.1:19092"
clusters:
  influx-a:
    urls: ["http://127.0.0.1:28086"]
    database: metrics
  influx-b:
    urls: ["http://127.0.0.1:28087"]
    database: metrics
routes:
  - name: dc1-metrics
    topics: ["metrics.dc1"]
    primary: influx-a
    standby: [influx-b]
"""


def errors_of(text: str, datacenter: str | None = None) -> list[str]:
    """The error lines parse_topology reports for ``text`` (the test fails if it loads)."""
    with pytest.raises(ConfigError) as caught:
        parse_topology(text, source="t.yaml", datacenter=datacenter)
    assert caught.value.source == "t.yaml"
    return caught.value.errors


def with_cluster_keys(extra: str) -> str:
    """MINIMAL with ``extra`` (YAML lines, 4-space indented) added to cluster influx-a."""
    return MINIMAL.replace("    database: metrics\n", "    database: metrics\n" + extra, 1)


def with_route(route: str) -> str:
    """MINIMAL with its route replaced by ``route`` (YAML lines of one list item)."""
    return MINIMAL[: MINIMAL.index("  - name:")] + route


# --- loading -------------------------------------------------------------------------------------


def test_shipped_topology_loads() -> None:
    """The commented example at the repo root loads, with the routes the local stack expects."""
    topology = load_topology(REPO / "topology.yaml")
    assert topology.datacenter == "dc1"
    assert topology.kafka.bootstrap == "127.0.0.1:19092"
    assert sorted(topology.clusters) == ["influx-a", "influx-b", "influx-c", "influx-d"]
    assert topology.cluster("influx-b").urls == ("http://127.0.0.1:28087",)
    assert topology.route("dc1-metrics").destinations == ("influx-a", "influx-b")
    assert topology.route("dc1-mirror").mode == "mirror"
    assert topology.route("dc1-mirror").destinations == (
        "influx-a",
        "influx-b",
        "influx-c",
        "influx-d",
    )
    v2 = topology.cluster("influx-d")  # the v2-API cluster: InfluxDB 1.8.3 with auth
    assert (v2.api, v2.bucket, v2.token()) == ("v2", "metrics/autogen", "admin:frouter-admin")
    assert topology.http.listen == "127.0.0.1:8080"


def test_minimal_topology_takes_documented_defaults() -> None:
    """Keys left out take the defaults docs/topology.md gives."""
    topology = parse_topology(MINIMAL)
    route, cluster = topology.route("dc1-metrics"), topology.cluster("influx-a")
    assert (route.mode, route.format, route.skip_missed, route.handback_lag) == (
        "failover",
        "line",
        False,
        1000,
    )
    assert (route.batch.max_points, route.batch.max_bytes) == (5000, 1024**2)
    assert (route.batch.linger, route.batch.max_in_flight) == (0.2, 4)
    assert (cluster.api, cluster.precision, cluster.write_timeout) == ("v1", "ns", 5.0)
    assert (cluster.min_healthy, cluster.max_retries, cluster.drain) == (1, 3, False)
    assert (cluster.compression, cluster.compression_level) == ("none", 1)
    assert (topology.health.interval, topology.health.fall) == (1.0, 3)
    assert topology.kafka.group_prefix == "frouter"


def test_group_id_joins_prefix_route_and_cluster() -> None:
    """A destination's consumer group is {group_prefix}.{route}.{cluster}."""
    topology = parse_topology(MINIMAL)
    assert topology.group_id("dc1-metrics", "influx-b") == "frouter.dc1-metrics.influx-b"


def test_group_id_refuses_a_cluster_outside_the_route() -> None:
    """Asking for the group of a cluster the route does not use is a KeyError, not a new group."""
    topology = parse_topology(MINIMAL.replace("    standby: [influx-b]\n", ""))
    with pytest.raises(KeyError, match="influx-b"):
        topology.group_id("dc1-metrics", "influx-b")


def test_dead_letter_topic_defaults_to_the_group_prefix() -> None:
    """Without dead_letter_topic, bad lines go to {group_prefix}.dead-letter."""
    topology = parse_topology(
        MINIMAL.replace('  bootstrap: "', '  group_prefix: r2\n  bootstrap: "')
    )
    assert topology.kafka.dead_letters == "r2.dead-letter"


def test_unknown_cluster_and_route_lookups_raise_key_error() -> None:
    """cluster() and route() name what is missing."""
    topology = parse_topology(MINIMAL)
    with pytest.raises(KeyError, match="influx-z"):
        topology.cluster("influx-z")
    with pytest.raises(KeyError, match="nope"):
        topology.route("nope")


def test_datacenter_argument_overrides_the_file() -> None:
    """The datacenter argument (flag or env in the CLI) wins over the file's datacenter."""
    assert parse_topology(MINIMAL, datacenter="dc2").datacenter == "dc2"


def test_datacenter_argument_supplies_a_missing_datacenter() -> None:
    """One file without datacenter can serve every dc when the argument is given."""
    text = MINIMAL.replace("datacenter: dc1\n", "")
    assert parse_topology(text, datacenter="dc3").datacenter == "dc3"
    assert errors_of(text) == ["datacenter: required key is missing (line 1)"]


def test_models_are_frozen() -> None:
    """A loaded topology cannot be changed in place; a reload builds a new one."""
    topology = parse_topology(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        topology.datacenter = "dc2"
    with pytest.raises(ValidationError, match="frozen"):
        topology.route("dc1-metrics").batch.max_points = 1


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """load_topology turns an unreadable file into ConfigError naming the file."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_topology(missing)
    assert caught.value.source == str(missing)
    assert caught.value.errors == ["cannot read file: No such file or directory"]


# --- error paths and lines -----------------------------------------------------------------------


def test_unknown_primary_names_its_key_path_and_line() -> None:
    """A primary that is not a declared cluster is reported at routes[i].primary with its line."""
    errors = errors_of(MINIMAL.replace("primary: influx-a", "primary: influx-z"))
    assert errors == ["routes[0].primary: unknown cluster 'influx-z' (line 14)"]


def test_unknown_standby_names_its_index_and_line() -> None:
    """An undeclared standby is reported at its position in the standby list."""
    errors = errors_of(MINIMAL.replace("[influx-b]", "[influx-b, influx-y]"))
    assert errors == ["routes[0].standby[1]: unknown cluster 'influx-y' (line 15)"]


def test_unknown_mirror_cluster_names_its_index_and_line() -> None:
    """An undeclared cluster of a mirror route is reported at routes[i].clusters[j]."""
    route = (
        "  - name: mirror\n"
        "    topics: [metrics.mirror]\n"
        "    mode: mirror\n"
        "    clusters: [influx-a, influx-q]\n"
    )
    errors = errors_of(with_route(route))
    assert errors == ["routes[0].clusters[1]: unknown cluster 'influx-q' (line 15)"]


def test_duplicate_route_names_are_reported() -> None:
    """Two routes with one name would share consumer groups; the second one is refused."""
    errors = errors_of(MINIMAL + MINIMAL[MINIMAL.index("  - name:") :])
    assert errors == [
        "routes[1].name: duplicate route name 'dc1-metrics' (first at routes[0]) (line 16)"
    ]


def test_every_problem_is_reported_in_line_order() -> None:
    """All problems of a file come back at once, sorted by line."""
    text = (
        MINIMAL.replace('"127.0.0.1:19092"', '"no-port"')
        .replace("    database: metrics\n", "    database: metrics\n    precision: h\n", 1)
        .replace("primary: influx-a", "primary: influx-z")
    )
    assert errors_of(text) == [
        "kafka.bootstrap: invalid address 'no-port': use host:port (line 3)",
        "clusters.influx-a.precision: must be 'ns', 'us', 'ms' or 's' (line 8)",
        "routes[0].primary: unknown cluster 'influx-z' (line 15)",
    ]


def test_a_missing_key_is_reported_at_its_parent_line() -> None:
    """A required key that is absent points at the line of the mapping that lacks it."""
    errors = errors_of(MINIMAL.replace('    topics: ["metrics.dc1"]\n', ""))
    assert errors == ["routes[0].topics: required key is missing (line 12)"]


def test_an_unknown_key_suggests_the_close_one() -> None:
    """A misspelt key is refused, with the key it probably meant."""
    errors = errors_of(MINIMAL.replace("standby:", "standbys:"))
    assert errors == ["routes[0].standbys: unknown key; did you mean 'standby'? (line 15)"]


def test_a_yaml_syntax_error_is_a_config_error_with_its_line() -> None:
    """Broken YAML is reported like any other problem, with the line."""
    errors = errors_of(MINIMAL.replace("    primary: influx-a", "    primary: [influx-a"))
    assert len(errors) == 1
    assert errors[0].startswith("yaml: ")
    assert errors[0].endswith("(line 15)")


def test_a_duplicate_yaml_key_is_reported() -> None:
    """A key given twice in one mapping is an error, not a silent override."""
    errors = errors_of(MINIMAL.replace("    standby:", "    primary: influx-a\n    standby:"))
    assert errors == ["routes[0].primary: duplicate key (first on line 14) (line 15)"]


def test_a_kept_error_holds_no_validator_handler() -> None:
    """A ConfigError kept alive holds no pydantic wrap handler (pydantic#13817 corrupts the GC)."""
    with pytest.raises(ConfigError) as caught:
        parse_topology(MINIMAL.replace('"metrics.dc1"', '"bad topic"'))
    assert caught.value.__context__ is None
    handlers = [obj for obj in gc.get_objects() if type(obj).__name__ == "ValidatorCallable"]
    assert handlers == []


def test_an_empty_file_is_reported() -> None:
    """An empty topology is one clear error."""
    assert errors_of("# nothing here\n") == ["(root): the file is empty (line 1)"]


# --- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "hint"),
    [("password", "password_env or password_file"), ("token", "token_env or token_file")],
)
def test_an_inline_cluster_secret_is_refused(key: str, hint: str) -> None:
    """An inline password or token is refused with the *_env / *_file keys to use instead."""
    errors = errors_of(with_cluster_keys(f"    {key}: hunter2\n"))
    assert errors == [
        f"clusters.influx-a.{key}: inline secrets are not allowed; use {hint} (line 8)"
    ]


def test_the_old_gzip_key_names_what_replaced_it() -> None:
    """``gzip: true`` of earlier versions is refused with the keys that replaced it."""
    errors = errors_of(with_cluster_keys("    gzip: true\n"))
    assert errors == [
        "clusters.influx-a.gzip: replaced: use compression: gzip (or none) and compression_level"
        " (line 8)"
    ]


@pytest.mark.parametrize(("compression", "level"), [("none", 1), ("gzip", 6)])
def test_compression_is_a_closed_choice_with_a_level(compression: str, level: int) -> None:
    """``compression`` and ``compression_level`` reach the cluster; a level of 0 is refused."""
    keys = f"    compression: {compression}\n    compression_level: {level}\n"
    cluster = parse_topology(with_cluster_keys(keys), source="t.yaml").clusters["influx-a"]
    assert (cluster.compression, cluster.compression_level) == (compression, level)
    errors = errors_of(with_cluster_keys("    compression: zstd\n    compression_level: 0\n"))
    assert [e.split(":")[0] for e in errors] == [
        "clusters.influx-a.compression",
        "clusters.influx-a.compression_level",
    ]


def test_an_inline_sasl_password_is_refused() -> None:
    """kafka.sasl_password is refused like a cluster password."""
    errors = errors_of(MINIMAL.replace("kafka:\n", "kafka:\n  sasl_password: hunter2\n"))
    assert errors[0].startswith("kafka.sasl_password: inline secrets are not allowed")


def test_no_error_echoes_a_secret() -> None:
    """Refused secrets (inline, in a URL, pasted into *_env) never appear in the errors."""
    text = with_cluster_keys("    password: hunter2\n    password_env: 'hunter2!'\n").replace(
        "http://127.0.0.1:28086", "http://admin:hunter2@127.0.0.1:28086"
    )
    errors = errors_of(text)
    assert len(errors) == 3
    assert not [error for error in errors if "hunter2" in error]


def test_an_unset_env_var_is_reported_with_its_key_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A password_env naming a variable that is not set is a load-time error at that key."""
    monkeypatch.setenv("INFLUX_A_USER", "writer")
    monkeypatch.delenv("INFLUX_A_PASSWORD", raising=False)
    text = with_cluster_keys(
        "    username_env: INFLUX_A_USER\n    password_env: INFLUX_A_PASSWORD\n"
    )
    assert errors_of(text) == [
        "clusters.influx-a.password_env: environment variable INFLUX_A_PASSWORD is not set (line 9)"
    ]


def test_credentials_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """credentials() returns (user, password) read from the named variables."""
    monkeypatch.setenv("INFLUX_A_USER", "writer")
    monkeypatch.setenv("INFLUX_A_PASSWORD", "s3cret")
    text = with_cluster_keys(
        "    username_env: INFLUX_A_USER\n    password_env: INFLUX_A_PASSWORD\n"
    )
    cluster = parse_topology(text).cluster("influx-a")
    assert cluster.credentials() == ("writer", "s3cret")
    assert parse_topology(MINIMAL).cluster("influx-a").credentials() is None


def test_secrets_stay_out_of_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolved secret appears in neither repr nor model_dump (logs, status page)."""
    monkeypatch.setenv("INFLUX_A_USER", "writer")
    monkeypatch.setenv("INFLUX_A_PASSWORD", "s3cret")
    text = with_cluster_keys(
        "    username_env: INFLUX_A_USER\n    password_env: INFLUX_A_PASSWORD\n"
    )
    topology = parse_topology(text)
    assert "s3cret" not in repr(topology)
    assert "s3cret" not in str(topology.model_dump())


def test_a_vanished_secret_is_a_config_error_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """credentials() raises ConfigError naming the key if the variable went away after load."""
    monkeypatch.setenv("INFLUX_A_USER", "writer")
    monkeypatch.setenv("INFLUX_A_PASSWORD", "s3cret")
    text = with_cluster_keys(
        "    username_env: INFLUX_A_USER\n    password_env: INFLUX_A_PASSWORD\n"
    )
    cluster = parse_topology(text).cluster("influx-a")
    monkeypatch.delenv("INFLUX_A_PASSWORD")
    with pytest.raises(ConfigError, match="password_env: environment variable INFLUX_A_PASSWORD"):
        cluster.credentials()


def test_a_token_file_is_relative_to_the_topology_file(tmp_path: Path) -> None:
    """token_file: a relative path is read from the topology file's folder, newline stripped."""
    (tmp_path / "token").write_text("tok-123\n", encoding="utf-8")
    v2 = "api: v2\n    org: o\n    bucket: b\n    token_file: token\n"
    (tmp_path / "topology.yaml").write_text(
        MINIMAL.replace("database: metrics\n", v2, 1), encoding="utf-8"
    )
    cluster = load_topology(tmp_path / "topology.yaml").cluster("influx-a")
    assert cluster.token_file == str(tmp_path / "token")
    assert cluster.token() == "tok-123"


def test_an_unreadable_secret_file_is_reported(tmp_path: Path) -> None:
    """A password_file that does not exist is a load-time error at that key."""
    missing = tmp_path / "missing"
    text = with_cluster_keys(f"    username_env: HOME\n    password_file: {missing}\n")
    assert errors_of(text) == [
        f"clusters.influx-a.password_file: cannot read {missing}: No such file or directory "
        "(line 9)"
    ]


def test_sasl_needs_a_mechanism_username_and_password() -> None:
    """SASL_SSL without its settings names each missing key."""
    errors = errors_of(MINIMAL.replace("kafka:\n", "kafka:\n  security_protocol: SASL_SSL\n"))
    assert [error.split(":")[0] for error in errors] == [
        "kafka.sasl_mechanism",
        "kafka.sasl_username_env",
        "kafka.sasl_password_env",
    ]


def test_librdkafka_config_resolves_sasl_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """librdkafka_config() has the connection keys with the SASL password read from its file."""
    monkeypatch.setenv("KAFKA_USER", "router")
    (tmp_path / "kafka-password").write_text("pw\n", encoding="utf-8")
    kafka = KafkaConfig(
        bootstrap="k1:9092, k2:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username_env="KAFKA_USER",
        sasl_password_file=str(tmp_path / "kafka-password"),
        client_config={"client.id": "frouter"},
    )
    assert kafka.librdkafka_config() == {
        "bootstrap.servers": "k1:9092,k2:9092",
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "router",
        "sasl.password": "pw",
        "client.id": "frouter",
    }


@pytest.mark.parametrize(
    "key", ["sasl.password", "ssl.key.password", "group.id", "enable.auto.commit"]
)
def test_client_config_refuses_secret_and_owned_keys(key: str) -> None:
    """client_config may not carry secrets or keys the router sets itself."""
    errors = errors_of(MINIMAL.replace("kafka:\n", f"kafka:\n  client_config: {{{key}: x}}\n"))
    assert len(errors) == 1
    assert errors[0].startswith(f"kafka.client_config.{key}: ")


def test_client_config_values_become_strings() -> None:
    """YAML numbers and booleans in client_config reach librdkafka as strings."""
    text = MINIMAL.replace("kafka:\n", "kafka:\n  client_config: {linger.ms: 5, b: true}\n")
    kafka = parse_topology(text).kafka
    assert kafka.client_config == {"linger.ms": "5", "b": "true"}


# --- clusters ------------------------------------------------------------------------------------


def test_a_cluster_needs_urls_or_a_consul_service() -> None:
    """A cluster with neither urls nor consul_service is refused at urls."""
    errors = errors_of(MINIMAL.replace('    urls: ["http://127.0.0.1:28086"]\n', ""))
    assert errors == [
        "clusters.influx-a.urls: give urls or consul_service (one is required) (line 5)"
    ]


def test_a_cluster_may_not_have_both_urls_and_consul() -> None:
    """urls and consul_service together are refused."""
    errors = errors_of(with_cluster_keys("    consul_service: influxdb\n"))
    assert errors == [
        "clusters.influx-a.consul_service: give urls or consul_service, not both (line 8)"
    ]


def test_a_consul_cluster_loads() -> None:
    """A cluster found through Consul needs no urls."""
    text = MINIMAL.replace(
        '    urls: ["http://127.0.0.1:28086"]\n',
        "    consul_service: influxdb\n    consul_tag: a\n",
    )
    cluster = parse_topology(text).cluster("influx-a")
    assert (cluster.urls, cluster.consul_service, cluster.consul_tag) == ((), "influxdb", "a")


def test_v2_needs_org_and_bucket_and_refuses_database() -> None:
    """api v2 requires org and bucket; database is a v1 key."""
    errors = errors_of(with_cluster_keys("    api: v2\n"))
    assert errors == [
        "clusters.influx-a.org: required for api v2 (line 5)",
        "clusters.influx-a.bucket: required for api v2 (line 5)",
        "clusters.influx-a.database: only for api v1 (line 7)",
    ]


def test_victoriametrics_flavor_takes_v1_without_retention_policy() -> None:
    """flavor victoriametrics is a v1 cluster (its v2 write ignores the bucket), with no rp."""
    cluster = parse_topology(with_cluster_keys("    flavor: victoriametrics\n")).cluster("influx-a")
    assert (cluster.flavor, cluster.api) == ("victoriametrics", "v1")
    assert parse_topology(MINIMAL).cluster("influx-a").flavor == "influxdb"
    errors = errors_of(
        with_cluster_keys("    flavor: victoriametrics\n    retention_policy: week\n")
    )
    assert errors == [
        "clusters.influx-a.retention_policy: not with flavor victoriametrics (it has none) (line 9)"
    ]
    text = MINIMAL.replace(
        "    database: metrics\n",
        "    api: v2\n    flavor: victoriametrics\n    org: o\n    bucket: b\n",
        1,
    )
    assert errors_of(text) == [
        "clusters.influx-a.api: flavor victoriametrics takes api v1 (its v2 write ignores "
        "bucket) (line 7)"
    ]
    assert errors_of(with_cluster_keys("    flavor: graphite\n"))[0].startswith(
        "clusters.influx-a.flavor: "
    )


def test_v1_needs_a_database() -> None:
    """api v1 (the default) requires database."""
    errors = errors_of(MINIMAL.replace("    database: metrics\n", "", 1))
    assert errors == ["clusters.influx-a.database: required for api v1 (line 5)"]


def test_min_healthy_cannot_exceed_the_urls() -> None:
    """min_healthy above the number of urls could never be met."""
    errors = errors_of(with_cluster_keys("    min_healthy: 2\n"))
    assert errors == ["clusters.influx-a.min_healthy: is 2 but only 1 urls are listed (line 8)"]


def test_urls_lose_their_trailing_slash() -> None:
    """A node URL is stored without a trailing slash, so paths can be appended."""
    text = MINIMAL.replace("127.0.0.1:28086", "127.0.0.1:28086/")
    assert parse_topology(text).cluster("influx-a").urls == ("http://127.0.0.1:28086",)


def test_a_url_needs_scheme_host_and_port() -> None:
    """A node URL without a port is refused (InfluxDB is rarely on 80)."""
    errors = errors_of(MINIMAL.replace("127.0.0.1:28086", "127.0.0.1"))
    assert errors == [
        "clusters.influx-a.urls[0]: invalid url 'http://127.0.0.1': "
        "use http(s)://host:port (line 6)"
    ]


def test_a_cluster_name_must_be_lowercase() -> None:
    """Cluster names become part of group ids and metric labels, so they are restricted."""
    errors = errors_of(MINIMAL.replace("  influx-b:", "  Influx_B:"))
    assert errors[0].startswith("clusters.Influx_B: invalid name 'Influx_B'")
    assert errors[0].endswith("(line 8)")


def test_cluster_config_accepts_drain() -> None:
    """drain: true is a valid cluster setting."""
    assert ClusterConfig(urls=("http://h:1",), database="m", drain=True).drain is True


# --- durations and sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("1s", 1.0), ("1.5s", 1.5), ("2m", 120.0), ("1h", 3600.0), (3, 3.0)],
)
def test_durations_parse_to_seconds(text: str | int, seconds: float) -> None:
    """A duration is a number with ms/s/m/h, or a plain number of seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("512KiB", 512 * 1024), ("1MiB", 1024**2), ("1MB", 10**6), ("10kB", 10_000), (2048, 2048)],
)
def test_sizes_parse_to_bytes(text: str | int, size: int) -> None:
    """A size is bytes, or a number with kB/KiB/MB/MiB/GB/GiB."""
    assert parse_byte_size(text) == size


def test_durations_and_sizes_are_read_from_yaml() -> None:
    """Batch and timeout keys take unit strings in the file."""
    text = with_cluster_keys("    write_timeout: 250ms\n")
    topology = parse_topology(text + "    batch: {max_bytes: 512KiB, linger: 1.5s}\n")
    assert topology.route("dc1-metrics").batch.max_bytes == 512 * 1024
    assert topology.route("dc1-metrics").batch.linger == 1.5
    assert topology.cluster("influx-a").write_timeout == 0.25


def test_a_bad_duration_is_reported() -> None:
    """A duration with an unknown unit is refused at its key."""
    errors = errors_of(with_cluster_keys("    write_timeout: 5 parsecs\n"))
    assert errors == [
        "clusters.influx-a.write_timeout: invalid duration '5 parsecs': "
        "use e.g. '250ms', '1.5s', '2m' or seconds (line 8)"
    ]


def test_batch_bounds_are_enforced() -> None:
    """max_bytes above 64MiB and linger above 60s are refused."""
    errors = errors_of(MINIMAL + "    batch: {max_bytes: 65MiB, linger: 61s}\n")
    assert errors == [
        "routes[0].batch.max_bytes: must be at most 67108864 (line 16)",
        "routes[0].batch.linger: must be at most 60 (line 16)",
    ]


# --- routes --------------------------------------------------------------------------------------


def test_a_regex_topic_is_compiled() -> None:
    """A topic starting with '^' is a regex, and a broken one is refused."""
    assert parse_topology(MINIMAL.replace('"metrics.dc1"', '"^metrics\\\\..*"')).routes[
        0
    ].topics == ("^metrics\\..*",)
    errors = errors_of(MINIMAL.replace('"metrics.dc1"', '"^metrics("'))
    assert errors[0].startswith("routes[0].topics[0]: invalid regex '^metrics(': ")


def test_a_topic_name_is_checked() -> None:
    """A plain topic name with characters Kafka does not allow is refused."""
    errors = errors_of(MINIMAL.replace('"metrics.dc1"', '"metrics dc1"'))
    assert errors[0].startswith("routes[0].topics[0]: invalid topic name 'metrics dc1'")


def test_a_failover_route_needs_a_primary() -> None:
    """failover mode (the default) requires primary."""
    errors = errors_of(MINIMAL.replace("    primary: influx-a\n", ""))
    assert errors == ["routes[0].primary: required in failover mode (line 12)"]


def test_a_failover_route_refuses_clusters() -> None:
    """failover mode takes primary/standby, not clusters."""
    errors = errors_of(MINIMAL + "    clusters: [influx-b]\n")
    assert errors == [
        "routes[0].clusters: not allowed in failover mode; use primary and standby (line 16)"
    ]


def test_a_mirror_route_needs_clusters() -> None:
    """mirror mode requires at least one cluster."""
    errors = errors_of(with_route("  - name: m\n    topics: [t]\n    mode: mirror\n"))
    assert errors == ["routes[0].clusters: required in mirror mode (at least one) (line 12)"]


def test_a_mirror_route_refuses_failover_keys() -> None:
    """mirror mode refuses primary, standby, skip_missed and handback_lag."""
    route = (
        "  - name: m\n"
        "    topics: [t]\n"
        "    mode: mirror\n"
        "    clusters: [influx-a]\n"
        "    primary: influx-a\n"
        "    standby: [influx-b]\n"
        "    skip_missed: true\n"
        "    handback_lag: 10\n"
    )
    assert [error.split(":")[0] for error in errors_of(with_route(route))] == [
        "routes[0].primary",
        "routes[0].standby",
        "routes[0].skip_missed",
        "routes[0].handback_lag",
    ]


def test_a_mirror_route_lists_its_destinations() -> None:
    """A mirror route's destinations are its clusters, in order."""
    route = "  - name: m\n    topics: [t]\n    mode: mirror\n    clusters: [influx-b, influx-a]\n"
    assert parse_topology(with_route(route)).route("m").destinations == ("influx-b", "influx-a")


def test_a_primary_is_not_its_own_standby() -> None:
    """Listing the primary among the standbys is refused at its index."""
    errors = errors_of(MINIMAL.replace("[influx-b]", "[influx-b, influx-a]"))
    assert errors == [
        "routes[0].standby[1]: 'influx-a' is the primary; "
        "a cluster is not its own standby (line 15)"
    ]


def test_a_standby_is_listed_once() -> None:
    """A standby listed twice is refused at its second position."""
    errors = errors_of(MINIMAL.replace("[influx-b]", "[influx-b, influx-b]"))
    assert errors == ["routes[0].standby[1]: 'influx-b' is listed twice (line 15)"]


def test_a_cluster_may_serve_several_routes() -> None:
    """The same cluster in two routes is fine: each (route, cluster) has its own group."""
    second = "  - name: other\n    topics: [t2]\n    primary: influx-a\n"
    topology = parse_topology(MINIMAL + second)
    assert [route.destinations[0] for route in topology.routes] == ["influx-a", "influx-a"]


def test_graphite_needs_templates() -> None:
    """format graphite requires graphite_templates."""
    errors = errors_of(MINIMAL + "    format: graphite\n")
    assert errors == ["routes[0].graphite_templates: required when format is graphite (line 12)"]


# --- check-topology ------------------------------------------------------------------------------


def test_check_topology_prints_a_summary_and_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file prints one ok line with the counts and the datacenter."""
    code = check_topology_main(str(REPO / "topology.yaml"), "dc7")
    assert code == 0
    assert capsys.readouterr().out == "ok: 4 clusters, 2 routes, datacenter dc7\n"


def test_check_topology_prints_every_error_and_returns_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid file prints each error on stderr, prefixed by the file name."""
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL.replace("influx-a\n", "influx-z\n").replace("[influx-b]", "[influx-y]"))
    code = check_topology_main(str(path), None)
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}: routes[0].primary: unknown cluster 'influx-z' (line 14)",
        f"{path}: routes[0].standby[0]: unknown cluster 'influx-y' (line 15)",
    ]
