"""The deployment table's script runs (benchmarks/deployment.py), so that it cannot rot."""

from benchmarks import deployment


def test_table_has_a_row_per_model_and_a_column_per_form():
    table = deployment.main(["--models", "crate_mini_patch4_28@8", "--forms", "fx", "script", "--batch", "1"])
    header, rule, row = table.splitlines()
    assert header == "| model | fx | script |" and rule == "|---|---|---|"
    assert row.startswith("| `crate_mini_patch4_28@8` | 0.0e+00 (1.00) | ")
