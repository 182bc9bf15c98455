"""One HTTP client factory for writes and probes (``router.tls``): an in-process HTTPS server on
127.0.0.1 with a CA made by openssl proves that the sink and the health probe trust exactly the
same CA, that both fail with a TLS reason (not a generic connection error) under a wrong one,
that the environment never changes whom they trust, and that a rotated CA file is read again."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from health.checker import ClusterSpec, HealthChecker
from health.verdict import ClusterState
from router.errors import SinkTlsError
from router.sink import InfluxSink, InfluxTarget
from router.tls import ReloadingClient, TlsError, TlsSettings, http_client, ssl_context
from tests.unit.tls_support import KEY_PASSWORD, Pki, https_server, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def sink_for(url: str, tls: TlsSettings | None) -> InfluxSink:
    target = InfluxTarget(cluster="influx-a", api="v1", database="m", max_retries=0, tls=tls)
    return InfluxSink(target, nodes=lambda: [url])


def probe(url: str, tls: TlsSettings | None) -> tuple[ClusterState, str]:
    """One probe round of a one-node cluster with fall 1: its state and reason."""
    spec = ClusterSpec(api="v1", nodes=(url,), tls=tls)
    checker = HealthChecker({"influx-a": spec}, interval=1, timeout=2, fall=1, rise=1)
    try:
        checker.probe_once()
        verdict = checker.verdict("influx-a")
        return verdict.state, verdict.reason
    finally:
        checker.stop()


# --- the same CA for writes and probes ---------------------------------------------------------


def test_the_sink_and_the_probe_trust_the_cluster_ca(pki: Pki) -> None:
    """With tls.ca_file the CA that signed the node, a write is accepted and the probe passes."""
    tls = TlsSettings(ca_file=str(pki.ca))
    with https_server(pki) as (url, seen), sink_for(url, tls) as sink:
        assert sink.write([b"cpu v=1 1"]) == []
        assert probe(url, tls)[0] is ClusterState.UP
    assert [(method, path.split("?")[0]) for method, path, _ in seen.requests] == [
        ("POST", "/write"),
        ("GET", "/ping"),
    ]


def test_under_a_wrong_ca_both_fail_with_a_tls_reason(pki: Pki) -> None:
    """A CA that did not sign the node: the write fails as SinkTlsError saying "TLS:
    certificate verify failed", a tls_error event names the cluster, and the probe's reason
    says the same (the cluster goes DOWN for a TLS reason, not "cannot connect")."""
    tls = TlsSettings(ca_file=str(pki.other_ca))
    with https_server(pki) as (url, _), sink_for(url, tls) as sink:
        with capture_logs() as events, pytest.raises(SinkTlsError) as failure:
            sink.write([b"cpu v=1 1"])
        state, reason = probe(url, tls)
    assert "TLS: certificate verify failed" in str(failure.value)
    assert "influx-a" in str(failure.value)
    tls_events = [e for e in events if e["event"] == "tls_error"]
    assert len(tls_events) == 1
    assert tls_events[0]["cluster"] == "influx-a"
    assert tls_events[0]["reason"].startswith("TLS: certificate verify failed")
    assert state is ClusterState.DOWN
    assert "TLS: certificate verify failed" in reason


def test_the_tls_error_event_is_not_repeated_for_each_failed_write(pki: Pki) -> None:
    """One tls_error per node and reason until the node answers again: failed writes in a row
    do not flood the log with the same event."""
    tls = TlsSettings(ca_file=str(pki.other_ca))
    with https_server(pki) as (url, _), sink_for(url, tls) as sink, capture_logs() as events:
        for _ in range(3):
            with pytest.raises(SinkTlsError):
                sink.write([b"cpu v=1 1"])
    assert [e["event"] for e in events].count("tls_error") == 1


def test_a_name_the_certificate_does_not_hold_is_a_tls_failure(pki: Pki) -> None:
    """The certificate names 127.0.0.1 and localhost: a node at 127.0.0.2 serving it fails the
    hostname check, with OpenSSL's words in the reason."""
    tls = TlsSettings(ca_file=str(pki.ca))
    with https_server(pki, host="127.0.0.2") as (url, _):
        with sink_for(url, tls) as sink, pytest.raises(SinkTlsError) as failure:
            sink.write([b"cpu v=1 1"])
        state, reason = probe(url, tls)
    assert "TLS: certificate verify failed" in str(failure.value)
    assert "127.0.0.2" in str(failure.value)
    assert state is ClusterState.DOWN and "TLS:" in reason


def test_the_environment_never_changes_whom_the_clients_trust(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSL_CERT_FILE (and REQUESTS_CA_BUNDLE) naming the right CA do not make a cluster without
    tls.ca_file trust it: writes and probes alike use certifi's public CAs, so they agree."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca))
    with https_server(pki) as (url, _), sink_for(url, None) as sink:
        with pytest.raises(SinkTlsError, match="TLS: certificate verify failed"):
            sink.write([b"cpu v=1 1"])
        state, reason = probe(url, None)
    assert state is ClusterState.DOWN and "TLS: certificate verify failed" in reason


def test_insecure_skip_verify_trusts_any_certificate(pki: Pki) -> None:
    """insecure_skip_verify: true accepts a certificate no known CA signed (tests only)."""
    tls = TlsSettings(insecure_skip_verify=True)
    with https_server(pki) as (url, _), sink_for(url, tls) as sink:
        assert sink.write([b"cpu v=1 1"]) == []
        assert probe(url, tls)[0] is ClusterState.UP


# --- client certificates ----------------------------------------------------------------------


def test_a_client_certificate_with_an_encrypted_key_is_presented(pki: Pki) -> None:
    """A node that requires a client certificate accepts the write and the probe of a cluster
    whose tls gives the certificate and its encrypted key with the key's password."""
    tls = TlsSettings(
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key_encrypted),
        key_password=lambda: KEY_PASSWORD,
    )
    with https_server(pki, client_ca=pki.ca) as (url, _), sink_for(url, tls) as sink:
        assert sink.write([b"cpu v=1 1"]) == []
        assert probe(url, tls)[0] is ClusterState.UP


def test_without_the_client_certificate_the_node_refuses_the_handshake(pki: Pki) -> None:
    """The same node, and no client certificate: a TLS failure, said as such."""
    tls = TlsSettings(ca_file=str(pki.ca))
    with https_server(pki, client_ca=pki.ca) as (url, _), sink_for(url, tls) as sink:
        with pytest.raises(SinkTlsError, match="TLS: "):
            sink.write([b"cpu v=1 1"])
        state, reason = probe(url, tls)
    assert state is ClusterState.DOWN and reason.count("TLS: ") == 1


# --- files that change ------------------------------------------------------------------------


def test_a_rotated_ca_file_is_read_before_the_next_request(pki: Pki, tmp_path: Path) -> None:
    """The CA file is replaced (as the kubelet swaps a Secret): the next write and the next
    probe use the new CA, without a restart or a topology edit."""
    ca = tmp_path / "ca.pem"
    shutil.copy(pki.other_ca, ca)
    tls = TlsSettings(ca_file=str(ca))
    spec = ClusterSpec(api="v1", nodes=(), tls=tls)
    with https_server(pki) as (url, _), sink_for(url, tls) as sink:
        spec = ClusterSpec(api="v1", nodes=(url,), tls=tls)
        checker = HealthChecker({"influx-a": spec}, interval=1, timeout=2, fall=1, rise=1)
        try:
            with pytest.raises(SinkTlsError):
                sink.write([b"cpu v=1 1"])
            checker.probe_once()
            assert checker.verdict("influx-a").state is ClusterState.DOWN
            replacement = tmp_path / "ca.pem.new"
            shutil.copy(pki.ca, replacement)
            os.replace(replacement, ca)
            with capture_logs() as events:
                assert sink.write([b"cpu v=1 2"]) == []
                checker.probe_once()
            assert checker.verdict("influx-a").state is ClusterState.UP
        finally:
            checker.stop()
    assert {e["event"] for e in events} >= {"tls_reloaded"}


def test_a_ca_file_that_becomes_unusable_keeps_the_last_good_client(
    pki: Pki, tmp_path: Path
) -> None:
    """A CA file replaced by garbage: one tls_error event naming the key, and requests keep
    using the client built from the last good file."""
    ca = tmp_path / "ca.pem"
    shutil.copy(pki.ca, ca)
    tls = TlsSettings(ca_file=str(ca))
    with https_server(pki) as (url, _), sink_for(url, tls) as sink:
        assert sink.write([b"cpu v=1 1"]) == []
        ca.write_text("not a certificate\n")
        with capture_logs() as events:
            assert sink.write([b"cpu v=1 2"]) == []
            assert sink.write([b"cpu v=1 3"]) == []
    errors = [e for e in events if e["event"] == "tls_error"]
    assert len(errors) == 1
    assert errors[0]["cluster"] == "influx-a" and errors[0]["key"] == "tls.ca_file"


def test_a_retired_client_is_closed_once_its_last_request_is_done(pki: Pki, tmp_path: Path) -> None:
    """A request under way when the file changes finishes on its client; that client is
    closed when it is done, not before."""
    ca = tmp_path / "ca.pem"
    shutil.copy(pki.ca, ca)
    tls = TlsSettings(ca_file=str(ca))
    reloading = ReloadingClient("influx-a", tls, lambda: http_client(tls, timeout=2))
    with reloading.client() as first:
        os.replace(shutil.copy(pki.ca, tmp_path / "ca.new"), ca)
        with reloading.client() as second:
            assert second is not first
        assert not first.is_closed
    assert first.is_closed
    reloading.close()
    assert second.is_closed
    with reloading.client() as late:  # a request that raced the close still gets a client
        assert not late.is_closed
    assert late.is_closed


# --- what the settings refuse -------------------------------------------------------------------


@pytest.fixture
def files(pki: Pki, tmp_path: Path) -> Iterator[dict[str, str]]:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    yield {
        "ca": str(pki.ca),
        "garbage": str(garbage),
        "missing": str(tmp_path / "missing.pem"),
        "cert": str(pki.client_cert),
        "key": str(pki.client_key),
        "other_key": str(pki.server_key),
        "encrypted": str(pki.client_key_encrypted),
    }


@pytest.mark.parametrize(
    ("settings", "key", "words"),
    [
        ({"ca_file": "garbage"}, "ca_file", "holds no usable PEM certificate"),
        ({"ca_file": "missing"}, "ca_file", "cannot read"),
        ({"cert_file": "cert", "key_file": "missing"}, "key_file", "cannot read"),
        ({"cert_file": "cert", "key_file": "other_key"}, "key_file", "is not the key of"),
        ({"cert_file": "cert"}, "cert_file", "give key_file"),
        ({"cert_file": "cert", "key_file": "encrypted"}, "key_file", "is encrypted"),
        (
            {"cert_file": "cert", "key_file": "encrypted", "password": "wrong-password"},
            "key_password",
            "does not decrypt",
        ),
    ],
)
def test_unusable_tls_files_name_the_setting(
    files: dict[str, str], settings: dict[str, str], key: str, words: str
) -> None:
    """Each unusable file is a TlsError naming its setting, never a secret."""
    password = settings.pop("password", None)
    paths = {name: files[value] for name, value in settings.items()}
    tls = TlsSettings(
        ca_file=paths.get("ca_file"),
        cert_file=paths.get("cert_file"),
        key_file=paths.get("key_file"),
        key_password=(lambda: password) if password else None,
    )
    with pytest.raises(TlsError) as failure:
        ssl_context(tls)
    assert failure.value.key == key
    assert words in str(failure.value)
    assert "wrong-password" not in str(failure.value)


def test_the_right_key_password_decrypts_the_key(files: dict[str, str]) -> None:
    """The encrypted key with its password builds a context (no terminal prompt)."""
    tls = TlsSettings(
        cert_file=files["cert"], key_file=files["encrypted"], key_password=lambda: KEY_PASSWORD
    )
    assert ssl_context(tls).check_hostname
