"""Training checkpoints, written atomically, checked when read, and resumed exactly.

A checkpoint is a folder ``checkpoint-<step>/`` holding ``model.safetensors`` (and ``ema.safetensors``),
``state.pt`` (step, optimizer state and every rank's RNG states; read back with
torch.load(weights_only=True), which refuses any pickled object but tensors and plain data) and
``sha256.json``, the digest of each of those files. It is written under a temporary name, synced to
disk and renamed into place, then the file ``latest`` is replaced atomically to name it: a crash or an
error at any moment (a full disk included) leaves the previous checkpoint intact and ``latest`` naming
it. ``restore`` reads the newest checkpoint whose files match their digests and load; one that does not
is named in the log and the next older one is tried.
"""

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import MissingError, UserError

LATEST = "latest"
DIGESTS = "sha256.json"
log = logging.getLogger("crate.checkpoint")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint folder that cannot be read back as written."""


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def rng_state() -> dict:
    """This process's RNG states: torch (and the current CUDA device's), NumPy and Python."""
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(),
        numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)),
        numpy_rest=[int(np_state[2]), int(np_state[3]), float(np_state[4])],
        python=random.getstate(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    position, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, gauss)
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _replace_file(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def step_folder(output: Path, step: int) -> Path:
    return Path(output) / f"checkpoint-{step:08d}"


def save(
    output: Path, step: int, model, optimizer, ema=None, keep: int = 2, rng_states: list[dict] | None = None
) -> Path:
    """Write checkpoint-<step>/ and point ``latest`` at it; keep the newest ``keep`` checkpoints.
    ``rng_states``: one per rank (default: this process's). If writing fails, the partial folder is
    removed, the error raised, and the previous checkpoint stays the latest."""
    output = Path(output)
    folder = step_folder(output, step)
    temporary = output / f".tmp-checkpoint-{step:08d}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        save_file(_unwrap(model).state_dict(), temporary / "model.safetensors")
        if ema is not None:
            save_file(ema.module.state_dict(), temporary / "ema.safetensors")
        state = dict(step=step, optimizer=optimizer.state_dict(), rng=rng_states or [rng_state()])
        torch.save(state, temporary / "state.pt")
        files = sorted(temporary.iterdir())
        for path in files:
            _sync(path)
        (temporary / DIGESTS).write_text(json.dumps({path.name: _sha256(path) for path in files}) + "\n")
        _sync(temporary / DIGESTS)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _sync(output)
    _replace_file(output / LATEST, folder.name + "\n")
    for old in sorted(output.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest(output: Path) -> Path:
    pointer = Path(output) / LATEST
    if not pointer.is_file():
        raise MissingError(f"no checkpoint to resume from in {output} ({pointer} does not exist)")
    return Path(output) / pointer.read_text().strip()


def candidates(output: Path) -> list[Path]:
    """The checkpoint folders to try, newest first: the one ``latest`` names, then the others by step."""
    newest = latest(output)
    older = sorted((p for p in Path(output).glob("checkpoint-*") if p != newest), reverse=True)
    return [newest, *older]


def read(folder: Path, device="cpu") -> dict:
    """A checkpoint folder's tensors and state, each file checked against its digest; CheckpointError
    naming the file that is missing, truncated, corrupt or carries more than tensors and plain data."""
    folder = Path(folder)
    digests = _digests(folder)
    for name in digests:
        _check(folder / name, digests)
    try:
        state = torch.load(folder / "state.pt", map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{folder / 'state.pt'} refused: it holds pickled objects other than tensors and plain data "
            f"(torch.load weights_only=True): {str(error).splitlines()[0]}"
        ) from error
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{folder / 'state.pt'} is unreadable: {error}") from error
    tensors = {}
    for name in ("model", "ema"):
        path = folder / f"{name}.safetensors"
        if path.exists():
            tensors[name] = _load_safetensors(path, device)
    return dict(state, **tensors)


def read_model(folder: Path, device="cpu") -> dict[str, torch.Tensor]:
    """A checkpoint folder's model.safetensors, checked against its digest: CheckpointError naming the
    file that is missing, truncated or corrupt (state.pt, the optimizer's, is neither read nor checked)."""
    folder = Path(folder)
    path = folder / "model.safetensors"
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist (a checkpoint folder holds model.safetensors)")
    _check(path, _digests(folder))
    return _load_safetensors(path, device)


def read_weights(path: Path, device="cpu") -> tuple[dict[str, torch.Tensor], Path]:
    """(model tensors, the checkpoint folder they came from) of a run folder or a checkpoint folder,
    checked against sha256.json. A run folder gives its newest intact checkpoint: each newer one that
    is not is named in a warning with why, and skipped. A checkpoint folder named explicitly that is
    not intact raises CheckpointError saying why and which checkpoint beside it is intact."""
    path = Path(path)
    if is_checkpoint(path):
        try:
            return read_model(path, device), path
        except CheckpointError as error:
            raise CheckpointError(f"{error}; {_instead(path)}") from error
    refused = []
    for folder in run_checkpoints(path):
        try:
            weights = read_model(folder, device)
        except CheckpointError as error:
            refused.append(f"skipping {folder.name}: {error}")
            continue
        if refused:
            log.warning("%s; reading %s instead", "; ".join(refused), folder)
        return weights, folder
    raise CheckpointError(f"no intact checkpoint in {path}: " + "; ".join(refused))


def is_checkpoint(path: Path) -> bool:
    """A folder the trainer wrote as one checkpoint: checkpoint-<step>/, or one holding
    model.safetensors or sha256.json (a run folder holds neither)."""
    path = Path(path)
    files = (path / DIGESTS, path / "model.safetensors")
    return path.name.startswith("checkpoint-") or any(file.exists() for file in files)


def run_checkpoints(run: Path) -> list[Path]:
    """A run folder's checkpoints, newest first (the one ``latest`` names, then the others by step);
    MissingError when it has none."""
    run = Path(run)
    if (run / LATEST).is_file():
        return candidates(run)
    folders = sorted(run.glob("checkpoint-*"), reverse=True)
    if not folders:
        raise MissingError(
            f"{run} holds no checkpoint (expected {run / LATEST} and checkpoint-<step>/ folders, "
            "which crate train writes)"
        )
    return folders


def _instead(folder: Path) -> str:
    """Which checkpoint beside ``folder`` (in its run folder) is intact, for the message."""
    for other in sorted(folder.parent.glob("checkpoint-*"), reverse=True):
        if other == folder:
            continue
        try:
            read_model(other)
        except CheckpointError:
            continue
        return f"{other} is intact: pass it, or the run folder {folder.parent}, which falls back to it"
    return f"no other checkpoint in {folder.parent} is intact"


def _digests(folder: Path) -> dict[str, str]:
    """sha256.json of a checkpoint folder ({} for one written before checkpoints carried digests)."""
    if not (folder / DIGESTS).exists():  # the loads still catch truncation
        log.warning("%s has no %s: its files are read unchecked", folder, DIGESTS)
        return {}
    try:
        return json.loads((folder / DIGESTS).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder / DIGESTS} is unreadable: {error}") from error


def _check(path: Path, digests: dict[str, str]) -> None:
    """CheckpointError unless ``path`` is there and matches its digest (when it has one)."""
    try:
        actual = _sha256(path)
    except OSError as error:
        raise CheckpointError(f"{path} is missing or unreadable: {error.strerror or error}") from error
    if path.name in digests and actual != digests[path.name]:
        raise CheckpointError(_damage(path))


def _damage(path: Path) -> str:
    """What is wrong with a file whose digest does not match: truncated (a .safetensors file shorter
    than its header describes), else corrupt."""
    truncated = safetensors_truncation(path) if path.suffix == ".safetensors" else None
    return truncated or f"{path} is corrupt: its sha256 does not match the digest in {path.parent / DIGESTS}"


def safetensors_truncation(path: Path) -> str | None:
    """The message when a .safetensors file is shorter than its header says (8 bytes of length, the
    JSON header, the tensors' data), else None: not truncated, or a header too corrupt to say."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length >= 100_000_000:  # safetensors' own limit on a header: corrupt
            return None
        if size < 8 + length:
            return f"{path} is truncated: {size} bytes, less than its own header"
        try:
            header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
    expected = 8 + length + max(ends, default=0)
    return (
        f"{path} is truncated: {size} bytes of the {expected} its header describes"
        if size < expected
        else None
    )


def _load_safetensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors; CheckpointError when it does not parse."""
    try:
        return load_file(path, device=str(device))
    except (OSError, SafetensorError) as error:
        raise CheckpointError(unreadable_safetensors(path)) from error


def unreadable_safetensors(path: Path) -> str:
    """Why a .safetensors file does not load, without the library's own words."""
    return safetensors_truncation(path) or (
        f"{path} is not a readable safetensors file: its header or tensors do not parse (corrupt)"
    )


def restore(output: Path, model, optimizer, ema=None, device="cpu", rank: int = 0) -> int:
    """Load the newest readable checkpoint into model, optimizer (and EMA) and this rank's RNGs;
    return its step. Unreadable newer checkpoints are named in the log and skipped."""
    refused = []
    for folder in candidates(output):
        try:
            saved = read(folder, device)
            break
        except CheckpointError as error:
            log.error("%s; falling back to the previous checkpoint", error)
            refused.append(str(error))
    else:
        raise CheckpointError(f"no readable checkpoint in {output}: " + "; ".join(refused))
    _unwrap(model).load_state_dict(saved["model"], strict=True)
    if ema is not None:
        ema.module.load_state_dict(saved["ema"], strict=True)
    optimizer.load_state_dict(saved["optimizer"])
    states = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # before per-rank states
    if rank < len(states):
        set_rng_state({k: v.cpu() if torch.is_tensor(v) else v for k, v in states[rank].items()})
    else:  # more ranks than the run that wrote it had: this rank keeps its fresh seed
        log.warning("%s holds RNG states for %d ranks; rank %d keeps its seed", folder, len(states), rank)
    log.info("resumed from %s", folder)
    return int(saved["step"])
