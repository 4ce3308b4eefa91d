"""Published weights without the Hub: not cached and no Hub is a MissingError in about a second that
names the weights, the repository and its file, the cache folder and the ways to get them, both
for a timm name as SOURCE and for timm.create_model(..., pretrained=True) of the crate registry (where
huggingface_hub retried for ~28 s, or raised CacheNotFound on a fresh machine). Nothing here touches
the network: HF_HUB_OFFLINE is set (in the environment and in huggingface_hub's constants, read at
its import), the cache is an empty folder of tmp_path, the probe's endpoint a local port."""

import socket
import time

import huggingface_hub.constants
import pytest
import timm

import crate  # noqa: F401  (registers crate_* and crate_alpha_*)
from crate.errors import MissingError
from crate.models import hub
from crate.weights import sources


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty HF_HOME and HF_HUB_OFFLINE=1; returns the hub cache folder (not created)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def _raised(call) -> tuple[MissingError, float]:
    start = time.perf_counter()
    with pytest.raises(MissingError) as error:
        call()
    return error.value, time.perf_counter() - start


@pytest.mark.parametrize(
    "name, repo, file",
    [
        ("crate_alpha_base_patch16_224.in21k_ft_in1k", "UCSC-VLAA/CRATE-alpha", "torch/crate_alpha_B16.pth"),
        (
            "vit_small_patch16_224.augreg_in21k",
            "timm/vit_small_patch16_224.augreg_in21k",
            "model.safetensors",
        ),
    ],
)
def test_a_timm_source_not_cached_offline_is_named_with_the_way_to_get_it(offline, name, repo, file):
    error, seconds = _raised(lambda: sources.read_source(name))
    message = str(error)
    assert seconds < 3
    assert f"the weights of {name} (" in message and f"Hugging Face repository {repo})" in message
    assert file in message and f"the local cache {offline}" in message
    assert "HF_HUB_OFFLINE is set" in message and "machine with internet" in message
    assert f"timm.create_model('{name}', pretrained=True)" in message
    assert "pretrained_cfg_overlay=dict(file=PATH)" in message and "\n" not in message


def test_create_model_pretrained_offline_is_a_missing_error_in_a_second(offline):
    error, seconds = _raised(
        lambda: timm.create_model("crate_alpha_base_patch16_224.in21k_ft_in1k", pretrained=True)
    )
    assert seconds < 3 and "torch/crate_alpha_B16.pth" in str(error) and str(offline) in str(error)
    # the ImageNet-21K file is found by the Hub's listing: on a machine that never downloaded anything
    # (no cache folder) the listing is empty, not huggingface_hub's CacheNotFound
    error, seconds = _raised(lambda: timm.create_model("crate_alpha_base_patch16_224.in21k", pretrained=True))
    message = str(error)
    assert (
        seconds < 3 and "expected one file torch/in21k_Pretrain/B16_*.pth in UCSC-VLAA/CRATE-alpha" in message
    )
    assert f"the local Hugging Face cache {offline} does not exist, and HF_HUB_OFFLINE is set" in message


def test_cached_weights_need_no_hub(offline):
    """A file in the cache's layout (refs/main -> snapshots/<commit>/file) is enough, offline."""
    commit = "0" * 40
    folder = offline / "models--timm--vit_small_patch16_224.augreg_in21k"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "model.safetensors").write_bytes(b"")
    cfg = timm.models.get_pretrained_cfg("vit_small_patch16_224.augreg_in21k")
    assert hub.require_hub_weights("vit_small_patch16_224.augreg_in21k", cfg) is None


def test_the_hub_probe_tells_a_closed_port_from_an_open_one(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert hub.hub_unreachable() is None
    start = time.perf_counter()
    reason = hub.hub_unreachable()  # the same port, now closed
    assert time.perf_counter() - start < 3
    assert reason.startswith(f"http://127.0.0.1:{port} cannot be reached (ConnectionRefusedError")
