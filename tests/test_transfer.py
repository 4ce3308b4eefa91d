"""The transfer experiment (crate/transfer.py) end to end at a tiny budget: three methods, the same
number of steps each, the table and the plot written."""

import json

from crate import transfer
from crate.data import Digits


def test_every_method_gets_the_same_step_budget(trained_run, tmp_path):
    run, _ = trained_run
    for method in transfer.METHODS:
        for labels in (10, 0):
            config = transfer.run_config(
                transfer.Run(method, labels, 0), str(run), 60, tmp_path, "crate_mini_patch4_28"
            )
            assert (
                config.max_steps == 60 <= config.epochs * (len(Digits("train", labels)) // config.batch_size)
            )
            assert (config.freeze, bool(config.finetune)) == (
                method == "linear probe",
                method != "from scratch",
            )
            assert config.hflip == 0 and config.dataset == "digits"


def test_a_tiny_experiment_writes_its_table_and_plot(trained_run, tmp_path):
    run, _ = trained_run
    summary = transfer.main(
        [
            "--source",
            str(run),
            "--seeds",
            "0",
            "1",
            "--labels",
            "10",
            "--steps",
            "6",
            "--output",
            str(tmp_path),
        ]
    )
    assert set(summary) == {(method, 10) for method in transfer.METHODS}
    assert all(runs == 2 and 0 <= mean <= 100 for mean, _, runs in summary.values())
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 6 and results["steps"] == 6
    table = (tmp_path / "transfer.md").read_text()
    assert "| fine-tuning |" in table and "| linear probe |" in table and "10 labels/class" in table
    assert (tmp_path / "transfer.png").stat().st_size > 5_000


def test_the_sweep_picks_each_methods_best_rate_on_a_seed_of_its_own(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    seen = []

    def fake_train(config):
        seen.append((config.seed, config.labels_per_class, config.lr))
        return {"top1": 100 * config.lr}  # the largest rate "wins"

    monkeypatch.setattr(transfer, "train", fake_train)
    chosen = transfer.sweep(str(run), 10, tmp_path)
    assert chosen == {method: max(rates) for method, (_, rates) in transfer.METHODS.items()}
    assert {(seed, labels) for seed, labels, _ in seen} == {(transfer.SWEEP_SEED, transfer.SWEEP_LABELS)}
    assert transfer.SWEEP_SEED not in (0, 1, 2)
