"""Progress output that suits a log; installs that match the lock file."""

import io
import re
from importlib.metadata import version

from infra.progress import progress
from tests.conftest import ROOT


def test_progress_off_a_terminal_writes_plain_lines():
    out = io.StringIO()  # not a terminal
    with progress(10_000, "replay", file=out) as bar:
        for _ in range(100):
            bar.update(100)
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3  # the first, maybe one more, the last: not one per update
    assert "10000/10000" in lines[-1] and lines[-1].startswith("replay")


def test_installed_packages_are_the_locked_versions():
    """make setup installs requirements/dev.txt: the environment tests run in is the locked one
    (the JSON Schema and every figure depend on these versions)."""
    locked = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)",
                             (ROOT / "requirements" / "dev.txt").read_text(), re.M))
    for name in ("msgspec", "numpy", "hnswlib", "redis", "faust-streaming", "aiokafka",
                 "fastapi", "pydantic"):
        assert version(name) == locked[name], f"{name}: installed {version(name)}, locked " \
                                              f"{locked[name]}: run `make setup`"
    runtime = (ROOT / "requirements" / "runtime.txt").read_text()
    for name, pinned in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", runtime, re.M):
        assert locked.get(name) == pinned, f"{name}: runtime lock and dev lock disagree"
