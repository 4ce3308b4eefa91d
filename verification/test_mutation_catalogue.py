"""The mutation catalogue is runnable: every text it replaces is in its file exactly once (else the
runner reports it STALE), names are unique (the runner reports by name) and every first test file
exists. Reads files only; no mutation is applied and no test is run."""

from collections import Counter
from pathlib import Path

import pytest

from verification.mutations.catalogue import TARGETS, entries

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("tests", "verification")


def _texts(text: str | tuple[str, ...]) -> tuple[str, ...]:
    return text if isinstance(text, tuple) else (text,)


@pytest.mark.parametrize(("target", "mutation"), entries(), ids=[f"{t.path}: {m.name}" for t, m in entries()])
def test_mutation_text_occurs_exactly_once_in_its_file(target, mutation):
    source = (ROOT / target.path).read_text()
    olds, news = _texts(mutation.old), _texts(mutation.new)
    assert len(olds) == len(news), f"{mutation.name}: {len(olds)} texts replaced by {len(news)}"
    for old, new in zip(olds, news, strict=True):
        assert source.count(old) == 1, f"{mutation.name}: {old!r} occurs {source.count(old)} times"
        assert old != new, f"{mutation.name}: {old!r} is replaced by itself"
        source = source.replace(old, new)


def test_mutation_names_are_unique():
    counts = Counter(mutation.name for _, mutation in entries())
    assert not [name for name, count in counts.items() if count > 1]


def test_each_file_is_one_target():
    counts = Counter(target.path for target in TARGETS)
    assert not [path for path, count in counts.items() if count > 1]


@pytest.mark.parametrize(
    ("target", "name"),
    [(target, name) for target in TARGETS for name in target.first],
    ids=[f"{target.path}: {name}" for target in TARGETS for name in target.first],
)
def test_first_test_file_exists_in_a_suite(target, name):
    assert any(found.is_file() for suite in SUITES for found in (ROOT / suite).rglob(name)), name
