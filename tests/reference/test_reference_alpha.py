"""The CRATE-α half of the reference: bad input is refused with an error that names what was wrong and
what was expected; the released layout (docs/crate-alpha.md §4) is what the model builds and reads;
the over-complete proximal-gradient steps are differentiable."""

import pytest
import torch

import reference

DTYPE = torch.float64
generator = torch.Generator().manual_seed(0)
X = torch.randn(2, 5, 4, dtype=DTYPE, generator=generator)
D = torch.randn(4, 8, dtype=DTYPE, generator=generator)  # over-complete, m = 2d

SMALL = dict(dim=4, depth=2, heads=2, head_dim=2, patch_size=2, channels=2, num_patches=4, num_classes=3)


def _state(**changes) -> dict[str, torch.Tensor]:
    return reference.random_official_alpha_state_dict(**(SMALL | changes), generator=generator)


# proximal_gradient_steps and lasso_objective -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize("argument", ["X", "D", "start"])
def test_non_float64_steps_input_is_refused(argument, dtype):
    inputs = dict(X=X, D=D, start=torch.zeros(2, 5, 8, dtype=DTYPE))
    inputs[argument] = inputs[argument].to(dtype)
    with pytest.raises(TypeError, match=rf"{argument} must be float64.*got {dtype}"):
        reference.proximal_gradient_steps(inputs["X"], inputs["D"], 0.1, 0.1, 2, start=inputs["start"])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: reference.proximal_gradient_steps(X, D[:3], 0.1, 0.1, 2),
            ValueError,
            r"D must have shape \(d, m\) = \(4, m\) with m >= 1 atoms, got \(3, 8\)",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D[0], 0.1, 0.1, 2),
            ValueError,
            r"D must have shape \(d, m\) = \(4, m\).*got \(8,\)",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D[:, :0], 0.1, 0.1, 2),
            ValueError,
            r"m >= 1 atoms, got \(4, 0\)",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, 0.1, 0.1, 0),
            ValueError,
            "steps must be an integer >= 1, got 0",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, 0.1, 0.1, 1.5),
            ValueError,
            "steps must be an integer >= 1, got 1.5",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, 0.1, 0.1, True),
            ValueError,
            "steps must be an integer >= 1, got True",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, 0.1, 0.1, 2, start=X),
            ValueError,
            r"start must have the codes' shape \(2, 5, 8\), got \(2, 5, 4\)",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, 0.1, 0.1, 2, start=[0.0]),
            TypeError,
            "start must be a torch.Tensor, got list",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, 0.0, 0.1, 2),
            ValueError,
            "eta must be > 0, got 0.0",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, -0.1, 0.1, 2),
            ValueError,
            "eta must be > 0, got -0.1",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, float("nan"), 0.1, 2),
            ValueError,
            "eta must be > 0, got nan",
        ),
        (
            lambda: reference.proximal_gradient_steps(X, D, 0.1, -0.1, 2),
            ValueError,
            "lam must be >= 0, got -0.1",
        ),
        (
            lambda: reference.proximal_gradient_steps(X[0, 0], D, 0.1, 0.1, 2),
            ValueError,
            r"X must have shape \(N, d\) or \(B, N, d\)",
        ),
        (
            lambda: reference.lasso_objective(X, X, D, 0.1),
            ValueError,
            r"with m = 8 codes per token \(D's columns\): expected \(2, 5, 8\), got \(2, 5, 4\)",
        ),
        (
            lambda: reference.lasso_objective(torch.zeros(2, 5, 8, dtype=DTYPE), X, D[:3], 0.1),
            ValueError,
            r"D must have shape \(d, m\) = \(4, m\)",
        ),
    ],
)
def test_bad_steps_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_lasso_objective_of_overcomplete_codes():
    """f(A) = ½‖X − DA‖² + λ‖A‖₁ with A (B, N, m), per image, +inf for a negative code."""
    A = torch.rand(2, 5, 8, dtype=DTYPE, generator=generator)
    values = reference.lasso_objective(A, X, D, 0.3)
    for image in range(2):
        expected = 0.5 * ((X[image].T - D @ A[image].T) ** 2).sum() + 0.3 * A[image].sum()
        assert torch.allclose(values[image], expected, rtol=1e-14, atol=0)
    A[1, 0, 7] = -1e-300
    assert torch.isinf(reference.lasso_objective(A, X, D, 0.3)[1])


def test_proximal_gradient_steps_are_differentiable_when_their_inputs_require_grad():
    """Second-order autograd through two steps from zero matches finite differences w.r.t. X and D
    (torch.autograd.gradcheck); without inputs that require grad, no graph is kept."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, dtype=DTYPE, generator=g).requires_grad_(True)
    dictionary = torch.randn(3, 6, dtype=DTYPE, generator=g).requires_grad_(True)
    steps = reference.proximal_gradient_steps(x.detach(), dictionary.detach(), 0.3, 0.05, 2)
    assert not any(A.requires_grad for A in steps)
    assert all((A > 0).any() for A in steps)  # some codes are active, so the gradients are not all zero
    assert torch.autograd.gradcheck(
        lambda x, d: tuple(reference.proximal_gradient_steps(x, d, 0.3, 0.05, 2)), (x, dictionary)
    )
    start = torch.rand(1, 2, 6, dtype=DTYPE, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: tuple(reference.proximal_gradient_steps(x.detach(), dictionary.detach(), 0.3, 0.05, 2, s)),
        (start,),
    )


# OfficialCRATEAlpha.from_state_dict -------------------------------------------------------------
def _without(key: str) -> dict:
    state = _state()
    del state[key]
    return state


def _with(key: str, value) -> dict:
    return _state() | {key: value}


@pytest.mark.parametrize(
    "state, heads, error, message",
    [
        (
            _without("transformer.layers.1.1.fn.D1"),
            2,
            ValueError,
            r"missing key 'transformer\.layers\.1\.1\.fn\.D1' \(expected shape \(4, 16\)\)",
        ),
        (
            _without("transformer.layers.0.0.fn.to_out.0.weight"),
            2,
            ValueError,
            r"missing key 'transformer\.layers\.0\.0\.fn\.to_out\.0\.weight'",
        ),
        (
            _without("conv1.weight"),
            2,
            KeyError,
            r"lacks \['conv1\.weight'\]: the CRATE-α model's sizes are read",
        ),
        (
            _without("transformer.layers.0.1.fn.D"),
            2,
            KeyError,
            r"lacks \['transformer\.layers\.0\.1\.fn\.D'\]",
        ),
        (
            _with("transformer.layers.0.1.fn.weight", torch.zeros(4, 4, dtype=DTYPE)),
            2,
            ValueError,
            r"unexpected key 'transformer\.layers\.0\.1\.fn\.weight'",
        ),
        (
            _with("transformer.layers.0.0.fn.to_out.0.bias", torch.zeros(4, dtype=DTYPE)),
            2,
            ValueError,
            r"unexpected key '.*to_out\.0\.bias'",
        ),
        (
            _with("module.cls_token", torch.zeros(1, 1, 4, dtype=DTYPE)),
            2,
            ValueError,
            r"unexpected key 'module\.cls_token'",
        ),
        (
            _with("transformer.layers.1.1.fn.D1", torch.zeros(16, 4, dtype=DTYPE)),
            2,
            ValueError,
            r"'transformer\.layers\.1\.1\.fn\.D1' has shape \(16, 4\), expected \(4, 16\)",
        ),
        (
            _with("conv1.bias", torch.zeros(5, dtype=DTYPE)),
            2,
            ValueError,
            r"'conv1\.bias' has shape \(5,\), expected \(4,\)",
        ),
        (
            _with("conv1.weight", torch.zeros(4, 2, 2, dtype=DTYPE)),
            2,
            ValueError,
            r"'conv1\.weight' must be a 4-dimensional tensor.*got \(4, 2, 2\)",
        ),
        (
            _with("conv1.weight", torch.zeros(4, 2, 2, 3, dtype=DTYPE)),
            2,
            ValueError,
            r"'conv1\.weight' has shape \(4, 2, 2, 3\), expected \(4, 2, 2, 2\)",
        ),
        (
            _with("pos_embedding", [0.0]),
            2,
            ValueError,
            r"'pos_embedding' must be a 3-dimensional tensor.*got list",
        ),
        (
            _with("transformer.layers.0.1.fn.D", torch.zeros(4, 6, dtype=DTYPE)),
            2,
            ValueError,
            r"fn\.D has 6 columns, not a multiple of d = 4",
        ),
        (_state(), 3, ValueError, r"heads=3 does not divide the qkv width 4"),
        (_state(), 0, ValueError, r"heads=0 does not divide the qkv width 4"),
        (
            _with("transformer.layers.0.1.fn.D", torch.zeros(4, 16, dtype=torch.int64)),
            2,
            ValueError,
            r"'transformer\.layers\.0\.1\.fn\.D' must be a floating-point tensor, got torch\.int64",
        ),
        (
            _with("cls_token", torch.zeros(1, 1, 4, dtype=torch.bool)),
            2,
            ValueError,
            r"'cls_token' must be a floating-point tensor, got torch\.bool",
        ),
    ],
)
def test_bad_state_dict_is_refused(state, heads, error, message):
    with pytest.raises(error, match=message):
        reference.OfficialCRATEAlpha.from_state_dict(state, heads=heads)


def test_every_problem_of_a_state_dict_is_listed_at_once():
    state = _state()
    del state["mlp_head.1.bias"]
    state["extra"] = torch.zeros(1, dtype=DTYPE)
    state["transformer.layers.1.0.norm.weight"] = torch.zeros(3, dtype=DTYPE)
    with pytest.raises(ValueError, match="released CRATE-α layout") as raised:
        reference.OfficialCRATEAlpha.from_state_dict(state, heads=2)
    for problem in (
        "missing key 'mlp_head.1.bias'",
        "unexpected key 'extra'",
        "has shape (3,), expected (4,)",
    ):
        assert problem in str(raised.value)


# images -----------------------------------------------------------------------------------------
MODEL = reference.OfficialCRATEAlpha.from_state_dict(_state(), heads=2)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.zeros(1, 2, 4, 4), TypeError, r"images must be float64.*got torch\.float32"),
        ([[0.0]], TypeError, r"images must be a torch\.Tensor, got list"),
        (
            torch.zeros(1, 3, 4, 4, dtype=DTYPE),
            ValueError,
            r"images must have shape \(B, 2, H, W\), got \(1, 3, 4, 4\)",
        ),
        (
            torch.zeros(2, 4, 4, dtype=DTYPE),
            ValueError,
            r"images must have shape \(B, 2, H, W\), got \(2, 4, 4\)",
        ),
        (
            torch.zeros(1, 2, 5, 4, dtype=DTYPE),
            ValueError,
            r"image size 5×4 is not divisible by the patch size 2",
        ),
        (
            torch.zeros(1, 2, 6, 4, dtype=DTYPE),
            ValueError,
            r"6×4 gives 6 patches of 2×2, more than the 4 position embeddings",
        ),
        (torch.zeros(1, 2, 0, 4, dtype=DTYPE), ValueError, r"image size 0×4 has no patches of 2×2"),
    ],
)
def test_bad_images_are_refused(images, error, message):
    with pytest.raises(error, match=message):
        MODEL(images)


def test_images_with_fewer_patches_than_position_embeddings_are_accepted():
    """The released code adds pos_embedding[:, :N + 1]: a 2×4 image has 2 of the 4 patches."""
    assert MODEL(torch.zeros(3, 2, 2, 4, dtype=DTYPE)).shape == (3, 3)


# sizes and layout -------------------------------------------------------------------------------
CONFIGURATIONS = [
    dict(
        dim=6, depth=2, heads=2, head_dim=3, patch_size=2, channels=3, num_patches=4, num_classes=5, ratio=4
    ),
    # one head of full width: to_out is the identity and has no key
    dict(
        dim=4, depth=1, heads=1, head_dim=4, patch_size=1, channels=2, num_patches=6, num_classes=2, ratio=4
    ),
    # one head narrower than d, and K·p ≠ d: to_out is there
    dict(
        dim=5, depth=3, heads=1, head_dim=3, patch_size=3, channels=1, num_patches=2, num_classes=1, ratio=1
    ),
    dict(
        dim=4, depth=2, heads=3, head_dim=2, patch_size=2, channels=2, num_patches=9, num_classes=4, ratio=2
    ),
]


@pytest.mark.parametrize(
    "config", CONFIGURATIONS, ids=lambda c: f"d{c['dim']}-K{c['heads']}-p{c['head_dim']}"
)
def test_from_state_dict_reads_every_size_from_the_shapes(config):
    state = reference.random_official_alpha_state_dict(**config, generator=generator)
    full_width = config["heads"] == 1 and config["head_dim"] == config["dim"]
    assert any("to_out" in key for key in state) != full_width
    model = reference.OfficialCRATEAlpha.from_state_dict(state, heads=config["heads"])
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert (model.patch_size, model.channels) == (config["patch_size"], config["channels"])
    assert len(model.transformer.layers) == config["depth"]
    assert model.pos_embedding.shape[1] == config["num_patches"] + 1
    assert model.mlp_head[1].out_features == config["num_classes"]
    assert model.mlp_head[0].eps == 1e-5
    for mssa, odl in model.transformer.layers:
        assert mssa.fn.heads == config["heads"] and mssa.fn.scale == config["head_dim"] ** -0.5
        assert isinstance(mssa.fn.to_out, torch.nn.Identity) == full_width
        assert odl.fn.D.shape == odl.fn.D1.shape == (config["dim"], config["ratio"] * config["dim"])
        assert (odl.fn.eta, odl.fn.lam) == (0.1, 0.1)  # the released constants by default
        assert mssa.norm.eps == odl.norm.eps == 1e-6
    side = config["patch_size"] * int(config["num_patches"] ** 0.5)
    images = torch.randn(2, config["channels"], side, side, dtype=DTYPE, generator=generator)
    assert model(images).shape == (2, config["num_classes"])


def _released_b16_table() -> dict[str, tuple[int, ...]]:
    """docs/crate-alpha.md §4, written out."""
    table = {
        "pos_embedding": (1, 197, 768),
        "cls_token": (1, 1, 768),
        "conv1.weight": (768, 3, 16, 16),
        "conv1.bias": (768,),
    }
    for layer in range(12):
        key = f"transformer.layers.{layer}"
        table |= {
            f"{key}.0.norm.weight": (768,),
            f"{key}.0.norm.bias": (768,),
            f"{key}.0.fn.qkv.weight": (768, 768),
            f"{key}.0.fn.to_out.0.weight": (768, 768),
            f"{key}.1.norm.weight": (768,),
            f"{key}.1.norm.bias": (768,),
            f"{key}.1.fn.D": (768, 3072),
            f"{key}.1.fn.D1": (768, 3072),
        }
    return table | {
        "mlp_head.0.weight": (768,),
        "mlp_head.0.bias": (768,),
        "mlp_head.1.weight": (1000, 768),
        "mlp_head.1.bias": (1000,),
    }


B16 = dict(
    dim=768, depth=12, heads=12, head_dim=64, patch_size=16, channels=3, num_patches=196, num_classes=1000
)


def _meta_model(sizes: dict) -> reference.OfficialCRATEAlpha:
    with torch.device("meta"):  # shapes only: no 72M float64 parameters are allocated
        return reference.OfficialCRATEAlpha(**sizes)


def test_b16_state_dict_keys_are_the_released_layout():
    table = _released_b16_table()
    assert reference.official_alpha_state_dict_shapes(**B16) == table
    built = {key: tuple(value.shape) for key, value in _meta_model(B16).state_dict().items()}
    assert built == table
