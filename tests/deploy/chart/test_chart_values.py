"""values.schema.json and the docs' values reference are generated from swaserve/chart_values.py and
up to date; the schema is closed (a typo fails with its path); values.yaml says the model's defaults."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest
import yaml

from swaserve import chart_values
from swaserve.chart_values import SCHEMA_PATH, Values
from tests.deploy.chart.chart_render import CHART, chart


def test_committed_schema_is_the_generated_one() -> None:
    assert SCHEMA_PATH.read_text() == chart_values.schema_text(), (
        "values.schema.json is stale: run python -m swaserve.chart_values --write"
    )


def test_docs_reference_is_up_to_date() -> None:
    assert chart_values.main(["--check"]) == 0, "run python -m swaserve.chart_values --write"


def test_check_reports_a_stale_schema(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "values.schema.json"
    stale.write_text("{}\n")
    monkeypatch.setattr(chart_values, "SCHEMA_PATH", stale)
    assert chart_values.main(["--check"]) == 1


def _closed(node: Any, path: str, found: list[str]) -> None:
    if isinstance(node, dict):
        if "properties" in node and node.get("additionalProperties") is not False:
            found.append(path)
        for k, v in node.items():
            _closed(v, f"{path}/{k}", found)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _closed(v, f"{path}/{i}", found)


def test_every_object_with_properties_is_closed() -> None:
    open_objects: list[str] = []
    schema = json.loads(SCHEMA_PATH.read_text())
    _closed(schema, "", open_objects)
    assert open_objects == []
    assert schema["additionalProperties"] is False


def test_values_yaml_is_the_models_defaults() -> None:
    raw = yaml.safe_load((CHART / "values.yaml").read_text())
    expected = Values().model_dump(by_alias=True, exclude_none=True)
    expected["prefill"]["pools"] = [{"name": "all", "minTokens": 0, "maxTokens": 1 << 20}]
    assert raw == expected


@pytest.mark.parametrize(
    ("values", "where", "what"),
    [
        ({"router": {"replicass": 3}}, "/router", "'replicass' not allowed"),
        (
            {"prefill": {"defaults": {"engine": {"maxTotalToken": 1}}}},
            "/prefill/defaults/engine",
            "'maxTotalToken'",
        ),
        (
            {"prefill": {"pools": [{"name": "a", "minTokens": 0, "maxTokens": 8, "gpu": 1}]}},
            "/prefill/pools/0",
            "'gpu' not allowed",
        ),
        ({"gcache": {"memory": "lots"}}, "/gcache/memory", "does not match pattern"),
        ({"router": {"replicas": 1}}, "/router/replicas", "minimum"),
        ({"models": {"source": "s3"}}, "/models/source", "must be one of"),
        (
            {"prefill": {"pools": [{"name": "Short", "minTokens": 0, "maxTokens": 8}]}},
            "/prefill/pools/0/name",
            "",
        ),
        ({"prefill": {"pools": []}}, "/prefill/pools", ""),
        ({"monitoring": {"grafana": True}}, "/monitoring", "'grafana' not allowed"),
        (
            {"decode": {"tolerations": [{"key": "k", "operater": "Exists"}]}},
            "/decode/tolerations/0",
            "operater",
        ),
    ],
)
def test_a_typo_fails_with_its_path(values: dict[str, Any], where: str, what: str) -> None:
    with pytest.raises(helm.HelmValuesError) as e:
        chart().validate_schema(values)
    message = str(e.value)
    assert f"at '{where}'" in message and what in message, message
    with pytest.raises(ValueError):  # the settings model agrees with the schema it generated
        Values.model_validate(values)


def test_the_schema_accepts_every_example_and_the_model_agrees() -> None:
    for path in sorted((CHART / "examples").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        chart().validate_schema(values)
        Values.model_validate(values)
