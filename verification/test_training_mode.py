"""Training-mode semantics of both fast models: stochastic depth (drop-path) and dropout.

Exact parts: in eval mode every drop is the identity (the model equals the float64 reference with
drop_rate and drop_path_rate set); in training mode a drop-path output is, sample by sample, either
the residual stream alone or the stream plus the branch divided by the survival probability (the whole
branch of a sample kept or dropped together), and a dropout output is, entry by entry, 0 or the value
divided by 1 − q. CRATE drops its MSSA branch only (ISTA has no residual), CRATE-α both branches.

Statistical parts: the survival counts of drop-path, per layer, follow the linear schedule over depth
(layer ℓ of L drops with probability rate·ℓ/(L − 1)), and dropout zeroes a fraction q of the entries.
Each count is checked by scipy's exact two-sided binomial test, and the sample mean of the rescaled
outputs (unbiasedness, E[drop(x)] = x) by its normal approximation, both at ALPHA = 1e-6: for a fresh
random seed a correct implementation fails a given check with probability at most 1e-6 (about 1e-4
for the whole module's checks together). The seeds are fixed, so CI is deterministic; a wrong
probability is far outside: with 4000 samples the count's standard deviation is ≤ 32, and a schedule
off by one layer (rate·ℓ/L) moves a count by ≥ 400.
"""

import pytest
import torch
from scipy import stats

from crate import CRATE, CRATEAlpha
from crate.models.layers import DropPath
from verification.asserts import assert_close

ALPHA = 1e-6  # the false-alarm probability of each statistical check
SAMPLES = 4000
TOKENS, DIM, HEADS = 3, 8, 2
FAMILIES = pytest.mark.parametrize("model_class", [CRATE, CRATEAlpha], ids=["crate", "alpha"])


def _config(**overrides) -> dict:
    return dict(img_size=4, patch_size=2, in_chans=2, num_classes=3, dim=DIM, heads=HEADS) | overrides


def _assert_binomial(count: int, trials: int, probability: float, what: str) -> None:
    __tracebackhide__ = True
    p_value = stats.binomtest(count, trials, probability).pvalue
    print(f"{what}: {count} of {trials}, expected {probability * trials:.1f}, p-value {p_value:.3g}")
    assert p_value >= ALPHA, f"{what}: {count} of {trials} is implausible for probability {probability}"


def _assert_unbiased(ratios: torch.Tensor, keep: float, what: str) -> None:
    """The mean of drop(x)/x over independent samples is 1 ± z·σ/√n, σ² = (1 − keep)/keep."""
    __tracebackhide__ = True
    z = stats.norm.isf(ALPHA / 2)
    sigma = ((1 - keep) / keep) ** 0.5
    error, bound = abs(ratios.mean().item() - 1), z * sigma / len(ratios) ** 0.5
    print(f"{what}: mean ratio off by {error:.3g}, bound {bound:.3g}")
    assert error <= bound, f"{what}: the mean of the rescaled outputs is off by {error:.3g} > {bound:.3g}"


def _per_sample_outcome(output, stream, branch, keep: float, what: str) -> torch.Tensor:
    """Whether each sample's branch survived; asserts that each sample (all tokens and features
    together) is either the stream alone or the stream plus branch/keep."""
    __tracebackhide__ = True
    added = output - stream  # (n, N, d)
    tolerance = 1e-12 * (1 + branch.abs().amax((1, 2)) / keep)
    dropped = added.abs().amax((1, 2)) <= tolerance
    kept = (added - branch / keep).abs().amax((1, 2)) <= tolerance
    neither = ~(dropped | kept)
    assert not neither.any(), (
        f"{what}: {int(neither.sum())} samples are neither dropped whole nor kept whole with 1/{keep} scaling"
    )
    return kept & ~dropped


@pytest.mark.parametrize("probability", [0.1, 0.35, 0.8])
def test_drop_path_keeps_or_drops_whole_samples_unbiased(probability):
    """DropPath on (n, N, d): per sample all zeros or x/keep; the survivors ~ Binomial(n, keep); the
    mean of output/x is 1 (unbiased); in eval mode, x itself."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(SAMPLES, TOKENS, DIM, generator=generator, dtype=torch.float64) + 0.5
    drop = DropPath(probability).train()
    torch.manual_seed(1)
    output = drop(x)
    keep = 1 - probability
    survived = _per_sample_outcome(output + x, x, x, keep, "DropPath")
    _assert_binomial(int(survived.sum()), SAMPLES, keep, "DropPath survivors")
    _assert_unbiased((output / x)[:, 0, 0], keep, "DropPath")
    assert torch.equal(drop.eval()(x), x)


@FAMILIES
def test_drop_path_is_per_sample_on_each_residual_branch_with_linear_schedule(model_class):
    """A depth-3 model with drop_path_rate 0.6 in training mode: layer ℓ drops its branches with
    probability 0.6·ℓ/2 (0, 0.3, 0.6), each sample's branch whole, survivors rescaled by 1/keep; CRATE's
    ISTA step (no residual) is never dropped, CRATE-α's ODL branch is, independently of the MSSA
    branch."""
    rate, depth = 0.6, 3
    torch.manual_seed(0)
    model = model_class(**_config(depth=depth, drop_path_rate=rate)).double()
    alpha = model_class is CRATEAlpha
    x = torch.randn(SAMPLES, TOKENS, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    for layer, block in enumerate(model.blocks):
        keep = 1 - rate * layer / (depth - 1)
        with torch.no_grad():
            model.eval()
            attention_branch = block.attn(block.norm1(x))
            z = x + attention_branch
            sparse_eval = block.sparsify(z)
            model.train()
            z_train = block.compress(x)
            sparse_train = block.sparsify(z)
        survived = _per_sample_outcome(z_train, x, attention_branch, keep, f"layer {layer} MSSA branch")
        _assert_binomial(int(survived.sum()), SAMPLES, keep, f"layer {layer} MSSA branch survivors")
        if alpha:
            odl_branch = sparse_eval - z
            kept = _per_sample_outcome(sparse_train, z, odl_branch, keep, f"layer {layer} ODL branch")
            _assert_binomial(int(kept.sum()), SAMPLES, keep, f"layer {layer} ODL branch survivors")
            if 0 < keep < 1:  # independent masks: both kept with probability keep²
                _assert_binomial(int((kept & survived).sum()), SAMPLES, keep**2, f"layer {layer} both kept")
        else:
            assert torch.equal(sparse_train, sparse_eval), f"layer {layer}: the ISTA step was dropped"


@FAMILIES
@pytest.mark.parametrize("depth", [1, 2, 5])
def test_drop_path_schedule_is_linear_in_depth(model_class, depth):
    """Layer ℓ's drop probability is rate·ℓ/(L − 1) (the first layer never drops; one layer: 0)."""
    model = model_class(**_config(depth=depth, drop_path_rate=0.4))
    for layer, block in enumerate(model.blocks):
        expected = 0.4 * layer / max(depth - 1, 1)
        assert getattr(block.drop_path, "probability", 0.0) == pytest.approx(expected, abs=1e-15), layer


@FAMILIES
@pytest.mark.parametrize("probability", [0.2, 0.7])
def test_dropout_zeroes_entries_and_rescales_in_training(model_class, probability):
    """drop_rate q: after the position embedding, after W_out and before the head, each entry is 0 with
    probability q (Binomial count) and otherwise its eval value / (1 − q)."""
    torch.manual_seed(0)
    model = model_class(**_config(depth=1, drop_rate=probability)).double()
    block = model.blocks[0]
    images = torch.randn(SAMPLES // 4, 2, 4, 4, dtype=torch.float64)
    y = torch.randn(SAMPLES // 4, TOKENS, DIM, dtype=torch.float64)
    sites = {
        "position embedding": lambda: model.embed(images),
        "W_out": lambda: block.attn(y),
        "head": lambda: model.forward_head(y, pre_logits=True),
    }
    keep = 1 - probability
    for site, compute in sites.items():
        with torch.no_grad():
            model.eval()
            expected = compute()
            model.train()
            output = compute()
        zero = output == 0
        assert_close(output[~zero], expected[~zero] / keep, 1e-12 * (1 + expected.abs().max().item()), site)
        _assert_binomial(int(zero.sum()), zero.numel(), probability, f"{site}: zeroed entries")


@FAMILIES
def test_every_drop_is_identity_in_eval(model_class):
    """drop_rate and drop_path_rate set: in eval mode the model equals the same model without them
    (which test_fast_model.py proves equal to the reference), bit for bit."""
    torch.manual_seed(0)
    model = model_class(**_config(depth=3, drop_rate=0.5, drop_path_rate=0.5)).double().eval()
    plain = model_class(**_config(depth=3)).double().eval()
    plain.load_state_dict(model.state_dict())
    images = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(images), plain(images))
        states = model.forward_intermediates(images, intermediates_only=True, return_layer_states=True)
        plain_states = plain.forward_intermediates(images, intermediates_only=True, return_layer_states=True)
    for state, plain_state in zip(states, plain_states, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(state[:3], plain_state[:3], strict=True))
