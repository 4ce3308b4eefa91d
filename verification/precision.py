"""Fast model vs float64 reference in every precision, by the FlashAttention rule (math.md §8).

For a pure low-precision run the inputs and parameters are rounded to the low dtype once and the
reference runs in float64 on those rounded values; for an autocast run the float32 master values are
the inputs. The plain implementation (verification/plain.py: explicit softmax, three-matmul ISTA)
runs on the same values in the same precision, and the fast error must satisfy

    max|fast − ref| <= 2·max|plain − ref| + 4u(1 + max|ref|).

``python -m verification.precision`` prints the errors at CRATE-T shapes (the issue note's table).
"""

import argparse
import contextlib
from dataclasses import dataclass

import torch

import reference
from crate import CRATE, CRATEConfig, convert_official_state_dict, load_official_state_dict
from verification import plain

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


def fast_model(state: dict, *, heads: int, patch_size: int, channels: int, fused: bool, dtype, device="cpu"):
    """The fast CRATE with an official state dict loaded (values copied as they are in ``state``)."""
    dim = state["cls_token"].shape[-1]
    grid = int((state["pos_embedding"].shape[1] - 1) ** 0.5)
    config = CRATEConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=channels,
        num_classes=state["mlp_head.1.weight"].shape[0],
        dim=dim,
        depth=plain.depth(state),
        heads=heads,
        fused_attn=fused,
    )
    model = CRATE(config).to(device=device, dtype=dtype)
    load_official_state_dict(model, state)
    return model.eval()


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
    """One layer's outputs from the three implementations: z_half and the ISTA output, plus the
    ISTA pre-activations of plain and reference (for ReLU-flip allowances)."""

    fast_half: torch.Tensor
    fast_out: torch.Tensor
    plain_half: torch.Tensor
    plain_out: torch.Tensor
    plain_pre: torch.Tensor
    ref_half: torch.Tensor
    ref_out: torch.Tensor
    ref_pre: torch.Tensor


def _models(
    state: dict, heads: int, patch_size: int, channels: int, precision: str, fused: bool, device: str
):
    """(rounded values, the same in float64, the reference on them, the fast model on them)."""
    low, ref_values = rounded(state, precision)
    ref_model = reference.OfficialCRATE.from_state_dict(
        ref_values, heads=heads, patch_size=patch_size, channels=channels
    )
    model = fast_model(
        low,
        heads=heads,
        patch_size=patch_size,
        channels=channels,
        fused=fused,
        dtype=PRECISIONS[precision][0],
        device=device,
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
):
    """Each layer fed the (rounded) reference input of that layer; yields one LayerResult per layer.

    ``state``: float64 official state dict; ``X``: float64 stream (B, N, d) entering layer 0.
    """
    dtype = PRECISIONS[precision][0]
    low, ref_values, ref_model, model = _models(state, heads, patch_size, channels, precision, fused, device)
    low = {key: value.to(device) for key, value in low.items()}
    with torch.no_grad():
        states = ref_model.transformer.forward_intermediates(X.to(dtype).double())
        for layer, (block, ref_state) in enumerate(zip(model.blocks, states, strict=True)):
            x = ref_state.input.to(device=device, dtype=dtype)
            with autocast(precision, device):
                fast_half, fast_out = block.compress(x), block(x)
                plain_half = plain.compress(low, layer, x, heads)
                plain_pre = plain.ista_preactivation(low, layer, plain_half)
            yield LayerResult(
                fast_half=fast_half.cpu(),
                fast_out=fast_out.cpu(),
                plain_half=plain_half.cpu(),
                plain_out=torch.relu(plain_pre).cpu(),
                plain_pre=plain_pre.cpu(),
                ref_half=ref_state.mssa,
                ref_out=ref_state.ista,
                ref_pre=plain.ista_preactivation(ref_values, layer, ref_state.mssa),  # float64: = reference
            )


def layer_gradients(
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
) -> dict[str, Errors]:
    """Gradients of ⟨layer output, g⟩ with respect to the layer's input and each of its parameters,
    fast and plain against the float64 reference, keyed by official parameter name ("input" for the
    input). g is random, and zero wherever the three disagree on the side of the ReLU: the backward
    is discontinuous there (math.md §8.4), so this imposes the reference's ReLU mask."""
    dtype, _, u = PRECISIONS[precision]
    low, _, ref_model, model = _models(state, heads, patch_size, channels, precision, fused, device)
    with torch.no_grad():
        x = ref_model.transformer.forward_intermediates(X.to(dtype).double())[layer].input.to(dtype)
    prefix = f"transformer.layers.{layer}."
    names = [key for key in state if key.startswith(prefix)]
    fast_names = dict(zip(state, convert_official_state_dict(state), strict=True))

    ref_inputs = [x.double().requires_grad_(True)] + [ref_model.get_parameter(name) for name in names]
    mssa, ista = ref_model.transformer.layers[layer]
    ref_out = ista(ref_inputs[0] + mssa(ref_inputs[0]))

    fast_inputs = [x.to(device).requires_grad_(True)] + [
        model.get_parameter(fast_names[name]) for name in names
    ]
    plain_inputs = [x.to(device).requires_grad_(True)] + [
        low[name].to(device).requires_grad_(True) for name in names
    ]
    plain_state = {key: value.to(device) for key, value in low.items()} | dict(
        zip(names, plain_inputs[1:], strict=True)
    )
    with autocast(precision, device):
        fast_out = model.blocks[layer](fast_inputs[0])
        plain_half = plain.compress(plain_state, layer, plain_inputs[0], heads)
        plain_out = torch.relu(plain.ista_preactivation(plain_state, layer, plain_half))

    active = ref_out.detach() > 0
    agree = (fast_out.detach().cpu() > 0).eq(active) & (plain_out.detach().cpu() > 0).eq(active)
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * agree

    def gradients(out, inputs):
        grads = torch.autograd.grad((out.double() * g.to(out.device)).sum(), inputs)
        return [grad.double().cpu() for grad in grads]

    ref_grads = gradients(ref_out, ref_inputs)
    fast_grads, plain_grads = gradients(fast_out, fast_inputs), gradients(plain_out, plain_inputs)
    return {
        name: errors(fast, plain_grad, ref, u)
        for name, fast, plain_grad, ref in zip(
            ["input", *names], fast_grads, plain_grads, ref_grads, strict=True
        )
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Fast vs float64 reference errors at CRATE-T layer shapes.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from verification.strategies import OfficialProblem

    precisions = [p for p in PRECISIONS if p != "tf32" or args.device == "cuda"]
    print(
        f"CRATE-T layer (B=2, N=197, d=384, K=6, p=64) on {args.device}: max abs error vs float64 reference"
    )
    print("precision | attention | weights | z_half fast/plain | out fast/plain | grad x fast/plain")
    for precision in precisions:
        for peaky in (False, True):
            problem = OfficialProblem(
                batch=2, tokens=197, heads=6, head_dim=64, depth=1, seed=args.seed, scale=1.0, peaky=peaky
            )
            for fused in (True, False):
                kwargs = dict(
                    heads=6,
                    patch_size=2,
                    channels=problem.channels,
                    precision=precision,
                    fused=fused,
                    device=args.device,
                )
                (result,) = layer_results(problem.state_dict(), problem.X, **kwargs)
                u = PRECISIONS[precision][2]
                half = errors(result.fast_half, result.plain_half, result.ref_half, u)
                out = errors(result.fast_out, result.plain_out, result.ref_out, u)
                grad = layer_gradients(problem.state_dict(), problem.X, **kwargs)["input"]
                attention, weights = ("fused" if fused else "explicit"), ("peaky" if peaky else "soft")
                print(
                    f"{precision} | {attention} | {weights} | {half.fast:.2e} / {half.plain:.2e} | "
                    f"{out.fast:.2e} / {out.plain:.2e} | {grad.fast:.2e} / {grad.plain:.2e}"
                )


if __name__ == "__main__":
    main()
