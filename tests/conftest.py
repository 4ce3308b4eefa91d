"""Shared fixtures: one small CRATE trained on real Fashion-MNIST images, once per test session."""

import pytest

from crate.train import resolve_config, train


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(run folder, final evaluation): crate_mini_patch4_28, 4096 training images, 3 epochs (~10 s)."""
    output = tmp_path_factory.mktemp("trained-run")
    config = resolve_config(
        [
            "--train-subset",
            "4096",
            "--eval-subset",
            "1000",
            "--epochs",
            "3",
            "--output",
            str(output),
            "--log-every",
            "8",
        ]
    )
    return output, train(config)
