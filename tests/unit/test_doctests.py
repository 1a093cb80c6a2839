"""The examples in module docstrings run as written (those marked +SKIP need services)."""

import doctest
import importlib

import pytest

MODULES = [
    "infra.embedded", "infra.settings", "online_models.mixture", "online_models.session",
    "online_models.signals", "online_models.store", "online_models.trending", "replay.metrics",
    "schemas.events", "schemas.impressions", "schemas.items", "schemas.keys", "schemas.vectors",
    "serving.ann", "serving.feeds", "stream.producer", "stream.simulator",
    "stream.vector_changes",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_every_module_with_examples_is_listed():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    with_examples = sorted(
        ".".join(path.relative_to(root).with_suffix("").parts)
        for package in ("infra", "online_models", "replay", "schemas", "serving", "state",
                        "stream")
        for path in (root / package).rglob("*.py") if ">>>" in path.read_text())
    assert with_examples == sorted(MODULES)
