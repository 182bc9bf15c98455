"""The topology's security settings: cluster ``tls:``, ``kafka.tls``, SASL PLAIN/SCRAM and
OAUTHBEARER; every rule reported at its key path, secrets only by ``*_env``/``*_file``, mapped
to the librdkafka settings librdkafka itself accepts."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import certifi
import pytest
from confluent_kafka import Producer
from structlog.testing import capture_logs

from router.errors import KafkaRefused
from router.kafka import check_access, client_config
from router.secrets import scrub
from router.topology import load_topology, parse_topology
from tests.unit.test_topology import MINIMAL, errors_of, with_cluster_keys
from tests.unit.tls_support import KEY_PASSWORD, Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def key_password(tmp_path: Path) -> Path:
    path = tmp_path / "key-password"
    path.write_text(KEY_PASSWORD + "\n")
    return path


def https_cluster(tls: str) -> str:
    """MINIMAL with influx-a on https and ``tls`` (a flow mapping) added to it."""
    text = with_cluster_keys(f"    tls: {tls}\n")
    return text.replace('urls: ["http://127.0.0.1:28086"]', 'urls: ["https://127.0.0.1:28086"]')


def with_kafka(lines: str) -> str:
    """MINIMAL with ``lines`` (2-space indented YAML) added to the kafka section."""
    return MINIMAL.replace("kafka:\n", "kafka:\n" + lines, 1)


def keys_of(errors: list[str]) -> list[str]:
    return [error.split(": ")[0] for error in errors]


# --- clusters.NAME.tls -----------------------------------------------------------------------


def test_a_cluster_tls_block_becomes_the_clients_settings(pki: Pki, key_password: Path) -> None:
    """ca_file, cert_file, key_file and the key password file reach the sink's and the
    probes' TLS settings (the password is read when a context is built)."""
    topology = parse_topology(
        https_cluster(
            f"{{ca_file: {pki.ca}, cert_file: {pki.client_cert}, "
            f"key_file: {pki.client_key_encrypted}, key_password_file: {key_password}}}"
        )
    )
    settings = topology.clusters["influx-a"].tls_settings()
    assert settings is not None
    assert (settings.ca_file, settings.cert_file, settings.key_file) == (
        str(pki.ca),
        str(pki.client_cert),
        str(pki.client_key_encrypted),
    )
    assert settings.key_password is not None and settings.key_password() == KEY_PASSWORD
    assert KEY_PASSWORD not in repr(topology) and KEY_PASSWORD not in repr(settings)
    assert topology.clusters["influx-b"].tls_settings() is None


def test_tls_on_a_cluster_with_only_http_urls_is_refused(pki: Pki) -> None:
    """tls: with http:// nodes would do nothing: an error at clusters.X.tls."""
    errors = errors_of(with_cluster_keys(f"    tls: {{ca_file: {pki.ca}}}\n"))
    assert keys_of(errors) == ["clusters.influx-a.tls"]
    assert "only for https:// urls" in errors[0]


@pytest.mark.parametrize(
    "case",
    [
        ("{ca_file: CA, insecure_skip_verify: true}", "ca_file", "not with insecure_skip_verify"),
        ("{key_file: KEY}", "key_file", "needs cert_file"),
        ("{key_password_file: PW}", "key_password_file", "needs cert_file and key_file"),
        ("{ca_file: KEY}", "ca_file", "holds no usable PEM certificate"),
        ("{ca_file: /nonexistent/ca.pem}", "ca_file", "cannot read"),
        ("{cert_file: CERT, key_file: OTHER}", "key_file", "is not the key of"),
        ("{cert_file: CERT, key_file: ENC}", "key_file", "is encrypted"),
        ("{cert_file: CERT, key_file: ENC, key_password_file: WRONG}", "key_password_file", ""),
        ("{cert_file: CERT, key_file: KEY, key_password: hunter2-secret}", "key_password", ""),
        (
            "{cert_file: CERT, key_file: KEY, key_password_env: NOT_SET_4711}",
            "key_password_env",
            "4711",
        ),
        ("{insecure_skip_verify: maybe}", "insecure_skip_verify", "true or false"),
        ("{ca_file: CA, server_name: x}", "server_name", "unknown key"),
    ],
)
def test_cluster_tls_problems_name_their_key(
    pki: Pki, key_password: Path, tmp_path: Path, case: tuple[str, str, str]
) -> None:
    """Each problem of a tls block is reported at clusters.X.tls.<key>, echoing no secret."""
    tls, key, words = case
    wrong = tmp_path / "wrong-password"
    wrong.write_text("wrong-password-4711\n")
    for name, path in (
        ("CA", pki.ca),
        ("CERT", pki.client_cert),
        ("OTHER", pki.server_key),
        ("ENC", pki.client_key_encrypted),
        ("KEY", pki.client_key),
        ("WRONG", wrong),
        ("PW", key_password),
    ):
        tls = tls.replace(f": {name}", f": {path}")
    errors = errors_of(https_cluster(tls))
    assert keys_of(errors) == [f"clusters.influx-a.tls.{key}"]
    assert words in errors[0]
    for secret in ("hunter2-secret", "wrong-password-4711", KEY_PASSWORD):
        assert secret not in errors[0]


def test_a_relative_tls_file_is_taken_from_the_topology_folder(pki: Pki, tmp_path: Path) -> None:
    """tls files follow the rule of the secret files: relative to the topology's folder."""
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_bytes(pki.ca.read_bytes())
    path = tmp_path / "topology.yaml"
    path.write_text(https_cluster("{ca_file: certs/ca.pem}"))
    settings = load_topology(path).clusters["influx-a"].tls_settings()
    assert settings is not None and settings.ca_file == str(tmp_path / "certs" / "ca.pem")


# --- kafka.tls ----------------------------------------------------------------------------------


def test_kafka_tls_maps_to_librdkafka_with_the_key_password_from_its_file(
    pki: Pki, key_password: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kafka.tls becomes ssl.ca.location, ssl.certificate.location, ssl.key.location and
    ssl.key.password (read from its file), and librdkafka loads the encrypted key with it."""
    monkeypatch.setenv("FROUTER_TEST_KAFKA_USER", "router")
    monkeypatch.setenv("FROUTER_TEST_KAFKA_PASSWORD", "kafka-password-4711")
    topology = parse_topology(
        with_kafka(
            "  security_protocol: SASL_SSL\n"
            "  sasl_mechanism: SCRAM-SHA-512\n"
            "  sasl_username_env: FROUTER_TEST_KAFKA_USER\n"
            "  sasl_password_env: FROUTER_TEST_KAFKA_PASSWORD\n"
            f"  tls: {{ca_file: {pki.ca}, cert_file: {pki.client_cert}, "
            f"key_file: {pki.client_key_encrypted}, key_password_file: {key_password}}}\n"
        )
    )
    config = topology.kafka.librdkafka_config()
    assert {k: v for k, v in config.items() if k.startswith(("ssl.", "sasl."))} == {
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "router",
        "sasl.password": "kafka-password-4711",
        "ssl.ca.location": str(pki.ca),
        "ssl.certificate.location": str(pki.client_cert),
        "ssl.key.location": str(pki.client_key_encrypted),
        "ssl.key.password": KEY_PASSWORD,
    }
    Producer(client_config(config)).flush(0)  # librdkafka decrypts the key at creation


def test_kafka_tls_without_a_ca_file_trusts_certifi_not_the_environment() -> None:
    """SSL without a CA file: ssl.ca.location is certifi's bundle, so SSL_CERT_FILE and the
    like never change whom librdkafka trusts."""
    topology = parse_topology(with_kafka("  security_protocol: SSL\n"))
    assert topology.kafka.librdkafka_config()["ssl.ca.location"] == certifi.where()


def test_kafka_insecure_skip_verify_turns_verification_off() -> None:
    """insecure_skip_verify maps to enable.ssl.certificate.verification=false (and no
    hostname check), with no CA location."""
    topology = parse_topology(
        with_kafka("  security_protocol: SSL\n  tls: {insecure_skip_verify: true}\n")
    )
    config = topology.kafka.librdkafka_config()
    assert config["enable.ssl.certificate.verification"] == "false"
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert "ssl.ca.location" not in config


def test_the_older_ssl_ca_file_still_works(pki: Pki) -> None:
    """kafka.ssl_ca_file (the name before kafka.tls) still sets ssl.ca.location."""
    topology = parse_topology(with_kafka(f"  security_protocol: SSL\n  ssl_ca_file: {pki.ca}\n"))
    assert topology.kafka.librdkafka_config()["ssl.ca.location"] == str(pki.ca)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("  tls: {ca_file: CA}\n", {"kafka.tls": "only with security_protocol SSL or SASL_SSL"}),
        (
            "  security_protocol: SSL\n  ssl_ca_file: CA\n  tls: {ca_file: CA}\n",
            {"kafka.ssl_ca_file": "give tls.ca_file only"},
        ),
        (
            "  security_protocol: SSL\n  tls: {cert_file: COMBINED}\n",
            {"kafka.tls.key_file": "required with cert_file"},
        ),
        (
            "  security_protocol: SSL\n  ssl_ca_file: KEY\n",
            {"kafka.ssl_ca_file": "holds no usable PEM certificate"},
        ),
        (
            "  security_protocol: SSL\n  tls: {cert_file: CERT, key_file: ENC}\n",
            {"kafka.tls.key_file": "is encrypted"},
        ),
    ],
)
def test_kafka_tls_problems_name_their_key(
    pki: Pki, tmp_path: Path, lines: str, expected: dict[str, str]
) -> None:
    """Each rule of kafka.tls is reported at its key path."""
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pki.client_cert.read_bytes() + pki.client_key.read_bytes())
    for name, path in (
        ("CA", pki.ca),
        ("CERT", pki.client_cert),
        ("KEY", pki.client_key),
        ("ENC", pki.client_key_encrypted),
        ("COMBINED", combined),
    ):
        lines = lines.replace(f": {name}", f": {path}")
    errors = errors_of(with_kafka(lines))
    assert set(keys_of(errors)) == set(expected)
    for error in errors:
        assert expected[error.split(": ")[0]] in error


@pytest.mark.parametrize(
    "key",
    [
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.key.location",
        "enable.ssl.certificate.verification",
        "sasl.oauthbearer.method",
        "sasl.oauthbearer.client.id",
        "sasl.oauthbearer.token.endpoint.url",
        "https.ca.location",
    ],
)
def test_client_config_points_tls_and_oauth_keys_to_their_fields(key: str) -> None:
    """A librdkafka key that has a field is refused in client_config, naming the field."""
    errors = errors_of(with_kafka(f"  client_config: {{{key}: x}}\n"))
    assert len(errors) == 1
    assert errors[0].startswith(f"kafka.client_config.{key}: not allowed: use kafka.")


@pytest.mark.parametrize("key", ["ssl.key.password", "sasl.oauthbearer.client.secret"])
def test_client_config_refuses_tls_and_oauth_secrets(key: str) -> None:
    """The key password and the OAuth client secret never go inline in client_config."""
    errors = errors_of(with_kafka(f"  client_config: {{{key}: hunter2-secret}}\n"))
    assert errors == [
        f"kafka.client_config.{key}: secrets are not allowed in client_config (line 3)"
    ]


# --- SASL OAUTHBEARER --------------------------------------------------------------------------

REFUSE = [False]  # the token endpoint's answer: 401 when True

OAUTH = (
    "  security_protocol: SASL_PLAINTEXT\n"
    "  sasl_mechanism: OAUTHBEARER\n"
    "  sasl_oauthbearer:\n"
    "    token_endpoint_url: {url}\n"
    "    client_id_file: {client_id}\n"
    "    client_secret_file: {secret}\n"
    "    scope: kafka\n"
)


@pytest.fixture
def oauth_files(tmp_path: Path) -> tuple[Path, Path]:
    client_id, secret = tmp_path / "client-id", tmp_path / "client-secret"
    client_id.write_text("frouter-dc1\n")
    secret.write_text("client-secret-4711\n")
    return client_id, secret


def oauth(url: str, files: tuple[Path, Path]) -> str:
    return with_kafka(OAUTH.format(url=url, client_id=files[0], secret=files[1]))


def test_oauthbearer_maps_to_librdkafkas_oidc_settings(oauth_files: tuple[Path, Path]) -> None:
    """OAUTHBEARER with client credentials: sasl.oauthbearer.method=oidc, the endpoint, the
    client id and secret read from their files, the scope; no username or password."""
    config = parse_topology(oauth("http://127.0.0.1:1/token", oauth_files)).kafka
    assert {k: v for k, v in config.librdkafka_config().items() if "sasl" in k} == {
        "sasl.mechanism": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.token.endpoint.url": "http://127.0.0.1:1/token",
        "sasl.oauthbearer.client.id": "frouter-dc1",
        "sasl.oauthbearer.client.secret": "client-secret-4711",
        "sasl.oauthbearer.scope": "kafka",
    }


def test_an_https_token_endpoint_is_verified_with_its_own_ca_or_certifi(
    pki: Pki, oauth_files: tuple[Path, Path]
) -> None:
    """https.ca.location is sasl_oauthbearer.ca_file, else certifi's bundle."""
    text = oauth("https://idp.example:8443/token", oauth_files)
    assert parse_topology(text).kafka.librdkafka_config()["https.ca.location"] == certifi.where()
    with_ca = text.replace("    scope: kafka\n", f"    scope: kafka\n    ca_file: {pki.ca}\n")
    assert parse_topology(with_ca).kafka.librdkafka_config()["https.ca.location"] == str(pki.ca)


@pytest.fixture
def token_endpoint() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """An OAuth token endpoint on 127.0.0.1 that records each request and hands out a token
    (or refuses the client with 401 when the test sets ``REFUSE[0]``)."""
    seen: list[tuple[dict[str, str], bytes]] = []
    REFUSE[0] = False

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((dict(self.headers), body))

            def part(doc: dict[str, object]) -> str:
                return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

            now = int(time.time())
            token = f"{part({'alg': 'none'})}.{part({'sub': 'router', 'exp': now + 3600})}."
            answer = json.dumps({"access_token": token, "token_type": "bearer"}).encode()
            if REFUSE[0]:
                answer = b'{"error": "invalid_client"}'
            self.send_response(401 if REFUSE[0] else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token", seen
    finally:
        server.shutdown()
        server.server_close()


def test_librdkafka_fetches_a_token_with_the_client_credentials(
    oauth_files: tuple[Path, Path],
    token_endpoint: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    """The mapped settings work in librdkafka itself: at start it asks the token endpoint for a
    token with the client id and secret (HTTP basic auth) and the scope."""
    url, seen = token_endpoint
    config = parse_topology(oauth(url, oauth_files)).kafka.librdkafka_config()
    producer = Producer(client_config(config, {"bootstrap.servers": "127.0.0.1:1"}))
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        producer.poll(0.1)
    assert seen, "librdkafka did not ask the token endpoint"
    headers, body = seen[0]
    expected = base64.b64encode(b"frouter-dc1:client-secret-4711").decode()
    assert headers["Authorization"] == f"Basic {expected}"
    assert body == b"grant_type=client_credentials&scope=kafka"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("  sasl_oauthbearer:\n", "  sasl_oauthbearer_x:\n"), "kafka.sasl_oauthbearer_x"),
        (
            ("    client_secret_file:", "    client_secret: hunter2-secret\n    x_file:"),
            "kafka.sasl_oauthbearer.client_secret",
        ),
        (("    client_id_file:", "    # client_id_file:"), "kafka.sasl_oauthbearer.client_id_env"),
        (
            ("    token_endpoint_url: http://127.0.0.1:1/token", "    token_endpoint_url: ftp://x"),
            "kafka.sasl_oauthbearer.token_endpoint_url",
        ),
        (
            ("  sasl_mechanism: OAUTHBEARER\n", "  sasl_mechanism: SCRAM-SHA-512\n"),
            "kafka.sasl_oauthbearer",
        ),
    ],
)
def test_oauthbearer_problems_name_their_key(
    oauth_files: tuple[Path, Path], change: tuple[str, str], expected: str
) -> None:
    """A missing or misplaced OAUTHBEARER setting is reported at its key; a secret inline is
    refused without being echoed."""
    text = oauth("http://127.0.0.1:1/token", oauth_files).replace(*change)
    errors = errors_of(text)
    assert expected in keys_of(errors)
    assert not any("hunter2-secret" in error for error in errors)


def test_a_username_or_password_with_oauthbearer_is_refused(
    oauth_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """OAUTHBEARER takes its credentials from sasl_oauthbearer only."""
    monkeypatch.setenv("FROUTER_TEST_KAFKA_USER", "router")
    text = oauth("http://127.0.0.1:1/token", oauth_files).replace(
        "  sasl_oauthbearer:\n",
        "  sasl_username_env: FROUTER_TEST_KAFKA_USER\n  sasl_oauthbearer:\n",
    )
    errors = errors_of(text)
    assert keys_of(errors) == ["kafka.sasl_username_env"]
    assert "not with sasl_mechanism OAUTHBEARER" in errors[0]


def test_oauthbearer_without_its_block_names_the_block() -> None:
    """sasl_mechanism OAUTHBEARER alone: kafka.sasl_oauthbearer is required."""
    errors = errors_of(with_kafka("  security_protocol: SASL_SSL\n  sasl_mechanism: OAUTHBEARER\n"))
    assert keys_of(errors) == ["kafka.sasl_oauthbearer"]


def test_usernames_and_client_ids_are_not_treated_as_secrets(
    oauth_files: tuple[Path, Path],
) -> None:
    """A client id is read but not scrubbed from the logs (it is a name); the client secret is."""
    parse_topology(oauth("http://127.0.0.1:1/token", oauth_files)).kafka.librdkafka_config()
    assert scrub("id frouter-dc1 secret client-secret-4711") == "id frouter-dc1 secret ***"


def test_a_refused_client_secret_is_a_kafka_refusal_naming_the_token_endpoint(
    oauth_files: tuple[Path, Path],
    token_endpoint: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    """The token endpoint answers 401 to the client credentials: librdkafka reports it, and
    check_access (the start-up check) raises KafkaRefused for OAUTHBEARER, saying the token
    endpoint refused, without the secret, in the error or in librdkafka's logged lines."""
    url, _ = token_endpoint
    REFUSE[0] = True
    config = parse_topology(oauth(url, oauth_files)).kafka.librdkafka_config()
    with capture_logs() as events, pytest.raises(KafkaRefused) as refused:
        check_access({**config, "bootstrap.servers": "127.0.0.1:1"}, timeout=10)
    assert refused.value.mechanism == "OAUTHBEARER"
    assert "the token endpoint refused the router's client credentials" in str(refused.value)
    assert "client-secret-4711" not in str(refused.value) + repr(events)
    assert any("invalid_client" in e.get("message", "") for e in events)
