"""Options shared by every test directory, and the stack of each pytest-xdist worker.

``./dev test`` runs the suite in two worker processes (``-n 2 --dist loadfile``: a module's
tests stay on one worker). Integration tests cut clusters with Toxiproxy and stop servers, so
two workers must never share a stack: worker ``gwN`` (N > 0) gets a stack of its own, its
ports shifted by 500 x N from ``FROUTER_PORT_OFFSET`` and its data in ``FROUTER_STACK_DIR`` +
``-gwN``; ``gw0`` uses the stack ``./dev stack up`` starts.
"""

from __future__ import annotations

import os

import pytest

from devstack import stack

WORKER_PORT_STEP = 500  # no port of one stack lands on another's (see devstack.stack.ports)


def pytest_configure(config: pytest.Config) -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    n = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    if n > 0:
        base = int(os.environ.get("FROUTER_PORT_OFFSET", "0") or 0)
        os.environ["FROUTER_PORT_OFFSET"] = str(base + WORKER_PORT_STEP * n)
        os.environ["FROUTER_STACK_DIR"] = f"{stack.stack_dir()}-{worker}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--keep-stack",
        action="store_true",
        help="leave the servers this session started running (faster reruns)",
    )
