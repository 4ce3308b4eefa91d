"""Weights on the Hugging Face Hub without the Hub: before timm asks huggingface_hub for a model's
published weights, check that they are in the local cache or that the Hub answers, and otherwise say
in about a second what is missing, where it was looked for and how to get it, where huggingface_hub
would retry for ~30 s and raise its own error (LocalEntryNotFoundError, or CacheNotFound on a machine
that has never downloaded anything). Used by `crate.weights.sources` (a timm name as SOURCE) and by
the crate registry's pretrained path (crate/models/crate.py)."""

import os
import socket
import threading
import urllib.parse
from pathlib import Path

from ..errors import MissingError


def _hub_files(cfg) -> list[str]:
    """The Hub files timm reads for ``cfg``, any one of which will do: its hf_hub_filename, else
    timm's default pytorch_model.bin and the model.safetensors it prefers (timm/models/_hub.py)."""
    if cfg.hf_hub_filename:
        name = cfg.hf_hub_filename
        return [name] + ([name.removesuffix(".bin") + ".safetensors"] if name.endswith(".bin") else [])
    return ["model.safetensors", "pytorch_model.bin"]


def hub_cache() -> Path:
    """The Hugging Face cache folder as the environment names it now (huggingface_hub reads it once)."""
    import huggingface_hub.constants as hub

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hub.HF_HUB_CACHE)


def hub_unreachable(timeout: float = 1.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None: HF_HUB_OFFLINE set, or no TCP connection
    to its endpoint within ``timeout`` seconds (where huggingface_hub would retry for ~30 s). Behind a
    proxy (HTTPS_PROXY, ALL_PROXY) the Hub is not probed: the proxy may reach it where we cannot."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(proxy) for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urllib.parse.urlsplit(hub.ENDPOINT)
    address = (endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80))
    outcome: list[str | None] = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(f"{type(error).__name__}: {error}")

    probe = threading.Thread(target=connect, daemon=True)  # name resolution has no timeout of its own
    probe.start()
    probe.join(timeout + 0.5)
    if not outcome:
        return f"{hub.ENDPOINT} did not answer within {timeout:.0f} s"
    return None if outcome[0] is None else f"{hub.ENDPOINT} cannot be reached ({outcome[0]})"


def require_hub_weights(name: str, cfg) -> None:
    """Nothing when timm can read ``cfg``'s weights (name: the model and tag, for the message): a local
    file or state dict, no Hub id, a Hub file already in the local cache, or a reachable Hub. Else a
    MissingError in about a second naming the weights, the repository, the cache and how to get them,
    where huggingface_hub would retry for ~30 s and raise its own error."""
    from huggingface_hub import try_to_load_from_cache

    if cfg.file or cfg.state_dict or not cfg.hf_hub_id:
        return
    repo, _, revision = cfg.hf_hub_id.partition("@")  # timm's "repo@revision"
    revision = revision or None
    cache, files = hub_cache(), _hub_files(cfg)
    if any(isinstance(try_to_load_from_cache(repo, file, cache, revision), str) for file in files):
        return
    reason = hub_unreachable()
    if reason is None:
        return
    raise MissingError(
        f"the weights of {name} ({' or '.join(files)} of the Hugging Face repository {repo}) are not in "
        f"the local cache {cache} and {reason}: download them on a machine with internet "
        f"(timm.create_model('{name}', pretrained=True) after `import crate`) and copy its cache folder "
        "to this one (or point HF_HOME at a copy), or pass a local file "
        "(pretrained_cfg_overlay=dict(file=PATH), or the file as SOURCE); once cached, set HF_HUB_OFFLINE=1 "
        "to skip the Hub"
    )
