"""The transfer experiment that runs offline: does CRATE trained on Fashion-MNIST help on handwritten
digits?

    python -m crate.transfer --sweep                  # source: the demo's run (make demo first)
    python -m crate.transfer --source runs/my-run --seeds 0 1 2 3 4 --steps 600

Source: a trained 28×28 grayscale model (the demo's crate_mini_patch7_28 on Fashion-MNIST). Target:
scikit-learn's digits (1,797 real 8×8 scans, upsampled to 28×28; crate.data.Digits), a fixed held-out
test split of 30% per class. For 10, 50 and all training labels per class and each seed, three ways
to train, each for the same number of optimizer steps at the same batch size:

- fine-tuning: every weight from the source, a new classifier, every parameter trained;
- linear probe: the same start, only the classifier trained (--freeze);
- from scratch: the same architecture, randomly initialised.

Each method's learning rate is chosen first with --sweep (four candidates each, 3× apart, on a seed
and label count of their own, so that no reported run chose it); without --sweep the first
candidate is used. The README's numbers: `OMP_NUM_THREADS=1 python -m crate.transfer --sweep`.

Writes results.json (every run), transfer.md (mean ± std top-1 per method and label count) and
transfer.png (top-1 against labels per class) into --output.
"""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import errors
from .data import Digits
from .errors import MissingError
from .train import resolve_config, train
from .weights.sources import source_model_name

# method: the training options that make it, and the learning rates tried at batch 32 by --sweep
# (the first is the default until a sweep picks; README "Transfer" gives the one chosen)
METHODS = {
    "fine-tuning": (["--finetune", "{source}"], (1e-3, 3e-4, 3e-3, 1e-2)),
    "linear probe": (["--finetune", "{source}", "--freeze"], (1e-2, 3e-3, 3e-2, 1e-1)),
    "from scratch": ([], (2e-3, 6e-4, 6e-3, 2e-2)),
}
SWEEP_SEED, SWEEP_LABELS = 100, 50  # a seed no reported run uses
BATCH = 32


@dataclass(frozen=True)
class Run:
    method: str
    labels_per_class: int  # 0: all
    seed: int


def run_name(run: Run) -> str:
    return f"{run.method.replace(' ', '-')}-{run.labels_per_class or 'all'}-seed{run.seed}"


def run_config(run: Run, source: str, steps: int, output: Path, model: str, lr: float | None = None):
    """The `crate train` configuration of one run: the same step budget for every method."""
    options, rates = METHODS[run.method]
    lr = lr or rates[0]
    epochs = math.ceil(steps / (len(Digits("train", run.labels_per_class)) // BATCH))  # planned: --max-steps
    argv = [
        "--dataset", "digits",
        "--model", model,
        "--labels-per-class", str(run.labels_per_class),
        "--seed", str(run.seed),
        "--epochs", str(epochs),
        "--max-steps", str(steps),
        "--batch-size", str(BATCH),
        "--lr", str(lr),
        "--lr-batch", str(BATCH),
        "--warmup-epochs", str(epochs * 0.05),
        "--hflip", "0",  # digits are not mirror-symmetric
        "--random-shift", "2",
        "--telemetry-batch", "0",
        "--eval-every", str(epochs + 1),  # once, after the last step
        "--log-every", "1000000",
        "--checkpoint-every", "1000000",
        "--keep-checkpoints", "1",
        "--output", str(output / f"{run_name(run)}-lr{lr:g}"),
        *(option.format(source=source) for option in options),
    ]  # fmt: skip
    return resolve_config(argv)


def _model_of(source: str) -> str:
    model = source_model_name(source)
    if model is None:
        raise MissingError(
            f"--source {source}: no run folder with a config.json there; train the demo model first "
            "(make demo) or pass --source with a run folder of a 28×28 grayscale model"
        )
    return model


def sweep(source: str, steps: int, output: Path) -> dict[str, float]:
    """Each method's learning rate: the best test top-1 of METHODS' candidates, on SWEEP_SEED with
    SWEEP_LABELS labels per class (the reported seeds are never used to choose)."""
    model, chosen = _model_of(source), {}
    for method, (_, rates) in METHODS.items():
        scores = {}
        for lr in rates:
            config = run_config(
                Run(method, SWEEP_LABELS, SWEEP_SEED), source, steps, output / "sweep", model, lr
            )
            scores[lr] = train(config)["top1"]
            print(f"sweep {method} lr {lr:g}: top-1 {scores[lr]:.2f}%")
        chosen[method] = max(scores, key=scores.get)
    return chosen


def run_experiment(
    source: str, seeds: list[int], labels: list[int], steps: int, output: Path, rates: dict | None = None
) -> list[dict]:
    model, rates = _model_of(source), rates or {}
    results = []
    for labels_per_class in labels:
        for seed in seeds:
            for method in METHODS:
                run = Run(method, labels_per_class, seed)
                result = train(run_config(run, source, steps, output, model, rates.get(method)))
                results.append(
                    dict(
                        method=method,
                        labels_per_class=labels_per_class,
                        seed=seed,
                        lr=rates.get(method) or METHODS[method][1][0],
                        top1=result["top1"],
                    )
                )
                print(f"{run_name(run)}: top-1 {result['top1']:.2f}%")
    return results


def summarise(results: list[dict]) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(method, labels per class) -> (mean, std, runs) of top-1."""
    groups: dict[tuple[str, int], list[float]] = {}
    for result in results:
        groups.setdefault((result["method"], result["labels_per_class"]), []).append(result["top1"])
    return {
        key: (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))
        for key, values in groups.items()
    }


def markdown_table(summary: dict) -> str:
    labels = sorted({key[1] for key in summary}, key=lambda k: k or 10**9)
    header = "| method | " + " | ".join(f"{k or 'all'} labels/class" for k in labels) + " |"
    rows = [header, "|---|" + "---|" * len(labels)]
    for method in METHODS:
        cells = []
        for k in labels:
            mean, std, runs = summary[(method, k)]
            cells.append(f"{mean:.1f} ± {std:.1f} ({runs})")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({key[1] for key in summary}, key=lambda k: k or 10**9)
    positions = [k or len(Digits("train")) / 10 for k in labels]
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for method in METHODS:
        means = [summary[(method, k)][0] for k in labels]
        stds = [summary[(method, k)][1] for k in labels]
        axis.errorbar(positions, means, yerr=stds, marker="o", capsize=3, label=method)
    axis.set_xscale("log")
    axis.set_xticks(positions, [str(k or "all") for k in labels])
    axis.set(xlabel="training labels per class", ylabel="test top-1 (%)", title="Fashion-MNIST → digits")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


@errors.command("python -m crate.transfer")
def main(argv: list[str] | None = None) -> dict:
    parser = errors.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="runs/demo-crate_mini_patch7_28", help="the trained run folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labels", type=int, nargs="+", default=[10, 50, 0], help="per class (0: all)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run (batch 32)")
    parser.add_argument("--output", type=Path, default=Path("runs/transfer-digits"))
    parser.add_argument("--sweep", action="store_true", help="choose each method's lr first (see sweep())")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    rates = sweep(args.source, args.steps, args.output) if args.sweep else {}
    results = run_experiment(args.source, args.seeds, args.labels, args.steps, args.output, rates)
    summary = summarise(results)
    (args.output / "results.json").write_text(
        json.dumps(
            dict(source=args.source, steps=args.steps, batch=BATCH, swept=rates, runs=results), indent=2
        )
        + "\n"
    )
    table = markdown_table(summary)
    (args.output / "transfer.md").write_text(
        f"# Fashion-MNIST → digits ({args.steps} steps at batch {BATCH}; top-1 %, mean ± std (runs))\n\n"
        f"{table}\n"
    )
    plot(summary, args.output / "transfer.png")
    print(f"\n{table}\n\nwritten: {args.output}/results.json, transfer.md, transfer.png")
    return summary


if __name__ == "__main__":
    main()
