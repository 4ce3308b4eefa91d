"""--crate-device and --crate-model (verification/options.py): the layer shapes of a registered model,
what a run with the options collects and runs, and the usage errors of bad values. Runs with options
are pytest in a subprocess, since the options are stored for the process that parses them."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from verification import options

ROOT = Path(__file__).resolve().parents[1]
FAST_MODEL = "verification/test_fast_model.py"
LAYER_TEST = "test_fast_layer_follows_precision_rule_at_crate_tiny_shapes"


def run_pytest(*arguments: str) -> subprocess.CompletedProcess:
    """pytest with ``arguments`` in a fresh process at the repository root, its output captured."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *arguments]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def collected_ids(result: subprocess.CompletedProcess, test: str) -> set[str]:
    """The parameter ids of ``test`` in a ``--collect-only -q`` listing."""
    prefix = f"{FAST_MODEL}::{test}["
    return {line[len(prefix) : -1] for line in result.stdout.splitlines() if line.startswith(prefix)}


@pytest.mark.parametrize(
    "model, shapes",
    [
        ("crate_small_patch16_224", dict(tokens=197, heads=12, head_dim=48)),
        ("crate_mini_patch7_28", dict(tokens=17, heads=4, head_dim=32)),
        ("crate_alpha_base_patch32_224", dict(tokens=50, heads=12, head_dim=64, overcomplete=4)),
    ],
)
def test_layer_shapes_are_the_models(model, shapes):
    """tokens = (img/patch)² + 1, head_dim = dim/heads, CRATE-α's dictionary ratio; batch, depth and
    scale as CRATE-T's layer tests."""
    assert options.layer_shapes(model) == dict(batch=2, depth=1, scale=1.0) | shapes


def test_options_choose_the_layer_tests_family_and_device():
    """A CRATE model keeps only the CRATE subject of the layer-shape tests (the others keep both), and
    --crate-device cpu only their cpu cases."""
    result = run_pytest(
        FAST_MODEL,
        "--collect-only",
        "-q",
        "--crate-model",
        "crate_small_patch16_224",
        "--crate-device",
        "cpu",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cases = [
        f"{w}-{p}" for w in ("soft", "peaky") for p in ("float32", "bfloat16", "float16", "bf16-autocast")
    ]
    assert collected_ids(result, LAYER_TEST) == {
        f"{a}-{case}-cpu-crate" for a in ("fused", "explicit") for case in cases
    }
    assert collected_ids(result, "test_fast_layers_equal_reference_in_float64") == {
        f"{a}-{subject}" for a in ("fused", "explicit") for subject in ("crate", "alpha")
    }


def test_a_model_runs_at_its_layer_shapes():
    result = run_pytest(
        FAST_MODEL,
        "--crate-model",
        "crate_mini_patch7_28",
        "--crate-device",
        "cpu",
        "-k",
        f"{LAYER_TEST} and float32 and soft and fused",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tokens=17, heads=4, head_dim=32" in result.stdout  # the run's header
    assert "1 passed, " in result.stdout and "skipped" not in result.stdout


def test_unknown_model_is_a_usage_error_naming_it_and_the_choices():
    result = run_pytest(FAST_MODEL, "--collect-only", "--crate-model", "crate_huge_patch16_224")
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--crate-model crate_huge_patch16_224: not a registered CRATE model" in result.stderr
    assert "crate_base_patch16_224" in result.stderr and "crate_alpha_base_patch16_224" in result.stderr


def test_cuda_without_a_gpu_is_a_usage_error(monkeypatch):
    """In this process, with CUDA made unavailable (so on a GPU machine too): configure refuses before
    it stores anything."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(options, "_choice", options._choice)  # restored, should configure store one
    config = SimpleNamespace(getoption={"crate_device": "cuda", "crate_model": None}.get)
    with pytest.raises(pytest.UsageError, match="--crate-device cuda: no CUDA GPU is available"):
        options.configure(config)
