"""Shared fixtures: one small CRATE trained on real Fashion-MNIST images, once per test session."""

import pytest

from crate.train import resolve_config, train


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(run folder, final evaluation): crate_mini_patch4_28 with horizontal flips (the earlier demo
    recipe, which the bars below were measured on), 4096 training images, 5 epochs (160 steps).

    5 epochs, not 3: over seeds 0-5 the final top-1 on these 1000 images measured 68.7-74.4% in float32
    and 69.9-75.8% in bf16 autocast at 5 epochs, but 59.6-65.3% and 58.7-64.5% at 3 epochs, where the
    learning test's 60% bar sat above the worst seed (tests/train/test_train.py)."""
    output = tmp_path_factory.mktemp("trained-run")
    config = resolve_config(
        [
            "--model",
            "crate_mini_patch4_28",
            "--hflip",
            "0.5",
            "--train-subset",
            "4096",
            "--eval-subset",
            "1000",
            "--epochs",
            "5",
            "--output",
            str(output),
            "--log-every",
            "8",
        ]
    )
    return output, train(config)
