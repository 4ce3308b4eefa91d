"""Distributed evaluation counts every image exactly once: 1, 2 and 3 gloo processes on 101 images
(a size no world size divides) give the one-process counts. torch's DistributedSampler would pad the
set to 102 with repeated images."""

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from crate.data import ShardSampler
from crate.evaluate import measure

IMAGES = 101


def _evaluate(rank: int, world_size: int, folder: str) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: a forked child must not use the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)  # the same on every rank
    generator = torch.Generator().manual_seed(1)
    dataset = TensorDataset(torch.randn(IMAGES, 8, generator=generator), torch.randint(0, 5, (IMAGES,)))
    loader = DataLoader(dataset, 16, sampler=ShardSampler(IMAGES, rank, world_size))
    result = measure(model, loader, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    if rank == 0:
        Path(folder, "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _result(world_size: int, folder: Path) -> dict:
    folder.mkdir()
    # forked, as DataLoader workers are: nothing is imported again
    mp.start_processes(_evaluate, (world_size, str(folder)), nprocs=world_size, start_method="fork")
    return json.loads((folder / "result.json").read_text())


def test_the_shards_cover_the_set_once():
    for world_size in (1, 2, 3, 4):
        shards = [list(ShardSampler(IMAGES, rank, world_size)) for rank in range(world_size)]
        assert sorted(itertools.chain(*shards)) == list(range(IMAGES))
        assert [len(ShardSampler(IMAGES, rank, world_size)) for rank in range(world_size)] == list(
            map(len, shards)
        )


def test_one_two_and_three_processes_count_every_image_once(tmp_path):
    one = _result(1, tmp_path / "1")
    assert one["eval_images"] == IMAGES
    for world_size in (2, 3):
        several = _result(world_size, tmp_path / str(world_size))
        assert several["eval_images"] == IMAGES
        assert (several["top1"], several["top5"]) == (one["top1"], one["top5"])
        # each batch's loss is a float32 sum of at most 16 terms, the batches then split differently:
        # equal to 16 float32 roundings (16 × 6e-8 ≈ 1e-6 relative)
        assert several["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6)
