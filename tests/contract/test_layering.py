"""The flow stays visible: models are pure learners, infrastructure lives outside them."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Packages a model must never import (directly or inside a function): brokers, Redis and the
#: stream/state/serving layers built on them. (The ``blended`` registry entry builds a serving
#: pipeline for replay and is the one allowed exception: serving depends on models, and the
#: registry names it lazily.)
INFRASTRUCTURE = ("redis", "hiredis", "faust", "kafka", "aiokafka", "stream", "state", "infra")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "online_models").glob("*.py")),
                         ids=lambda p: p.name)
def test_online_models_import_no_infrastructure(path):
    assert not _imports(path) & set(INFRASTRUCTURE), path.name


def test_the_check_sees_an_import():
    assert "redis" in _imports(ROOT / "state" / "redis_store.py")
