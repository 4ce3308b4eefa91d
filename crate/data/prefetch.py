"""One batch ahead: ``prefetched(batches, prepare, device)`` yields ``prepare(batch)`` for each batch, in
order, and prepares batch i+1 in a background thread while the caller trains on batch i. Training
uses it for --data-pipeline gpu on CUDA, where ``prepare`` (nvjpeg decoding and the augmentation) is
the training process's own work: there it runs on a side CUDA stream, and the step that uses a batch
waits for that batch's work alone (its event), not for the next one's.

The batches are drawn in the caller's thread; only ``prepare`` runs in the other. A loader without
workers draws each sample's augmentation in the thread that iterates it, under SeededSamples, which
seeds and then restores the global RNGs: that must stay the training thread. ``prepare`` must draw no
random numbers (DevicePipeline's __call__ draws none: every draw is in the worker's plans). On the
CPU the same code runs with a plain thread and no streams."""

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def prefetched(batches: Iterable, prepare: Callable, device: torch.device) -> Iterator:
    """``prepare(batch)`` for each of ``batches`` in order, each prepared while the caller holds the one
    before. An exception of ``prepare`` is raised here, with the thread's traceback. Closing the
    iterator (a loop's break, an exception, KeyboardInterrupt) drops the next batch and waits at most
    for the one being prepared: no thread outlives it."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    pool = ThreadPoolExecutor(1, thread_name_prefix="crate-prefetch")
    try:
        pending = None
        for batch in batches:
            submitted = pool.submit(_prepared, prepare, batch, side)
            if pending is not None:
                yield _handed_over(pending, device)
            pending = submitted
        if pending is not None:
            yield _handed_over(pending, device)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _prepared(prepare: Callable, batch, side: torch.cuda.Stream | None) -> tuple:
    """In the thread: (prepare(batch), the event its CUDA work ends with, None on the CPU)."""
    if side is None:
        return prepare(batch), None
    with torch.cuda.stream(side):
        result = prepare(batch)
        ready = torch.cuda.Event()
        ready.record(side)
    return result, ready


def _handed_over(future: Future, device: torch.device):
    """The prepared batch, usable on the caller's stream: that stream waits for its work, and the
    allocator keeps its memory until that stream is done with it."""
    result, ready = future.result()
    if ready is not None:
        current = torch.cuda.current_stream(device)
        current.wait_event(ready)
        for tensor in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(tensor, torch.Tensor):
                tensor.record_stream(current)
    return result
