"""Print the benchmark tables (Markdown) from a pytest-benchmark JSON file.

python -m benchmarks.report benchmarks/results/cpu-2026-11-26.json
"""

import argparse
import json
from pathlib import Path


def _range(entry: dict, digits: int = 2) -> str:
    return f"{entry['median']:.{digits}f} ({entry['min']:.{digits}f}–{entry['max']:.{digits}f})"


def throughput_table(benchmarks: list[dict]) -> str:
    lines = [
        "| size | mode | model | images/s median (min–max) | GFLOP/img | FLOP utilisation "
        "| peak memory MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = ["| size | mode | fast / naive (min–max) | fast / ViT (min–max) |", "|---|---|---|---|"]
    for bench in benchmarks:
        info = bench["extra_info"]
        if "fast_over_naive" not in info:
            continue
        for kind in ("fast", "naive", "vit"):
            model = info[kind]
            memory = model["peak_memory_mib"]
            lines.append(
                f"| {info['size']} | {info['mode']} | {kind} | {_range(model['images_per_s'], 1)} | "
                f"{model['gflops_per_image']:.2f} | {100 * model['utilisation']:.1f}% | "
                f"{'n/a' if memory is None else f'{memory:.0f}'} |"
            )
        naive, vit = _range(info["fast_over_naive"]), _range(info["fast_over_vit"])
        ratios.append(f"| {info['size']} | {info['mode']} | {naive} | {vit} |")
    return "\n".join([*lines, "", *ratios])


def options_table(benchmarks: list[dict]) -> str:
    lines = ["| option (CRATE-T) | mode | speed-up over the default, median (min–max) |", "|---|---|---|"]
    for bench in benchmarks:
        info = bench["extra_info"]
        if "option" in info:
            lines.append(f"| {info['option']} | {info['mode']} | {_range(info['speedup'])} |")
        if "speedup_over_official" in info:
            times = ", ".join(f"{name} {ms:.2f} ms" for name, ms in info["milliseconds"].items())
            speedup = info["speedup_over_official"]
            lines.append(
                f"| ISTA forms: {times} | {info['mode']} | one matmul over official {speedup:.2f}× |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    benchmarks = data["benchmarks"]
    device = next((b["extra_info"].get("device") for b in benchmarks if "device" in b["extra_info"]), "?")
    peak = next(
        (
            b["extra_info"]["matmul_peak_gflops"]
            for b in benchmarks
            if "matmul_peak_gflops" in b["extra_info"]
        ),
        None,
    )
    print(f"Device: {device}; run {data.get('datetime', '?')}")
    if peak:
        print(f"Measured matmul peak in this run: {peak:.0f} GFLOP/s\n")
    print(throughput_table(benchmarks))
    print()
    print(options_table(benchmarks))


if __name__ == "__main__":
    main()
