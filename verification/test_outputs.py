"""What the fast models hand to a user equals the float64 reference's: the attention maps of every
layer and head (``forward_intermediates(..., return_attention=True)``, which ``MSSA.attention``
computes, and the cls-token maps of ``crate.analysis.attention_maps`` that the audit plots), timm's
per-layer features in every format, the pooled features and logits under every pool option (CRATE:
``reference.OfficialCRATE``; CRATE-α: ``reference.OfficialCRATEAlpha``), and the audit's patch PCA
(against an eigendecomposition of the reference's features).

float64 throughout: max|fast − ref| <= 1e-10·(1 + max|ref|), the tolerance of test_fast_model.py
(docs/math.md §8.1), whose layer states these quantities are computed from.
"""

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from crate import analysis, load_official_state_dict
from verification.asserts import assert_close
from verification.precision import ALPHA_FAMILY, CRATE_FAMILY
from verification.strategies import official_alpha_problems, official_problems, scaled_settings

FAMILIES = pytest.mark.parametrize(
    "family, problems",
    [(CRATE_FAMILY, official_problems), (ALPHA_FAMILY, official_alpha_problems)],
    ids=["crate", "alpha"],
)
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
# this model's pool names, timm's aliases, and the reference's pool each stands for
POOLS = pytest.mark.parametrize(
    "pool, reference_pool", [("cls", "cls"), ("token", "cls"), ("mean", "mean"), ("avg", "mean")]
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny shapes, where two OpenMP threads on a busy 2-core machine spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tolerance(ref: torch.Tensor) -> float:
    return 1e-10 * (1 + ref.abs().max().item())


def fast_float64(family, problem, fused: bool = True, **overrides):
    """The family's fast model in float64, in eval mode, with the problem's released-layout state dict
    loaded; ``overrides`` are config fields or timm's names (global_pool=...)."""
    state = problem.state_dict()
    config = family.make_config(state, problem.heads, problem.patch_size, problem.channels, fused)
    model = family.model_class(config, **overrides).double()
    load_official_state_dict(model, state)
    return model.eval()


@FAMILIES
@FUSED
@scaled_settings(0.2)
@given(st.data())
def test_attention_maps_equal_reference(family, problems, fused, data):
    """Every layer's (B, K, N, N) attention, every head, against ``reference ... .attention_maps``; each
    row sums to 1; and the audit's cls-token maps are the reference's row 0 over the patch keys on the
    patch grid."""
    problem = data.draw(problems(peaky=True))
    model = fast_float64(family, problem, fused)
    images = problem.images
    with torch.no_grad():
        expected = problem.model().attention_maps(images)
        states = model.forward_intermediates(
            images, intermediates_only=True, return_layer_states=True, return_attention=True
        )
    grid = model.patch_embed.grid_size
    for layer, (state, ref) in enumerate(zip(states, expected, strict=True)):
        assert_close(state.attention, ref, _tolerance(ref), f"layer {layer} attention")
        rows = state.attention.sum(-1)
        assert_close(rows, torch.ones_like(rows), 1e-12, f"layer {layer} attention row sums")
        cls_maps = analysis.attention_maps(model, images, layer=layer)
        cls_ref = ref[:, :, 0, 1:].unflatten(-1, grid)  # (B, K, h, w): query cls, keys the patches
        assert_close(cls_maps, cls_ref, _tolerance(cls_ref), f"layer {layer} cls-token maps")


@FAMILIES
@scaled_settings(0.2)
@given(st.data())
def test_timm_intermediates_equal_reference(family, problems, data):
    """timm's ``forward_intermediates``: the final features, each layer's output in NCHW (patch grid
    row-major) and NLC, the prefix (cls) tokens, ``norm=True`` (the head's LayerNorm), ``indices``
    with ``stop_early``, and ``forward_features``."""
    problem = data.draw(problems(peaky=True))
    model = fast_float64(family, problem)
    ref_model = problem.model()
    images = problem.images
    B, (h, w) = images.shape[0], model.patch_embed.grid_size
    with torch.no_grad():
        ref_states = [state.ista for state in ref_model.forward_intermediates(images)]
        final, nchw = model.forward_intermediates(images, return_prefix_tokens=True)
        nlc = model.forward_intermediates(images, output_fmt="NLC", norm=True, intermediates_only=True)
        (last,) = model.forward_intermediates(images, indices=[-1], stop_early=True, intermediates_only=True)
        features = model.forward_features(images)
        ref_norm = [ref_model.mlp_head[0](state) for state in ref_states]
    assert_close(final, ref_states[-1], _tolerance(ref_states[-1]), "final features")
    assert_close(features, ref_states[-1], _tolerance(ref_states[-1]), "forward_features")
    for layer, ((spatial, prefix), ref) in enumerate(zip(nchw, ref_states, strict=True)):
        grid = torch.stack(
            [torch.stack([ref[:, 1 + i * w + j] for j in range(w)], -1) for i in range(h)], -2
        )  # (B, d, h, w): patch (i, j) is token 1 + i·w + j
        assert_close(spatial, grid, _tolerance(ref), f"layer {layer} NCHW")
        assert_close(prefix, ref[:, :1], _tolerance(ref), f"layer {layer} prefix token")
        assert_close(
            nlc[layer], ref_norm[layer][:, 1:], _tolerance(ref_norm[layer]), f"layer {layer} NLC norm"
        )
    assert_close(last, nchw[-1][0], 0.0, "indices=[-1], stop_early")
    assert (B, h * w) == tuple(nlc[0].shape[:2])


@FAMILIES
@POOLS
@scaled_settings(0.1)
@given(st.data())
def test_pooled_features_and_logits_equal_reference_under_every_pool(
    family, problems, pool, reference_pool, data
):
    """For every pool option (and its timm alias): the logits, ``forward_head(..., pre_logits=True)``,
    and the features a headless model (``reset_classifier(0)``) returns, against the reference's
    ``pre_logits`` (the pooled token after the head's LayerNorm; "mean" averages all tokens, cls
    included)."""
    problem = data.draw(problems(peaky=True))
    model = fast_float64(family, problem, global_pool=pool)
    ref_model = problem.model(pool=reference_pool)
    images = problem.images
    with torch.no_grad():
        expected_logits = ref_model(images)
        expected_features = ref_model.pre_logits(ref_model.transformer(ref_model.embed(images)))
        logits = model(images)
        features = model.forward_head(model.forward_features(images), pre_logits=True)
        model.reset_classifier(0)
        headless = model(images)
    assert_close(logits, expected_logits, _tolerance(expected_logits), f"logits, pool {pool}")
    assert_close(features, expected_features, _tolerance(expected_features), f"pre-logits, pool {pool}")
    assert_close(headless, expected_features, _tolerance(expected_features), f"headless output, pool {pool}")


@FAMILIES
@scaled_settings(0.1)
@given(st.data())
def test_patch_pca_equals_principal_components_of_reference_features(family, problems, data):
    """``analysis.patch_pca``: the reference's last-layer patch features of the whole batch, centred,
    projected on their first three principal directions (eigenvectors of the covariance, largest
    eigenvalues first), each component min-max scaled to [0, 1], on the patch grid. A principal
    direction has no sign, so each component may be c or 1 − c. Tolerance 1e-8: the direction of
    eigenvalue λ_k moves by ~u·λ_max/gap_k, so draws with a relative eigengap under 1e-4 among the
    first four, or fewer than four directions, are left out (hypothesis ``assume``)."""
    problem = data.draw(problems(peaky=True))
    assume(problem.dim >= 4)  # and B·h·w >= 4: 2×2 grids
    model = fast_float64(family, problem)
    images = problem.images
    with torch.no_grad():
        features = problem.model().forward_intermediates(images)[-1].ista[:, 1:]  # (B, h·w, d)
    B, L, d = features.shape
    flat = features.reshape(B * L, d)
    centred = flat - flat.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    gaps = (eigenvalues[:3] - eigenvalues[1:4]) / eigenvalues[0]
    assume(bool((gaps > 1e-4).all()))
    pca = analysis.patch_pca(model, images)
    components = centred @ eigenvectors[:, :3]  # (B·L, 3)
    low, high = components.min(0).values, components.max(0).values
    scaled = ((components - low) / (high - low)).T.reshape(3, B, *model.patch_embed.grid_size).transpose(0, 1)
    for k in range(3):
        error = min((pca[:, k] - scaled[:, k]).abs().max(), (pca[:, k] - (1 - scaled[:, k])).abs().max())
        assert error <= 1e-8, f"principal component {k}: error {error:.3e}"
