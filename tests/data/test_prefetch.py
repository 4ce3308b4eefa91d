"""crate/data/prefetch.py on the CPU (a plain thread, no streams; the first two device tests on CUDA
too, its side stream): the same batches bit for bit and in order as without it, one batch ahead and
no more, the thread's exceptions raised in the caller, no thread left when a loop ends early; the gpu
pipeline's device steps draw no random numbers; a run prefetching its inputs resumes to the
parameters of a straight run without it."""

import random
import threading
import traceback

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from crate import data
from crate.train import resolve_config, setup, train
from tests.data.test_gpu_pipeline import CPU, DEIT, DEVICES, both_pipelines, jpeg_folder
from tests.helpers import latest_weights


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("crate-prefetch")]


def gpu_pipeline_loader(folder, seed: int = 0) -> DataLoader:
    """The deit augmentation's encoded batches of 4, shuffled by ``seed`` (the same order each time)."""
    _, gpu = both_pipelines(folder, seed, **DEIT)
    return DataLoader(gpu, batch_size=4, shuffle=True, collate_fn=data.collate_encoded,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def prepared_batches(loader: DataLoader, device: torch.device, ahead: bool) -> list:
    encoded = data.encoded_images(loader.dataset)

    def prepare(batch):
        return encoded.inputs(batch, device)

    batches = data.prefetched(loader, prepare, device) if ahead else map(prepare, loader)
    return [(images.cpu(), targets.cpu()) for images, targets in batches]  # each used on arrival


@pytest.mark.parametrize("device", DEVICES)
def test_prefetched_batches_are_the_batches_in_order(tmp_path, device):
    """The deit augmentation (RandAugment, erasing) of 12 images in 3 shuffled batches, drawn in the
    loader (no workers: in the caller's thread) and decoded and augmented in the prefetch thread (on
    CUDA: on its side stream, each batch read on the caller's stream as it arrives)."""
    folder = jpeg_folder(tmp_path)
    plain, prefetched = (prepared_batches(gpu_pipeline_loader(folder), device, a) for a in (False, True))
    assert len(prefetched) == len(plain) == 3
    for (images, targets), (expected_images, expected_targets) in zip(prefetched, plain, strict=True):
        assert torch.equal(images, expected_images) and torch.equal(targets, expected_targets)
    assert not prefetch_threads()


def test_the_next_batch_is_prepared_while_the_caller_holds_one():
    drawn, prepared = [], {index: threading.Event() for index in range(4)}

    def batches():
        for index in range(4):
            drawn.append(index)
            yield index

    def prepare(index):
        prepared[index].set()
        return index

    for index in data.prefetched(batches(), prepare, CPU):
        if index < 3:
            assert prepared[index + 1].wait(timeout=60)  # the next one, in the thread, now
        assert drawn == list(range(min(index + 2, 4)))  # and none beyond it
    assert not prefetch_threads()


def test_an_exception_in_the_thread_is_raised_in_the_caller_with_its_traceback():
    def failing_prepare(index):
        if index == 2:
            raise ValueError(f"batch {index} is broken")
        return index

    received = []
    with pytest.raises(ValueError, match="batch 2 is broken") as raised:
        for index in data.prefetched(range(5), failing_prepare, CPU):
            received.append(index)
    assert received == [0, 1]
    assert "failing_prepare" in [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
    assert not prefetch_threads()


@pytest.mark.parametrize("ending", ["break", "exception", "KeyboardInterrupt"])
def test_no_thread_is_left_when_the_loop_ends_early(ending):
    def loop():
        for index in data.prefetched(range(100), lambda index: index, CPU):
            if index == 1:
                if ending == "break":
                    break
                raise {"exception": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}[ending]

    if ending == "break":
        loop()
    else:
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            loop()
    assert not prefetch_threads()


@pytest.mark.parametrize("device", DEVICES)
def test_decoding_and_augmenting_draw_no_random_numbers(tmp_path, device):
    """Whichever thread runs DevicePipeline's device steps, and when, cannot change the run: they leave
    Python's, NumPy's and torch's RNGs (the device's too) where they were."""
    loader = gpu_pipeline_loader(jpeg_folder(tmp_path))
    batch = next(iter(loader))
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    device_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    data.encoded_images(loader.dataset).inputs(batch, device)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    if device_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(device), device_state)


def test_a_prefetching_run_resumes_to_the_parameters_of_a_straight_run(tmp_path, monkeypatch):
    """The deit recipe (Mixup/CutMix and drop-path draw from the global RNGs between the batches) on 12
    images in 6 batches of 2, no loader workers: 4 steps without prefetching, then 2 steps, a stop and 2
    resumed (mid-epoch: ResumableSampler's start_batch) with it (on the CPU by choice here): equal."""
    for split in ("train", "val"):
        jpeg_folder(tmp_path / "imagenet" / split)
    options = ["--preset", "deit", "--model", "crate_tiny_patch16_224", "--data", str(tmp_path / "imagenet")]
    options += ["--data-pipeline", "gpu", "--batch-size", "2", "--workers", "0", "--max-steps", "4"]
    options += ["--eval-subset", "2", "--skip-verify", "--telemetry-batch", "0"]
    train(resolve_config([*options, "--output", str(tmp_path / "straight")]))

    threads = set()

    def prefetched(batches, prepare, device):
        def recorded(batch):
            threads.add(threading.current_thread().name)
            return prepare(batch)

        return data.prefetch.prefetched(batches, recorded, device)

    monkeypatch.setattr(setup, "prefetches", lambda train_set, device: True)
    monkeypatch.setattr(data, "prefetched", prefetched)
    resumed = [*options, "--output", str(tmp_path / "resumed"), "--checkpoint-every", "2"]
    train(resolve_config([*resumed, "--stop-after", "2"]))
    assert not prefetch_threads()
    train(resolve_config([*resumed, "--resume"]))
    assert threads and all(name.startswith("crate-prefetch") for name in threads)
    straight, prefetching = latest_weights(tmp_path / "straight"), latest_weights(tmp_path / "resumed")
    assert straight.keys() == prefetching.keys()
    for key in straight:
        assert torch.equal(straight[key], prefetching[key]), key
