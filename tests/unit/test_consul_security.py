"""Consul with ACLs and TLS: the token file always wins over CONSUL_HTTP_TOKEN (checked with the
X-Consul-Token header a small local HTTP server captures), an https agent is verified with
--consul-ca-file and never with the environment's CAs, a 403 is one clear ConsulDenied, and a
replica whose token is refused decides on its local verdict without crashing."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from health.checker import HealthChecker
from health.consul import ConsulAPI, ConsulSettings
from health.shared import ClusterSource, SharedVerdict
from health.verdict import ClusterState
from router.cli import consul_settings, main
from router.errors import ConfigError, ConsulDenied, ConsulError
from tests.support import wait_until
from tests.unit.tls_support import Pki, Seen, https_server, make_pki

FILE_TOKEN = "file-token-0f1e2d3c"
ENV_TOKEN = "env-token-9a8b7c6d"
DENIED = (
    b"Permission denied: token with AccessorID '3f7e' lacks permission 'session:write' "
    b'on "node-1"'
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class FakeConsul:
    """Answers the calls the router makes the way a Consul agent does, or refuses them all
    (403) as an agent with ACLs refuses a token that lacks the permission."""

    def __init__(self) -> None:
        self.refusal: bytes | None = None
        self.registered = False

    def __call__(self, method: str, path: str) -> tuple[int, bytes]:
        if self.refusal is not None:
            return 403, self.refusal
        route = path.split("?", maxsplit=1)[0]
        if route == "/v1/agent/service/register":
            self.registered = True
        answers = {
            "/v1/agent/services": {"me": {"ID": "me"}} if self.registered else {},
            "/v1/session/create": {"ID": "session-1"},
            "/v1/session/renew/session-1": [{"ID": "session-1"}],
        }
        if route in answers:
            return 200, json.dumps(answers[route]).encode()
        if route.startswith("/v1/kv/"):  # no key is stored; a write is accepted
            return (404, b"") if method == "GET" else (200, b"true")
        if route.startswith(("/v1/session/destroy/", "/v1/agent/service/")):
            return 200, b"true"
        return 404, b""


@pytest.fixture
def agent(pki: Pki) -> Iterator[tuple[str, Seen, FakeConsul]]:
    fake = FakeConsul()
    with https_server(pki, fake, tls=False, headers={"X-Consul-Index": "7"}) as (url, seen):
        yield url, seen, fake


def flags(
    address: str, *, token_file: Path | None = None, ca: Path | None = None
) -> Callable[[], ConsulSettings]:
    """The settings `failover-router run` makes of these flags (read when called)."""

    def settings() -> ConsulSettings:
        args = argparse.Namespace(
            consul_addr=address,
            consul_token_file=str(token_file) if token_file else None,
            consul_ca_file=str(ca) if ca else None,
            consul_prefix="failover-router",
            consul_session_ttl=10.0,
        )
        made = consul_settings(args, "127.0.0.1:8080")
        assert made is not None
        return made

    return settings


def tokens_sent(seen: Seen) -> list[str | None]:
    return [headers.get("X-Consul-Token") for _, _, headers in seen.requests]


# --- which token is sent ------------------------------------------------------------------------


def test_the_token_file_wins_over_consul_http_token(
    agent: tuple[str, Seen, FakeConsul], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONSUL_HTTP_TOKEN set to another token (py-consul would send it): the file's token is
    the one in X-Consul-Token, from the first call on."""
    url, seen, _ = agent
    token = tmp_path / "token"
    token.write_text(FILE_TOKEN + "\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", ENV_TOKEN)
    ConsulAPI(flags(url, token_file=token)()).get_prefix("failover-router/dc1/")
    assert tokens_sent(seen) == [FILE_TOKEN]


def test_an_empty_consul_http_token_never_removes_the_file_token(
    agent: tuple[str, Seen, FakeConsul], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONSUL_HTTP_TOKEN set but empty: the file's token is still sent."""
    url, seen, _ = agent
    token = tmp_path / "token"
    token.write_text(FILE_TOKEN + "\n")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "")
    ConsulAPI(flags(url, token_file=token)()).get_prefix("failover-router/dc1/")
    assert tokens_sent(seen) == [FILE_TOKEN]


def test_without_a_token_file_consul_http_token_is_used(
    agent: tuple[str, Seen, FakeConsul], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No token file: CONSUL_HTTP_TOKEN is the token; an empty one means no token at all."""
    url, seen, _ = agent
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", ENV_TOKEN)
    ConsulAPI(flags(url)()).get_prefix("x/")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "")
    ConsulAPI(flags(url)()).get_prefix("x/")
    assert tokens_sent(seen) == [ENV_TOKEN, None]


def test_the_environment_cannot_redirect_the_client(
    agent: tuple[str, Seen, FakeConsul], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CONSUL_HTTP_ADDR and an HTTP proxy in the environment do not move the calls away from
    --consul-addr."""
    url, seen, _ = agent
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")
    ConsulAPI(flags(url)()).get_prefix("x/")
    assert len(seen.requests) == 1


def test_run_help_says_the_token_file_wins(capsys: pytest.CaptureFixture[str]) -> None:
    """`failover-router run --help` states the precedence and the CA flag."""
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "It always wins over CONSUL_HTTP_TOKEN" in text
    assert "--consul-ca-file" in text
    assert "https://host:port" in text


# --- an https agent -----------------------------------------------------------------------------


def test_an_https_agent_is_verified_with_the_consul_ca_file(pki: Pki) -> None:
    """--consul-addr https://... with --consul-ca-file naming the agent's CA works."""
    with https_server(pki, FakeConsul(), headers={"X-Consul-Index": "7"}) as (url, seen):
        ConsulAPI(flags(url, ca=pki.ca)()).get_prefix("x/")
    assert len(seen.requests) == 1


def test_an_https_agent_is_not_trusted_through_the_environment(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --consul-ca-file the agent's private CA is not trusted, whatever
    REQUESTS_CA_BUNDLE, CONSUL_CACERT-like variables or CONSUL_HTTP_SSL_VERIFY say."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(pki.ca))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(pki.ca))
    monkeypatch.setenv("CONSUL_HTTP_SSL_VERIFY", "false")
    with (
        https_server(pki, FakeConsul(), headers={"X-Consul-Index": "7"}) as (url, seen),
        pytest.raises(ConsulError, match="TLS: certificate verify failed"),
    ):
        ConsulAPI(flags(url)()).get_prefix("x/")
    assert seen.requests == []


def test_an_unusable_consul_ca_file_is_a_start_error(tmp_path: Path) -> None:
    """--consul-ca-file that holds no certificate: a ConfigError naming the flag."""
    ca = tmp_path / "ca.pem"
    ca.write_text("nothing\n")
    with pytest.raises(ConfigError, match=r"--consul-ca-file: .* holds no usable PEM"):
        flags("https://127.0.0.1:8501", ca=ca)()


# --- 403 ---------------------------------------------------------------------------------------


def test_a_403_is_consul_denied_naming_the_token_source_not_the_token(
    agent: tuple[str, Seen, FakeConsul], tmp_path: Path
) -> None:
    """A refused call says "consul: permission denied", where the token came from, the call,
    and Consul's words (the missing permission); never the token."""
    url, _, fake = agent
    token = tmp_path / "token"
    token.write_text(FILE_TOKEN + "\n")
    fake.refusal = DENIED
    with pytest.raises(ConsulDenied) as denied:
        ConsulAPI(flags(url, token_file=token)()).create_session("me", 10, [])
    text = str(denied.value)
    assert text.startswith(
        f"consul: permission denied (token from --consul-token-file {token}) for session.create"
    )
    assert "lacks permission 'session:write'" in text
    assert FILE_TOKEN not in text


def test_an_unknown_token_is_said_to_be_unknown(agent: tuple[str, Seen, FakeConsul]) -> None:
    """Consul's "ACL not found" (a token it does not know) is spelt out."""
    url, _, fake = agent
    fake.refusal = b"ACL not found"
    with pytest.raises(ConsulDenied, match=r"\(no token\) .* ACL not found \(Consul does not"):
        ConsulAPI(flags(url)()).get_prefix("x/")


def test_a_refused_replica_falls_back_to_local_verdicts_and_says_so_once(
    agent: tuple[str, Seen, FakeConsul],
) -> None:
    """Every call refused (a token without the policy): one consul_permission_denied per kind
    of call, the verdict source is local, the verdicts are the replica's own probes, nothing
    crashes; once Consul accepts the calls the replica goes back to the shared verdict."""
    url, _, fake = agent
    fake.refusal = DENIED
    local = HealthChecker({}, interval=0.2, timeout=0.2, fall=1, rise=1)
    shared = SharedVerdict(
        ConsulSettings(address=url, advertise="127.0.0.1:8080"),
        local,
        {"influx-a": ClusterSource(api="v1", min_healthy=1, urls=("http://127.0.0.1:1",))},
        datacenter="dc1",
        replica="me",
    )
    with capture_logs() as events:
        shared.start()
        try:
            wait_until(lambda: shared.consul_errors >= 6, timeout=10, what="refused calls")
            assert shared.source == "local"
            wait_until(
                lambda: shared.verdict("influx-a").state is ClusterState.DOWN,
                timeout=5,
                what="the local probe's verdict",
            )
            denied = [e for e in events if e["event"] == "consul_permission_denied"]
            assert sorted(e["op"] for e in denied) == ["election", "register", "watch"]
            assert all("lacks permission 'session:write'" in e["reason"] for e in denied)
            assert all(e["reason"].startswith("consul: permission denied") for e in denied)
            fake.refusal = None
            wait_until(lambda: shared.source == "shared", timeout=15, what="shared again")
        finally:
            shared.stop()
    sources = [(e["from_state"], e["to_state"]) for e in events if e["event"] == "verdict_source"]
    assert sources == [("shared", "local"), ("local", "shared")]
    granted = {e["op"] for e in events if e["event"] == "consul_permission_granted"}
    assert {"watch", "election"} <= granted
