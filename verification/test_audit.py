"""Every number of the white-box audit (crate.analysis.audit, docs/math.md §7; for CRATE-α
docs/crate-alpha.md §2) equals an independent float64 computation on the reference's layer states:
the float64 ``reference.OfficialCRATE`` / ``OfficialCRATEAlpha`` built from the same released-layout
state dict, U_k read head by head from the qkv rows, LASSO objectives written out token by token,
spectral norms from singular values.

Tolerance: |audit − expected| <= 1e-9·(1 + |expected mean|) for each mean and std. Both sides are
float64 functions of states that agree to ~1e-15 relative (test_fast_model.py); the measures are
well conditioned on these small problems (log-determinants of I + γA with normalised or O(1) tokens,
largest singular values, sums), so 1e-9 is a wide margin (measured worst error 1.9e-5 of it over the
CI examples) that a wrong axis, operand or constant cannot meet. Non-zero fractions are counts:
they may differ only by codes whose reference pre-activation lies within the float64 comparison
tolerance of zero.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from crate import analysis
from verification.asserts import assert_within
from verification.precision import ALPHA_FAMILY, CRATE_FAMILY
from verification.strategies import official_alpha_problems, official_problems, scaled_settings
from verification.test_outputs import _one_thread, fast_float64  # noqa: F401 (an autouse fixture)

EPS = 0.1  # the audit's coding precision, the official measurement tool's


def _stats(values: torch.Tensor) -> dict:
    return dict(mean=values.mean().item(), std=values.std().item() if values.numel() > 1 else 0.0)


def _sigma_max(matrix: torch.Tensor) -> float:
    return torch.linalg.svdvals(matrix)[0].item()


def _subspaces(mssa) -> list[torch.Tensor]:
    """[U_1 … U_K], each (d, p): U_k is the transpose of qkv rows k·p .. (k+1)·p − 1."""
    weight, K = mssa.qkv.weight, mssa.heads
    p = weight.shape[0] // K
    return [weight[k * p : (k + 1) * p].T for k in range(K)]


def _fraction_nonzero(codes: torch.Tensor) -> torch.Tensor:
    return (codes > 0).double().mean((-2, -1))


def _shared_fields(layer, state) -> tuple[dict, list[torch.Tensor]]:
    """The MSSA fields of both families: compression in and out (normalised and raw), their change,
    the orthonormality gap and the head coherence."""
    norm1, mssa = layer[0].norm, layer[0].fn
    Us = _subspaces(mssa)
    U = torch.stack(Us)
    y_in, y_out = norm1(state.input), norm1(state.mssa)
    rate = {
        (name, normalize): reference.compression_rate(y, U, EPS, normalize=normalize)
        for name, y in (("in", y_in), ("out", y_out))
        for normalize in (True, False)
    }
    eye = torch.eye(Us[0].shape[1], dtype=torch.float64)
    coherence = [
        _sigma_max(Uj.T @ Uk) / (_sigma_max(Uj) * _sigma_max(Uk))
        for j, Uj in enumerate(Us)
        for k, Uk in enumerate(Us)
        if j != k
    ]
    fields = dict(
        compression_in=_stats(rate["in", True]),
        compression_out=_stats(rate["out", True]),
        compression_change=_stats(rate["out", True] - rate["in", True]),
        raw_compression_in=_stats(rate["in", False]),
        raw_compression_out=_stats(rate["out", False]),
        orthonormality_gap=max(_sigma_max(Uk.T @ Uk - eye) for Uk in Us),
        head_coherence=max(coherence, default=0.0),
    )
    return fields, Us


def _lasso(codes: torch.Tensor, u: torch.Tensor, D: torch.Tensor, lam: float) -> torch.Tensor:
    """Per image: Σ_tokens ½‖u_i − D a_i‖² + λ‖a_i‖₁, with u_i, a_i the token rows."""
    total = torch.zeros(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        residual = u[:, i] - codes[:, i] @ D.T
        total += 0.5 * (residual**2).sum(-1) + lam * codes[:, i].abs().sum(-1)
    return total


def _crate_expected(layer, state) -> tuple[dict, dict]:
    """(expected fields, allowed non-zero differences) of a CRATE layer."""
    fields, _ = _shared_fields(layer, state)
    ista = layer[1].fn
    D, eta, lam = ista.weight, ista.eta, ista.lam
    u = layer[1].norm(state.mssa)
    pre = u + eta * (u - u @ D.T) @ D - eta * lam  # the ISTA step before its ReLU
    fields |= dict(
        nonzero=_stats(_fraction_nonzero(state.ista)),
        eta_lipschitz=eta * _sigma_max(D) ** 2,
        lasso_start=_stats(_lasso(u, u, D, lam)),
        lasso_end=_stats(_lasso(state.ista, u, D, lam)),
    )
    return fields, dict(nonzero=_flip_allowance(pre))


def _alpha_expected(layer, state) -> tuple[dict, dict]:
    """(expected fields, allowed non-zero differences) of a CRATE-α layer."""
    fields, _ = _shared_fields(layer, state)
    odl = layer[1].fn
    D, D1, eta, lam = odl.D, odl.D1, odl.eta, odl.lam
    u = layer[1].norm(state.mssa)
    a1, a2 = odl.codes(u)
    pre1 = eta * u @ D - eta * lam
    pre2 = a1 - eta * (a1 @ D.T - u) @ D - eta * lam
    fields |= dict(
        nonzero_a1=_stats(_fraction_nonzero(a1)),
        nonzero_a2=_stats(_fraction_nonzero(a2)),
        eta_lipschitz=eta * _sigma_max(D) ** 2,
        lasso_start=_stats(0.5 * (u**2).sum((-2, -1))),
        lasso_step1=_stats(_lasso(a1, u, D, lam)),
        lasso_step2=_stats(_lasso(a2, u, D, lam)),
        decoder_drift=(torch.linalg.vector_norm(D1 - D) / torch.linalg.vector_norm(D)).item(),
    )
    return fields, dict(nonzero_a1=_flip_allowance(pre1), nonzero_a2=_flip_allowance(pre2))


def _flip_allowance(pre: torch.Tensor) -> float:
    """The largest per-image fraction of pre-activations within 1e-10·(1 + max|pre|) of zero: the codes
    whose side of the ReLU the fast model may see otherwise."""
    near = pre.abs() <= 1e-10 * (1 + pre.abs().max().item())
    return near.double().mean((-2, -1)).max().item()


@pytest.mark.parametrize(
    "problems, expected_fields",
    [(official_problems, _crate_expected), (official_alpha_problems, _alpha_expected)],
    ids=["crate", "alpha"],
)
@scaled_settings(0.1)
@given(st.data())
def test_audit_numbers_equal_independent_computation_on_reference_states(problems, expected_fields, data):
    problem = data.draw(problems(peaky=True))
    family = ALPHA_FAMILY if problems is official_alpha_problems else CRATE_FAMILY
    model = fast_float64(family, problem)
    ref_model = problem.model()
    images = problem.images
    rows = analysis.audit(model, images)
    with torch.no_grad():
        states = ref_model.forward_intermediates(images)
        expected = [
            expected_fields(layer, state)
            for layer, state in zip(ref_model.transformer.layers, states, strict=True)
        ]
    assert len(rows) == len(expected)
    for index, (row, (fields, allowances)) in enumerate(zip(rows, expected, strict=True)):
        assert row["layer"] == index
        assert set(row) == {"layer", *fields}, f"layer {index}: fields {sorted(row)} not all checked"
        for name, value in fields.items():
            if isinstance(value, dict):
                tolerance = allowances.get(name, 1e-9 * (1 + abs(value["mean"])))
                for part in ("mean", "std"):
                    error = abs(row[name][part] - value[part])
                    assert_within(error, tolerance, f"layer {index} {name} {part}")
            else:
                assert_within(abs(row[name] - value), 1e-9 * (1 + abs(value)), f"layer {index} {name}")
