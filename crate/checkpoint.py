"""Training checkpoints, written atomically and resumed exactly.

A checkpoint is a folder ``checkpoint-<step>/`` holding ``model.safetensors`` (and ``ema.safetensors``)
and ``state.pt`` (step, optimizer state and the RNG states; read back with torch.load(weights_only=True)).
It is written under a temporary name and renamed into place, then the file ``latest`` is replaced
atomically to name it: a crash at any moment leaves the previous checkpoint intact.
"""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = dict(
        torch=torch.get_rng_state(),
        numpy_keys=torch.from_numpy(np_state[1].astype(np.int64)),
        numpy_rest=[int(np_state[2]), int(np_state[3]), float(np_state[4])],
        python=random.getstate(),
    )
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    position, has_gauss, gauss = state["numpy_rest"]
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), position, has_gauss, gauss)
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_file(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save(output: Path, step: int, model, optimizer, ema=None, keep: int = 2) -> Path:
    output = Path(output)
    folder = output / f"checkpoint-{step:08d}"
    temporary = output / f".tmp-checkpoint-{step:08d}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(_unwrap(model).state_dict(), temporary / "model.safetensors")
    if ema is not None:
        save_file(ema.module.state_dict(), temporary / "ema.safetensors")
    torch.save(dict(step=step, optimizer=optimizer.state_dict(), rng=rng_state()), temporary / "state.pt")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(temporary, folder)
    _replace_file(output / LATEST, folder.name + "\n")
    for old in sorted(output.glob("checkpoint-*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest(output: Path) -> Path:
    pointer = Path(output) / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {output} ({pointer} does not exist)")
    return Path(output) / pointer.read_text().strip()


def restore(output: Path, model, optimizer, ema=None, device="cpu") -> int:
    """Load the latest checkpoint into model, optimizer (and EMA) and the RNGs; return its step."""
    folder = latest(output)
    _unwrap(model).load_state_dict(load_file(folder / "model.safetensors", device=str(device)), strict=True)
    if ema is not None:
        ema.module.load_state_dict(load_file(folder / "ema.safetensors", device=str(device)), strict=True)
    state = torch.load(folder / "state.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(
        {key: value.cpu() if torch.is_tensor(value) else value for key, value in state["rng"].items()}
    )
    return int(state["step"])
