"""The report reads both JSON layouts (this version's, and the earlier CRATE-only one of
benchmarks/results/cpu-2026-11-26.json), so the tables cannot rot with the benchmarks."""

from pathlib import Path

from benchmarks import report

SPREAD = dict(min=1.0, median=2.0, max=3.0)
MODEL = dict(images_per_s=SPREAD, gflops_per_image=1.0, utilisation=0.5, peak_memory_mib=10.0)


def test_tables_from_this_versions_layout():
    models = [
        dict(MODEL, family=family, kind=kind, parameters=72_328_936)
        for family, kind in [("crate", "fast"), ("crate", "naive"), ("crate_alpha", "fast"), ("vit", "fast")]
    ]
    ratios = [dict(SPREAD, family=f, fast_over=o) for f in ("crate", "crate_alpha") for o in ("naive", "vit")]
    info = dict(size="base", mode="train", models=models, ratios=ratios)
    forms = dict(
        block="ODL",
        model="CRATE-α-B/16",
        batch=8,
        tokens=197,
        dim=768,
        atoms=3072,
        mode="train",
        fast_form="a",
        milliseconds={"a": SPREAD, "b": SPREAD},
        gflops_per_call={"a": 1.0, "b": 2.0},
        time_over_fast={"a": SPREAD, "b": SPREAD},
    )
    benchmarks = [dict(extra_info=info), dict(extra_info=forms)]
    throughput = report.throughput_table(benchmarks)
    assert "| base | train | CRATE-α | fast | 72.3M | 2.0 (1.0–3.0) | 1.00 | 50.0% | 10 |" in throughput
    assert "| base | train | CRATE-α | 2.00 (1.00–3.00) | n/a | 2.00 (1.00–3.00) |" in throughput
    models[1]["gflops_per_image"] = 1.45  # the naive CRATE's FLOPs over the fast one's: 1.45
    assert "| base | train | CRATE | 2.00 (1.00–3.00) | 1.45 | 2.00 (1.00–3.00) |" in report.throughput_table(
        benchmarks
    )
    assert "| ODL (CRATE-α-B/16: 8×197 tokens, d 768, 3072 atoms) | train | b |" in report.forms_table(
        benchmarks
    )


def test_tables_from_the_earlier_layout(capsys):
    path = Path(__file__).parent / "results" / "cpu-2026-11-26.json"
    report.main([str(path)])
    out = capsys.readouterr().out
    assert "| base | train | CRATE | 1.31 (1.18–1.54) | 1.37 | 2.82 (2.23–2.96) |" in out
    assert "| ISTA (CRATE-T) | inference | three matmuls (official) | 6.95 | n/a | 2.30 |" in out


def test_utilisation_is_against_the_runs_best_matmul_peak():
    """A test that measured a lower peak (a slow moment) is reported against the run's best."""
    model = dict(MODEL, family="crate", kind="fast", parameters=1)
    early = dict(size="tiny", mode="train", models=[model], ratios=[], matmul_peak_gflops=100.0)
    late = dict(early, size="small", matmul_peak_gflops=200.0)
    table = report.throughput_table([dict(extra_info=early), dict(extra_info=late)])
    assert "| tiny | train | CRATE | fast | 0.0M | 2.0 (1.0–3.0) | 1.00 | 25.0% | 10 |" in table
    assert "| small | train | CRATE | fast | 0.0M | 2.0 (1.0–3.0) | 1.00 | 50.0% | 10 |" in table
