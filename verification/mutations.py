"""Every test can fail: break the implementation on purpose, once per mutation, and see which test
catches it.

    python -m verification.mutations          # all mutations (an hour or more on 2 cores)
    python -m verification.mutations -k ista  # those whose name contains "ista"
    python -m verification.mutations verification  # caught by verification/ alone?
    python -m verification.mutations -j 2 verification tests  # two at a time, both folders

Each mutation is applied to a copy of the tree in a temporary folder (this checkout is never
modified); the suites run there and stop at the first failure: the test files likeliest to catch a
mutation of its file first (``FIRST``), then the rest, with the quick ``mutations`` hypothesis profile
(ci's, derandomized, with a twentieth of its examples, stopping at the first failure without
shrinking it); if nothing fails, the whole suites again with the ci profile. A mutation that no test
catches is reported as MISSED, one whose text is no longer in its file as STALE; the last lines give
the score (caught of all) and name every survivor, and either makes the exit status non-zero.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutation(NamedTuple):
    """Replace ``old`` by ``new`` in ``path``; tuples of the same length replace several places."""

    name: str
    path: str
    old: str | tuple[str, ...]
    new: str | tuple[str, ...]


# Test files run first for a mutation of each file: most mutations are caught there within seconds.
# Only when they all pass do the whole suites run (without them), so the verdict is the same as one
# run of the whole suites, and a survivor has passed every test of the suites.
FIRST = {
    "reference/objective.py": (
        "test_compression.py",
        "test_attention.py",
        "test_ista.py",
        "test_official.py",
    ),
    "reference/steps.py": ("test_compression.py", "test_ista.py", "test_odl.py"),
    "reference/official.py": (
        "test_official.py",
        "test_bridge.py",
        "test_outputs.py",
        "test_initialisation.py",
    ),
    "reference/official_alpha.py": ("test_official_alpha.py", "test_odl.py", "test_outputs.py"),
    "reference/symbolic.py": ("test_symbolic.py",),
    "crate/model.py": (
        "test_outputs.py",
        "test_training_mode.py",
        "test_initialisation.py",
        "test_position_embedding.py",
    ),
    "crate/alpha.py": ("test_outputs.py", "test_training_mode.py", "test_initialisation.py"),
    "crate/analysis.py": ("test_audit.py", "test_outputs.py"),
    "crate/sources.py": ("test_position_embedding.py",),
    "crate/recompute.py": ("test_recompute.py",),
}


MUTATIONS = [
    Mutation(
        "logdet constant",
        "reference/objective.py",
        "torch.linalg.cholesky(eye + a * gram)",
        "torch.linalg.cholesky(eye + 2 * a * gram)",
    ),
    Mutation(
        "coding rate uses eps, not eps²",
        "reference/objective.py",
        "dim / (n_tokens * eps**2)",
        "dim / (n_tokens * eps)",
    ),
    Mutation(
        "compression gamma counts features, not tokens",
        "reference/objective.py",
        "n_tokens, p = Z.shape[-2], U.shape[-1]",
        "n_tokens, p = Z.shape[-1], U.shape[-1]",
    ),
    Mutation(
        "head-token normalisation on the token axis",
        "reference/objective.py",
        "normalize(Y, dim=-2)",
        "normalize(Y, dim=-1)",
    ),
    Mutation(
        "Taylor polynomial constant",
        "reference/objective.py",
        "gamma**2 / 4 * trace_A2",
        "gamma**2 / 2 * trace_A2",
    ),
    Mutation(
        "energy softmax over queries",
        "reference/objective.py",
        "torch.logsumexp(logits, dim=-2)",
        "torch.logsumexp(logits, dim=-1)",
    ),
    Mutation(
        "surrogate sign",
        "reference/objective.py",
        "gamma / 2 * quadratic - gamma**2",
        "gamma / 2 * quadratic + gamma**2",
    ),
    Mutation(
        "LASSO with transposed dictionary",
        "reference/objective.py",
        "_columns(X) - D @ _columns(A)",
        "_columns(X) - D.T @ _columns(A)",
    ),
    Mutation(
        "compression step ascends",
        "reference/steps.py",
        "return Z - kappa * compression_gradient",
        "return Z + kappa * compression_gradient",
    ),
    Mutation(
        "soft threshold sign",
        "reference/steps.py",
        "torch.clamp_min(v - t, 0.0)",
        "torch.clamp_min(v + t, 0.0)",
    ),
    Mutation(
        "ISTA uses D = Wᵀ",
        "reference/official.py",
        "(u - u @ self.weight.T) @ self.weight",
        "(u - u @ self.weight) @ self.weight.T",
    ),
    Mutation(
        "ISTA threshold λ off by 1%",
        "reference/official.py",
        "- self.eta * self.lam)",
        "- self.eta * self.lam * 1.01)",
    ),
    Mutation(
        "attention softmax over queries",
        "reference/official.py",
        "w.transpose(-1, -2), dim=-1)",
        "w.transpose(-1, -2), dim=-2)",
    ),
    Mutation(
        "attention temperature (p+1)^-½",
        "reference/official.py",
        "self.scale = head_dim**-0.5",
        "self.scale = (head_dim + 1) ** -0.5",
    ),
    Mutation(
        "missing MSSA residual",
        "reference/official.py",
        "z_half = self.rho * x + mssa(x)",
        "z_half = mssa(x)",
    ),
    Mutation("LayerNorm eps 1e-6", "reference/official.py", "LAYERNORM_EPS = 1e-5", "LAYERNORM_EPS = 1e-6"),
    Mutation("pool the last token", "reference/official.py", "else x[:, 0]", "else x[:, -1]"),
    Mutation(
        "patch flattened (channel, row, column)",
        "reference/official.py",
        "grid.permute(0, 2, 4, 3, 5, 1)",
        "grid.permute(0, 2, 4, 1, 3, 5)",
    ),
    Mutation(
        "heads split interleaved",
        "reference/official.py",
        "self.qkv(y).unflatten(-1, (self.heads, -1))",
        "self.qkv(y).unflatten(-1, (-1, self.heads)).transpose(-1, -2)",
    ),
    Mutation(
        "fast: attention softmax over queries",
        "crate/model.py",
        "* scale).softmax(dim=-1) @ w",
        "* scale).softmax(dim=-2) @ w",
    ),
    Mutation(
        "fast: SDPA without the p^-½ scale",
        "crate/model.py",
        "F.scaled_dot_product_attention(w, w, w, scale=scale)",
        "F.scaled_dot_product_attention(w, w, w, scale=1.0)",
    ),
    Mutation(
        "fast: ISTA Gram transposed",
        "crate/model.py",
        "M = eta * (W - W.T @ W)",
        "M = eta * (W - W @ W.T)",
    ),
    Mutation(
        "fast: ISTA uses D = Wᵀ",
        "crate/model.py",
        "M = eta * (W - W.T @ W)",
        "M = eta * (W.T - W.T @ W)",
    ),
    Mutation(
        "fast: ISTA threshold constant",
        "crate/model.py",
        "u + u @ M - eta * lam",
        "u + u @ M - lam",
    ),
    Mutation("fast: LayerNorm eps 1e-6", "crate/model.py", "LAYERNORM_EPS = 1e-5", "LAYERNORM_EPS = 1e-6"),
    Mutation(
        "fast: missing MSSA residual",
        "crate/model.py",
        "return x + self.drop_path(self.attn(self.norm1(x)))",
        "return self.drop_path(self.attn(self.norm1(x)))",
    ),
    Mutation(
        "fast: residual adds LN(x)",
        "crate/model.py",
        "return x + self.drop_path(self.attn(self.norm1(x)))",
        "return self.norm1(x) + self.drop_path(self.attn(self.norm1(x)))",
    ),
    Mutation(
        "fast: patch flattened (channel, row, column)",
        "crate/model.py",
        "grid.permute(0, 2, 4, 3, 5, 1)",
        "grid.permute(0, 2, 4, 1, 3, 5)",
    ),
    Mutation(
        "fast: heads interleaved",
        "crate/model.py",
        "self.qkv(y).reshape(B, N, self.heads, self.head_dim)",
        "self.qkv(y).reshape(B, N, self.head_dim, self.heads).transpose(-1, -2)",
    ),
    Mutation(
        "fast: pool the last token",
        "crate/model.py",
        'x = x[:, 0] if self.global_pool == "cls"',
        'x = x[:, -1] if self.global_pool == "cls"',
    ),
    Mutation("fast: no position embedding", "crate/model.py", "x], dim=1) + self.pos_embed", "x], dim=1)"),
    Mutation(
        "white-box subspaces interleaved",
        "crate/analysis.py",
        "unflatten(0, (block.attn.heads, -1)).transpose(-2, -1)",
        "unflatten(0, (-1, block.attn.heads)).permute(1, 2, 0)",
    ),
    # CRATE-α: the released model in reference/ (literal einsum code), its autograd steps, the fast model
    Mutation(
        "α: decoder D instead of D₁",
        "reference/official_alpha.py",
        'torch.einsum("dp,nlp->nld", self.D1, self.codes(x)[-1])',
        'torch.einsum("dp,nlp->nld", self.D, self.codes(x)[-1])',
    ),
    Mutation(
        "α: gradient with D instead of Dᵀ",
        "reference/official_alpha.py",
        'lasso_grad = torch.einsum("pd,nlp->nld", self.D, Da1 - x)',
        'lasso_grad = torch.einsum("dp,nlp->nld", self.D, Da1 - x)',
    ),
    Mutation("α: one step, not two", "reference/official_alpha.py", "return [a1, a2]", "return [a1, a1]"),
    Mutation(
        "α: missing ODL residual",
        "reference/official_alpha.py",
        "z_next = z_half + odl(z_half)",
        "z_next = odl(z_half)",
    ),
    Mutation(
        "α: block LayerNorm eps 1e-5",
        "reference/official_alpha.py",
        "LAYERNORM_EPS = 1e-6",
        "LAYERNORM_EPS = 1e-5",
    ),
    Mutation(
        "α: autograd steps warm-started at [u, 0]",
        "reference/steps.py",
        "start = X.new_zeros(codes_shape)",
        "start = torch.nn.functional.pad(X, (0, D.shape[1] - X.shape[-1]))",
    ),
    Mutation(
        "fast α: encoder and decoder swapped",
        "crate/alpha.py",
        ("u @ self.D)", "(a1 @ self.D.T - u) @ self.D)", "self.codes(u)[1] @ self.D1.T"),
        ("u @ self.D1)", "(a1 @ self.D1.T - u) @ self.D1)", "self.codes(u)[1] @ self.D.T"),
    ),
    Mutation(
        "fast α: gradient with D instead of Dᵀ",
        "crate/alpha.py",
        "(a1 @ self.D.T - u) @ self.D)",
        "(a1 @ self.D.T - u) @ self.D.T.T.T)",
    ),
    Mutation("fast α: one step, not two", "crate/alpha.py", "return a1, a2", "return a1, a1"),
    Mutation(
        "fast α: warm start at [u, 0]",
        "crate/alpha.py",
        "a1 = F.relu(self.eta * (u @ self.D) - threshold)",
        "a0 = F.pad(u, (0, self.D.shape[1] - u.shape[-1]))\n"
        "        a1 = F.relu(a0 - self.eta * ((a0 @ self.D.T - u) @ self.D) - threshold)",
    ),
    Mutation(
        "fast α: missing ODL residual",
        "crate/alpha.py",
        "return z + self.drop_path(self.odl(self.norm2(z)))",
        "return self.drop_path(self.odl(self.norm2(z)))",
    ),
    Mutation(
        "fast α: block LayerNorm eps 1e-5", "crate/alpha.py", "LAYERNORM_EPS = 1e-6", "LAYERNORM_EPS = 1e-5"
    ),
    Mutation(
        "fast α: patches column-major",
        "crate/alpha.py",
        "self.proj(images).flatten(2)",
        "self.proj(images).transpose(2, 3).flatten(2)",
    ),
    Mutation(
        "white-box α: LASSO of a₁ reported after step 2",
        "crate/analysis.py",
        "lasso_step2=_stats(reference.lasso_objective(a2, u, D, lam))",
        "lasso_step2=_stats(reference.lasso_objective(a1, u, D, lam))",
    ),
    Mutation(
        "white-box α: decoder drift against D₁ itself",
        "crate/analysis.py",
        "decoder_drift=((D1 - D).norm() / D.norm()).item()",
        "decoder_drift=((D1 - D1).norm() / D.norm()).item()",
    ),
    # what a user sees: attention maps, timm's intermediates, pooled features (reference and fast)
    Mutation(
        "reference: attention maps of the raw stream, not LN₁",
        "reference/official.py",
        "mssa.fn.attention(mssa.norm(state.input))",
        "mssa.fn.attention(state.input)",
    ),
    Mutation(
        "reference: mean pool leaves out the cls token",
        "reference/official.py",
        'pooled = x.mean(dim=1) if self.pool == "mean"',
        'pooled = x[:, 1:].mean(dim=1) if self.pool == "mean"',
    ),
    Mutation(
        "fast: attention map softmax over queries",
        "crate/model.py",
        "return ((w @ w.transpose(-2, -1)) * self.scale).softmax(dim=-1)",
        "return ((w @ w.transpose(-2, -1)) * self.scale).softmax(dim=-2)",
    ),
    Mutation(
        "fast: attention maps of the raw stream, not LN₁",
        "crate/model.py",
        "attention = block.attn.attention(block.norm1(x)) if return_attention else None",
        "attention = block.attn.attention(x) if return_attention else None",
    ),
    Mutation(
        "white-box: cls maps are the patches' attention to cls",
        "crate/analysis.py",
        "states[0].attention[:, :, 0, 1:]",
        "states[0].attention[:, :, 1:, 0]",
    ),
    Mutation(
        "white-box: cls maps transposed on the grid",
        "crate/analysis.py",
        "attention.unflatten(-1, model.patch_embed.grid_size)",
        "attention.unflatten(-1, model.patch_embed.grid_size).transpose(-2, -1)",
    ),
    Mutation(
        "fast: NCHW intermediates transposed",
        "crate/model.py",
        "y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2)",
        "y.reshape(y.shape[0], h, w, -1).permute(0, 3, 2, 1)",
    ),
    Mutation(
        "fast: intermediates norm=True without the LayerNorm",
        "crate/model.py",
        "state = self.fc_norm(x) if norm else x",
        "state = x",
    ),
    Mutation(
        "fast: prefix tokens taken from the end",
        "crate/model.py",
        "prefix = [y[:, : self.num_prefix_tokens] for y in outputs]",
        "prefix = [y[:, -self.num_prefix_tokens :] for y in outputs]",
    ),
    Mutation(
        "fast: mean pool leaves out the cls token",
        "crate/model.py",
        'x = x[:, 0] if self.global_pool == "cls" else x.mean(dim=1)',
        'x = x[:, 0] if self.global_pool == "cls" else x[:, 1:].mean(dim=1)',
    ),
    Mutation("fast: timm's avg pool means cls", "crate/model.py", '"avg": "mean"', '"avg": "cls"'),
    Mutation(
        "fast: pre-logits without the head LayerNorm",
        "crate/model.py",
        "x = self.head_drop(self.fc_norm(x))",
        "x = self.head_drop(x if pre_logits else self.fc_norm(x))",
    ),
    Mutation(
        "white-box: patch PCA without centring",
        "crate/analysis.py",
        "flat = flat - flat.mean(0)",
        "flat = flat",
    ),
    Mutation(
        "white-box: patch PCA on the last directions",
        "crate/analysis.py",
        "components = flat @ V[:3].T",
        "components = flat @ V[-3:].T",
    ),
    # training mode: stochastic depth and dropout
    Mutation("fast: drop-path without 1/keep", "crate/model.py", "return x * mask / keep", "return x * mask"),
    Mutation(
        "fast: drop-path mask per entry, not per sample",
        "crate/model.py",
        "mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)",
        "mask = x.new_empty(x.shape).bernoulli_(keep)",
    ),
    Mutation(
        "fast: drop-path keeps with the drop probability",
        "crate/model.py",
        "bernoulli_(keep)",
        "bernoulli_(self.probability)",
    ),
    Mutation(
        "fast: drop-path active in eval",
        "crate/model.py",
        "if not self.training:",
        "if self.probability == 0:",
    ),
    Mutation(
        "fast: drop-path schedule rate·ℓ/L",
        "crate/model.py",
        "config.drop_path_rate * i / max(config.depth - 1, 1)",
        "config.drop_path_rate * i / config.depth",
    ),
    Mutation(
        "fast: drop-path rate constant over depth",
        "crate/model.py",
        "config.drop_path_rate * i / max(config.depth - 1, 1)",
        "config.drop_path_rate + 0 * i",
    ),
    Mutation(
        "fast α: ODL branch never dropped",
        "crate/alpha.py",
        "return z + self.drop_path(self.odl(self.norm2(z)))",
        "return z + self.odl(self.norm2(z))",
    ),
    Mutation(
        "fast: no dropout after the position embedding",
        "crate/model.py",
        "return self.pos_drop(x)",
        "return x",
    ),
    Mutation(
        "fast: no dropout after W_out",
        "crate/model.py",
        "return self.proj_drop(self.proj(o))",
        "return self.proj(o)",
    ),
    Mutation(
        "fast: no dropout before the head",
        "crate/model.py",
        "x = self.head_drop(self.fc_norm(x))",
        "x = self.fc_norm(x)",
    ),
    Mutation(
        "fast: position dropout at the drop-path rate",
        "crate/model.py",
        "self.pos_drop = nn.Dropout(config.drop_rate)",
        "self.pos_drop = nn.Dropout(config.drop_path_rate)",
    ),
    # initialisation
    Mutation(
        "fast: cls token std 0.02",
        "crate/model.py",
        "self.cls_token = nn.Parameter(torch.randn(1, 1, dim))",
        "self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)",
    ),
    Mutation(
        "fast: position embedding std 0.02",
        "crate/model.py",
        "torch.randn(1, self.patch_embed.num_patches + 1, dim))",
        "torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)",
    ),
    Mutation(
        "fast: ISTA dictionary with Linear's init",
        "crate/model.py",
        "nn.init.kaiming_uniform_(self.weight)",
        "nn.init.kaiming_uniform_(self.weight, a=5**0.5)",
    ),
    Mutation(
        "fast α: encoder D xavier-uniform",
        "crate/alpha.py",
        "nn.init.kaiming_uniform_(self.D)",
        "nn.init.xavier_uniform_(self.D)",
    ),
    Mutation(
        "fast α: decoder D₁ on its fan-out",
        "crate/alpha.py",
        "nn.init.kaiming_uniform_(self.D1)",
        'nn.init.kaiming_uniform_(self.D1, mode="fan_out")',
    ),
    Mutation(
        "reference: ISTA dictionary U(±√(3/d))",
        "reference/official.py",
        "uniform_tensor(shape, (6 / dim) ** 0.5, generator)",
        "uniform_tensor(shape, (3 / dim) ** 0.5, generator)",
    ),
    # position-embedding resampling, and fine-tuning's loading
    Mutation(
        "fast: position embedding resampled to the transposed grid",
        "crate/model.py",
        "return resample_position_embedding(pos_embed, grid, (old, old), num_prefix_tokens=1)",
        "return resample_position_embedding(pos_embed, grid[::-1], (old, old), num_prefix_tokens=1)",
    ),
    Mutation(
        "resampling without antialiasing",
        "crate/model.py",
        "list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens",
        "list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens, antialias=False",
    ),
    Mutation(
        "resampling without the h×1 workaround",
        "crate/model.py",
        "if new_grid[1] == 1 and new_grid[0] > 1:",
        "if False:",
    ),
    Mutation(
        "fine-tuning: position embedding resampled to the transposed grid",
        "crate/sources.py",
        "resample_position_embedding(pos_embed, grid, (old, old), num_prefix_tokens=prefix)",
        "resample_position_embedding(pos_embed, grid[::-1], (old, old), num_prefix_tokens=prefix)",
    ),
    Mutation(
        "fine-tuning: the position embedding not loaded",
        "crate/sources.py",
        "model.load_state_dict(state, strict=False)",
        'model.load_state_dict({k: v for k, v in state.items() if k != "pos_embed"}, strict=False)',
    ),
    # the audit's numbers
    Mutation(
        "white-box: compression change reversed",
        "crate/analysis.py",
        'compression_change=_stats(compression["out"] - compression["in"])',
        'compression_change=_stats(compression["in"] - compression["out"])',
    ),
    Mutation(
        "white-box: raw R^c after MSSA measured on the input",
        "crate/analysis.py",
        '("raw_out", y_out, False)',
        '("raw_out", y_in, False)',
    ),
    Mutation(
        "white-box: R^c of the input under LN₂",
        "crate/analysis.py",
        "y_in, y_out = _layer_norm64(state.input, block.norm1)",
        "y_in, y_out = _layer_norm64(state.input, block.norm2)",
    ),
    Mutation(
        "white-box: sparsity of the MSSA stream",
        "crate/analysis.py",
        "nonzero=_stats((state.ista != 0)",
        "nonzero=_stats((state.mssa != 0)",
    ),
    Mutation(
        "white-box: η‖D‖₂ not squared",
        "crate/analysis.py",
        "matrix_norm(D, ord=2).item() ** 2",
        "matrix_norm(D, ord=2).item()",
    ),
    Mutation(
        "white-box: LASSO start without |·|",
        "crate/analysis.py",
        "lam * u.abs().sum((-2, -1))",
        "lam * u.sum((-2, -1))",
    ),
    Mutation(
        "white-box: orthonormality gap of the best head",
        "crate/analysis.py",
        "@ U - eye, ord=2).max()",
        "@ U - eye, ord=2).min()",
    ),
    Mutation(
        "white-box: coherence normalised by one head",
        "crate/analysis.py",
        "norms[:, None] * norms[None]",
        "norms[:, None] * norms[:, None]",
    ),
    Mutation(
        "white-box: population std over the batch",
        "crate/analysis.py",
        "values.std().item()",
        "values.std(unbiased=False).item()",
    ),
    Mutation(
        "white-box α: η‖D‖² from the smallest eigenvalue",
        "crate/analysis.py",
        "torch.linalg.eigvalsh(gram)[-1]",
        "torch.linalg.eigvalsh(gram)[0]",
    ),
    Mutation(
        "white-box α: a₂ counted as a₁",
        "crate/analysis.py",
        "nonzero_a1=_stats((a1 != 0)",
        "nonzero_a1=_stats((a2 != 0)",
    ),
    Mutation(
        "symbolic logdet constant",
        "reference/symbolic.py",
        "(sp.eye(Y.shape[1]) + a * Y.T * Y).det()) / 2",
        "(sp.eye(Y.shape[1]) + a * Y.T * Y).det()) / 3",
    ),
    Mutation(
        "symmetric attention drops the key gradient",
        "crate/attention.py",
        "(ds + ds.transpose(-2, -1))",
        "(2 * ds)",
    ),
    Mutation(
        "symmetric attention backward forgets the scale",
        "crate/attention.py",
        "@ (w * ctx.scale)",
        "@ w",
    ),
    Mutation(
        "symmetric attention value gradient with P, not Pᵀ",
        "crate/attention.py",
        "p.transpose(-2, -1) @ do",
        "p @ do",
    ),
    Mutation(
        "ISTA's few-token form with W for Wᵀ",
        "crate/model.py",
        "(u - u @ W.T) @ (eta * W)",
        "(u - u @ W) @ (eta * W)",
    ),
    Mutation(
        "ISTA's few-token form without the residual",
        "crate/model.py",
        "F.relu(u + (u - u @ W.T) @ (eta * W) - eta * lam)",
        "F.relu((u - u @ W.T) @ (eta * W) - eta * lam)",
    ),
    Mutation(
        "recomputed norm output without its view's offset",
        "crate/recompute.py",
        ".as_strided(*view)",
        ".as_strided(view[0], view[1])",
    ),
    Mutation(
        "recomputed norm output from the output, not the input",
        "crate/recompute.py",
        "outputs[output.untyped_storage().data_ptr()] = (module, args[0], output, autocast)",
        "outputs[output.untyped_storage().data_ptr()] = (module, output, output, autocast)",
    ),
    Mutation(
        "norm recomputation outside the forward's autocast",
        "crate/recompute.py",
        "torch.autocast(inputs.device.type, dtype, enabled)",
        "torch.autocast(inputs.device.type, dtype, False)",
    ),
    Mutation(
        "recomputation packs saved tensors as themselves",
        "crate/recompute.py",
        "return saved.detach()",
        "return saved",
    ),
    Mutation(
        "norm recipes keep the outputs alive",
        "crate/recompute.py",
        "outputs.clear()",
        "outputs.copy()",
    ),
    Mutation(
        "symbolic prox branch",
        "reference/symbolic.py",
        "(stationary, stationary >= 0)",
        "(stationary, stationary >= 1)",
    ),
]


MISSED = "MISSED"
STALE = "STALE"  # the text to replace is not in the file (once): the mutation needs updating


def _mutated(mutation: Mutation, source: str) -> str | None:
    olds, news = (
        (mutation.old, mutation.new) if isinstance(mutation.old, tuple) else ([mutation.old], [mutation.new])
    )
    for old, new in zip(olds, news, strict=True):
        if source.count(old) != 1:
            return None
        source = source.replace(old, new)
    return source


def _pytest(tree: Path, arguments: list[str], profile: str) -> str | None:
    """The first failing test of a pytest run in ``tree`` (it stops there), None if every test passes."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *arguments],
        cwd=tree,
        env=dict(os.environ, CI="1", HYPOTHESIS_PROFILE=profile, PYTHONPATH=str(tree)),
        capture_output=True,
        text=True,
    )
    if result.returncode == 0:
        return None
    failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    lines = (result.stdout.strip() or result.stderr.strip() or "no output").splitlines()
    return failed[0] if failed else lines[-1]


def run(mutation: Mutation, suites: list[str]) -> str:
    """'caught by <test>', MISSED or STALE. First the FIRST test files, then the rest of the suites, with
    the quick ``mutations`` hypothesis profile; if nothing failed, the whole suites with the ci profile,
    so that a survivor has passed what CI runs."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "tree"
        shutil.copytree(
            ROOT, tree, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".hypothesis")
        )
        target = tree / mutation.path
        source = _mutated(mutation, target.read_text())
        if source is None:
            return STALE
        target.write_text(source)
        first = [
            f"{suite}/{name}"
            for suite in suites
            for name in FIRST.get(mutation.path, ())
            if (tree / suite / name).is_file()
        ]
        failed = _pytest(tree, first, "mutations") if first else None
        if failed is None:
            failed = _pytest(tree, [*suites, *(f"--ignore={path}" for path in first)], "mutations")
        if failed is None:
            failed = _pytest(tree, suites, "ci")
    return MISSED if failed is None else f"caught by {failed}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Break the implementation on purpose; check a test fails.")
    parser.add_argument("-k", default="", help="only the mutations whose name contains this text")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="mutations run at once")
    parser.add_argument("suites", nargs="*", default=["tests", "verification"], help="test folders to run")
    args = parser.parse_args()
    chosen = [mutation for mutation in MUTATIONS if args.k.lower() in mutation.name.lower()]

    def timed(mutation: Mutation) -> str:
        start = time.monotonic()
        outcome = run(mutation, args.suites)
        print(f"{mutation.name:60s} {outcome} ({time.monotonic() - start:.0f} s)", flush=True)
        return outcome

    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = dict(zip([m.name for m in chosen], pool.map(timed, chosen), strict=True))
    caught = sum(outcome.startswith("caught") for outcome in outcomes.values())
    print(f"\nscore: {caught} of {len(outcomes)} mutations caught by {' + '.join(args.suites)}")
    for kind in (MISSED, STALE):
        names = [name for name, outcome in outcomes.items() if outcome == kind]
        print(f"{kind.lower()} ({len(names)}): {', '.join(names) if names else 'none'}")
    sys.exit(1 if caught < len(outcomes) else 0)


if __name__ == "__main__":
    main()
