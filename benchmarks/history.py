"""Throughput over commits: compare the newest benchmark run with the stored runs of the same
machine kind, and draw the history.

    python -m benchmarks.history                 # this machine kind's newest run; exit 1 on a regression
    python -m benchmarks.history --plot out.png  # also draw images/s and ratios per commit
    python -m benchmarks.history --kind "NVIDIA H100 80GB HBM3"  # another kind's

Runs are pytest-benchmark JSON files: those `make bench` and benchmarks/run_gpu.sh store with
pytest-benchmark's storage (benchmarks/history/<platform>/NNNN_<commit>_<date>.json) and the dated
ones in benchmarks/results/. A machine kind is the GPU's name, or the CPU's brand, core count and
whether it has native bf16 (avx512_bf16), since the ratios differ between those.

A ratio (fast/naive, fast/ViT, an option's speed-up, a block form's time over the fast form) has
regressed when it falls below the median of the earlier runs by more than its run-to-run spread:
the range of the earlier runs' values when there are at least two, else the newest run's own
per-round range (median − min).
"""

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.report import FAMILY, throughput_entries

ROOT = Path(__file__).resolve().parent
FOLDERS = (ROOT / "history", ROOT / "results")


@dataclass(frozen=True)
class Run:
    kind: str
    commit: str
    when: str
    ratios: dict[str, dict]  # name -> {median, min, max}
    images_per_s: dict[str, float]  # "size mode family" (fast models) -> median

    @property
    def label(self) -> str:
        return f"{self.commit[:7]} {self.when[:10]}"


def cpu_kind(cpu: dict) -> str:
    """From py-cpuinfo's fields, as pytest-benchmark stores them."""
    flags = set(cpu.get("flags", []))
    isa = "avx512_bf16" if "avx512_bf16" in flags else ("avx2" if "avx2" in flags else "no avx2")
    return f"{cpu.get('brand_raw', 'unknown CPU')}, {cpu.get('count', '?')} cores, {isa}"


def machine_kind(data: dict) -> str:
    devices = {b["extra_info"].get("device", "") for b in data["benchmarks"]}
    gpus = sorted(d for d in devices if d and not d.startswith("CPU"))
    return gpus[0] if gpus else cpu_kind(data["machine_info"].get("cpu", {}))


def this_machine_kind() -> str:
    import cpuinfo
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_kind(cpuinfo.get_cpu_info())


def _spread_entry(entry) -> dict:
    return entry if isinstance(entry, dict) else dict(median=entry, min=entry, max=entry)


def read_run(path: Path) -> Run | None:
    """The ratios and throughputs of one pytest-benchmark JSON file; None if it holds none."""
    data = json.loads(path.read_text())
    ratios, images = {}, {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("batch") == 2:  # a --bench-smoke run, never history
            return None
        entries = throughput_entries(info)
        if entries is not None:
            models, run_ratios = entries
            for r in run_ratios:
                kind = r.get("kind", "fast")
                other = {"naive": "naive", "vit": "ViT", "eager": "eager"}[r["fast_over"]]
                if kind == "compiled" and other == "ViT":
                    other = "ViT compiled"
                name = f"{info['size']} {info['mode']} {FAMILY[r['family']]} {kind}/{other}"
                ratios[name] = _spread_entry(r)
            for m in models:
                if m["kind"] == "compiled" or (m["kind"] == "fast" and m["family"] != "vit"):
                    compiled = " compiled" if m["kind"] == "compiled" else ""
                    name = f"{info['size']} {info['mode']} {FAMILY[m['family']]}{compiled}"
                    images[name] = _spread_entry(m["images_per_s"])["median"]
        elif "time_over_fast" in info:
            fast = info.get("fast_form")
            for form, entry in info["time_over_fast"].items():
                if form != fast:
                    ratios[f"{info.get('block', 'ISTA')} {info['mode']}: {form} / fast form"] = _spread_entry(
                        entry
                    )
        elif "speedup" in info:
            ratios[f"option {info['option']} {info['mode']}"] = info["speedup"]
    if not ratios:
        return None
    commit = data.get("commit_info", {}).get("id") or "unknown"
    return Run(machine_kind(data), commit, data.get("datetime", ""), ratios, images)


def load_runs(folders=FOLDERS) -> list[Run]:
    """Every stored run, oldest first; the same run stored twice counts once."""
    runs = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.json")):
            try:
                run = read_run(path)
            except (json.JSONDecodeError, KeyError) as error:
                print(f"skipping {path}: not a benchmark run of this project ({error!r})", file=sys.stderr)
                continue
            if run is not None:  # the autosaved and the --benchmark-json copy differ in time by ms
                runs[run.commit, run.kind, json.dumps(run.ratios, sort_keys=True)] = run
    return sorted(runs.values(), key=lambda run: run.when)


@dataclass(frozen=True)
class Verdict:
    name: str
    newest: float
    reference: float | None  # median of the earlier runs
    spread: float
    spread_from: str  # "history" or "this run"

    @property
    def regressed(self) -> bool:
        return self.reference is not None and self.reference - self.newest > self.spread


def compare(runs: list[Run], kind: str) -> tuple[Run, list[Run], list[Verdict]]:
    """The newest run of the machine kind, the earlier ones, and a verdict per ratio."""
    *earlier, newest = [run for run in runs if run.kind == kind]
    verdicts = []
    for name, entry in newest.ratios.items():
        values = [run.ratios[name]["median"] for run in earlier if name in run.ratios]
        if len(values) >= 2:
            spread, source = max(values) - min(values), "history"
        else:
            spread, source = entry["median"] - entry["min"], "this run"
        reference = statistics.median(values) if values else None
        verdicts.append(Verdict(name, entry["median"], reference, spread, source))
    return newest, earlier, verdicts


def report(newest: Run, earlier: list[Run], verdicts: list[Verdict]) -> str:
    lines = [
        f"newest run: {newest.label} on {newest.kind}; {len(earlier)} earlier run(s) of this machine kind",
        "",
        "| ratio | earlier median | spread (from) | newest | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        reference = "n/a" if v.reference is None else f"{v.reference:.2f}"
        verdict = "REGRESSION" if v.regressed else ("no history" if v.reference is None else "ok")
        lines.append(
            f"| {v.name} | {reference} | {v.spread:.2f} ({v.spread_from}) | {v.newest:.2f} | {verdict} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], kind: str, path: Path) -> Path:
    """Images/s of the fast models (top) and the fast/naive and fast/ViT ratios (bottom) per commit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in runs if run.kind == kind]
    labels = [run.label for run in runs]
    models = sorted({name for run in runs for name in run.images_per_s})  # "size mode family"
    palette = plt.get_cmap("tab20").colors
    colours = {model: palette[i % len(palette)] for i, model in enumerate(models)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for model in models:
        top.plot(
            labels, [run.images_per_s.get(model) for run in runs], "o-", color=colours[model], label=model
        )
        for other, style in (("naive", "o-"), ("ViT", "s--")):
            values = [run.ratios.get(f"{model} fast/{other}", {}).get("median") for run in runs]
            bottom.plot(labels, values, style, color=colours[model], label=f"{model} fast/{other}")
    top.set(ylabel="images/s (fast model)", yscale="log", title=f"throughput per commit: {kind}")
    bottom.set(ylabel="speed ratio (>1: fast model faster)", xlabel="commit")
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    for axis in (top, bottom):
        axis.legend(fontsize=6, ncol=2)
        axis.grid(alpha=0.3)
    plt.setp(bottom.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare the newest benchmark run with its history.")
    parser.add_argument("folders", nargs="*", type=Path, default=list(FOLDERS), help="where runs are stored")
    parser.add_argument("--kind", help="the machine kind to compare (default: this machine's)")
    parser.add_argument("--plot", type=Path, help="draw the machine kind's history here (PNG)")
    args = parser.parse_args(argv)
    runs = load_runs(args.folders)
    kind = args.kind or this_machine_kind()
    if not any(run.kind == kind for run in runs):
        stored = "; ".join(sorted({run.kind for run in runs})) or "none"
        sys.exit(f"no stored benchmark run of {kind!r} (stored kinds: {stored}): run `make bench` first")
    newest, earlier, verdicts = compare(runs, kind)
    print(report(newest, earlier, verdicts))
    if args.plot:
        print(f"history plot: {plot(runs, kind, args.plot)}")
    regressions = [v.name for v in verdicts if v.regressed]
    if regressions:
        sys.exit(f"{len(regressions)} ratio(s) regressed: {', '.join(regressions)}")


if __name__ == "__main__":
    main()
