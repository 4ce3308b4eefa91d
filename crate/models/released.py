"""Checkpoints in the released layouts (CRATE: Ma-Lab-Berkeley/CRATE; CRATE-α: UCSC-VLAA/CRATE-alpha):
their key names converted to this project's, the fit check that names every mismatch, and the
resampling of a position embedding to another patch grid. The one copy of each, for timm's checkpoint
filter, ``load_official_state_dict`` and fine-tuning (crate/weights/sources.py) alike."""

import math
import re

import torch
from torch import nn

from ..errors import InvalidError
from .layers import pair

# (released key pattern, this model's key): CRATE (Ma-Lab-Berkeley/CRATE) and CRATE-α (UCSC-VLAA/CRATE-alpha)
_OFFICIAL_KEYS = [
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.weight", r"blocks.\1.ista.weight"),
]
_RELEASED_ALPHA_KEYS = [
    (r"conv1\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.(D|D1)", r"blocks.\1.odl.\2"),
]
_SHARED_KEYS = [
    (r"cls_token", r"cls_token"),
    (r"pos_embedding", r"pos_embed"),
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"mlp_head\.0\.(weight|bias)", r"fc_norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
]
_LAYOUTS = {"CRATE": _OFFICIAL_KEYS + _SHARED_KEYS, "CRATE-α": _RELEASED_ALPHA_KEYS + _SHARED_KEYS}


def official_layout(state_dict: dict) -> str | None:
    """ "CRATE" or "CRATE-α" for a state dict in a released layout, None for any other."""
    if "pos_embedding" not in state_dict:
        return None
    return "CRATE-α" if "conv1.weight" in state_dict else "CRATE"


def convert_official_state_dict(state_dict: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Released key names (CRATE: Ma-Lab-Berkeley/CRATE; CRATE-α: UCSC-VLAA/CRATE-alpha) -> this
    model's; also timm's checkpoint filter.

    Accepts a training checkpoint too (weights under 'state_dict' or 'model', DDP's 'module.' prefix).
    A state dict already in this model's names passes through. With ``model``: the checkpoint must fit
    it (every key but the classifier's present with its shape, no other key; else a ValueError names
    each problem), and the position embedding is resampled (bicubic, cls token kept) when the
    checkpoint's patch grid differs from the model's, and the first layer adapted as timm does
    (``adapt_input_channels``) when the checkpoint reads another number of image channels.
    """
    for wrapper in ("state_dict", "model"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    layout = official_layout(state_dict)
    if layout is not None:
        state_dict = _rename(state_dict, layout)
    if model is not None:
        if "pos_embed" in state_dict:
            state_dict["pos_embed"] = resample_to_model(state_dict["pos_embed"], model)
        state_dict, _ = adapt_input_channels(state_dict, model)
        _check_fits(state_dict, model, layout)
    return state_dict


def _rename(state_dict: dict, layout: str) -> dict:
    converted, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, target in _LAYOUTS[layout]:
            if re.fullmatch(pattern, key):
                converted[re.sub(pattern, target, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise InvalidError(f"keys not in the released {layout} layout: {unknown}")
    return converted


def export_official_state_dict(state_dict: dict, layout: str) -> dict[str, torch.Tensor]:
    """This model's key names -> the released ``layout``'s ("CRATE" or "CRATE-α"): the inverse of
    ``convert_official_state_dict``, the same table read backwards; a key of neither raises."""
    exported, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, target in _LAYOUTS[layout]:
            released = _released_name(pattern, target, key)
            if released is not None:
                exported[released] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise InvalidError(f"keys with no released {layout} name: {unknown}")
    return exported


def _released_name(pattern: str, target: str, key: str) -> str | None:
    """The released key that ``pattern`` renames to ``key`` through ``target``, or None."""
    groups = re.findall(r"\(([^)]*)\)", pattern)
    pieces = re.split(r"\\(\d)", target)  # literal, group number, literal, ...
    numbers = [int(number) for number in pieces[1::2]]
    regex = "".join(
        re.escape(piece) if i % 2 == 0 else f"({groups[int(piece) - 1]})" for i, piece in enumerate(pieces)
    )
    match = re.fullmatch(regex, key)
    if match is None:
        return None
    values = dict(zip(numbers, match.groups(), strict=True))
    number = iter(range(1, len(groups) + 1))
    return re.sub(r"\([^)]*\)", lambda _: values[next(number)], pattern).replace("\\.", ".")


def _check_fits(state_dict: dict, model: nn.Module, layout: str | None) -> None:
    """Strict and loud: every model key but the classifier's (timm drops that one when the class
    count differs) present with its shape, and no other key."""
    problems = fit_problems(state_dict, model, "head.")
    if problems:
        source = f"a released {layout} checkpoint" if layout else "the checkpoint"
        raise InvalidError(
            f"{source} does not fit {type(model).__name__} ({model.config.dim} wide, "
            f"{len(model.blocks)} layers): " + "; ".join(problems)
        )


def fit_problems(state_dict: dict, model: nn.Module, skipped_prefix: str) -> list[str]:
    """Each key of ``model`` missing from ``state_dict``, each key it does not have, each shape that
    differs; keys starting with ``skipped_prefix`` (the classifier's) are not compared."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(skipped_prefix)}
    given = {k: v for k, v in state_dict.items() if not k.startswith(skipped_prefix)}
    problems = [
        f"missing key {key!r} (shape {tuple(value.shape)})"
        for key, value in expected.items()
        if key not in given
    ]
    problems += [f"unexpected key {key!r}" for key in given if key not in expected]
    problems += [
        f"key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
        for key, value in given.items()
        if key in expected and value.shape != expected[key].shape
    ]
    return problems


def adapt_input_channels(state_dict: dict, model: nn.Module) -> tuple[dict, str | None]:
    """(state dict, note or None): weights of a first layer ``patch_embed.proj`` that reads another
    number of image channels than ``model``, adapted as timm adapts a pretrained first conv
    (timm.models.adapt_input_conv): summed over R, G and B for one channel; for C channels, RGB
    repeated and scaled by 3 / C. A conv (CRATE-α, timm's ViTs) is adapted as it is. CRATE's patch
    embedding is LayerNorm → Linear on (row, column, channel)-flattened patches: the LayerNorm's scale
    and shift are folded into the Linear first (a gray patch replicated to RGB has the gray patch's
    mean and variance), its weight is read as a (d, C, P, P) conv and adapted, so that on one channel
    the adapted layer on a gray image computes exactly what the source computes on it replicated to
    RGB, as timm's summed conv does. Unchanged when the channels agree or there is no such layer."""
    key = "patch_embed.proj.weight"
    expected = model.state_dict()
    source, target = input_channels(state_dict, model), input_channels(expected, model)
    if source is None or target is None or source == target:
        return state_dict, None
    given = state_dict[key]
    if given.dim() != expected[key].dim() or given.shape[0] != expected[key].shape[0]:
        return state_dict, None  # another family or width: fit_problems names it
    if given.shape[2:] != expected[key].shape[2:]:
        return state_dict, None  # another patch size: fit_problems names it
    if given.dim() == 4:  # a conv: (d, C, P, P)
        adapted = {key: _adapt_conv(target, given, source)}
    else:
        adapted = _adapt_patch_linear(state_dict, target, source, pair(model.patch_embed.patch_size))
    note = (
        f"patch_embed.proj adapted from {source} to {target} input channels as timm does "
        f"({'summed over RGB' if target == 1 else f'RGB repeated, scaled by 3/{target}'})"
    )
    return state_dict | adapted, note


def input_channels(state_dict: dict, model: nn.Module) -> int | None:
    """The image channels the first layer ``patch_embed.proj`` of ``state_dict`` reads, at ``model``'s
    patch size: a conv's (d, C, P, P); CRATE's LayerNorm over P·P·C features; None for neither."""
    weight = state_dict.get("patch_embed.proj.weight")
    if weight is not None and weight.dim() == 4:
        return weight.shape[1]
    norm = state_dict.get("patch_embed.norm_in.weight")
    if weight is None or weight.dim() != 2 or norm is None:
        return None
    P = pair(model.patch_embed.patch_size)
    return norm.numel() // (P[0] * P[1]) if norm.numel() % (P[0] * P[1]) == 0 else None


def _adapt_conv(target: int, weight: torch.Tensor, source: int) -> torch.Tensor:
    """timm's adapt_input_conv of a (d, C, P, P) weight, which starts from RGB."""
    from timm.models import adapt_input_conv

    if source != 3:
        raise InvalidError(
            f"the checkpoint's first layer patch_embed.proj reads {source} image channels, the model "
            f"{target}: timm adapts a first layer from 3-channel (RGB) weights only; build the model "
            f"with in_chans={source}"
        )
    return adapt_input_conv(target, weight)


def _adapt_patch_linear(state_dict: dict, target: int, source: int, P: tuple[int, int]) -> dict:
    """CRATE's norm_in (LayerNorm over P·P·C) and proj (Linear) for ``target`` channels, the norm's
    affine folded into proj, proj's weight adapted as a (d, C, P, P) conv."""
    weight, bias = state_dict["patch_embed.proj.weight"], state_dict["patch_embed.proj.bias"]
    scale, shift = state_dict["patch_embed.norm_in.weight"], state_dict["patch_embed.norm_in.bias"]
    dtype, d = weight.dtype, weight.shape[0]
    folded = weight.float() * scale.float()  # (d, P·P·C): W diag(γ)
    folded_bias = bias.float() + weight.float() @ shift.float()  # b + W β
    conv = folded.reshape(d, P[0], P[1], source).permute(0, 3, 1, 2)  # (d, C, P, P)
    adapted = _adapt_conv(target, conv, source).permute(0, 2, 3, 1).reshape(d, -1)  # (d, P·P·C')
    features = P[0] * P[1] * target
    return {
        "patch_embed.proj.weight": adapted.to(dtype),
        "patch_embed.proj.bias": folded_bias.to(dtype),
        "patch_embed.norm_in.weight": torch.ones(features, dtype=scale.dtype),
        "patch_embed.norm_in.bias": torch.zeros(features, dtype=shift.dtype),
    }


def resample_to_model(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A (1, prefix + h·w, d) position embedding of a square grid, resampled to ``model``'s patch grid
    (unchanged when it has the model's length)."""
    prefix, grid = getattr(model, "num_prefix_tokens", 1), model.patch_embed.grid_size
    if pos_embed.shape[1] == grid[0] * grid[1] + prefix:
        return pos_embed
    old = math.isqrt(pos_embed.shape[1] - prefix)
    if old * old != pos_embed.shape[1] - prefix:
        raise InvalidError(
            f"cannot resample a position embedding of {pos_embed.shape[1] - prefix} patches: "
            "not a square grid"
        )
    return resample_position_embedding(pos_embed, grid, (old, old), num_prefix_tokens=prefix)


def resample_position_embedding(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """(1, prefix + h·w, d) embedding on ``old_grid`` -> on ``new_grid`` (patches row-major), the prefix
    tokens kept: timm's resample_abs_pos_embed (bicubic, antialiased). PyTorch's antialiased
    F.interpolate (2.14, CPU) returns its first output row h times for an output of width 1 and height
    h > 1 (verification/test_position_embedding.py found it); the transposed problem, width h and
    height 1, is right, and a (1, h) grid lists its tokens in the order of the (h, 1) grid."""
    from timm.layers import resample_abs_pos_embed

    if new_grid[1] == 1 and new_grid[0] > 1:
        prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
        transposed = patches.unflatten(1, tuple(old_grid)).transpose(1, 2).flatten(1, 2)
        pos_embed, new_grid, old_grid = torch.cat([prefix, transposed], 1), new_grid[::-1], old_grid[::-1]
    return resample_abs_pos_embed(
        pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens
    )


def load_official_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Convert and load strictly: a missing, unexpected or mis-shaped key raises, naming the key."""
    model.load_state_dict(convert_official_state_dict(state_dict, model), strict=True)
