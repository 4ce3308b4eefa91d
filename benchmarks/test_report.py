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


def _train_run(size: str, crate: float, vit: float, memory: float, compiled: float | None = None) -> dict:
    """A training run's extra_info: eager CRATE and ViT at these images/s (utilisation 0.2), and
    optionally compiled rows at ``compiled`` × the eager images/s (utilisation likewise)."""

    def row(family, kind, images, utilisation=0.2):
        return dict(
            MODEL,
            family=family,
            kind=kind,
            parameters=1,
            images_per_s=dict(min=images, median=images, max=images),
            utilisation=utilisation,
            peak_memory_mib=memory,
        )

    models = [row("crate", "fast", crate), row("vit", "fast", vit)]
    ratios = [dict(SPREAD, family="crate", fast_over=o) for o in ("naive", "vit")]
    if compiled:
        models += [row("crate", "compiled", crate * compiled, 0.2 * compiled), row("vit", "compiled", vit)]
        models[-2]["first_step_s"] = 21.0
        ratios += [dict(SPREAD, family="crate", kind="compiled", fast_over=o) for o in ("eager", "vit")]
        ratios.append(dict(SPREAD, family="vit", kind="compiled", fast_over="eager"))
    models.append(row("crate", "naive", crate / 2))
    return dict(
        size=size,
        mode="train",
        batch=256,
        device="GPU",
        matmul_peak_gflops=100.0,
        models=models,
        ratios=ratios,
    )


def test_goals_are_met_or_missed_from_the_measured_rows():
    """Each goal from the run's own rows, the best of eager and compiled: CRATE-S 1.6× ViT-S (met),
    CRATE-T 1.2× (missed), CRATE-B at 20% × 1.6 = 32% (met), memory over S's limit (missed)."""
    runs = [
        _train_run("tiny", 1200.0, 1000.0, 4000.0),
        _train_run("small", 1000.0, 1000.0, 7000.0, compiled=1.6),
        _train_run("base", 500.0, 400.0, 7000.0, compiled=1.6),
    ]
    table = report.goals_table([dict(extra_info=info) for info in runs])
    assert "| CRATE-S / ViT-S/16 training images/s ≥ 1.5 | 1.60 (compiled 1600 / eager 1000) | met |" in table
    assert "| CRATE-T / ViT-T/16 training images/s ≥ 1.3 | 1.20 (eager 1200 / eager 1000) | MISSED |" in table
    assert "| CRATE-B/16 training at ≥ 30% of the matmul peak | 32.0% (compiled) | met |" in table
    assert (
        "| CRATE-S training step memory ≤ 6011 MiB (2026-11-27's) | 7000 MiB (compiled) | MISSED |" in table
    )
    assert "| CRATE-T training step memory ≤ 4090 MiB (2026-11-27's) | 4000 MiB (eager) | met |" in table
    assert "CRATE-α" not in table  # no CRATE-α row measured: no verdict


def test_compiled_rows_get_their_own_ratio_table():
    """Compiled over eager, over the compiled ViT, and the compile's seconds, per family."""
    table = report.throughput_table([dict(extra_info=_train_run("small", 1000.0, 900.0, 10.0, compiled=1.5))])
    assert "| small | train | CRATE | compiled | 0.0M | 1500.0 (1500.0–1500.0) |" in table
    assert "| small | train | ViT | timm compiled |" in table
    assert "| small | train | CRATE | 2.00 (1.00–3.00) | 2.00 (1.00–3.00) | 21 |" in table
    assert "| small | train | ViT | 2.00 (1.00–3.00) | n/a | n/a |" in table


def test_choices_mark_the_fastest_admissible_candidate():
    entry = dict(milliseconds=SPREAD, time_over_first=SPREAD, first_call_s=1.0)
    info = dict(
        choice="SDPA backend",
        shapes="CRATE-T",
        candidates={"flash": dict(entry, holds=True), "auto": dict(entry, holds=None)},
        unavailable={"cudnn": "No available kernel"},
        chosen="flash",
    )
    table = report.choices_table([dict(extra_info=info)])
    assert (
        "| SDPA backend | CRATE-T | flash | 2.00 (1.00–3.00) | 2.00 (1.00–3.00) | 1.0 | holds | ← |" in table
    )
    assert "| SDPA backend | CRATE-T | auto | 2.00 (1.00–3.00) | 2.00 (1.00–3.00) | 1.0 | n/a |  |" in table
    assert "| SDPA backend | CRATE-T | cudnn | does not run: No available kernel | | | | |" in table


def test_kernel_table_compares_each_form_with_sdpa():
    info = dict(
        block="MSSA attention kernel",
        model="CRATE-T",
        mode="train",
        batch=256,
        heads=6,
        tokens=197,
        head_dim=64,
        milliseconds={"SDPA": 2.0, "kernel (row blocks)": 1.0},
        tflops={"SDPA": 10.0, "kernel (row blocks)": 20.0},
        peak_memory_mib={"SDPA": 300.0, "kernel (row blocks)": 100.0},
    )
    table = report.kernel_table([dict(extra_info=info)])
    shapes = "| CRATE-T (256×6×197×64) | train"
    assert f"{shapes} | kernel (row blocks) | 1.000 | 20.0 | 2.00 | 100 | 200 |" in table
    assert f"{shapes} | SDPA | 2.000 | 10.0 | 1.00 | 300 | 0 |" in table


def test_end_to_end_rows_give_each_folder_input_against_synthetic():
    info = dict(
        pipeline_recipe="paper (crop + flip)",
        end_to_end_model="crate_base_patch16_224",
        device="NVIDIA H100",
        batch=256,
        loader_workers=16,
        end_to_end_images_per_s=dict(synthetic=SPREAD, synchronous=SPREAD, prefetched=SPREAD),
        over_synthetic=dict(synchronous=dict(min=0.8, median=0.85, max=0.87), prefetched=SPREAD),
        goal_met=dict(synchronous=False, prefetched=True),
    )
    table = report.pipeline_table([dict(extra_info=info)])
    assert "| synthetic input, on the device | 2 (1–3) | 1 |  |" in table
    assert "between the steps | 2 (1–3) | 0.85 (0.80–0.87) | MISSED |" in table
    assert "(a thread; CUDA: a side stream) | 2 (1–3) | 2.00 (1.00–3.00) | met |" in table
