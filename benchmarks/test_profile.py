"""benchmarks.profile runs, for the fast model and its released formulation, so that it cannot rot."""

import pytest

from benchmarks import profile


@pytest.mark.parametrize("naive", [False, True], ids=["fast", "naive"])
def test_profile_table_lists_the_operators(naive):
    argv = ["--model", "crate_mini_patch4_28", "--batch", "2", "--steps", "1", "--rows", "5"]
    result = profile.main(argv + (["--naive"] if naive else []))
    title, summary, operators = _parts(result)
    expected = "crate_mini_patch4_28, train, batch 2, float32, eager"
    assert title.startswith(("naive " if naive else "") + expected)
    header, rule, row = summary.splitlines()
    assert header.startswith("| batch | images/s |") and row.startswith("| 2 | ")
    header, rule, *rows = operators.splitlines()
    assert rule == "|---|---|---|---|"
    assert header == "| operator | self time (ms) | share | calls |" and len(rows) == 5
    assert any("mm" in row for row in rows), "a transformer's profile without a matmul"


def _parts(result: str) -> tuple[str, str, str]:
    """The title, the per-batch summary and the operator table (its caption dropped)."""
    title, summary, caption, operators, *_ = result.split("\n\n")
    assert caption == "operators, batch 2:"
    return title, summary, operators


def test_profile_writes_each_batch_size_and_the_file(tmp_path):
    out = tmp_path / "profile.md"
    argv = ["--model", "crate_mini_patch4_28", "--batch", "2", "4", "--steps", "1", "--output", str(out)]
    result = profile.main(argv)
    assert out.read_text() == result + "\n"
    summary = result.split("\n\n")[1].splitlines()
    assert [row.split(" | ")[0] for row in summary[2:]] == ["| 2", "| 4"]


def test_profile_refuses_naive_for_other_models():
    with pytest.raises(SystemExit, match="no released formulation"):
        profile.main(["--model", "vit_mini_patch4_28", "--naive", "--steps", "1"])
