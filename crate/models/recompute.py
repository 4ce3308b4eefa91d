"""Autograd keeps a norm's input, not its output: the output is recomputed in the backward.

In a CRATE layer each LayerNorm feeds a product that saves its input for the weight gradient
(y = LN₁(z) for the U projection, u = LN₂(z) for ISTA's u·M), while the LayerNorm itself saves its own
input z. Saving y and u as recipes, (the norm, z, the view), drops two (B, N, d) tensors per layer
from what a training step keeps, for one LayerNorm forward per recipe in the backward (the memory
and time measured: README "Using the fast model"). The recomputation repeats
the forward's operation on the same input with the same autocast state, so gradients are bitwise
those of the plain path (verification/test_recompute.py).

Only tensors whose storage is a norm's output are replaced; under bf16 autocast a product saves its
bf16 copy of the output, which stays as it is.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing


def in_eager_autograd() -> bool:
    """True where autograd saves tensors as the code runs: not under torch.compile or torch.export
    (the compiled graph decides what it saves, and recomputes norms itself), nor while torch.fx or
    torch.jit traces."""
    tracing = is_fx_symbolic_tracing() or torch.jit.is_tracing()
    compiling = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    return torch.is_grad_enabled() and not (tracing or compiling)


@contextlib.contextmanager
def norm_outputs_recomputed(*norms: nn.Module) -> Iterator[None]:
    """Within the block, what autograd saves of these modules' outputs is recomputed in the backward.

    Not with other saved-tensor hooks (gradient checkpointing, save_on_cpu): the innermost hooks
    would take the outer ones' place."""
    outputs = {}  # storage address -> (module, its input, its output, autocast state)

    def remember(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        device = output.device.type
        autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
        outputs[output.untyped_storage().data_ptr()] = (module, args[0], output, autocast)

    def pack(saved: torch.Tensor):
        entry = outputs.get(saved.untyped_storage().data_ptr())
        if entry is None:
            return saved.detach()  # not saved itself: an output saved by its own node (ReLU's) would
            # hold that node through its grad_fn, a cycle through C++ that Python's collector never frees
        module, inputs, _, autocast = entry  # not the output: it is what is not kept
        return module, inputs.detach(), autocast, (saved.size(), saved.stride(), saved.storage_offset())

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        module, inputs, (enabled, dtype), view = packed
        with torch.no_grad(), torch.autocast(inputs.device.type, dtype, enabled):
            return module.forward(inputs).as_strided(*view)

    handles = [norm.register_forward_hook(remember) for norm in norms]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()  # the outputs are alive until here, so no other tensor can take their address
