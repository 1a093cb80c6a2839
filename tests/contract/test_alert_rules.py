"""The shipped Prometheus alerts (infra/prometheus/): valid for Prometheus, each one silent and
firing where it must (promtool's own rule tests), and written against metrics, labels, ports
and runbook sections that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infra.docs import ROLE_METRICS, role_metrics, samples

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "infra" / "prometheus"
TARGET_LABELS = {"job", "instance", "le"}  # added by Prometheus, or a histogram's bucket bound


def promtool(*args: str) -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: `make test` installs it (Debian package prometheus)")
    done = subprocess.run([binary, *args], cwd=RULES, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def exported() -> dict[str, set[str]]:
    """Every sample name the roles export → the label names it carries."""
    return {sample: set(labels) for role in ROLE_METRICS
            for name, kind, labels, _ in role_metrics(role) for sample in samples(name, kind)}


def expressions() -> dict[str, str]:
    """Alert name → its expression (one line each in alerts.yml)."""
    text = (RULES / "alerts.yml").read_text()
    names = re.findall(r"^\s+- alert: (\w+)$", text, re.M)
    exprs = re.findall(r"^\s+expr: (.+)$", text, re.M)
    assert len(names) == len(exprs) > 0
    return dict(zip(names, exprs))


def test_rules_and_config_are_valid_for_prometheus():
    rules = promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(expressions())} rules found" in rules
    promtool("check", "config", "prometheus.yml")


def test_each_alert_fires_and_stays_silent_where_it_must():
    promtool("test", "rules", "alerts.test.yml")
    tested = set(re.findall(r"alertname: (\w+)", (RULES / "alerts.test.yml").read_text()))
    assert tested == set(expressions())  # no alert without its test
    documented = (ROOT / "docs" / "reliability.md").read_text()
    assert [a for a in expressions() if f"| `{a}` |" not in documented] == []


def test_alerts_read_metrics_and_labels_that_exist():
    metrics = exported()
    for alert, expr in expressions().items():
        used = re.findall(r"\b(streamrec_\w+)(\{[^}]*\})?", expr)
        assert used or "up{" in expr, alert
        for name, matchers in used:
            assert name in metrics, f"{alert}: {name} is not exported"
            labels = set(re.findall(r"(\w+)\s*(?:=~|!=|!~|=)", matchers))
            assert labels <= metrics[name] | TARGET_LABELS, f"{alert}: {name}{matchers}"
        for grouping in re.findall(r"\bby \(([^)]*)\)", expr):
            names = {label.strip() for label in grouping.split(",")}
            assert names <= set().union(*(metrics[n] for n, _ in used)) | TARGET_LABELS, alert


def test_scrape_ports_match_the_compose_stack_and_runbooks_exist():
    compose = (ROOT / "docker-compose.yml").read_text()
    config = (RULES / "prometheus.yml").read_text()
    jobs = dict(re.findall(r"- job_name: ([\w-]+)\n((?:\s{4,}.*\n?)*)", config))
    ports = {role: re.findall(rf'STREAMREC_{role}_METRICS_PORT: "(\d+)"', compose)
             for role in ("WORKER", "API", "FEEDS", "TRAINER")}
    assert all(ports.values()) and len(set(ports["TRAINER"])) == 1, ports  # both trainers
    assert re.search(rf"names: \[worker\]\s+type: A\s+port: {ports['WORKER'][0]}\b",
                     jobs["streamrec-worker"]), jobs
    assert re.search(rf"names: \[trainer, trainer-seq\]\s+type: A\s+port: "
                     rf"{ports['TRAINER'][0]}\b", jobs["streamrec-trainer"]), jobs
    assert f'targets: ["api:{ports["API"][0]}"]' in jobs["streamrec-api"], jobs
    assert f'targets: ["feeds:{ports["FEEDS"][0]}"]' in jobs["streamrec-feeds"], jobs
    for path, anchor in re.findall(r"runbook: ([\w/.-]+\.md)(?:#([\w-]+))?",
                                   (RULES / "alerts.yml").read_text()):
        doc = (ROOT / path).read_text()
        headings = {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
                    for line in doc.splitlines() if line.startswith("#")}
        assert not anchor or anchor in headings, f"{path}#{anchor}"
