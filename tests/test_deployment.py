"""The fast models' deployable forms (crate/deploy.py): torch.fx, timm's FX feature extraction,
TorchScript, FX then TorchScript, torch.export with a dynamic batch, ONNX by the dynamo exporter run in
onnxruntime.

- Every registered model at its registered size (meta device, nothing runs): traces with FX, with
  timm's FX feature extractor, scripts, scripts after FX; `-m slow` exports each with torch.export.
- Numbers, on CRATE-mini, CRATE-α-mini, CRATE-T (224×224) and CRATE-α-B/16 at 64×64 (its registered
  width and depth): each form's logits on a batch other than the export example's obey the precision
  rule of docs/math.md §8.2 against a float64 eager run,
  max|form − ref| <= 2·max|eager − ref| + 4u(1 + max|ref|), with eager the float32 model, u = 2⁻²⁴.
  FX runs the same modules and leaves as eager: bitwise equal. Export and ONNX record the attention
  path taken while exporting (under autograd: the explicit one), eager without autograd runs SDPA:
  two float32 computations, which the rule compares.
- Training paths (drop path, gradient checkpointing, the explicit attention under autograd) and input
  errors survive tracing and scripting.
`python -m benchmarks.deployment` prints the measured differences (README, "Deploying").
"""

import numpy as np
import pytest
import timm
import torch

from crate.deploy import FORMS, exported, scripted

NAMES = timm.list_models(module="crate")  # the classifiers; CRATE-MAE is module "crate_mae"
UNIT_ROUNDOFF = 2.0**-24
# (name, create_model overrides): the models whose deployed forms are run and measured
MEASURED = [
    ("crate_mini_patch4_28", {}),
    ("crate_alpha_mini_patch4_28", {}),
    ("crate_tiny_patch16_224", {}),
    ("crate_alpha_base_patch16_224", dict(img_size=64)),
]
# torch.jit.script is deprecated (FutureWarning); scripting an FX GraphModule warns about torch's own
# GraphModule attributes (UserWarning)
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::DeprecationWarning", "ignore:The TorchScript type system:UserWarning"
)


def _images(model, batch: int, seed: int = 0) -> torch.Tensor:
    embed = model.patch_embed
    return torch.randn(batch, embed.in_chans, *embed.img_size, generator=torch.Generator().manual_seed(seed))


# -- every registered model, at its registered size ----------------------------------------------------
@pytest.fixture(params=NAMES)
def meta_model(request):
    with torch.device("meta"):
        return timm.create_model(request.param).eval()


def test_every_registered_model_traces_and_scripts(meta_model):
    depth = len(meta_model.blocks)
    graph = torch.fx.symbolic_trace(meta_model)
    leaves = {node.target.__name__ for node in graph.graph.nodes if node.op == "call_function"}
    assert {"checked_images", "subspace_attention"} <= leaves  # the run-time choices stay in the graph
    features = timm.models.create_feature_extractor(meta_model, ["blocks.0", f"blocks.{depth - 1}"])
    assert list(features.graph.find_nodes(op="output")[0].args[0]) == ["blocks.0", f"blocks.{depth - 1}"]
    scripted(meta_model)
    scripted(graph)


@pytest.mark.slow
def test_every_registered_model_exports_with_a_dynamic_batch(meta_model):
    program = exported(meta_model, torch.empty(2, *meta_model.pretrained_cfg["input_size"], device="meta"))
    (images,) = program.graph.find_nodes(op="placeholder", target="images")
    batch, *sizes = images.meta["val"].shape
    assert isinstance(batch, torch.SymInt) and tuple(sizes) == meta_model.pretrained_cfg["input_size"]


# -- numbers ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured(request):
    """(float32 model, images, float64 eager logits, float32 eager logits), eval mode."""
    name, overrides = MEASURED[request.param]
    torch.manual_seed(0)
    model = timm.create_model(name, **overrides).eval()
    twin = timm.create_model(name, **overrides).eval().double()
    twin.load_state_dict(model.state_dict())
    images = _images(model, batch=3, seed=1)
    with torch.no_grad():
        return model, images, twin(images.double()), model(images)


def _measured_cases(forms: list[str]) -> list:
    """(model index, form) for each measured model and form; CRATE-α-B/16's ONNX (15 s) in the slow run."""
    return [
        pytest.param(i, form, id=f"{name}-{form}", marks=[pytest.mark.slow] * (form == "onnx" and i == 3))
        for i, (name, _) in enumerate(MEASURED)
        for form in forms
    ]


@pytest.mark.parametrize("measured, form", _measured_cases(list(FORMS)), indirect=["measured"])
def test_deployed_form_equals_eager_within_float32_error(measured, form, tmp_path):
    model, images, reference, eager = measured
    deployed = FORMS[form](model, _images(model, batch=2), tmp_path)  # built as a user would, autograd on
    with torch.no_grad():
        outputs = deployed(images)
        assert deployed(images[:1]).shape == (1, model.num_classes)  # the batch is dynamic
    assert outputs.shape == eager.shape and outputs.dtype == torch.float32
    if form == "fx":
        assert torch.equal(outputs, eager)
    eager_error = (eager.double() - reference).abs().max().item()
    error = (outputs.double() - reference).abs().max().item()
    bound = 2 * eager_error + 4 * UNIT_ROUNDOFF * (1 + reference.abs().max().item())
    assert error <= bound, f"{form}: error {error:.3e} vs float64 > {bound:.3e} (eager's {eager_error:.3e})"


@pytest.mark.parametrize("measured, feature_cls", _measured_cases(["fx", "extractor"]), indirect=["measured"])
def test_fx_features_equal_the_eager_layer_outputs(measured, feature_cls):
    """timm's FX feature extraction returns each layer's tokens (B, N, d), those of forward_intermediates."""
    model, images, _, _ = measured
    take = [0, len(model.blocks) - 1]
    if feature_cls == "fx":
        extractor = timm.create_model(
            model.default_cfg["architecture"],
            features_only=True,
            feature_cls="fx",
            out_indices=take,
            img_size=model.patch_embed.img_size,
        )
        missing, _ = extractor.graph_module.load_state_dict(model.state_dict(), strict=False)
        assert missing == []  # (the unexpected keys: the head's and the layers after the last taken)
        run = extractor
    else:
        graph = timm.models.create_feature_extractor(model, [f"blocks.{i}" for i in take])
        run = lambda x: list(graph(x).values())  # noqa: E731
    with torch.no_grad():
        features = run(images)
        states = model.forward_intermediates(
            images, indices=take, intermediates_only=True, return_layer_states=True
        )
    assert all(torch.equal(f, s.ista) for f, s in zip(features, states, strict=True))


# -- training paths ---------------------------------------------------------------------------------------
def _within_float32_error(actual: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor) -> bool:
    """The precision rule (module docstring), for one tensor."""
    eager_error = (eager.double() - reference).abs().max().item()
    bound = 2 * eager_error + 4 * UNIT_ROUNDOFF * (1 + reference.abs().max().item())
    return (actual.double() - reference).abs().max().item() <= bound


@pytest.mark.parametrize("form", ["fx", "script", "fx+script", "export"])
@pytest.mark.parametrize("name", ["crate_mini_patch4_28", "crate_alpha_mini_patch4_28"])
def test_training_paths_survive(name, form, tmp_path):
    """Drop path (random per sample, the same draws), gradient checkpointing and the attention under
    autograd: the traced model's outputs and gradients are eager's, bit for bit under FX (the same
    leaves run), else within float32's error against a float64 eager run (TorchScript and torch.export
    may differentiate another attention path than eager's)."""
    model = timm.create_model(name, drop_path_rate=0.5).train()
    twin = timm.create_model(name, drop_path_rate=0.5).train().double()
    twin.load_state_dict(model.state_dict())
    for module in (model, twin):
        module.set_grad_checkpointing()
    images = _images(model, batch=4)
    deployed = FORMS[form](model, images, tmp_path)

    def step(module, dtype=torch.float32):
        torch.manual_seed(0)  # the same drop-path draws in every dtype
        outputs = module(images.to(dtype))
        outputs.square().sum().backward()
        return outputs.detach(), {key: p.grad for key, p in module.named_parameters()}

    reference, reference_gradients = step(twin, torch.float64)
    outputs, gradients = step(model)
    model.zero_grad()
    deployed_outputs, deployed_gradients = step(deployed)
    assert deployed_gradients.keys() == gradients.keys()
    if form == "fx":
        assert torch.equal(deployed_outputs, outputs)
        assert all(torch.equal(deployed_gradients[key], gradients[key]) for key in gradients)
    else:
        assert _within_float32_error(deployed_outputs, outputs, reference)
        far = [
            key
            for key in gradients
            if not _within_float32_error(deployed_gradients[key], gradients[key], reference_gradients[key])
        ]
        assert far == []


# -- input errors ---------------------------------------------------------------------------------------
BAD_IMAGES = [
    (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), TypeError, "CRATE expects floating-point images, got "),
    (
        torch.zeros(2, 3, 28, 28),
        ValueError,
        r"CRATE expects images of shape \(B, 1, 28, 28\), got \(2, 3, 28, 28\)",
    ),
    (torch.zeros(2, 1, 32, 32), ValueError, r"got \(2, 1, 32, 32\)"),
    (torch.zeros(1, 28, 28), ValueError, r"got \(1, 28, 28\)"),
]


def test_eager_refuses_what_is_not_a_tensor():
    model = timm.create_model("crate_mini_patch4_28")
    with pytest.raises(TypeError, match="CRATE expects floating-point images, got ndarray"):
        model(np.zeros((2, 1, 28, 28), dtype=np.float32))


@pytest.mark.parametrize("form", ["eager", "fx", "script", "fx+script"])
@pytest.mark.parametrize("images, error, message", BAD_IMAGES)
def test_traced_and_scripted_models_keep_the_input_errors(form, images, error, message, tmp_path):
    """The same message; TorchScript raises torch.jit.Error naming the Python exception, and prints a
    dtype as its number."""
    model = timm.create_model("crate_mini_patch4_28").eval()
    deployed = model if form == "eager" else FORMS[form](model, _images(model, batch=2), tmp_path)
    with pytest.raises(error if form in ("eager", "fx") else torch.jit.Error, match=message):
        deployed(images)


@pytest.mark.parametrize("form", ["export", "onnx"])
def test_exported_models_refuse_other_shapes(form, tmp_path):
    """torch.export and onnxruntime check the static dimensions themselves (their own messages)."""
    model = timm.create_model("crate_mini_patch4_28").eval()
    deployed = FORMS[form](model, _images(model, batch=2), tmp_path)
    for images, _, _ in BAD_IMAGES[1:3]:
        with pytest.raises(Exception, match=r"(?i)dimension|guard|shape"):
            deployed(images)
