"""The chart's values schema knows exactly the topology keys the router knows, so a mistyped
topology key fails at `helm install` rather than in a crash-looping pod."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from router.topology import BatchConfig, ClusterConfig, HealthConfig, KafkaConfig, RouteConfig

SCHEMA = Path(__file__).resolve().parents[2] / "helm" / "failover-router" / "values.schema.json"


def _topology_schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA.read_text())
    return dict(schema["properties"]["topology"])


def _section(path: str) -> dict[str, Any]:
    node = _topology_schema()
    for part in path.split("."):
        if part == "*":
            node = node["additionalProperties"]
        elif part == "[]":
            node = node["items"]
        else:
            node = node["properties"][part]
    return node


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("kafka", KafkaConfig),
        ("clusters.*", ClusterConfig),
        ("routes.[]", RouteConfig),
        ("routes.[].batch", BatchConfig),
        ("health", HealthConfig),
    ],
)
def test_schema_section_has_the_model_fields(path: str, model: type[BaseModel]) -> None:
    """Each topology section of values.schema.json lists the model's fields, no more, no
    less, and refuses any other key."""
    section = _section(path)
    schema_keys, model_keys = set(section["properties"]), set(model.model_fields)
    assert schema_keys == model_keys, (
        f"topology.{path} in helm/failover-router/values.schema.json: add "
        f"{sorted(model_keys - schema_keys)}, drop {sorted(schema_keys - model_keys)}"
    )
    assert section["additionalProperties"] is False


def test_topology_top_level_leaves_datacenter_and_http_to_the_chart() -> None:
    """datacenter and http are set by the chart (--datacenter, --listen), not in values."""
    top = _topology_schema()
    assert set(top["properties"]) == {"kafka", "clusters", "routes", "health"}
    assert top["additionalProperties"] is False
