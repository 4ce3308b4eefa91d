"""benchmarks.profile runs, for the fast model and its released formulation, so that it cannot rot."""

import pytest

from benchmarks import profile


@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_profile_table_lists_the_operators(naive):
    argv = ["--model", "crate_mini_patch4_28", "--batch", "2", "--steps", "1", "--rows", "5"]
    result = profile.main(argv + (["--naive"] if naive else []))
    title, _, header, rule, *rows = result.splitlines()
    assert rule == "|---|---|---|---|"
    assert title.startswith(("naive " if naive else "") + "crate_mini_patch4_28, train, batch 2, float32")
    assert header == "| operator | self time (ms) | share | calls |" and len(rows) == 5
    assert any("mm" in row for row in rows), "a transformer's profile without a matmul"


def test_profile_refuses_naive_for_other_models():
    with pytest.raises(SystemExit, match="no released formulation"):
        profile.main(["--model", "vit_mini_patch4_28", "--naive", "--steps", "1"])
