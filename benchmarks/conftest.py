"""Benchmark settings: full sizes by default (CPU: batch 8, float32; GPU: batch 256, bf16 autocast),
or tiny sizes and one round with --bench-smoke (what `make test` runs, so the benchmarks cannot rot)."""

import argparse
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from crate.runtime import keep_freed_memory


def pytest_addoption(parser):
    parser.addoption("--bench-smoke", action="store_true", help="tiny sizes, one round: check that it runs")
    parser.addoption("--bench-rounds", type=int, default=7, help="timed rounds per benchmark")
    parser.addoption(
        "--results-json",
        help="also write each finished benchmark's extra_info here at once (pytest-benchmark's layout): "
        "what a time limit that stops the session leaves",
    )
    parser.addoption(
        "--bench-compile",
        action=argparse.BooleanOptionalAction,
        help="compiled training rows in the interleaved runs (default: on CUDA in full runs only; "
        "compiling a step takes ~25 s on 2 CPU cores)",
    )


COMMIT_VARIABLE = "CRATE_COMMIT"  # the commit a run measures, where its tree has no .git


def pytest_benchmark_update_commit_info(config, commit_info):
    """A GPU machine runs a copy of the working tree without .git (benchmarks/run_gpu.sh there), so
    pytest-benchmark finds no commit; CRATE_COMMIT names it, so that the history files the run by
    commit as it does a local one. A commit git found is kept."""
    if os.environ.get(COMMIT_VARIABLE) and commit_info.get("id") in ("unversioned", "unknown"):
        commit_info["id"] = os.environ[COMMIT_VARIABLE]


_FINISHED: list[dict] = []  # this session's finished benchmarks, for --results-json


@pytest.fixture(autouse=True)
def _write_each_result(request):
    """After each benchmark test, the session's finished results so far to --results-json."""
    yield
    path = request.config.getoption("--results-json")
    benchmark = request.node.funcargs.get("benchmark") if hasattr(request.node, "funcargs") else None
    if not path or benchmark is None or not benchmark.extra_info:
        return
    _FINISHED.append(dict(name=request.node.name, extra_info=dict(benchmark.extra_info)))
    when = datetime.datetime.now(datetime.UTC).isoformat()
    Path(path).write_text(json.dumps(dict(datetime=when, benchmarks=_FINISHED), indent=1) + "\n")


@dataclass(frozen=True)
class Bench:
    smoke: bool
    device: torch.device
    batch: int
    rounds: int
    amp: bool  # bf16 autocast (GPU)
    compile: bool = False  # compiled training rows (crate/train/compiled.py) beside the eager ones

    @property
    def sizes(self) -> list[str]:
        return ["tiny"] if self.smoke else ["tiny", "small", "base"]

    @property
    def alpha_sizes(self) -> list[str]:
        """Sizes at which CRATE-α joins CRATE and ViT: B/16 (the published weights' size) in full
        runs; in smoke mode the tiny one, so that its code runs in `make test`."""
        return ["tiny"] if self.smoke else ["base"]

    def model_kwargs(self) -> dict:
        """Tiny images and depth in smoke mode; the real 224×224 models otherwise."""
        return dict(img_size=32, depth=2) if self.smoke else {}


@pytest.fixture(scope="session")
def bench(request) -> Bench:
    smoke = request.config.getoption("--bench-smoke")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu:
        keep_freed_memory()  # as the trainer runs (crate/runtime.py), for every model alike
    batch = 2 if smoke else (256 if gpu else 8)
    compiled = request.config.getoption("--bench-compile")
    rounds = 1 if smoke else request.config.getoption("--bench-rounds")
    return Bench(smoke, device, batch, rounds, gpu, gpu and not smoke if compiled is None else compiled)
