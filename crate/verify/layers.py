"""One model three ways, layer by layer: the fast model, the plain implementation in the same
precision and the float64 reference, each layer fed the reference's input of that layer (so errors do
not compound), forward (``layer_results``) and backward (``layer_gradient_check``)."""

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidError
from ..models import load_official_state_dict
from ..models.released import convert_official_state_dict, export_official_state_dict
from .families import Family, family_of, model_family
from .rule import PRECISIONS, Errors, autocast, errors, rounded


@dataclass(frozen=True)
class Models:
    """The fast model (on its device, in the precision's dtype), the released-layout values that it and
    the plain implementation run on (``low``, on that device), the float64 reference on them."""

    fast: nn.Module
    low: dict
    reference: nn.Module
    family: Family
    precision: str

    @property
    def device(self) -> torch.device:
        return next(iter(self.low.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision][0]

    @property
    def u(self) -> float:
        return PRECISIONS[self.precision][2]

    @functools.cached_property
    def _fast_names(self) -> dict[str, str]:
        return dict(zip(self.low, convert_official_state_dict(self.low), strict=True))

    def fast_parameter(self, name: str) -> nn.Parameter:
        """The fast model's parameter of a released-layout name."""
        return self.fast.get_parameter(self._fast_names[name])


def models_from_state(
    state: dict,
    *,
    heads: int,
    patch_size: int,
    channels: int,
    precision: str,
    fused: bool,
    device="cpu",
    family: Family | None = None,
) -> Models:
    """From a released-layout state dict: rounded to the precision, the fast model of its family built
    on those values."""
    family = family or family_of(state)
    low, ref_values = rounded(state, precision)
    config = family.make_config(state, heads, patch_size, channels, fused)
    model = family.model_class(config).to(device=device, dtype=PRECISIONS[precision][0])
    load_official_state_dict(model, low)
    low = {key: value.to(device) for key, value in low.items()}
    return Models(model.eval(), low, family.make_reference(ref_values, config), family, precision)


def models_from_model(model: nn.Module, precision: str) -> Models:
    """From a fast model as it is (its device, dtype and options): its weights exported to the released
    layout are the values; the reference is built on them in float64."""
    family = model_family(model)
    if family is None:
        raise TypeError(f"{type(model).__name__} is neither CRATE nor CRATE-α: there is no reference")
    dtype = PRECISIONS[precision][0]
    parameter = next(model.parameters())
    if parameter.dtype != dtype:
        raise InvalidError(
            f"precision {precision!r} runs on {dtype} weights; the model's are {parameter.dtype}"
        )
    layout = "CRATE-α" if family.name == "alpha" else "CRATE"
    low = {
        key: value.detach() for key, value in export_official_state_dict(model.state_dict(), layout).items()
    }
    ref_values = {key: value.double().cpu() for key, value in low.items()}
    return Models(model, low, family.make_reference(ref_values, model.config), family, precision)


@dataclass(frozen=True)
class LayerResult:
    """One layer's outputs from the three implementations: z_half and the layer output, the codes
    whose non-zeros are counted (CRATE: the ISTA output; CRATE-α: a₂), and the pre-activations of
    those codes from plain and reference (for ReLU-flip allowances)."""

    fast_half: torch.Tensor
    fast_out: torch.Tensor
    fast_codes: torch.Tensor
    plain_half: torch.Tensor
    plain_out: torch.Tensor
    plain_codes: torch.Tensor
    plain_pre: torch.Tensor
    ref_half: torch.Tensor
    ref_out: torch.Tensor
    ref_codes: torch.Tensor
    ref_pre: torch.Tensor


def reference_states(models: Models, X: torch.Tensor) -> list:
    """The reference's LayerStates of every layer from the stream X (float64, (B, N, d)) rounded to the
    precision's dtype, as the fast layers see it."""
    with torch.no_grad():
        return models.reference.transformer.forward_intermediates(X.to(models.dtype).double())


def _call_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x)


def _compress(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block.compress(x)


def layer_results(
    models: Models,
    X: torch.Tensor | None,
    states: list | None = None,
    *,
    compress: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _compress,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _call_block,
) -> Iterator[LayerResult]:
    """Each layer fed the (rounded) reference input of that layer; yields one LayerResult per layer.
    ``X``: float64 stream (B, N, d) entering layer 0 (or its reference ``states``); ``compress`` and
    ``forward`` run the fast layer's two halves (e.g. compiled)."""
    family, low, device, dtype, config = (
        models.family,
        models.low,
        models.device,
        models.dtype,
        models.fast.config,
    )
    states = states if states is not None else reference_states(models, X)
    ref_values = {key: value.double().cpu() for key, value in low.items()}
    with torch.no_grad():
        for layer, (block, ref_state) in enumerate(zip(models.fast.blocks, states, strict=True)):
            x = ref_state.input.to(device=device, dtype=dtype)
            with autocast(models.precision, device):
                fast_half, fast_out = compress(block, x), forward(block, x)
                fast_codes = family.fast_codes(block, fast_half)[-1]
                plain_half = family.plain.compress(low, layer, x, config.heads)
                plain_out, plain_pres = family.plain.sparsify(low, layer, plain_half, config.eta, config.lam)
            _, ref_pres = family.plain.sparsify(ref_values, layer, ref_state.mssa, config.eta, config.lam)
            yield LayerResult(
                fast_half=fast_half.cpu(),
                fast_out=fast_out.cpu(),
                fast_codes=fast_codes.cpu(),
                plain_half=plain_half.cpu(),
                plain_out=plain_out.cpu(),
                plain_codes=torch.relu(plain_pres[-1]).cpu(),
                plain_pre=plain_pres[-1].cpu(),
                ref_half=ref_state.mssa,
                ref_out=ref_state.ista,
                ref_codes=family.reference_codes(models.reference.transformer.layers[layer], ref_state.mssa)[
                    -1
                ],
                ref_pre=ref_pres[-1],
            )


@dataclass(frozen=True)
class LayerGradients:
    """``errors``: per released name ("input" for the layer input), and ``output``: the layer output's
    (forward, under autograd: the training path's kernels); ``kept`` of ``total`` entries (CRATE) or
    tokens (CRATE-α) keep a non-zero upstream gradient g."""

    errors: dict[str, Errors]
    output: Errors
    kept: int
    total: int


def layer_gradient_check(
    models: Models,
    x: torch.Tensor,
    layer: int,
    *,
    seed: int = 0,
    run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _call_block,
) -> LayerGradients:
    """Gradients of ⟨layer output, g⟩ with respect to the layer's input ``x`` (float64 (B, N, d), the
    reference's input of the layer, rounded to the precision's dtype here) and each of its parameters,
    fast and plain against the float64 reference, keyed by released parameter name. ``run_block``
    (default: the block's forward) runs the fast layer, e.g. as the training step does (checkpointed,
    norms recomputed). g is random, and zero wherever the three disagree on the side of a ReLU: the
    backward is discontinuous there (docs/math.md §8.4), so this imposes the reference's ReLU mask.
    CRATE's output is its codes, so g is zeroed entry-wise; CRATE-α's output z + a₂D₁ᵀ is dense, so g
    is zeroed on every token where any code of a₁ or a₂ flips (the block acts on tokens independently,
    so g = 0 on a token's output removes that token's discontinuity from every gradient)."""
    family, low, device, config = models.family, models.low, models.device, models.fast.config
    x = x.to(models.dtype)
    prefix = f"transformer.layers.{layer}."
    names = [key for key in low if key.startswith(prefix)]

    ref_inputs = [x.double().requires_grad_(True)] + [models.reference.get_parameter(name) for name in names]
    ref_layer = models.reference.transformer.layers[layer]
    ref_half = ref_inputs[0] + ref_layer[0](ref_inputs[0])
    ref_out = family.reference_sparsify(ref_layer, ref_half)

    fast_inputs = [x.to(device).requires_grad_(True)] + [models.fast_parameter(name) for name in names]
    plain_inputs = [x.to(device).requires_grad_(True)] + [
        low[name].detach().requires_grad_(True) for name in names
    ]
    plain_state = low | dict(zip(names, plain_inputs[1:], strict=True))
    block = models.fast.blocks[layer]
    with autocast(models.precision, device):
        fast_out = run_block(block, fast_inputs[0])
        # the same forward again (under autograd, so the same attention path) for the codes' sides
        fast_codes = family.fast_codes(block, block.compress(fast_inputs[0]))
        plain_half = family.plain.compress(plain_state, layer, plain_inputs[0], config.heads)
        plain_out, plain_pres = family.plain.sparsify(plain_state, layer, plain_half, config.eta, config.lam)

    agree = [
        (fast.detach().cpu() > 0).eq(ref > 0) & (plain_pre.detach().cpu() > 0).eq(ref > 0)
        for fast, plain_pre, ref in zip(
            fast_codes, plain_pres, family.reference_codes(ref_layer, ref_half.detach()), strict=True
        )
    ]
    if family.token_mask:
        keep = torch.stack([a.all(dim=-1) for a in agree]).all(dim=0).unsqueeze(-1)  # (B, N, 1)
    else:
        (keep,) = agree
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * keep

    def gradients(out, inputs):
        grads = torch.autograd.grad((out.double() * g.to(out.device)).sum(), inputs)
        return [grad.double().cpu() for grad in grads]

    ref_grads = gradients(ref_out, ref_inputs)
    fast_grads, plain_grads = gradients(fast_out, fast_inputs), gradients(plain_out, plain_inputs)
    return LayerGradients(
        {
            name: errors(fast, plain_grad, ref, models.u)
            for name, fast, plain_grad, ref in zip(
                ["input", *names], fast_grads, plain_grads, ref_grads, strict=True
            )
        },
        errors(fast_out, plain_out, ref_out, models.u),
        int(keep.sum()),
        keep.numel(),
    )
