"""Options shared by every test directory."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--keep-stack",
        action="store_true",
        help="leave the servers this session started running (faster reruns)",
    )
