import pytest

from infra.docs import DOCS, GENERATED


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_docs_are_current(name):
    assert (DOCS / name).read_text() == GENERATED[name](), "run `make docs`"
