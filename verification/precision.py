"""Fast model vs float64 reference in every precision, by the FlashAttention rule (docs/math.md §8).

For a pure low-precision run the inputs and parameters are rounded to the low dtype once and the
reference runs in float64 on those rounded values; for an autocast run the float32 master values are
the inputs. The plain implementation (verification/plain.py: explicit softmax, three-matmul ISTA;
verification/plain_alpha.py for CRATE-α: the released ODL code) runs on the same values in the same
precision, and the fast error must satisfy

    max|fast − ref| <= 2·max|plain − ref| + 4u(1 + max|ref|).

The machinery serves both families (a ``Family`` says how to build each implementation from a
released-layout state dict; it is detected from the state dict). ``python -m verification.precision``
prints the errors at CRATE-T layer shapes, ``--family alpha`` at CRATE-α layer shapes (m = 4d).
"""

import argparse
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

import reference
from crate import (
    CRATE,
    CRATEAlpha,
    CRATEAlphaConfig,
    CRATEConfig,
    convert_official_state_dict,
    load_official_state_dict,
)
from crate.models.released import official_layout
from verification import plain, plain_alpha

# the shapes of CRATE-T's layer, at which both families are measured (the tests' OfficialProblem and
# OfficialAlphaProblem fields; CRATE-α's dictionaries have m = 4d atoms, that problem's default)
CRATE_T_LAYER = dict(batch=2, tokens=197, heads=6, head_dim=64, depth=1, scale=1.0)

# name: (dtype of tensors, autocast dtype or None, unit roundoff u); "tf32" is float32 with TF32
# matmuls allowed (CUDA only; 10-bit mantissa)
PRECISIONS = {
    "float64": (torch.float64, None, 2.0**-53),
    "float32": (torch.float32, None, 2.0**-24),
    "tf32": (torch.float32, None, 2.0**-11),
    "bfloat16": (torch.bfloat16, None, 2.0**-8),
    "float16": (torch.float16, None, 2.0**-11),
    "bf16-autocast": (torch.float32, torch.bfloat16, 2.0**-8),
}


@dataclass(frozen=True)
class Errors:
    """Max abs errors against the float64 reference, and the rule's bound."""

    fast: float
    plain: float
    reference_max: float
    u: float

    @property
    def bound(self) -> float:
        return 2 * self.plain + 4 * self.u * (1 + self.reference_max)

    @property
    def holds(self) -> bool:
        return self.fast <= self.bound

    def __str__(self) -> str:
        ratio = self.fast / self.plain if self.plain else float("inf")
        return f"fast {self.fast:.3e}, plain {self.plain:.3e} (ratio {ratio:.2f}), bound {self.bound:.3e}"


def errors(fast: torch.Tensor, plain_result: torch.Tensor, ref: torch.Tensor, u: float) -> Errors:
    def error(tensor):
        return (tensor.double() - ref).abs().max().item()

    return Errors(error(fast), error(plain_result), ref.abs().max().item(), u)


@dataclass(frozen=True)
class Family:
    """What the machinery below needs to know of a model family (CRATE or CRATE-α): how to build the
    fast model and the float64 reference from a released-layout state dict, the plain functions
    (``compress(state, layer, x, heads, attention)``, ``sparsify(state, layer, z)`` -> (output,
    pre-activations)), how to read the codes (the ReLU outputs, last = the one whose non-zeros are
    counted) from the fast and the reference layer, and how the backward's ReLU flips are masked:
    entry-wise where the layer output is the codes (CRATE's ISTA), token-wise where it is a dense
    function of them (CRATE-α's z + a₂D₁ᵀ; tokens are independent in the block)."""

    name: str
    title: str
    model_class: type
    make_config: Callable[..., CRATEConfig]  # (state, heads, patch_size, channels, fused) -> config
    make_reference: Callable[..., nn.Module]  # (float64 state, heads, patch_size, channels) -> model
    plain: ModuleType
    fast_codes: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]  # (block, z_half)
    reference_sparsify: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (layer modules, z_half)
    reference_codes: Callable[[nn.Module, torch.Tensor], list[torch.Tensor]]
    token_mask: bool


def _grid(state: dict) -> int:
    return int((state["pos_embedding"].shape[1] - 1) ** 0.5)


def _crate_config(state: dict, heads: int, patch_size: int, channels: int, fused: bool) -> CRATEConfig:
    return CRATEConfig(
        img_size=_grid(state) * patch_size,
        patch_size=patch_size,
        in_chans=channels,
        num_classes=state["mlp_head.1.weight"].shape[0],
        dim=state["cls_token"].shape[-1],
        depth=plain.depth(state),
        heads=heads,
        fused_attn=fused,
    )


def _alpha_config(state: dict, heads: int, patch_size: int, channels: int, fused: bool) -> CRATEAlphaConfig:
    dim, state_channels, state_patch, _ = state["conv1.weight"].shape
    if (state_patch, state_channels) != (patch_size, channels):
        raise ValueError(
            f"conv1.weight has {state_channels} channels and {state_patch}×{state_patch} patches, "
            f"not {channels} and {patch_size}×{patch_size}"
        )
    return CRATEAlphaConfig(
        img_size=_grid(state) * patch_size,
        patch_size=patch_size,
        in_chans=channels,
        num_classes=state["mlp_head.1.weight"].shape[0],
        dim=dim,
        depth=plain_alpha.depth(state),
        heads=heads,
        dictionary_ratio=state["transformer.layers.0.1.fn.D"].shape[-1] // dim,
        fused_attn=fused,
    )


CRATE_FAMILY = Family(
    name="crate",
    title="CRATE-T layer (B=2, N=197, d=384, K=6, p=64)",
    model_class=CRATE,
    make_config=_crate_config,
    make_reference=lambda state, heads, patch_size, channels: reference.OfficialCRATE.from_state_dict(
        state, heads=heads, patch_size=patch_size, channels=channels
    ),
    plain=plain,
    fast_codes=lambda block, z: [block.sparsify(z)],
    reference_sparsify=lambda layer, z: layer[1](z),
    reference_codes=lambda layer, z: [layer[1](z)],
    token_mask=False,
)
ALPHA_FAMILY = Family(
    name="alpha",
    title="CRATE-α layer (B=2, N=197, d=384, K=6, p=64, m=4d=1536)",
    model_class=CRATEAlpha,
    make_config=_alpha_config,
    make_reference=lambda state, heads, patch_size, channels: reference.OfficialCRATEAlpha.from_state_dict(
        state, heads=heads
    ),
    plain=plain_alpha,
    fast_codes=lambda block, z: list(block.odl.codes(block.norm2(z))),
    reference_sparsify=lambda layer, z: z + layer[1](z),
    reference_codes=lambda layer, z: list(layer[1].fn.codes(layer[1].norm(z))),
    token_mask=True,
)
FAMILIES = {family.name: family for family in (CRATE_FAMILY, ALPHA_FAMILY)}


def family_of(state: dict) -> Family:
    """The family of a released-layout state dict (CRATE-α's has a Conv2d patch embedding)."""
    layout = official_layout(state)
    if layout is None:
        raise ValueError("not a released-layout state dict (no pos_embedding)")
    return ALPHA_FAMILY if layout == "CRATE-α" else CRATE_FAMILY


def fast_model(
    state: dict,
    *,
    heads: int,
    patch_size: int,
    channels: int,
    fused: bool,
    dtype,
    device="cpu",
    family: Family | None = None,
):
    """The fast model of the state dict's family with a released-layout state dict loaded (values
    copied as they are in ``state``)."""
    family = family or family_of(state)
    config = family.make_config(state, heads, patch_size, channels, fused)
    model = family.model_class(config).to(device=device, dtype=dtype)
    load_official_state_dict(model, state)
    return model.eval()


def problem_kwargs(problem, family: Family, fused: bool, device: str = "cpu", **more) -> dict:
    """The keyword arguments of ``fast_model``, ``layer_results`` and ``layer_gradient_check`` for a
    problem of verification/strategies.py (its heads, patch size and channels), and ``more``
    (``precision`` or ``dtype``)."""
    return dict(
        heads=problem.heads,
        patch_size=problem.patch_size,
        channels=problem.channels,
        fused=fused,
        device=device,
        family=family,
        **more,
    )


def rounded(state: dict, precision: str) -> tuple[dict, dict]:
    """(values the fast and plain code run on, the same values in float64 for the reference)."""
    dtype = PRECISIONS[precision][0]
    low = {key: value.to(dtype) for key, value in state.items()}
    return low, {key: value.double() for key, value in low.items()}


@contextlib.contextmanager
def autocast(precision: str, device: str = "cpu"):
    """The precision policy of ``precision``: autocast, and TF32 matmuls for "tf32" (else TF32 off)."""
    autocast_dtype = PRECISIONS[precision][1]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        with torch.autocast(
            device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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


def _models(
    state: dict,
    heads: int,
    patch_size: int,
    channels: int,
    precision: str,
    fused: bool,
    device: str,
    family: Family,
):
    """(rounded values, the same in float64, the reference on them, the fast model on them)."""
    low, ref_values = rounded(state, precision)
    ref_model = family.make_reference(ref_values, heads, patch_size, channels)
    model = fast_model(
        low,
        heads=heads,
        patch_size=patch_size,
        channels=channels,
        fused=fused,
        dtype=PRECISIONS[precision][0],
        device=device,
        family=family,
    )
    return low, ref_values, ref_model, model


def layer_results(
    state: dict,
    X: torch.Tensor,
    *,
    heads: int,
    patch_size: int,
    channels: int,
    precision: str,
    fused: bool,
    device: str = "cpu",
    family: Family | None = None,
):
    """Each layer fed the (rounded) reference input of that layer; yields one LayerResult per layer.

    ``state``: float64 released-layout state dict (CRATE or CRATE-α, detected when ``family`` is
    None); ``X``: float64 stream (B, N, d) entering layer 0.
    """
    family = family or family_of(state)
    dtype = PRECISIONS[precision][0]
    low, ref_values, ref_model, model = _models(
        state, heads, patch_size, channels, precision, fused, device, family
    )
    low = {key: value.to(device) for key, value in low.items()}
    with torch.no_grad():
        states = ref_model.transformer.forward_intermediates(X.to(dtype).double())
        for layer, (block, ref_state) in enumerate(zip(model.blocks, states, strict=True)):
            x = ref_state.input.to(device=device, dtype=dtype)
            with autocast(precision, device):
                fast_half, fast_out = block.compress(x), block(x)
                fast_codes = family.fast_codes(block, fast_half)[-1]
                plain_half = family.plain.compress(low, layer, x, heads)
                plain_out, plain_pres = family.plain.sparsify(low, layer, plain_half)
            _, ref_pres = family.plain.sparsify(ref_values, layer, ref_state.mssa)  # float64: = reference
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
                ref_codes=family.reference_codes(ref_model.transformer.layers[layer], ref_state.mssa)[-1],
                ref_pre=ref_pres[-1],
            )


@dataclass(frozen=True)
class LayerGradients:
    """``errors``: per official name ("input" for the layer input); ``kept`` of ``total`` entries
    (CRATE) or tokens (CRATE-α) keep a non-zero upstream gradient g."""

    errors: dict[str, Errors]
    kept: int
    total: int


def layer_gradient_check(
    state: dict,
    X: torch.Tensor,
    *,
    heads: int,
    patch_size: int,
    channels: int,
    precision: str,
    fused: bool,
    layer: int = 0,
    seed: int = 0,
    device: str = "cpu",
    family: Family | None = None,
) -> LayerGradients:
    """Gradients of ⟨layer output, g⟩ with respect to the layer's input and each of its parameters,
    fast and plain against the float64 reference, keyed by official parameter name ("input" for the
    input). g is random, and zero wherever the three disagree on the side of a ReLU: the backward is
    discontinuous there (docs/math.md §8.4), so this imposes the reference's ReLU mask. CRATE's output is
    its codes, so g is zeroed entry-wise; CRATE-α's output z + a₂D₁ᵀ is dense, so g is zeroed on every
    token where any code of a₁ or a₂ flips (the block acts on tokens independently, so g = 0 on a
    token's output removes that token's discontinuity from every gradient)."""
    family = family or family_of(state)
    dtype, _, u = PRECISIONS[precision]
    low, _, ref_model, model = _models(state, heads, patch_size, channels, precision, fused, device, family)
    with torch.no_grad():
        x = ref_model.transformer.forward_intermediates(X.to(dtype).double())[layer].input.to(dtype)
    prefix = f"transformer.layers.{layer}."
    names = [key for key in state if key.startswith(prefix)]
    fast_names = dict(zip(state, convert_official_state_dict(state), strict=True))

    ref_inputs = [x.double().requires_grad_(True)] + [ref_model.get_parameter(name) for name in names]
    ref_layer = ref_model.transformer.layers[layer]
    ref_half = ref_inputs[0] + ref_layer[0](ref_inputs[0])
    ref_out = family.reference_sparsify(ref_layer, ref_half)

    fast_inputs = [x.to(device).requires_grad_(True)] + [
        model.get_parameter(fast_names[name]) for name in names
    ]
    plain_inputs = [x.to(device).requires_grad_(True)] + [
        low[name].to(device).requires_grad_(True) for name in names
    ]
    plain_state = {key: value.to(device) for key, value in low.items()} | dict(
        zip(names, plain_inputs[1:], strict=True)
    )
    block = model.blocks[layer]
    with autocast(precision, device):
        fast_out = block(fast_inputs[0])
        # the same forward again (under autograd, so the same attention path) for the codes' sides
        fast_codes = family.fast_codes(block, block.compress(fast_inputs[0]))
        plain_half = family.plain.compress(plain_state, layer, plain_inputs[0], heads)
        plain_out, plain_pres = family.plain.sparsify(plain_state, layer, plain_half)

    agree = [
        (fast.detach().cpu() > 0).eq(ref > 0) & (plain_pre.detach().cpu() > 0).eq(ref > 0)
        for fast, plain_pre, ref in zip(
            fast_codes, plain_pres, family.reference_codes(ref_layer, ref_half.detach()), strict=True
        )
    ]
    if family.token_mask:
        keep = torch.stack([a.all(dim=-1) for a in agree]).all(dim=0).unsqueeze(-1)  # (B, N, 1)
        kept, total = int(keep.sum()), keep.numel()
    else:
        (keep,) = agree
        kept, total = int(keep.sum()), keep.numel()
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * keep

    def gradients(out, inputs):
        grads = torch.autograd.grad((out.double() * g.to(out.device)).sum(), inputs)
        return [grad.double().cpu() for grad in grads]

    ref_grads = gradients(ref_out, ref_inputs)
    fast_grads, plain_grads = gradients(fast_out, fast_inputs), gradients(plain_out, plain_inputs)
    return LayerGradients(
        {
            name: errors(fast, plain_grad, ref, u)
            for name, fast, plain_grad, ref in zip(
                ["input", *names], fast_grads, plain_grads, ref_grads, strict=True
            )
        },
        kept,
        total,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Fast vs float64 reference errors at CRATE-T (or CRATE-α) layer shapes."
    )
    parser.add_argument("--family", choices=sorted(FAMILIES), default="crate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from verification.strategies import OfficialAlphaProblem, OfficialProblem

    family = FAMILIES[args.family]
    alpha = family is ALPHA_FAMILY
    precisions = [p for p in PRECISIONS if p != "tf32" or args.device == "cuda"]
    print(f"{family.title} on {args.device}: max abs error vs float64 reference")
    if alpha:
        print(
            "precision | attention | weights | z_half fast/plain | out fast/plain | codes a2 fast/plain | "
            "grad x fast/plain | tokens kept for the backward"
        )
    else:
        print("precision | attention | weights | z_half fast/plain | out fast/plain | grad x fast/plain")
    for precision in precisions:
        for peaky in (False, True):
            problem_class = OfficialAlphaProblem if alpha else OfficialProblem
            problem = problem_class(**CRATE_T_LAYER, seed=args.seed, peaky=peaky)
            for fused in (True, False):
                kwargs = problem_kwargs(problem, family, fused, args.device, precision=precision)
                (result,) = layer_results(problem.state_dict(), problem.X, **kwargs)
                u = PRECISIONS[precision][2]
                half = errors(result.fast_half, result.plain_half, result.ref_half, u)
                out = errors(result.fast_out, result.plain_out, result.ref_out, u)
                check = layer_gradient_check(problem.state_dict(), problem.X, **kwargs)
                grad = check.errors["input"]
                attention, weights = ("fused" if fused else "explicit"), ("peaky" if peaky else "soft")
                row = f"{precision} | {attention} | {weights} | {half.fast:.2e} / {half.plain:.2e} | "
                row += f"{out.fast:.2e} / {out.plain:.2e} | "
                if alpha:
                    codes = errors(result.fast_codes, result.plain_codes, result.ref_codes, u)
                    row += f"{codes.fast:.2e} / {codes.plain:.2e} | "
                row += f"{grad.fast:.2e} / {grad.plain:.2e}"
                if alpha:
                    row += f" | {check.kept}/{check.total}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
