"""Two gloo processes under torchrun, interrupted as a cluster interrupts them: one rank signalled
mid-epoch (both stop after the same step with a checkpoint, exit 75, and --resume continues exactly),
and one rank killed under --max-restarts (torchrun restarts the pair, which resumes by itself). Both
end with every tensor (weights, optimizer state, each rank's RNG state) equal to an uninterrupted run.
Drop-path is on, so each rank's RNG stream must continue as its own."""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crate.train import EXIT_PREEMPTED
from crate.weights import checkpoint
from tests.helpers import FAST, run_python

# 1024 images of global batch 64: 16 steps an epoch, so steps 3 to 9 are mid-epoch
ARGS = ["-m", "crate.train", *FAST, "--max-steps", "10", "--drop-path", "0.1", "--log-every", "1"]
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest checkpoint: weights, optimizer state and each rank's RNG states."""
    latest = checkpoint.latest(folder)
    state = torch.load(latest / "state.pt", weights_only=True)
    tensors = {f"model.{k}": v for k, v in load_file(latest / "model.safetensors").items()}
    for index, parameter_state in state["optimizer"]["state"].items():
        tensors |= {f"optimizer.{index}.{k}": torch.as_tensor(v) for k, v in parameter_state.items()}
    for rank, rng in enumerate(state["rng"]):
        tensors |= {f"rng.{rank}.{k}": v for k, v in rng.items() if torch.is_tensor(v)}
    return tensors


def _assert_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def _step(folder: Path) -> int:
    latest = folder / checkpoint.LATEST
    return int(latest.read_text().split("-")[1]) if latest.exists() else 0


def _logged_step(folder: Path) -> int:
    metrics = folder / "metrics.jsonl"
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []  # complete lines only
    return max((json.loads(line)["step"] for line in lines), default=0)


def _wait_until(condition, process, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, f"{what} within 300 s"
        time.sleep(0.05)


def _worker(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of the given rank."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    for pid in children:
        environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environment:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("uninterrupted")
    pair = run_python(*TORCHRUN, *ARGS, "--output", str(folder))
    assert pair.wait() == 0, pair.stdout.read()
    gate = json.loads((folder / "verification.json").read_text())  # each rank checked its own device
    assert gate["passed"] and [report["rank"] for report in gate["reports"]] == [0, 1]
    return _tensors(folder)


def test_a_rank_signalled_mid_epoch_stops_both_with_a_checkpoint_and_resume_is_exact(tmp_path, uninterrupted):
    pair = run_python(*TORCHRUN, *ARGS, "--output", str(tmp_path))
    _wait_until(lambda: _logged_step(tmp_path) >= 3, pair, "no step 3")
    os.kill(_worker(pair.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns it in the step's all-reduce
    output = pair.communicate(timeout=300)[0]
    stopped = _step(tmp_path)
    assert 3 <= stopped < 10, output  # mid-epoch
    assert output.count(f"stopped at step {stopped} on a stop signal") == 2, output  # both ranks, same step
    assert f"exitcode  : {EXIT_PREEMPTED}" in output, output
    resumed = run_python(*TORCHRUN, *ARGS, "--output", str(tmp_path), "--resume")
    assert resumed.wait() == 0, resumed.stdout.read()
    _assert_equal(uninterrupted, _tensors(tmp_path))


def test_a_rank_killed_under_max_restarts_resumes_by_itself_exactly(tmp_path, uninterrupted):
    elastic = [*TORCHRUN, "--max-restarts", "1"]
    pair = run_python(*elastic, *ARGS, "--checkpoint-every", "2", "--output", str(tmp_path))
    _wait_until(lambda: _step(tmp_path) >= 4, pair, "no checkpoint at step 4")
    os.kill(_worker(pair.pid, 1), signal.SIGKILL)
    output = pair.communicate(timeout=300)[0]
    assert pair.returncode == 0, output
    assert output.count(f"resumed from {tmp_path}/checkpoint-") == 2, output  # both ranks, by themselves
    _assert_equal(uninterrupted, _tensors(tmp_path))
