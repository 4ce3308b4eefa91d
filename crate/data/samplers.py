"""Which samples a process reads, and in which order: the resumable training order, the evaluation
shards, the seeded augmentation of each sample, the first-n subsets of --train-subset and the seeded
subsets of `crate eval --max-images` and `crate audit --images`."""

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset


class ResumableSampler(Sampler):
    """The distributed sampler's epoch permutation (seeded by seed and epoch), starting at a given
    batch, so that a resumed run sees exactly the batches the interrupted one had not seen."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int, batch_per_rank: int):
        self.inner = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_per_rank, self.start_batch = batch_per_rank, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        indices = list(self.inner)
        usable = len(indices) // self.batch_per_rank * self.batch_per_rank
        return iter(indices[self.start_batch * self.batch_per_rank : usable])

    def __len__(self) -> int:
        return (len(self.inner) // self.batch_per_rank - self.start_batch) * self.batch_per_rank


class ShardSampler(Sampler):
    """Rank r of w evaluates images r, r + w, r + 2w, ...: over all ranks every image exactly once.
    (torch's DistributedSampler pads the set to a multiple of w with repeated images, which summed
    counts would then count twice.)"""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededSamples(Dataset):
    """``dataset`` with sample i of epoch e drawn under the RNGs (Python, NumPy, torch's CPU one) seeded
    by (seed, e, i) and restored afterwards: random transforms (timm's crop, flip, RandAugment, random
    erasing) then give a sample the same augmentation whichever worker, batch order or resumed run
    draws it, as InMemoryImages does for its own augmentation (call ``set_epoch``)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with _seeded(hash((self.seed, self.epoch, index)) % 2**32):
            return self.dataset[index]


@contextlib.contextmanager
def _seeded(seed: int):
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it would reseed CUDA's too
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def first(dataset: Dataset, size: int) -> Dataset:
    """The first ``size`` samples of ``dataset``, passing ``set_epoch`` on to it."""
    subset = Subset(dataset, range(min(size, len(dataset))))
    subset.set_epoch = getattr(dataset, "set_epoch", lambda epoch: None)
    return subset


def sample(dataset: Dataset, size: int, seed: int) -> Dataset:
    """``size`` samples of ``dataset`` drawn without replacement with ``seed``, in dataset order (all of
    it when it has no more): a class-sorted folder gives every class its share, not the first ones."""
    if size >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:size].sort().values.tolist())
