"""Deliberately wrong fast paths, injected by monkeypatching the fast model's kernels (never by
editing the package), that the gate must catch: each a (module, attribute, replacement) patch."""

import torch
import torch.nn.functional as F

from crate.models import alpha, layers, mae, model


def scale_off(original):
    """The attention temperature 10% off: softmax(1.1·s·wwᵀ)w."""
    return lambda w, scale, fused: original(w, 1.1 * scale, fused)


def softmax_over_keys_axis(original):
    """A training kernel whose softmax normalises columns instead of rows (the backward path only:
    inference still runs SDPA)."""

    def attention(w, scale):
        return ((w @ w.transpose(-2, -1)) * scale).softmax(dim=-2) @ w

    return attention


def ista_in_bfloat16(original):
    """ISTA's products in bfloat16 whatever the precision: a silent downcast."""

    def step(u, W, eta, lam):
        return original(u.bfloat16(), W.bfloat16(), eta, lam).to(u.dtype)

    return step


def odl_codes_in_bfloat16(original):
    """CRATE-α's ODL steps in bfloat16 whatever the precision."""

    def codes(self, u):
        D = self.D.bfloat16()
        threshold = self.eta * self.lam
        a1 = F.relu(self.eta * (u.bfloat16() @ D) - threshold)
        a2 = F.relu(a1 - self.eta * ((a1 @ D.T - u.bfloat16()) @ D) - threshold)
        return a1.to(u.dtype), a2.to(u.dtype)

    return codes


def drop_path_unscaled(original):
    """Drop-path that forgets to divide the surviving branches by the survival probability."""

    def forward(self, x):
        if not self.training:
            return x
        return x * x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(1 - self.probability)

    return forward


def decoder_sign_flipped(original):
    """The decoder's expansion with the sign of the encoder's: u + MSSA(LN₂ u), not u − MSSA(LN₂ u)."""

    def expand(self, u):
        return u + self.attn(self.norm2(u))

    return expand


def mask_token_ignored(original):
    """CRATE-MAE's embedding that forgets to put the mask token on the masked patches."""

    def embed(self, images, masking=None):
        return original(self, images, None)

    return embed


def loss_over_every_patch(original):
    """CRATE-MAE's loss averaged over every patch instead of the masked ones."""

    def forward_loss(self, images, pred, mask):
        return original(self, images, pred, torch.ones_like(mask))

    return forward_loss


FAULTS = {
    "attention scale off": (layers, "subspace_attention", scale_off),
    "training softmax over the wrong axis": (layers, "symmetric_attention", softmax_over_keys_axis),
    "ISTA downcast to bfloat16": (model, "ista_step", ista_in_bfloat16),
    "ODL downcast to bfloat16": (alpha.ODL, "codes", odl_codes_in_bfloat16),
    "drop-path unscaled": (layers.DropPath, "forward", drop_path_unscaled),
    "MAE decoder sign flipped": (mae.DecoderBlock, "expand", decoder_sign_flipped),
    "MAE mask token ignored": (mae.CRATEMAE, "embed", mask_token_ignored),
    "MAE loss over every patch": (mae.CRATEMAE, "forward_loss", loss_over_every_patch),
}


def inject(monkeypatch, name: str) -> None:
    owner, attribute, fault = FAULTS[name]
    monkeypatch.setattr(owner, attribute, fault(getattr(owner, attribute)))
