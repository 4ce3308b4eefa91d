"""The CPU allocator setting the trainer runs with: glibc keeps freed memory for reuse.

PyTorch's CPU tensors come from malloc. glibc gives large blocks fresh pages from the kernel (mmap,
or heap growth after a trim), and a training step frees and re-allocates its activations every step,
so each step page-faults them in again: 28,000 minor faults (110 MiB) per CRATE-T training step at
batch 8 here, 5% of the step (crate_mini_patch7_28 at batch 128: 5% in float32, 18% under bf16
autocast). Raising the mmap and trim thresholds keeps the freed pages in the process, as CUDA's caching
allocator does on the GPU: the process's resident set stays at its peak, the bytes in use do not change.
"""

import ctypes
import ctypes.util

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
