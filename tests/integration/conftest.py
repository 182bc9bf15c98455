"""Session fixtures: the real local stack, brought up once (or reused if already running)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack import stack
from devstack.toxiproxy import Toxiproxy


@pytest.fixture(scope="session")
def stack_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Endpoints of a running stack. Servers this session started are stopped at the end."""
    started = stack.up()  # raises StackError -> the test errors; it never skips
    yield stack.endpoints()
    if started and not request.config.getoption("--keep-stack"):
        stack.down(started)


@pytest.fixture(scope="session")
def secure_env(
    stack_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[dict[str, str]]:
    """The plain endpoints and the secured stack's (``stack.secure_env()``: CA and certificate
    files, Kafka's SASL_SSL and SSL listeners, influx-s, consul-acl, users and secret files).
    The secured servers this session started are stopped at the end."""
    started = stack.up(secure=True)
    yield {**stack_env, **stack.secure_env()}
    if started and not request.config.getoption("--keep-stack"):
        stack.down(started)


@pytest.fixture
def toxiproxy(stack_env: dict[str, str]) -> Iterator[Toxiproxy]:
    """A Toxiproxy client; every proxy is enabled and toxic-free before and after the test."""
    client = Toxiproxy(stack_env["TOXIPROXY_URL"])
    client.reset()
    yield client
    client.reset()
    client.close()
