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
    if (folder / DIGESTS).exists():
        try:
            digests = json.loads((folder / DIGESTS).read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{folder / DIGESTS} is unreadable: {error}") from error
    else:  # written before checkpoints carried digests: the loads below still catch truncation
        log.warning("%s has no %s: its files are read unchecked", folder, DIGESTS)
        digests = {}
    for name, digest in digests.items():
        path = folder / name
        try:
            actual = _sha256(path)
        except OSError as error:
            raise CheckpointError(f"{path} is missing or unreadable: {error}") from error
        if actual != digest:
            raise CheckpointError(f"{path} is truncated or corrupt (its sha256 differs from {DIGESTS})")
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
            try:
                tensors[name] = load_file(path, device=str(device))
            except (OSError, SafetensorError) as error:
                raise CheckpointError(f"{path} is unreadable: {error}") from error
    return dict(state, **tensors)


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
