"""The gate: a fast model as a run will execute it (its device, precision, options, compiled or not)
checked against the float64 reference of its own weights, by the precision rule (rule.py).

Two paths, because they run different kernels: "train", the grad-enabled forward and backward that
the optimizer sees (every parameter's gradient and the input's), and "inference", the no-grad forward
of evaluation and deployment. Each is checked part by part: the patch embedding, every layer's MSSA
and ISTA/ODL (each fed the reference's input of that layer, so errors do not compound: layers.py),
the head, and the whole model from images to logits (the compiled model, when compiled, too)."""

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..models.layers import DropPath
from ..models.mae import CRATEMAE
from . import mae
from .layers import Models, layer_gradient_check, layer_results, models_from_model, reference_states
from .rule import Errors, autocast, errors

PATHS = ("train", "inference")
EXIT_FAILED = 70  # sysexits' EX_SOFTWARE: the fast model does not compute the derived CRATE here


@dataclass(frozen=True)
class Row:
    path: str  # "train" or "inference"
    part: str  # "embed", "layer 3", "head", "model"
    quantity: str  # "output", "z_half", "grad input", "grad <released parameter name>"
    errors: Errors

    @property
    def holds(self) -> bool:
        return self.errors.holds

    def __str__(self) -> str:
        return f"{self.path} {self.part} {self.quantity}: {self.errors}"


@dataclass
class Report:
    """Every quantity checked, with the configuration it was checked in; ``passed`` when all hold."""

    model: str
    device: str
    precision: str
    compiled: bool
    options: dict
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(row.holds for row in self.rows)

    @property
    def first_violation(self) -> Row | None:
        return next((row for row in self.rows if not row.holds), None)

    def verdict(self) -> str:
        violation = self.first_violation
        if violation is None:
            return f"passed: {len(self.rows)} quantities within the precision rule ({self.seconds:.1f} s)"
        failed = sum(not row.holds for row in self.rows)
        return f"FAILED: {failed} of {len(self.rows)} quantities break the precision rule; first: {violation}"

    def to_dict(self) -> dict:
        rows = [
            dict(
                asdict(row) | asdict(row.errors),
                ratio=row.errors.ratio,
                bound=row.errors.bound,
                holds=row.holds,
            )
            for row in self.rows
        ]
        for row in rows:
            del row["errors"]
        settings = dict(
            model=self.model, device=self.device, precision=self.precision, compiled=self.compiled
        )
        return settings | dict(
            options=self.options,
            passed=self.passed,
            verdict=self.verdict(),
            seconds=round(self.seconds, 3),
            rows=rows,
        )

    def table(self) -> str:
        width = max([8] + [len(row.part) for row in self.rows])  # "decoder 11" is CRATE-MAE's longest
        header = (
            f"{'path':<9} {'part':<{width}} {'quantity':<40} {'error':>9} {'plain':>9} {'ratio':>6} "
            f"{'bound':>9}"
        )
        lines = [header + "  verdict"]
        for row in self.rows:
            e = row.errors
            ratio = "     -" if not e.plain else (f"{e.ratio:6.2f}" if e.ratio < 1000 else f"{e.ratio:6.0e}")
            lines.append(
                f"{row.path:<9} {row.part:<{width}} {row.quantity:<40} {e.fast:9.2e} {e.plain:9.2e} {ratio} "
                f"{e.bound:9.2e}  {'ok' if row.holds else 'FAIL'}"
            )
        return "\n".join(lines)


@dataclass(frozen=True)
class Runners:
    """How each part of the fast model is run: eagerly, or each through torch.compile (``compiled``)."""

    embed: Callable
    compress: Callable  # (block, x)
    forward: Callable  # (block, x): the no-grad layer
    train_block: Callable  # (block, x): the layer as the training step runs it
    head: Callable
    model: Callable

    @classmethod
    def of(cls, model: nn.Module, compiled: bool, mode: str = "default") -> "Runners":
        wrap = functools.partial(torch.compile, mode=mode) if compiled else (lambda function: function)
        return cls(
            embed=wrap(lambda x: model.embed(x)),
            compress=wrap(lambda block, x: block.compress(x)),
            forward=wrap(lambda block, x: block(x)),
            train_block=wrap(lambda block, x: model.run_block(block, x)),
            head=wrap(lambda x: model.forward_head(x)),
            model=wrap(model),
        )


def check_model(
    model: nn.Module,
    precision: str,
    *,
    images: torch.Tensor | None = None,
    batch: int = 2,
    seed: int = 0,
    compiled: bool = False,
    compile_mode: str = "default",
    paths: tuple[str, ...] = PATHS,
) -> Report:
    """Check ``model`` (CRATE, CRATE-α or CRATE-MAE, on its device, in the dtype of ``precision``) by
    the rule.

    ``images``: the inputs (e.g. a run's first images; by default ``batch`` seeded standard-normal
    ones, the statistics of normalised images). ``compiled``: every part, and the whole model, run
    through torch.compile in ``compile_mode``. The model's training flag is restored; dropout and
    drop-path are held off while it is checked (their masks are random; verification/test_training_mode.py
    proves their exact per-sample semantics). The global random state is left as it was. A CRATEMAE is
    checked part by part as mae.py says, its masking drawn by noise seeded with ``seed``."""
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the reference's construction draws: a run's stream stays
        check = _check_mae if isinstance(model, CRATEMAE) else _check
        return check(model, precision, images, batch, seed, (compiled, compile_mode), paths)


def _default_images(
    model: nn.Module, images: torch.Tensor | None, batch: int, seed: int, dtype
) -> torch.Tensor:
    if images is None:
        generator = torch.Generator().manual_seed(seed)
        size = model.patch_embed.img_size
        images = torch.randn(batch, model.config.in_chans, *size, generator=generator, dtype=torch.float64)
    return images.to(dtype).cpu()


def _model_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__


def _check_mae(model, precision, images, batch, seed, compiling, paths) -> Report:
    start = time.perf_counter()
    compiled, mode = compiling
    config = model.config
    options = dict(
        fused_attn=config.fused_attn,
        grad_checkpointing=model.grad_checkpointing,
        drop_path_rate=config.drop_path_rate,
        drop_rate=config.drop_rate,
        mask_ratio=config.mask_ratio,
        norm_pix_loss=config.norm_pix_loss,
    )
    with _deterministic(model):
        models, rows = mae.rows(
            model,
            precision,
            _default_images(model, images, batch, seed, next(model.parameters()).dtype),
            seed=seed,
            compiled=compiled,
            paths=paths,
            compile_mode=mode,
        )
    report = Report(_model_name(model), str(models.device), precision, compiled, options)
    report.rows = [Row(*row) for row in rows]
    report.seconds = time.perf_counter() - start
    return report


def _check(model, precision, images, batch, seed, compiling, paths) -> Report:
    start = time.perf_counter()
    compiled, mode = compiling
    models = models_from_model(model, precision)
    config = model.config
    options = dict(
        fused_attn=config.fused_attn,
        grad_checkpointing=model.grad_checkpointing,
        recompute_norms=model.recompute_norms,
        drop_path_rate=config.drop_path_rate,
        drop_rate=config.drop_rate,
    ) | (dict(compile_mode=mode) if compiled else {})
    report = Report(_model_name(model), str(models.device), precision, compiled, options)
    images = _default_images(model, images, batch, seed, models.dtype)
    runners = Runners.of(model, compiled, mode)
    with _deterministic(model):
        stream = models.reference.embed(images.double())
        states = reference_states(models, stream)
        for path in paths:
            check = _train_rows if path == "train" else _inference_rows
            rows = check(models, runners, images, states, seed)
            report.rows += [Row(path, part, quantity, e) for part, quantity, e in rows]
    report.seconds = time.perf_counter() - start
    return report


@contextlib.contextmanager
def _deterministic(model: nn.Module) -> Iterator[None]:
    """Dropout and drop-path modules in eval mode (the identity), the rest as the caller left it; every
    parameter differentiable, so that a frozen one's gradient is checked too (a --freeze run's)."""
    training = model.training
    frozen = [parameter for parameter in model.parameters() if not parameter.requires_grad]
    try:
        for module in model.modules():
            if isinstance(module, nn.Dropout | DropPath):
                module.eval()
        for parameter in frozen:
            parameter.requires_grad_(True)
        yield
    finally:
        model.train(training)
        for parameter in frozen:
            parameter.requires_grad_(False)


def _inference_rows(models: Models, runners: Runners, images: torch.Tensor, states: list, seed: int) -> list:
    family, low, device, u = models.family, models.low, models.device, models.u
    rows = []
    with torch.no_grad(), autocast(models.precision, device):
        x = images.to(device)
        plain_stream = family.plain_embed(low, x, models.fast.config.patch_size)
        rows.append(("embed", "output", errors(runners.embed(x), plain_stream, states[0].input, u)))
        results = layer_results(models, None, states, compress=runners.compress, forward=runners.forward)
        for layer, result in enumerate(results):
            part = f"layer {layer}"
            rows.append((part, "z_half", errors(result.fast_half, result.plain_half, result.ref_half, u)))
            rows.append((part, "output", errors(result.fast_out, result.plain_out, result.ref_out, u)))
        last = states[-1].ista.to(device=device, dtype=models.dtype)
        ref_head = models.reference.head(last.double())
        rows.append(
            ("head", "output", errors(runners.head(last), _plain_head(models, low, last), ref_head, u))
        )
    rows.append(("model", "output", _model_errors(models, runners, images, grad=False)))
    return rows


def _model_errors(models: Models, runners: Runners, images: torch.Tensor, grad: bool) -> Errors:
    """Images to logits, errors compounding over the layers in fast and plain alike (docs/math.md
    §8.3); a forward only: the whole model's backward crosses every layer's ReLUs, where one flip
    changes a gradient discontinuously, so it is judged layer by layer, where flips are masked."""
    with torch.no_grad():
        reference_logits = models.reference(images.double())
    x = images.to(models.device)
    with torch.set_grad_enabled(grad), autocast(models.precision, models.device):
        fast, plain_logits = runners.model(x), _plain_logits(models, x)
    return errors(fast, plain_logits, reference_logits, models.u)


def _plain_head(models: Models, low: dict, x: torch.Tensor) -> torch.Tensor:
    return models.family.plain.head(low, x, pool=models.fast.config.pool)


def _plain_logits(models: Models, images: torch.Tensor) -> torch.Tensor:
    family, low, config = models.family, models.low, models.fast.config
    x = family.plain_embed(low, images, config.patch_size)
    for layer in range(config.depth):
        z_half = family.plain.compress(low, layer, x, config.heads)
        x = family.plain.sparsify(low, layer, z_half, config.eta, config.lam)[0]
    return _plain_head(models, low, x)


def _train_rows(models: Models, runners: Runners, images: torch.Tensor, states: list, seed: int) -> list:
    patch_size = models.fast.config.patch_size
    rows = _part_rows(
        models,
        "embed",
        images,
        fast=runners.embed,
        plain=lambda low, x: models.family.plain_embed(low, x, patch_size),
        ref=lambda x: models.reference.embed(x),
        seed=seed,
    )
    wider = _WiderStates(models, images, seed)
    for layer, state in enumerate(states):
        check = layer_gradient_check(
            models, state.input, layer, seed=seed + layer, run_block=runners.train_block
        )
        if check.kept < MIN_KEPT:  # ReLU flips masked most of the upstream gradient: more images
            layer_input = wider.states()[layer].input
            check = layer_gradient_check(
                models, layer_input, layer, seed=seed + layer, run_block=runners.train_block
            )
        rows += _layer_gradient_rows(layer, check, models.family.token_mask, models.u)
    rows += _part_rows(
        models,
        "head",
        states[-1].ista,
        fast=runners.head,
        plain=lambda low, x: _plain_head(models, low, x),
        ref=lambda x: models.reference.head(x),
        seed=seed,
        with_input=True,
    )
    rows.append(("model", "output", _model_errors(models, runners, images, grad=True)))
    return rows + _drop_path_rows(models, states, seed)


MIN_KEPT = 16  # tokens (CRATE-α) or entries (CRATE) whose upstream gradient survives the ReLU-flip mask
WIDER = 8  # the images of a layer's second try, as a multiple of the first's


class _WiderStates:
    """The reference's layer states of WIDER times the images (the given ones, then seeded standard
    normal ones), computed once when a layer's backward first needs them."""

    def __init__(self, models: Models, images: torch.Tensor, seed: int):
        self.models, self.images, self.seed, self._states = models, images, seed, None

    def states(self) -> list:
        if self._states is None:
            generator = torch.Generator().manual_seed(self.seed + 1)
            shape = ((WIDER - 1) * self.images.shape[0], *self.images.shape[1:])
            more = torch.randn(shape, generator=generator, dtype=torch.float64).to(self.models.dtype)
            images = torch.cat([self.images, more]).double()
            self._states = reference_states(self.models, self.models.reference.embed(images))
        return self._states


def _layer_gradient_rows(layer: int, check, token_mask: bool, u: float) -> list:
    """A layer's rows: its output, then its input's gradient (with how much of the upstream gradient
    the ReLU-flip mask kept) and each parameter's. With nothing kept the backward was not tested: a
    failing row says so instead of vacuous zeros."""
    part, unit = f"layer {layer}", "tokens" if token_mask else "entries"
    rows = [(part, "output", check.output)]
    if check.kept == 0:
        untested = Errors(math.inf, 0.0, 0.0, u)
        return [*rows, (part, f"grad: all {check.total} {unit} have a ReLU flip, untested", untested)]
    for name, e in check.errors.items():
        label = name.split(f"layers.{layer}.")[-1]
        if label == "input":
            label += f" ({check.kept} of {check.total} {unit} kept)"
        rows.append((part, f"grad {label}", e))
    return rows


def _drop_path_rows(models: Models, states: list, seed: int) -> list:
    """Each drop-path branch in training mode, on the reference's input of its layer: a sample whose
    output is its input bit for bit was dropped; every other one must be the input plus the whole
    branch divided by the survival probability, judged by the rule (plain: the same from the plain
    branch); CRATE-α's ODL branch too."""
    family, low, config, u = models.family, models.low, models.fast.config, models.u
    rows = []
    for layer, (block, state) in enumerate(zip(models.fast.blocks, states, strict=True)):
        if not isinstance(block.drop_path, DropPath):
            continue
        halves = [("MSSA", block.compress, state.input, state.mssa, _plain_half(family, config, layer))]
        if family.name == "alpha":
            halves.append(
                ("ODL", block.sparsify, state.mssa, state.ista, _plain_sparse(family, config, layer))
            )
        keep = 1 - block.drop_path.probability
        for branch, fast, given, ref_full, plain in halves:
            x = given.to(device=models.device, dtype=models.dtype)
            torch.manual_seed(seed + layer)  # inside check_model's forked random state
            with torch.no_grad(), autocast(models.precision, models.device):
                block.drop_path.train()
                try:
                    out = fast(x)
                finally:
                    block.drop_path.eval()
                plain_full = plain(low, x)
            kept = ~(out == x).flatten(1).all(dim=1).cpu()  # (B,)
            x64 = x.double().cpu()
            expected = x64 + (ref_full - x64) / keep
            plain_kept = x64 + (plain_full.double().cpu() - x64) / keep
            quantity = f"drop-path {branch} ({int(kept.sum())} of {len(kept)} kept)"
            rows.append((f"layer {layer}", quantity, errors(out[kept], plain_kept[kept], expected[kept], u)))
    return rows


def _plain_half(family, config, layer: int) -> Callable:
    return lambda low, x: family.plain.compress(low, layer, x, config.heads)


def _plain_sparse(family, config, layer: int) -> Callable:
    return lambda low, z: family.plain.sparsify(low, layer, z, config.eta, config.lam)[0]


_PARAMETERS = {  # the released names of each part's parameters, by prefix
    "embed": ("to_patch_embedding.", "conv1.", "cls_token", "pos_embedding"),
    "head": ("mlp_head.",),
}


def _part_rows(models: Models, part: str, inputs, *, fast, plain, ref, seed: int, with_input: bool = False):
    """Output and gradients of ⟨output, g⟩ (g seeded, standard normal) with respect to the part's
    parameters, and its input when ``with_input``, fast and plain against the reference. These parts
    have no ReLU, so g needs no mask."""
    low, device, u = models.low, models.device, models.u
    names = [key for key in low if key.startswith(_PARAMETERS[part])]
    x = inputs.to(models.dtype)
    ref_inputs = [x.double().requires_grad_(with_input)] + [models.reference.get_parameter(n) for n in names]
    fast_inputs = [x.to(device).requires_grad_(with_input)] + [models.fast_parameter(n) for n in names]
    plain_inputs = [x.to(device).requires_grad_(with_input)] + [
        low[n].detach().requires_grad_(True) for n in names
    ]
    plain_state = low | dict(zip(names, plain_inputs[1:], strict=True))
    ref_out = ref(ref_inputs[0])
    with autocast(models.precision, device):
        fast_out, plain_out = fast(fast_inputs[0]), plain(plain_state, plain_inputs[0])
    g = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    first = 0 if with_input else 1

    def gradients(out, given):
        return torch.autograd.grad((out.double() * g.to(out.device)).sum(), given[first:])

    labels = (["input"] if with_input else []) + names
    grads = zip(
        labels,
        gradients(fast_out, fast_inputs),
        gradients(plain_out, plain_inputs),
        gradients(ref_out, ref_inputs),
        strict=True,
    )
    rows = [(part, "output", errors(fast_out, plain_out, ref_out, u))]
    return rows + [(part, f"grad {label}", errors(f, p, r, u)) for label, f, p, r in grads]
