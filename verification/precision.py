"""Fast model vs float64 reference in every precision, by the FlashAttention rule (docs/math.md §8).

The rule, the plain implementations and the layer-by-layer machinery are the installed package's
(crate/verify/: rule.py, plain.py, plain_alpha.py, families.py, layers.py), which `crate verify` and
the trainer's gate run on a live model; this module builds the models of a test problem from a
released-layout state dict and keeps the call signatures the tests use. ``python -m
verification.precision`` prints the errors at CRATE-T layer shapes, ``--family alpha`` at CRATE-α
layer shapes (m = 4d), ``--family mae`` CRATE-MAE's parts at CRATE-MAE-T shapes with one layer in
each stack (crate/verify/mae.py through the gate).
"""

import argparse

import torch

from crate.verify.families import ALPHA_FAMILY, CRATE_FAMILY, FAMILIES, Family, family_of
from crate.verify.layers import LayerGradients, LayerResult, models_from_state, reference_states
from crate.verify.layers import layer_gradient_check as _layer_gradient_check
from crate.verify.layers import layer_results as _layer_results
from crate.verify.rule import PRECISIONS, Errors, autocast, errors, rounded

__all__ = [
    "ALPHA_FAMILY",
    "CRATE_FAMILY",
    "FAMILIES",
    "PRECISIONS",
    "Errors",
    "Family",
    "LayerGradients",
    "LayerResult",
    "autocast",
    "errors",
    "family_of",
    "fast_model",
    "layer_gradient_check",
    "layer_results",
    "problem_kwargs",
    "rounded",
]

# the shapes of CRATE-T's layer, at which both families are measured (the tests' OfficialProblem and
# OfficialAlphaProblem fields; CRATE-α's dictionaries have m = 4d atoms, that problem's default)
CRATE_T_LAYER = dict(batch=2, tokens=197, heads=6, head_dim=64, depth=1, scale=1.0)
TITLES = {
    "mae": "CRATE-MAE-T parts, one layer per stack (B=2, 224², P=16, N=197, d=384, K=6, p=64, 75% masked)",
    "crate": "CRATE-T layer (B=2, N=197, d=384, K=6, p=64)",
    "alpha": "CRATE-α layer (B=2, N=197, d=384, K=6, p=64, m=4d=1536)",
}


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
    precision = next(name for name, (tensor_dtype, amp, _) in PRECISIONS.items() if tensor_dtype == dtype)
    kwargs = dict(heads=heads, patch_size=patch_size, channels=channels, fused=fused, device=device)
    return models_from_state(state, precision=precision, family=family, **kwargs).fast


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


def layer_results(state: dict, X: torch.Tensor, **kwargs):
    """Each layer fed the (rounded) reference input of that layer; yields one LayerResult per layer.

    ``state``: float64 released-layout state dict (CRATE or CRATE-α, detected when ``family`` is
    None); ``X``: float64 stream (B, N, d) entering layer 0; ``kwargs``: ``models_from_state``'s.
    """
    yield from _layer_results(models_from_state(state, **kwargs), X)


def layer_gradient_check(
    state: dict, X: torch.Tensor, *, layer: int = 0, seed: int = 0, **kwargs
) -> LayerGradients:
    """crate.verify.layers.layer_gradient_check of ``layer`` fed the reference's input of that layer
    from the stream ``X``; ``kwargs``: ``models_from_state``'s."""
    models = models_from_state(state, **kwargs)
    x = reference_states(models, X)[layer].input
    return _layer_gradient_check(models, x, layer, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Fast vs float64 reference errors at CRATE-T (or CRATE-α) layer shapes."
    )
    parser.add_argument("--family", choices=[*sorted(FAMILIES), "mae"], default="crate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from verification.strategies import OfficialAlphaProblem, OfficialProblem

    if args.family == "mae":
        return mae_table(args.device, args.seed)
    family = FAMILIES[args.family]
    alpha = family is ALPHA_FAMILY
    precisions = [p for p in PRECISIONS if p != "tf32" or args.device == "cuda"]
    print(f"{TITLES[family.name]} on {args.device}: max abs error vs float64 reference")
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


def mae_table(device: str, seed: int) -> None:
    """Per precision and attention path, each part's outputs and input gradient (train path), fast /
    plain max abs error against the float64 reference, and the gate's verdict of every row."""
    from crate.verify import check_model
    from crate.verify.mae import models_from_state
    from reference import random_official_mae_state_dict

    shapes = dict(dim=384, depth=1, heads=6, head_dim=64, patch_size=16, channels=3, num_patches=196)
    state = random_official_mae_state_dict(**shapes, generator=torch.Generator().manual_seed(seed))
    images = torch.randn(
        2, 3, 224, 224, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    print(f"{TITLES['mae']} on {device}: max abs error vs float64 reference, fast / plain")
    precisions = [p for p in PRECISIONS if p != "float64" and (p != "tf32" or device == "cuda")]
    for precision in precisions:
        for fused in (True, False):
            models = models_from_state(state, heads=6, precision=precision, fused=fused, device=device)
            report = check_model(models.fast.train(), precision, images=images.to(models.dtype))
            cells = [
                f"{row.part} {row.quantity.split(' (')[0]} {row.errors.fast:.2e} / {row.errors.plain:.2e}"
                for row in report.rows
                if row.path == "train" and (not row.quantity.startswith("grad") or "input" in row.quantity)
            ]
            attention = "fused" if fused else "explicit"
            print(f"{precision} | {attention} | {report.verdict()} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
