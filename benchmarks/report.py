"""Print the benchmark tables (Markdown) from a pytest-benchmark JSON file.

python -m benchmarks.report benchmarks/results/cpu-2026-11-26.json
python -m benchmarks.report RUN.json RUN-choices.json     # one GPU run's files (benchmarks/run_gpu.sh)

Reads this version's JSON (models grouped by family: CRATE, CRATE-α, ViT) and the earlier one (fast,
naive and ViT keys of CRATE alone; ISTA forms without ranges).
"""

import argparse
import json
from pathlib import Path

FAMILY = {"crate": "CRATE", "crate_alpha": "CRATE-α", "vit": "ViT"}
KERNEL_BLOCK = "MSSA attention kernel"  # benchmarks/test_attention_kernel.py
KIND = {"fast": "fast", "naive": "naive (released code)", "compiled": "compiled"}


def _range(entry: dict | float, digits: int = 2) -> str:
    if not isinstance(entry, dict):  # an earlier JSON: the median alone
        return f"{entry:.{digits}f}"
    return f"{entry['median']:.{digits}f} ({entry['min']:.{digits}f}–{entry['max']:.{digits}f})"


def throughput_entries(info: dict) -> tuple[list[dict], list[dict]] | None:
    """(models, ratios) of one interleaved run, from either JSON layout; None if not a throughput run."""
    if "models" in info:
        return info["models"], info["ratios"]
    if "fast_over_naive" not in info:
        return None
    models = [dict(info[kind], family=family, kind=kind) for family, kind in _EARLIER_MODELS]
    ratios = [dict(info[f"fast_over_{other}"], family="crate", fast_over=other) for other in ("naive", "vit")]
    return models, ratios


_EARLIER_MODELS = (("crate", "fast"), ("crate", "naive"), ("vit", "vit"))


def throughput_table(benchmarks: list[dict]) -> str:
    lines = [
        "| size | mode | family | model | parameters | images/s median (min–max) | GFLOP/img "
        "| FLOP utilisation | peak memory MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = [
        "| size | mode | family | fast / naive (min–max) | naive FLOPs / fast FLOPs "
        "(the speed-up at equal FLOP/s) | fast / ViT (min–max) |",
        "|---|---|---|---|---|---|",
    ]
    compiled_ratios = [
        "| size | mode | family | compiled / eager step (min–max) | compiled / compiled ViT (min–max) "
        "| first step s (compiling) |",
        "|---|---|---|---|---|---|",
    ]
    run_peak = run_matmul_peak(benchmarks)
    for bench in benchmarks:
        info = bench["extra_info"]
        entries = throughput_entries(info)
        if entries is None:
            continue
        models, run_ratios = entries
        rescale = info["matmul_peak_gflops"] / run_peak if run_peak and "matmul_peak_gflops" in info else 1.0
        for model in models:
            memory, parameters = model["peak_memory_mib"], model.get("parameters")
            utilisation = model["utilisation"] * rescale
            if model["family"] == "vit":
                kind = "timm" + (" compiled" if model["kind"] == "compiled" else "")
            else:
                kind = KIND[model["kind"]]
            lines.append(
                f"| {info['size']} | {info['mode']} | {FAMILY[model['family']]} | {kind} | "
                f"{'n/a' if parameters is None else f'{parameters / 1e6:.1f}M'} | "
                f"{_range(model['images_per_s'], 1)} | {model['gflops_per_image']:.2f} | "
                f"{100 * utilisation:.1f}% | {'n/a' if memory is None else f'{memory:.0f}'} |"
            )
        by_family: dict[str, dict] = {}
        for ratio in run_ratios:
            if ratio.get("kind", "fast") == "fast":
                by_family.setdefault(ratio["family"], {})[ratio["fast_over"]] = ratio
        for family, over in by_family.items():
            ratios.append(
                f"| {info['size']} | {info['mode']} | {FAMILY[family]} | "
                f"{_range(over['naive'])} | {_flop_ratio(models, family)} | {_range(over['vit'])} |"
            )
        compiled_ratios += _compiled_rows(info, models, run_ratios)
    tables = [*lines, "", *ratios]
    if len(compiled_ratios) > 2:
        tables += ["", *compiled_ratios]
    return "\n".join(tables)


def _compiled_rows(info: dict, models: list[dict], run_ratios: list[dict]) -> list[str]:
    """Per family: the compiled step over the eager one, over the compiled ViT, and its first step
    (the compile) in seconds."""
    first = {m["family"]: m.get("first_step_s") for m in models if m["kind"] == "compiled"}
    over: dict[str, dict] = {}
    for ratio in run_ratios:
        if ratio.get("kind") == "compiled":
            over.setdefault(ratio["family"], {})[ratio["fast_over"]] = ratio
    rows = []
    for family, entries in over.items():
        vit = _range(entries["vit"]) if "vit" in entries else "n/a"
        seconds = f"{first[family]:.0f}" if first.get(family) is not None else "n/a"
        rows.append(
            f"| {info['size']} | {info['mode']} | {FAMILY[family]} | {_range(entries['eager'])} | {vit} "
            f"| {seconds} |"
        )
    return rows


def run_matmul_peak(benchmarks: list[dict]) -> float | None:
    """The best matmul rate measured in the run: every utilisation is reported against it (each test
    recorded it against the best measured up to then)."""
    peaks = [
        b["extra_info"]["matmul_peak_gflops"] for b in benchmarks if "matmul_peak_gflops" in b["extra_info"]
    ]
    return max(peaks, default=None)


def _flop_ratio(models: list[dict], family: str) -> str:
    """The naive formulation's FLOPs per image over the fast model's ("n/a" where one is missing)."""
    gflops = {model["kind"]: model["gflops_per_image"] for model in models if model["family"] == family}
    return f"{gflops['naive'] / gflops['fast']:.2f}" if {"naive", "fast"} <= gflops.keys() else "n/a"


def forms_table(benchmarks: list[dict]) -> str:
    """The blocks' forms (ISTA, ODL, MSSA attention): ms per call, GFLOP per call (where recorded), each
    form's time over the fast model's form (per-round ratios; >1: the fast form is faster) and, for
    the attention, the bytes autograd keeps for the backward."""
    lines = [
        "| block (shapes) | mode | form | ms per call median (min–max) | GFLOP per call "
        "| time / fast form, median (min–max) | saved for backward (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in benchmarks:
        info = bench["extra_info"]
        if "milliseconds" not in info or info.get("block") == KERNEL_BLOCK:  # kernel_table's
            continue
        block = info.get("block", "ISTA")
        if "batch" in info:
            atoms = f", {info['atoms']} atoms" if "atoms" in info else ""
            width = f"d {info['dim']}" if "dim" in info else f"{info['heads']} heads of {info['head_dim']}"
            shapes = f"{info['model']}: {info['batch']}×{info['tokens']} tokens, {width}{atoms}"
        else:
            shapes = "CRATE-T"
        names = list(info["milliseconds"])
        fast = info.get("fast_form", names[0])
        over = info.get("time_over_fast") or {
            name: _median(info["milliseconds"][name]) / _median(info["milliseconds"][fast]) for name in names
        }
        gflops, saved = info.get("gflops_per_call", {}), info.get("saved_mib", {})
        for name in names:
            flops = f"{gflops[name]:.2f}" if name in gflops else "n/a"
            kept = f"{saved[name]:.1f}" if name in saved and info["mode"] == "train" else "n/a"
            lines.append(
                f"| {block} ({shapes}) | {info['mode']} | {name} | {_range(info['milliseconds'][name])} | "
                f"{flops} | {_range(over[name])} | {kept} |"
            )
    return "\n".join(lines)


def _median(entry: dict | float) -> float:
    return entry["median"] if isinstance(entry, dict) else entry


def options_table(benchmarks: list[dict]) -> str:
    lines = [
        "| option (CRATE-T; in the run's precision, bf16 autocast against float32) | mode "
        "| speed-up over the default, median (min–max) |",
        "|---|---|---|",
    ]
    for bench in benchmarks:
        info = bench["extra_info"]
        if "option" in info:
            lines.append(f"| {info['option']} | {info['mode']} | {_range(info['speedup'])} |")
    return "\n".join(lines)


def loading_table(benchmarks: list[dict]) -> str:
    """Decode + augment images/s of one loader worker (one process, one thread), per recipe."""
    lines = [
        "| transform (224² output, generated ~100 KB JPEGs) | images/s per worker, median (min–max) |",
        "|---|---|",
    ]
    for bench in benchmarks:
        info = bench["extra_info"]
        if "images_per_s_per_worker" in info:
            lines.append(f"| {info['recipe']} | {_range(info['images_per_s_per_worker'], 1)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


# the goals (22): one GPU, bf16, batch 256, 224², each model at its best setting (eager or
# compiled) in the same run; the memory limits are the eager training steps' of the 2026-11-27 H100 run
SPEED_GOALS = (("small", 1.5), ("tiny", 1.3))  # CRATE images/s over ViT's of the size, at least
UTILISATION_GOALS = (("crate", 0.30), ("crate_alpha", 0.40))  # at base, of the run's matmul peak
MEMORY_LIMITS_MIB = {"tiny": 4090, "small": 6011, "base": 7974}  # CRATE's training step, at most


def _best(models: list[dict], family: str) -> dict | None:
    """The family's fastest row among its fast (eager) and compiled ones."""
    rows = [m for m in models if m["family"] == family and m["kind"] in ("fast", "compiled")]
    return max(rows, key=lambda m: _median(m["images_per_s"]), default=None)


def goals_table(benchmarks: list[dict]) -> str:
    """Each goal of the issue, met or missed, from this run's training rows (absent rows: not
    measured); utilisation against the run's best matmul peak."""
    train = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        if info.get("mode") == "train" and "models" in info:
            train[info["size"]] = (info, info["models"])
    if not train:
        return ""
    run_peak = run_matmul_peak(benchmarks)
    some = next(iter(train.values()))[0]
    lines = [
        f"Goals (issue 22; this run: batch {some.get('batch', '?')}, {some.get('device', '?')}; each model's "
        "best of eager and compiled)",
        "",
        "| goal | measured | verdict |",
        "|---|---|---|",
    ]

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def label(row: dict) -> str:
        return "compiled" if row["kind"] == "compiled" else "eager"

    for size, goal in SPEED_GOALS:
        if size not in train:
            continue
        crate, vit = _best(train[size][1], "crate"), _best(train[size][1], "vit")
        ratio = _median(crate["images_per_s"]) / _median(vit["images_per_s"])
        lines.append(
            f"| CRATE-{size[0].upper()} / ViT-{size[0].upper()}/16 training images/s ≥ {goal} | {ratio:.2f} "
            f"({label(crate)} {_median(crate['images_per_s']):.0f} / {label(vit)} "
            f"{_median(vit['images_per_s']):.0f}) | {verdict(ratio >= goal)} |"
        )
    if "base" in train:
        info, models = train["base"]
        rescale = info["matmul_peak_gflops"] / run_peak if run_peak and "matmul_peak_gflops" in info else 1.0
        for family, goal in UTILISATION_GOALS:
            row = _best(models, family)
            if row is None:
                continue
            used = row["utilisation"] * rescale
            lines.append(
                f"| {FAMILY[family]}-B/16 training at ≥ {100 * goal:.0f}% of the matmul peak | "
                f"{100 * used:.1f}% ({label(row)}) | {verdict(used >= goal)} |"
            )
    for size, limit in MEMORY_LIMITS_MIB.items():
        row = _best(train[size][1], "crate") if size in train else None
        if row is None or row["peak_memory_mib"] is None:
            continue
        memory = row["peak_memory_mib"]
        lines.append(
            f"| CRATE-{size[0].upper()} training step memory ≤ {limit} MiB (2026-11-27's) | {memory:.0f} MiB "
            f"({label(row)}) | {verdict(memory <= limit)} |"
        )
    return "\n".join(lines)


def choices_table(benchmarks: list[dict]) -> str:
    """The measurements that choose a setting (benchmarks/test_compile_choices.py): each candidate's
    time (and, for SDPA and the kernel's tiles, whether it keeps the precision rule), and the candidates
    that do not run and why; the choice is the fastest that may run."""
    lines = [
        "| choice | shapes | candidate | ms per step median (min–max) | over the first candidate "
        "| first call s | rule | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bench in benchmarks:
        info = bench["extra_info"]
        if "candidates" not in info:
            continue
        chosen = info.get("chosen")
        for name, entry in info["candidates"].items():
            rule = {True: "holds", False: "BREAKS", None: "n/a"}[entry.get("holds")]
            first = entry.get("first_call_s")
            lines.append(
                f"| {info['choice']} | {info['shapes']} | {name} | {_range(entry['milliseconds'])} | "
                f"{_range(entry['time_over_first'])} | {'n/a' if first is None else f'{first:.1f}'} | "
                f"{rule} | {'←' if name == chosen else ''} |"
            )
        for name, why in info.get("unavailable", {}).items():
            lines.append(f"| {info['choice']} | {info['shapes']} | {name} | does not run: {why} | | | | |")
    return "\n".join(lines) if len(lines) > 2 else ""


def pipeline_table(benchmarks: list[dict]) -> str:
    """--data-pipeline cpu against gpu on an ImageNet-shaped JPEG folder: images/s per CPU core of each
    stage, the gpu pipeline's GPU share, and the end-to-end training row against synthetic input."""
    lines = []
    for bench in benchmarks:
        info = bench["extra_info"]
        recipe = info.get("pipeline_recipe")
        if "per_core" in info:
            rates = info["per_core"]
            worker, device = _median(rates["gpu_worker"]), _median(rates["gpu_on_cpu"])
            lines.append(
                f"| {recipe} | {_range(rates['cpu_worker'], 0)} | {_range(rates['gpu_worker'], 0)} | "
                f"{_range(rates['gpu_on_cpu'], 0)} | {1 / (1 / worker + 1 / device):.0f} |"
            )
    table = []
    if lines:
        table += [
            "| recipe (images/s per CPU core, median (min–max)) | cpu pipeline: worker decodes + augments "
            "| gpu pipeline: worker (bytes, header, draw) | gpu pipeline: decode + augment on device=cpu "
            "| gpu pipeline on the CPU, both |",
            "|---|---|---|---|---|",
            *lines,
        ]
    crops = [bench["extra_info"] for bench in benchmarks if "crop_form" in bench["extra_info"]]
    if crops:
        table += [
            "",
            f"| crop + resize to 224² ({crops[0]['device']}) | images/s | mean levels to PIL "
            "| share > 1 level | max |",
            "|---|---|---|---|---|",
        ]
        for info in crops:
            levels = info["levels_to_pil"]
            table.append(
                f"| {info['crop_form']} | {_range(info['crop_images_per_s'], 0)} | {levels['mean']:.2f} | "
                f"{levels['above_1']:.1%} | {levels['max']:.0f} |"
            )
    for bench in benchmarks:
        info = bench["extra_info"]
        if "gpu_images_per_s" in info:
            table.append(
                f"\ngpu pipeline, {info['pipeline_recipe']}, {info['device']}: decode + augment of a batch "
                f"of {info['batch']}: {_range(info['gpu_images_per_s'], 0)} images/s"
            )
        if "over_synthetic" in info:
            table += ["", *end_to_end_rows(info)]
    return "\n".join(table)


END_TO_END_INPUTS = {
    "synthetic": "synthetic input, on the device",
    "synchronous": "the folder, each batch decoded + augmented between the steps",
    "prefetched": "the folder, each batch prepared during the step before (a thread; CUDA: a side stream)",
}


def end_to_end_rows(info: dict) -> list[str]:
    """The end-to-end training rows of one recipe: images/s from synthetic input and from the folder,
    prepared between the steps or prefetched, each folder row against synthetic and the >= 0.9 goal."""
    rates, ratios = info["end_to_end_images_per_s"], info["over_synthetic"]
    rows = [
        f"| end to end: {info['end_to_end_model']}, {info['pipeline_recipe']}, {info['device']}, batch "
        f"{info['batch']}, {info['loader_workers']} loader workers | images/s | of synthetic "
        "| goal >= 0.90 |",
        "|---|---|---|---|",
    ]
    for name, label in END_TO_END_INPUTS.items():
        if name in ratios:
            against = f"{_range(ratios[name])} | {'met' if info['goal_met'][name] else 'MISSED'}"
        else:
            against = "1 | "
        rows.append(f"| {label} | {_range(rates[name], 0)} | {against} |")
    return rows


def kernel_table(benchmarks: list[dict]) -> str:
    """MSSA's attention block (benchmarks/test_attention_kernel.py): each form's time, TFLOP/s and peak
    memory, and its time and memory against SDPA's, the training path it would replace."""
    lines = [
        "| heads | mode | form | ms (median) | TFLOP/s | SDPA's time / this | peak memory MiB "
        "| memory saved against SDPA MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for bench in benchmarks:
        info = bench["extra_info"]
        if info.get("block") != KERNEL_BLOCK:
            continue
        shapes = f"{info['model']} ({info['batch']}×{info['heads']}×{info['tokens']}×{info['head_dim']})"
        sdpa_ms, sdpa_mib = info["milliseconds"]["SDPA"], info["peak_memory_mib"]["SDPA"]
        for form, ms in info["milliseconds"].items():
            mib = info["peak_memory_mib"][form]
            saved = "n/a" if mib is None or sdpa_mib is None else f"{sdpa_mib - mib:.0f}"
            lines.append(
                f"| {shapes} | {info['mode']} | {form} | {ms:.3f} | {info['tflops'][form]:.1f} | "
                f"{sdpa_ms / ms:.2f} | {'n/a' if mib is None else f'{mib:.0f}'} | {saved} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="one run's JSON files (their tables together)")
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.results]
    data = runs[0]
    benchmarks = [bench for run in runs for bench in run["benchmarks"]]
    device = next((b["extra_info"].get("device") for b in benchmarks if "device" in b["extra_info"]), "?")
    peak = run_matmul_peak(benchmarks)
    amp = next(
        (b["extra_info"]["amp"] for b in benchmarks if b["extra_info"].get("amp") in (True, False)), None
    )
    precision = {True: "; bf16 autocast", False: "; float32", None: ""}[amp]
    print(f"Device: {device}; run {data.get('datetime', '?')}{precision}")
    if peak:
        print(f"Measured matmul peak in this run (the best of its measurements): {peak:.0f} GFLOP/s\n")
    print(throughput_table(benchmarks))
    print()
    print(forms_table(benchmarks))
    print()
    print(options_table(benchmarks))
    tables = (loading_table, pipeline_table, kernel_table, choices_table, goals_table)
    for table in (make(benchmarks) for make in tables):
        if table:
            print()
            print(table)


if __name__ == "__main__":
    main()
