"""``streamrec replay``: the machine-readable contract, on a slice of the shared log."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA

YOOCHOOSE = SHARED_DATA / "yoochoose-rsc15-100k" / "yoochoose-clicks-100k_train_full.txt"


@pytest.mark.skipif(not YOOCHOOSE.exists(), reason="../shared/data absent (outside the team)")
@pytest.mark.parametrize("protocol", ["session", "prequential"])
def test_replay_writes_results_and_report(tmp_path, protocol):
    sample = tmp_path / "slice.txt"
    lines = YOOCHOOSE.read_text().splitlines()[:8001]
    sample.write_text("\n".join(lines) + "\n")
    out, html = tmp_path / "results.json", tmp_path / "report.html"
    run = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "--data", str(sample),
                          "--format", "yoochoose", "--protocol", protocol, "--models",
                          "session,cooc,mf", "--out", str(out), "--html", str(html),
                          "--test-days", "1", "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert {"session", "cooc", "mf", "random", "popularity"} <= set(results)
    for name in ("session", "cooc", "mf", "popularity", "random"):
        for key in ("HR@20", "MRR@20", "HR@10", "MRR@10", "NDCG@10", "Precision@20",
                    "Recall@20", "MAP@20", "coverage", "novelty", "ILD", "ARP",
                    "exposure_gini", "events_per_s", "predictions_per_s"):
            assert key in results[name], (name, key)
    assert results["session"]["HR@20"] > results["popularity"]["HR@20"] > \
        results["random"]["HR@20"]
    assert "| session |" in run.stdout and "<svg" in html.read_text()


def test_replay_bad_format_is_a_clear_error(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("nothing\n")
    run = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "--data", str(path),
                          "--format", "nope", "--quiet"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "unknown format 'nope'" in run.stderr


@pytest.mark.skipif(not YOOCHOOSE.exists(), reason="../shared/data absent (outside the team)")
def test_replay_of_every_model_exits_0_three_times(tmp_path):
    """The blend keeps an HNSW index rebuilt on a background thread: a rebuild still inside
    hnswlib at interpreter exit used to abort the process (exit 134) after the results were
    written. Every model, three runs in a row, each must exit 0."""
    sample = tmp_path / "slice.txt"
    sample.write_text("\n".join(YOOCHOOSE.read_text().splitlines()[:12001]) + "\n")
    for attempt in range(3):
        out = tmp_path / f"results-{attempt}.json"
        run = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "--data", str(sample),
                              "--models", "all", "--out", str(out), "--quiet"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (attempt, run.returncode, run.stderr[-2000:])
        assert "terminate called" not in run.stderr
        assert set(json.loads(out.read_text())) >= {"blend", "blend_raw", "river_mf", "session"}
