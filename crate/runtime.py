"""Where and how a process computes: its rank and device (torchrun), the bf16 policy, seeding, the
CPU allocator setting of training, and how often a progress bar redraws."""

import ctypes
import ctypes.util
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: nccl on GPU, gloo on CPU; else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        store, rank, world_size = next(dist.rendezvous("env://"))
        # torchrun's store outlives a restart (--max-restarts): keep each attempt's keys apart, or a
        # restarted rank may read a dead worker's address and fail to connect
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend, store=dist.PrefixStore(f"attempt-{attempt}", store), rank=rank, world_size=world_size
        )
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return Distributed(dist.get_rank(), dist.get_world_size(), device)
    return Distributed(0, 1, default_device())


def default_device() -> torch.device:
    """The device of a single process: the GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- precision ---------------------------------------------------------------------------------------
def uses_bf16(device: torch.device, amp: bool = True) -> bool:
    """The one bf16 policy: with ``amp``, compute under bf16 autocast on a GPU, and on a CPU with bf16
    instructions (avx512_bf16 or amx_bf16), where it pays off; elsewhere bf16 is emulated and slower,
    so float32."""
    return amp and (device.type == "cuda" or cpu_has_native_bf16())


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: torch.device, amp: bool = True) -> Callable:
    """A factory of the autocast context that ``uses_bf16`` chooses (disabled: float32)."""
    enabled = uses_bf16(device, amp)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def precision_name(device: torch.device, amp: bool = True) -> str:
    return "bf16 autocast" if uses_bf16(device, amp) else "float32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_interval() -> float:
    """tqdm's ``mininterval``: redraw 10 times a second on a terminal; a log file (stderr not a TTY) gets
    a line every 30 s instead of one carriage-return-joined line of every update."""
    return 0.1 if sys.stderr.isatty() else 30


# -- the CPU allocator -------------------------------------------------------------------------------
# PyTorch's CPU tensors come from malloc. glibc gives large blocks fresh pages from the kernel (mmap,
# or heap growth after a trim), and a training step frees and re-allocates its activations every
# step, so each step page-faults them in again (README "Using the fast model"). Raising the mmap and
# trim thresholds keeps the freed pages in the process, as CUDA's caching allocator does on the GPU.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_THRESHOLDS = (2**30, 2**25)  # 1 GiB; else 32 MiB, the most that some glibc versions accept


def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks up to 1 GiB (32 MiB on older glibc) from its heap and never hand
    freed heap memory back; False where the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    for threshold in _THRESHOLDS:
        if mallopt(_M_MMAP_THRESHOLD, threshold):
            return bool(mallopt(_M_TRIM_THRESHOLD, 2 * threshold))
    return False
