"""CRATE-MAE three ways, part by part: the fast CRATEMAE, the plain implementation in the same precision
(plain_mae.py) and the float64 reference.OfficialCRATEMAE of the same weights, by the precision rule.

The parts: the embedding (patches, mask token where masked, cls, sin-cos table), every encoder layer
(z_half after MSSA, the ISTA output), the encoder's final norm, every decoder layer (u after the linear
step, the output u − MSSA(LN u)), the head (decoder_norm, decoder_pred, cls dropped) and the loss; each
fed the reference's input of that part rounded to the precision's dtype, on which the reference is
recomputed in float64 (so errors do not compound), forward and, on the "train" path, the gradients of
⟨output, g⟩ with respect to the part's input and each of its parameters. Then the whole model, images
to (loss, pred, mask), forward only (the encoder's ReLUs, as gate.py's ``_model_errors`` says). One
seeded noise draws the masking, so the three mask the same patches; the fast model draws its own masking
from that noise, and its mask must equal the reference's exactly.

gate.check_model runs ``rows`` for a CRATEMAE and reports them as it does CRATE's."""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reference.official_mae import OfficialCRATEMAE, official_mae_state_dict_shapes, random_masking

from ..errors import InvalidError
from ..models.mae import (
    CRATEMAE,
    CRATEMAEConfig,
    convert_released_mae_state_dict,
    load_released_mae_state_dict,
)
from . import plain_mae
from .rule import PRECISIONS, Errors, autocast, errors, rounded


@dataclass(frozen=True)
class MAEModels:
    """The fast model (on its device, in the precision's dtype), the released-layout values that it and
    the plain implementation run on (``low``, on that device), the float64 reference on them, and the
    fast model's name of each released parameter (``names``)."""

    fast: CRATEMAE
    low: dict
    reference: OfficialCRATEMAE
    precision: str
    names: dict[str, str]

    @property
    def device(self) -> torch.device:
        return next(iter(self.low.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision][0]

    @property
    def u(self) -> float:
        return PRECISIONS[self.precision][2]

    def parameters(self, prefixes: tuple[str, ...]) -> list[str]:
        """The released names of the fast model's parameters that start with one of ``prefixes``."""
        return [name for name in self.names if name.startswith(prefixes)] if prefixes else []


def _released_shapes(config: CRATEMAEConfig, grid: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    return official_mae_state_dict_shapes(
        dim=config.dim,
        depth=config.depth,
        heads=config.heads,
        head_dim=config.dim // config.heads,
        patch_size=config.patch_size,
        channels=config.in_chans,
        num_patches=grid[0] * grid[1],
    )


def parameter_names(model: CRATEMAE) -> dict[str, str]:
    """Released name -> the fast model's, for each of its parameters (the sin-cos table is a buffer)."""
    parameters = dict(model.named_parameters())
    names = {}
    for key in _released_shapes(model.config, model.patch_embed.grid_size):
        for fast in convert_released_mae_state_dict({key: None}):  # none for the release's unused keys
            if fast in parameters:
                names[key] = fast
    return names


def export_released_mae_state_dict(model: CRATEMAE) -> dict[str, torch.Tensor]:
    """The fast model's weights in the released layout (detached; its device and dtype). The release's
    unused ``pos_embed`` and ``decoder_embed`` are the sin-cos table and zeros."""
    state = model.state_dict()
    exported = {}
    for key, shape in _released_shapes(model.config, model.patch_embed.grid_size).items():
        converted = convert_released_mae_state_dict({key: None})
        if converted:
            exported[key] = state[next(iter(converted))].detach()
        elif key == "pos_embed":
            exported[key] = state["pos_embed"].detach()
        else:
            exported[key] = state["pos_embed"].new_zeros(shape)
    return exported


def models_from_model(model: CRATEMAE, precision: str) -> MAEModels:
    """From a fast model as it is (its device, dtype and options): the reference on its weights."""
    dtype = PRECISIONS[precision][0]
    parameter = next(model.parameters())
    if parameter.dtype != dtype:
        raise InvalidError(
            f"precision {precision!r} runs on {dtype} weights; the model's are {parameter.dtype}"
        )
    low = export_released_mae_state_dict(model)
    config = model.config
    ref = OfficialCRATEMAE.from_state_dict(
        {key: value.double().cpu() for key, value in low.items()},
        heads=config.heads,
        eta=config.eta,
        lam=config.lam,
        norm_pix_loss=config.norm_pix_loss,
    )
    return MAEModels(model, low, ref, precision, parameter_names(model))


def models_from_state(
    state: dict, *, heads: int, precision: str, fused: bool = True, device="cpu", **config
) -> MAEModels:
    """From a released-layout state dict (float64, e.g. reference.random_official_mae_state_dict):
    rounded to the precision, the fast model built on those values (``config``: CRATEMAEConfig fields
    such as lam, norm_pix_loss)."""
    low, _ = rounded(state, precision)
    dim, channels, patch_size, _ = state["patch_embed.proj.weight"].shape
    grid = int((state["decoder_pos_embed"].shape[1] - 1) ** 0.5)
    model = CRATEMAE(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=channels,
        dim=dim,
        depth=plain_mae.depth(state),
        heads=heads,
        fused_attn=fused,
        **config,
    )
    model = model.to(device=device, dtype=PRECISIONS[precision][0])
    load_released_mae_state_dict(model, low)
    return models_from_model(model.eval(), precision)


@dataclass(frozen=True)
class Part:
    """One part of the model: its name, the prefixes of its parameters' released names, the labels of
    its outputs (the last is differentiated), and each implementation as a function of the part's input
    (plain: of the values and the input) returning those outputs. ``relu`` when the last output is
    ReLU codes (an encoder layer's): the upstream gradient is zeroed wherever fast, plain and reference
    disagree on the side of a ReLU, where the backward is discontinuous (docs/math.md §8.4)."""

    name: str
    prefixes: tuple[str, ...]
    labels: tuple[str, ...]
    fast: Callable[[torch.Tensor], tuple]
    plain: Callable[[dict, torch.Tensor], tuple]
    reference: Callable[[torch.Tensor], tuple]
    relu: bool = False


@dataclass(frozen=True)
class Runners:
    """How the fast model's pieces are run: eagerly, or each through torch.compile (``compiled``). The
    layers run through the model's own ``_run`` (checkpointed when the run checkpoints)."""

    embed: Callable  # (images, masking)
    compress: Callable  # (encoder block, x)
    layer: Callable  # (block, x): an encoder or decoder layer as the model runs it
    unsparsify: Callable  # (decoder block, x)
    norm: Callable
    head: Callable
    loss: Callable  # (images, pred, mask)
    model: Callable  # (images, mask ratio, noise)

    @classmethod
    def of(cls, model: CRATEMAE, compiled: bool, mode: str = "default") -> "Runners":
        wrap = functools.partial(torch.compile, mode=mode) if compiled else (lambda function: function)
        return cls(
            embed=wrap(lambda images, masking: model.embed(images, masking)),
            compress=wrap(lambda block, x: block.compress(x)),
            layer=wrap(lambda block, x: model._run(block, x)),
            unsparsify=wrap(lambda block, x: block.unsparsify(x)),
            norm=wrap(lambda x: model.norm(x)),
            head=wrap(lambda x: model.decoder_pred(model.decoder_norm(x))[:, 1:]),
            loss=wrap(lambda images, pred, mask: model.forward_loss(images, pred, mask)),
            model=wrap(model),
        )


def parts(models: MAEModels, runners: Runners, images: torch.Tensor, noise: torch.Tensor) -> list:
    """(Part, the reference's float64 input of it) in the order of the model; no loss where nothing is
    masked (the release's loss is 0/0 there)."""
    fast, ref, config = models.fast, models.reference, models.fast.config
    ratio, device = config.mask_ratio, models.device
    masking = random_masking(noise, ratio)
    fast_masking = fast.random_masking(images.to(device), ratio, noise.to(device))
    heads, eta, lam = config.heads, config.eta, config.lam
    images64 = images.double()
    with torch.no_grad():
        stream = ref.encoder_input(images64, masking)
        encoder = ref.encoder_states(stream)
        latent = ref.norm(encoder[-1].output)
        decoder = ref.decoder_states(latent)
        pred = ref.forward_decoder(latent)
    result = [
        (
            Part(
                "embed",
                ("patch_embed.", "cls_token", "mask_token"),
                ("output",),
                fast=lambda x: (runners.embed(x, fast_masking),),
                plain=lambda low, x: (plain_mae.embed(low, x, masking),),
                reference=lambda x: (ref.encoder_input(x, masking),),
            ),
            images64,
        )
    ]
    for layer, (block, state) in enumerate(zip(fast.blocks, encoder, strict=True)):
        result.append((_encoder_part(layer, block, ref.blocks[layer], runners, heads, eta, lam), state.input))
    result.append(
        (
            Part(
                "norm",
                ("norm.",),
                ("output",),
                fast=lambda x: (runners.norm(x),),
                plain=lambda low, x: (plain_mae.encoder_norm(low, x),),
                reference=lambda x: (ref.norm(x),),
            ),
            encoder[-1].output,
        )
    )
    for layer, (block, state) in enumerate(zip(fast.decoder_blocks, decoder, strict=True)):
        result.append((_decoder_part(layer, block, ref.decoder_blocks[layer], runners, heads), state.input))
    result.append(
        (
            Part(
                "head",
                ("decoder_norm.", "decoder_pred."),
                ("output",),
                fast=lambda x: (runners.head(x),),
                plain=lambda low, x: (plain_mae.head(low, x),),
                reference=lambda x: (ref.decoder_pred(ref.decoder_norm(x))[:, 1:],),
            ),
            decoder[-1].output,
        )
    )
    if masking.mask.sum() > 0:
        low_images = images.to(device)
        result.append(
            (
                Part(
                    "loss",
                    (),
                    ("output",),
                    fast=lambda p: (runners.loss(low_images, p, fast_masking.mask),),
                    plain=lambda low, p: (
                        plain_mae.loss(low_images, p, masking.mask, config.patch_size, config.norm_pix_loss),
                    ),
                    reference=lambda p: (ref.forward_loss(images64, p, masking.mask),),
                ),
                pred,
            )
        )
    return result


def _encoder_part(layer: int, block: nn.Module, ref_block: nn.Module, runners: Runners, heads, eta, lam):
    def plain(low, x):
        z_half = plain_mae.compress(low, layer, x, heads)
        return z_half, plain_mae.sparsify(low, layer, z_half, eta, lam)[0]

    return Part(
        f"encoder {layer}",
        (f"blocks.{layer}.",),
        ("z_half", "output"),
        fast=lambda x: (runners.compress(block, x), runners.layer(block, x)),
        plain=plain,
        reference=lambda x: tuple(ref_block.states(x))[1:],
        relu=True,
    )


def _decoder_part(layer: int, block: nn.Module, ref_block: nn.Module, runners: Runners, heads):
    def plain(low, x):
        u = plain_mae.unsparsify(low, layer, x)
        return u, plain_mae.expand(low, layer, u, heads)

    return Part(
        f"decoder {layer}",
        (f"decoder_blocks.{layer}.",),
        ("u", "output"),
        fast=lambda x: (runners.unsparsify(block, x), runners.layer(block, x)),
        plain=plain,
        reference=lambda x: tuple(ref_block.states(x))[1:],
    )


def part_rows(models: MAEModels, part: Part, given: torch.Tensor, *, grad: bool, seed: int) -> list:
    """(part, quantity, Errors) of each output of ``part`` on ``given`` (rounded to the precision's
    dtype; the reference recomputed on it), and with ``grad`` the gradients of ⟨last output, g⟩ (g
    seeded, standard normal, masked for ReLU codes) with respect to the input and each parameter."""
    device, u = models.device, models.u
    names = models.parameters(part.prefixes) if grad else []
    x = given.to(models.dtype)
    ref_inputs = [x.double().requires_grad_(grad)] + [models.reference.get_parameter(n) for n in names]
    fast_inputs = [x.to(device).requires_grad_(grad)] + [
        models.fast.get_parameter(models.names[n]) for n in names
    ]
    plain_inputs = [x.to(device).requires_grad_(grad)] + [
        models.low[n].detach().requires_grad_(True) for n in names
    ]
    plain_state = models.low | dict(zip(names, plain_inputs[1:], strict=True))
    with torch.set_grad_enabled(grad):
        ref_outs = part.reference(ref_inputs[0])
        with autocast(models.precision, device):
            fast_outs, plain_outs = part.fast(fast_inputs[0]), part.plain(plain_state, plain_inputs[0])
    outputs = zip(part.labels, fast_outs, plain_outs, ref_outs, strict=True)
    rows = [(part.name, label, errors(f, p, r, u)) for label, f, p, r in outputs]
    if not grad:
        return rows
    ref_out, fast_out, plain_out = ref_outs[-1], fast_outs[-1], plain_outs[-1]
    keep = torch.ones_like(ref_out, dtype=torch.bool)
    if part.relu:
        ref_sides = ref_out.detach() > 0
        keep = (fast_out.detach().cpu() > 0).eq(ref_sides) & (plain_out.detach().cpu() > 0).eq(ref_sides)
        if not keep.any():
            untested = Errors(float("inf"), 0.0, 0.0, u)
            return [
                *rows,
                (part.name, f"grad: all {keep.numel()} entries have a ReLU flip, untested", untested),
            ]
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * keep

    def gradients(out, inputs):
        """A parameter the output does not reach (a fast model that drops one) has gradient zero."""
        grads = torch.autograd.grad((out.double() * g.to(out.device)).sum(), inputs, allow_unused=True)
        return [
            (torch.zeros_like(given) if gradient is None else gradient).double().cpu()
            for gradient, given in zip(grads, inputs, strict=True)
        ]

    kept = f" ({int(keep.sum())} of {keep.numel()} entries kept)" if part.relu else ""
    labels = [f"input{kept}"] + [_label(part, name) for name in names]
    grads = zip(
        labels,
        gradients(fast_out, fast_inputs),
        gradients(plain_out, plain_inputs),
        gradients(ref_out, ref_inputs),
        strict=True,
    )
    return rows + [(part.name, f"grad {label}", errors(f, p, r, u)) for label, f, p, r in grads]


def _label(part: Part, name: str) -> str:
    """A layer parameter's name within its layer (``0.fn.qkv.weight``), another its released name."""
    return name.removeprefix(part.prefixes[0] + "layers.0.")


def model_rows(models: MAEModels, runners: Runners, images: torch.Tensor, noise: torch.Tensor, grad: bool):
    """Images to (loss, pred, mask), errors compounding through both stacks in fast and plain alike;
    a forward only (grad-enabled on the train path: the training kernels)."""
    config, device, u = models.fast.config, models.device, models.u
    masking = random_masking(noise, config.mask_ratio)
    with torch.no_grad():
        ref_loss, ref_pred, ref_mask = models.reference(images.double(), noise, config.mask_ratio)
    x = images.to(device)
    with torch.set_grad_enabled(grad), autocast(models.precision, device):
        loss, pred, mask = runners.model(x, config.mask_ratio, noise.to(device))
        plain_loss, plain_pred = plain_mae.forward(
            models.low,
            x,
            masking,
            heads=config.heads,
            eta=config.eta,
            lam=config.lam,
            norm_pix_loss=config.norm_pix_loss,
        )
    rows = [("model", "mask", errors(mask, ref_mask, ref_mask, u))]
    if ref_mask.sum() > 0:
        rows.append(("model", "loss", errors(loss, plain_loss, ref_loss, u)))
    return [*rows, ("model", "pred", errors(pred, plain_pred, ref_pred, u))]


def rows(
    model: CRATEMAE,
    precision: str,
    images: torch.Tensor,
    *,
    seed: int,
    compiled: bool,
    paths: tuple,
    compile_mode: str = "default",
) -> tuple[MAEModels, list]:
    """(the models, (path, part, quantity, Errors) of every check), the masking drawn by noise seeded
    with ``seed``; ``images`` (B, C, H, W) in the precision's dtype, on the CPU."""
    models = models_from_model(model, precision)
    runners = Runners.of(model, compiled, compile_mode)
    noise = torch.rand(
        images.shape[0], model.num_patches, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    checked = []
    for path in paths:
        grad = path == "train"
        for index, (part, given) in enumerate(parts(models, runners, images, noise)):
            checked += [(path, *row) for row in part_rows(models, part, given, grad=grad, seed=seed + index)]
        checked += [(path, *row) for row in model_rows(models, runners, images, noise, grad)]
    return models, checked
