"""A model created from scratch starts from the released initialisation (docs/architecture.md;
docs/crate-alpha.md): cls token and position embedding standard normal (std 1, not timm's 0.02);
every Linear and Conv2d PyTorch's default, weight and bias U(±1/√fan_in); CRATE's ISTA dictionary
kaiming-uniform U(±√(6/d)); CRATE-α's D and D₁ kaiming-uniform with PyTorch's fan_in = ratio·d,
U(±√(6/(ratio·d))); every LayerNorm weight 1 and bias 0.

Every parameter of the fast models must match exactly one rule (so a new parameter cannot go
unchecked), and so must every tensor of the reference's ``random_official_state_dict`` and
``random_official_alpha_state_dict`` (which the rest of verification/ draws its models from), by
their converted names. Constants are compared exactly; a uniform's support bound exactly (no value
beyond ±bound); each distribution by the Kolmogorov–Smirnov test (scipy.stats.kstest) at level
ALPHA/m for the m random tensors of a model (Bonferroni): for a fresh seed a correct initialisation
fails a test with probability at most ALPHA = 1e-6. The seeds are fixed, so CI is deterministic.
Power: at the sizes below the dictionaries have 4096–16384 entries, where the KS critical distance
at 1e-6 is 0.02–0.04; a wrong scale by 10% (e.g. xavier's √(6/(fan_in + fan_out)) for D) moves it
by ≥ 0.05, timm's std 0.02 for the embeddings by 0.48.
"""

import math
import re

import pytest
import torch
from scipy import stats

import reference
from crate import CRATE, CRATEAlpha, convert_official_state_dict

ALPHA = 1e-6
DIM, HEADS, DEPTH, PATCH, CHANNELS, IMAGE, CLASSES, RATIO = 64, 4, 2, 4, 3, 16, 10, 4
PATCHES = (IMAGE // PATCH) ** 2


def _rules() -> list[tuple[str, str, float]]:
    """(parameter name pattern, distribution, its parameter): "normal" (std), "uniform" (bound),
    "constant" (value)."""
    fan_in = {"patch": CHANNELS * PATCH**2, "dim": DIM, "atoms": RATIO * DIM}
    return [
        (r"cls_token|pos_embed", "normal", 1.0),
        (r".*norm.*\.weight", "constant", 1.0),
        (r".*norm.*\.bias", "constant", 0.0),
        (r"patch_embed\.proj\.(weight|bias)", "uniform", fan_in["patch"] ** -0.5),
        (r"blocks\.\d+\.attn\.qkv\.weight", "uniform", fan_in["dim"] ** -0.5),
        (r"blocks\.\d+\.attn\.proj\.(weight|bias)", "uniform", fan_in["dim"] ** -0.5),  # fan-in K·p = d
        (r"blocks\.\d+\.ista\.weight", "uniform", math.sqrt(6 / fan_in["dim"])),
        (r"blocks\.\d+\.odl\.(D|D1)", "uniform", math.sqrt(6 / fan_in["atoms"])),
        (r"head\.(weight|bias)", "uniform", fan_in["dim"] ** -0.5),
    ]


def _rule(name: str) -> tuple[str, float]:
    matches = [(kind, value) for pattern, kind, value in _rules() if re.fullmatch(pattern, name)]
    assert len(matches) == 1, f"{name}: matches {len(matches)} initialisation rules, expected one"
    return matches[0]


def _assert_initialisation(tensors: dict[str, torch.Tensor]) -> None:
    __tracebackhide__ = True
    rules = {name: _rule(name) for name in tensors}
    level = ALPHA / sum(kind != "constant" for kind, _ in rules.values())
    for name, tensor in tensors.items():
        kind, value = rules[name]
        values = tensor.detach().double().flatten()
        if kind == "constant":
            assert torch.equal(values, torch.full_like(values, value)), f"{name}: not all {value}"
            continue
        if kind == "uniform":
            assert values.abs().max().item() <= value, f"{name}: a value beyond the bound ±{value:.4g}"
            distribution = stats.uniform(-value, 2 * value)
        else:
            distribution = stats.norm(0, value)
        result = stats.kstest(values.numpy(), distribution.cdf)
        print(
            f"{name}: {kind}({value:.4g}), n={len(values)}, KS {result.statistic:.4f}, p {result.pvalue:.3g}"
        )
        assert result.pvalue >= level, (
            f"{name}: {len(values)} values do not look {kind}({value:.4g}): KS distance "
            f"{result.statistic:.4f}, p-value {result.pvalue:.3g} < {level:.3g}"
        )


def _config() -> dict:
    return dict(
        img_size=IMAGE,
        patch_size=PATCH,
        in_chans=CHANNELS,
        num_classes=CLASSES,
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model_class", [CRATE, CRATEAlpha], ids=["crate", "alpha"])
def test_fast_model_starts_from_released_initialisation(model_class, seed):
    torch.manual_seed(seed)
    model = model_class(**_config())
    _assert_initialisation(dict(model.named_parameters()))


@pytest.mark.parametrize("family", ["crate", "alpha"])
def test_reference_random_state_dict_is_released_initialisation(family):
    draw = (
        reference.random_official_state_dict
        if family == "crate"
        else reference.random_official_alpha_state_dict
    )
    sizes = dict(
        dim=DIM,
        depth=DEPTH,
        heads=HEADS,
        head_dim=DIM // HEADS,
        patch_size=PATCH,
        channels=CHANNELS,
        num_patches=PATCHES,
        num_classes=CLASSES,
    )
    state = draw(**sizes, generator=torch.Generator().manual_seed(0))
    _assert_initialisation(convert_official_state_dict(state))
