"""`make demo-mae`: the offline CRATE-MAE demo on Fashion-MNIST on the CPU, in minutes.

1. pre-train the masked autoencoder (`crate train --preset mae`, the default model
   crate_mae_mini_patch4_28: 49 patches of 4×4, 75% masked) on the training images;
2. the reconstruction figure of test images (masked input, reconstruction with the visible patches
   pasted, the decoder's prediction, original) and the white-box audit of the encoder AND the decoder
   (crate.analysis.write_mae_report: R^c per layer, the encoder's ISTA sparsity);
3. a linear probe of the frozen encoder: closed-form ridge regression onto one-hot labels of the
   features [cls token, mean patch token] of ``CRATEMAE.forward_features`` (its ridge chosen on a
   held-out fifth of the probe's training images), beside the same probe on a randomly initialised
   autoencoder and on the raw pixels;
4. at one budget, the same number of training images seen with the same recipe (the fashion-mnist
   preset): the encoder fine-tuned from the pre-training (`crate train --finetune RUN`, into
   crate_mae_encoder_*), that encoder from scratch, and the supervised demo CRATE (crate_mini_patch7_28).

    python -m crate.mae_demo                            # writes runs/demo-mae-crate_mae_mini_patch4_28/
    python -m crate.mae_demo --pretrain-epochs 3 --budget-images 60000

Idempotent: each stage is skipped when its folder holds a completed run of the same configuration
(--retrain to start again). It prints first the estimated time of each training stage on this machine.
"""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from . import analysis, errors
from .audit import load_images
from .demo import estimate_training_seconds
from .evaluate import evaluation_split
from .runtime import autocast, default_device
from .train import TrainConfig, train
from .train.command import resolve_config
from .weights.sources import load_run

SUPERVISED = "crate_mini_patch7_28"  # `make demo`'s model
RIDGES = (
    1e-6,
    1e-5,
    1e-4,
    1e-3,
    1e-2,
    1e-1,
)  # the probe's ridge per image (penalty λ·n), chosen on held-out images


@errors.command("python -m crate.mae_demo")
def main(argv: list[str] | None = None) -> dict:
    parser = errors.Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crate_mae_mini_patch4_28")
    parser.add_argument("--output", default=None, help="run folder (default runs/demo-mae-<model>)")
    parser.add_argument("--retrain", action="store_true", help="run every stage again")
    parser.add_argument("--pretrain-epochs", type=int, default=5, help="passes over the training images")
    parser.add_argument("--pretrain-subset", type=int, default=0, help="pre-train on the first n (0: all)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak lr at batch 128, every stage")
    parser.add_argument(
        "--budget-images",
        type=int,
        default=60000,
        help="training images each classifier sees (one epoch of the first n): the fine-tune and baselines",
    )
    parser.add_argument("--probe-images", type=int, default=10000, help="training images the probe fits")
    parser.add_argument("--eval-subset", type=int, default=0, help="test images evaluated (0: all 10,000)")
    parser.add_argument("--audit-images", type=int, default=64, help="test images the audit measures")
    args = parser.parse_args(argv)
    output = Path(args.output or f"runs/demo-mae-{args.model}")
    if args.retrain and output.exists():
        shutil.rmtree(output)
    configs = _configs(args, output)
    device = default_device()
    print(_plan(configs, device))

    summary = dict(model=args.model, device=str(device), budget=_budget_text(args), stages={})
    summary["stages"]["pretrain"] = _stage(configs["pretrain"])
    mae = load_run(output / "pretrain")
    title = f"{args.model}, Fashion-MNIST"
    paths = _audits(mae, args, output, title)
    print("\nCRATE-MAE audit and reconstructions:\n" + "\n".join(f"  {k}: {p}" for k, p in paths.items()))
    summary["probe"] = _probes(mae, args, output)
    for stage in ("finetune", "encoder_scratch", "supervised"):
        summary["stages"][stage] = _stage(configs[stage])
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + results_table(summary))
    print(f"\nrun folder: {output} (summary.json, audit/, pretrain/, finetune/, ...)")
    return summary


def _budget_text(args) -> str:
    return (
        f"each classifier: one epoch of the first {args.budget_images} training images "
        f"({args.budget_images // 128} steps of 128), the fashion-mnist preset's recipe, lr {args.lr}"
    )


def _configs(args, output: Path) -> dict:
    """The trainer configurations of the four training stages."""
    common = ["--lr", str(args.lr), "--lr-batch", "128", "--workers", "0"]
    if args.eval_subset:
        common += ["--eval-subset", str(args.eval_subset)]
    pretrain = [
        *("--preset", "mae", "--model", args.model, "--dataset", "fashion-mnist"),
        *("--epochs", str(args.pretrain_epochs), "--batch-size", "128", "--warmup-epochs", "0.1"),
        *("--eval-every", str(args.pretrain_epochs), "--train-subset", str(args.pretrain_subset)),
        *("--output", str(output / "pretrain")),
    ]
    classifier = [
        *("--preset", "fashion-mnist", "--epochs", "1", "--warmup-epochs", "0.1"),
        *("--train-subset", str(args.budget_images), "--checkpoint-every", "100000"),
    ]
    encoder = args.model.replace("crate_mae_", "crate_mae_encoder_", 1)
    finetune = ["--model", encoder, "--finetune", str(output / "pretrain")]
    return dict(
        pretrain=resolve_config(pretrain + common),
        finetune=resolve_config(classifier + finetune + ["--output", str(output / "finetune")] + common),
        encoder_scratch=resolve_config(
            [
                *classifier,
                "--model",
                encoder,
                "--output",
                str(output / "encoder-scratch"),
                *common,
            ]
        ),
        supervised=resolve_config(
            [*classifier, "--model", SUPERVISED, "--output", str(output / "supervised"), *common]
        ),
    )


def completed_run(output: Path, config: TrainConfig) -> dict | None:
    """The summary of the completed stage in ``output`` when it ran with ``config`` (an option added since
    it was saved counts with its default), else None."""
    try:
        saved = json.loads((output / "config.json").read_text())
        summary = json.loads((output / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    saved = dataclasses.asdict(TrainConfig()) | saved
    return summary if saved == dataclasses.asdict(config) else None


def _stage(config) -> dict:
    """A trainer run, or the completed one its folder holds: {result, wall_s}."""
    output = Path(config.output)
    done = completed_run(output, config)
    if done is not None:
        print(f"{output} holds a completed run with this configuration")
        return done
    if output.exists():
        shutil.rmtree(output)
    start = time.perf_counter()
    result = train(config)
    done = dict(model=config.model, result=result, wall_s=time.perf_counter() - start)
    (output / "summary.json").write_text(json.dumps(done, indent=2) + "\n")
    return done


def _plan(configs: dict, device: torch.device) -> str:
    lines = [
        "Estimated training time on this machine (a few timed steps each; evaluations and the probe extra):"
    ]
    for stage, config in configs.items():
        if completed_run(Path(config.output), config) is not None:
            lines.append(f"  {stage}: done ({config.output})")
            continue
        estimate = estimate_pretraining_seconds if stage == "pretrain" else estimate_training_seconds
        seconds, steps, step_s = estimate(config, device)
        lines.append(
            f"  {stage}: {config.model}, {steps} steps at {step_s:.2f} s/step: "
            f"about {seconds // 60:.0f} min {seconds % 60:.0f} s"
        )
    return "\n".join(lines)


def estimate_pretraining_seconds(
    config, device: torch.device, timed_steps: int = 3
) -> tuple[float, int, float]:
    """(seconds, steps, seconds per step) of the pre-training: timed steps of its autoencoder on random
    images (its loss is its own), times its planned steps."""
    import timm

    from .train.setup import planned_steps

    images_count = config.train_subset or 60000
    steps = planned_steps(config, images_count // config.batch_size)
    model = timm.create_model(config.model).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters())
    images = torch.randn(
        config.batch_size, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(0)
    )
    in_precision = autocast(device, config.amp)

    def step():
        with in_precision():
            loss = model(images.to(device))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(timed_steps):
        step()
    step_s = (time.perf_counter() - start) / timed_steps
    return steps * step_s, steps, step_s


def _audits(mae, args, output: Path, title: str) -> dict:
    """The audit and figures of the pre-trained autoencoder, and the audit of its random initialisation."""
    images = load_images(mae, "fashion-mnist", None, "test", args.audit_images)
    mean, std = mae.pretrained_cfg["mean"], mae.pretrained_cfg["std"]
    paths = analysis.write_mae_report(mae, images, output / "audit", title=title, mean=mean, std=std)
    initial = _initialised_like(mae)
    for kind, path in analysis.write_mae_report(
        initial, images, output / "audit-init", title=f"{title}, at initialisation", mean=mean, std=std
    ).items():
        paths[f"{kind} (at initialisation)"] = path
    return paths


def _initialised_like(model):
    """A fresh ``model`` architecture, initialised with torch seeded by 0 (the pre-training's seed)."""
    torch.manual_seed(0)
    initial = type(model)(model.config).eval()
    initial.pretrained_cfg = model.pretrained_cfg
    return initial


# -- the linear probe -------------------------------------------------------------------------------------
@torch.no_grad()
def encoder_features(model, images: torch.Tensor) -> torch.Tensor:
    """(B, 2d): the frozen encoder's [cls token, mean patch token] (``forward_features``, no masking)."""
    tokens = model.forward_features(images).double()  # (B, L + 1, d)
    return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)


@torch.no_grad()
def pixel_features(model, images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).double()


@torch.no_grad()
def split_features(
    model, split: str, count: int, featurize, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, f), labels (n,)) of the first ``count`` images of Fashion-MNIST's ``split`` (0: all),
    read as the model's evaluation does."""
    dataset, _ = evaluation_split(model, "fashion-mnist", None, split)
    if count:
        dataset = Subset(dataset, range(min(count, len(dataset))))
    model.eval()
    features, labels = [], []
    for images, targets in DataLoader(dataset, batch):
        features.append(featurize(model, images))
        labels.append(targets)
    return torch.cat(features), torch.cat(labels)


def ridge_probe(train_x, train_y, test_x, test_y, classes: int = 10, ridges=RIDGES) -> dict:
    """Closed-form ridge regression of one-hot labels on standardised features (a bias column
    unpenalised): the ridge λ·n chosen by accuracy on the last fifth of the training features, then
    refit on all of them; accuracy on the test features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-8)

    def design(x):
        x = (x - mean) / std
        return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)

    def fit(x, y, ridge):
        X, Y = design(x), torch.nn.functional.one_hot(y, classes).double()
        penalty = ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype)
        penalty[-1, -1] = 0
        return torch.linalg.solve(X.T @ X + penalty, X.T @ Y)

    def accuracy(W, x, y):
        return (design(x) @ W).argmax(1).eq(y).double().mean().item() * 100

    cut = len(train_x) * 4 // 5
    held_out = {
        ridge: accuracy(fit(train_x[:cut], train_y[:cut], ridge), train_x[cut:], train_y[cut:])
        for ridge in ridges
    }
    best = max(held_out, key=held_out.get)
    W = fit(train_x, train_y, best)
    return dict(
        top1=accuracy(W, test_x, test_y),
        train_top1=accuracy(W, train_x, train_y),
        ridge=best,
        held_out_top1={str(ridge): value for ridge, value in held_out.items()},
        features=train_x.shape[1],
        train_images=len(train_x),
        test_images=len(test_x),
    )


def _probes(mae, args, output: Path) -> dict:
    """The ridge probe on the pre-trained encoder, on the same architecture at initialisation and on
    pixels (written to probe.json; idempotent like the training stages)."""
    path = output / "probe.json"
    key = dict(probe_images=args.probe_images, eval_subset=args.eval_subset)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["probes"]
    probes = {}
    for name, model, featurize in (
        ("pre-trained encoder", mae, encoder_features),
        ("encoder at initialisation", _initialised_like(mae), encoder_features),
        ("pixels", mae, pixel_features),
    ):
        start = time.perf_counter()
        train_x, train_y = split_features(model, "train", args.probe_images, featurize)
        test_x, test_y = split_features(model, "test", args.eval_subset, featurize)
        probes[name] = ridge_probe(train_x, train_y, test_x, test_y) | dict(
            wall_s=time.perf_counter() - start
        )
        print(f"linear probe, {name}: top-1 {probes[name]['top1']:.2f}% ({probes[name]['wall_s']:.0f} s)")
    path.write_text(json.dumps(dict(key=key, probes=probes), indent=2) + "\n")
    return probes


def results_table(summary: dict) -> str:
    """The Markdown table of the probes and the classifiers at the one budget, with their times."""
    stages = summary["stages"]
    pretrain = stages["pretrain"]
    rows = [
        "| what | model | test top-1 | time |",
        "|---|---|---|---|",
        f"| MAE pre-training (masked-patch MSE {pretrain['result']['eval_loss']:.3f}) | {pretrain['model']} "
        f"| – | {pretrain['wall_s']:.0f} s |",
    ]
    for name, probe in summary["probe"].items():
        rows.append(
            f"| linear probe (ridge, {probe['features']} features, {probe['train_images']} images), {name} "
            f"| {summary['model']} | {probe['top1']:.2f}% | {probe['wall_s']:.0f} s |"
        )
    labels = dict(
        finetune="fine-tuned from the MAE",
        encoder_scratch="the same encoder from scratch",
        supervised="supervised demo CRATE from scratch",
    )
    for stage, label in labels.items():
        run = stages[stage]
        rows.append(f"| {label} | {run['model']} | {run['result']['top1']:.2f}% | {run['wall_s']:.0f} s |")
    return "\n".join(rows) + f"\n\nbudget: {summary['budget']}"


if __name__ == "__main__":
    main()
