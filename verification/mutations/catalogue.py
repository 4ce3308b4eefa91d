"""The mutations: for each file they break, the test files likeliest to catch them (run first) and the
deliberate bugs, each a text of that file (found exactly once) and its replacement.

A ``Mutation`` whose ``old`` and ``new`` are tuples of the same length replaces several places of its
file at once. ``verification/test_mutation_catalogue.py`` checks, in milliseconds, that every text
is still in its file exactly once, that names are unique and that every first test file exists.
"""

from typing import NamedTuple


class Mutation(NamedTuple):
    """Replace ``old`` by ``new`` in its target's file; tuples of the same length replace several places."""

    name: str
    old: str | tuple[str, ...]
    new: str | tuple[str, ...]


class Target(NamedTuple):
    """A file, the test files run first for a mutation of it (by name, anywhere under a suite folder),
    and its mutations."""

    path: str
    first: tuple[str, ...]
    mutations: tuple[Mutation, ...]


# Most mutations are caught by their target's first test files within seconds. Only when they all pass
# do the whole suites run (without them), so the verdict is the same as one run of the whole suites,
# and a survivor has passed every test of the suites.
TARGETS = (
    Target(
        "reference/objective.py",
        first=("test_compression.py", "test_attention.py", "test_ista.py", "test_official.py"),
        mutations=(
            Mutation(
                "logdet constant",
                "torch.linalg.cholesky(eye + a * gram)",
                "torch.linalg.cholesky(eye + 2 * a * gram)",
            ),
            Mutation("coding rate uses eps, not eps²", "dim / (n_tokens * eps**2)", "dim / (n_tokens * eps)"),
            Mutation(
                "compression gamma counts features, not tokens",
                "n_tokens, p = Z.shape[-2], U.shape[-1]",
                "n_tokens, p = Z.shape[-1], U.shape[-1]",
            ),
            Mutation(
                "head-token normalisation on the token axis", "normalize(Y, dim=-2)", "normalize(Y, dim=-1)"
            ),
            Mutation("Taylor polynomial constant", "gamma**2 / 4 * trace_A2", "gamma**2 / 2 * trace_A2"),
            Mutation(
                "energy softmax over queries",
                "torch.logsumexp(logits, dim=-2)",
                "torch.logsumexp(logits, dim=-1)",
            ),
            Mutation(
                "surrogate sign", "gamma / 2 * quadratic - gamma**2", "gamma / 2 * quadratic + gamma**2"
            ),
            Mutation(
                "LASSO with transposed dictionary",
                "_columns(X) - D @ _columns(A)",
                "_columns(X) - D.T @ _columns(A)",
            ),
        ),
    ),
    Target(
        "reference/steps.py",
        first=("test_compression.py", "test_ista.py", "test_odl.py", "test_mae.py"),
        mutations=(
            Mutation(
                "compression step ascends",
                "return Z - kappa * compression_gradient",
                "return Z + kappa * compression_gradient",
            ),
            Mutation(
                "MAE: expansion step descends",
                "return Z + kappa * compression_gradient",
                "return Z - kappa * compression_gradient",
            ),
            Mutation("soft threshold sign", "torch.clamp_min(v - t, 0.0)", "torch.clamp_min(v + t, 0.0)"),
            Mutation(
                "α: autograd steps warm-started at [u, 0]",
                "start = X.new_zeros(codes_shape)",
                "start = torch.nn.functional.pad(X, (0, D.shape[1] - X.shape[-1]))",
            ),
        ),
    ),
    Target(
        "reference/official.py",
        first=("test_official.py", "test_bridge.py", "test_outputs.py", "test_initialisation.py"),
        mutations=(
            Mutation(
                "ISTA uses D = Wᵀ",
                "(u - u @ self.weight.T) @ self.weight",
                "(u - u @ self.weight) @ self.weight.T",
            ),
            Mutation("ISTA threshold λ off by 1%", "- self.eta * self.lam)", "- self.eta * self.lam * 1.01)"),
            Mutation(
                "attention softmax over queries",
                "w.transpose(-1, -2), dim=-1)",
                "w.transpose(-1, -2), dim=-2)",
            ),
            Mutation(
                "attention temperature (p+1)^-½",
                "self.scale = head_dim**-0.5",
                "self.scale = (head_dim + 1) ** -0.5",
            ),
            Mutation("missing MSSA residual", "z_half = self.rho * x + mssa(x)", "z_half = mssa(x)"),
            Mutation("LayerNorm eps 1e-6", "LAYERNORM_EPS = 1e-5", "LAYERNORM_EPS = 1e-6"),
            Mutation("pool the last token", "else x[:, 0]", "else x[:, -1]"),
            Mutation(
                "patch flattened (channel, row, column)",
                "grid.permute(0, 2, 4, 3, 5, 1)",
                "grid.permute(0, 2, 4, 1, 3, 5)",
            ),
            Mutation(
                "heads split interleaved",
                "self.qkv(y).unflatten(-1, (self.heads, -1))",
                "self.qkv(y).unflatten(-1, (-1, self.heads)).transpose(-1, -2)",
            ),
            Mutation(
                "reference: attention maps of the raw stream, not LN₁",
                "mssa.fn.attention(mssa.norm(state.input))",
                "mssa.fn.attention(state.input)",
            ),
            Mutation(
                "reference: mean pool leaves out the cls token",
                'pooled = x.mean(dim=1) if self.pool == "mean"',
                'pooled = x[:, 1:].mean(dim=1) if self.pool == "mean"',
            ),
            Mutation(
                "reference: ISTA dictionary U(±√(3/d))",
                "uniform_tensor(shape, (6 / dim) ** 0.5, generator)",
                "uniform_tensor(shape, (3 / dim) ** 0.5, generator)",
            ),
        ),
    ),
    Target(
        "reference/official_alpha.py",
        first=("test_official_alpha.py", "test_odl.py", "test_outputs.py"),
        mutations=(
            Mutation(
                "α: decoder D instead of D₁",
                'torch.einsum("dp,nlp->nld", self.D1, self.codes(x)[-1])',
                'torch.einsum("dp,nlp->nld", self.D, self.codes(x)[-1])',
            ),
            Mutation(
                "α: gradient with D instead of Dᵀ",
                'lasso_grad = torch.einsum("pd,nlp->nld", self.D, Da1 - x)',
                'lasso_grad = torch.einsum("dp,nlp->nld", self.D, Da1 - x)',
            ),
            Mutation("α: one step, not two", "return [a1, a2]", "return [a1, a1]"),
            Mutation("α: missing ODL residual", "z_next = z_half + odl(z_half)", "z_next = odl(z_half)"),
            Mutation("α: block LayerNorm eps 1e-5", "LAYERNORM_EPS = 1e-6", "LAYERNORM_EPS = 1e-5"),
        ),
    ),
    Target(
        "reference/official_mae.py",
        first=("test_mae.py", "test_mae_model.py"),
        mutations=(
            Mutation("reference MAE: decoder ρ·u + MSSA", "self.rho * u - mssa(u)", "self.rho * u + mssa(u)"),
            Mutation(
                "reference MAE: kept count rounded, not truncated",
                "keep = int(L * (1 - mask_ratio))",
                "keep = round(L * (1 - mask_ratio))",
            ),
            Mutation(
                "reference MAE: masked patches unshuffled by the argsort, not its inverse",
                "torch.gather(shuffled, 1, masking.ids_restore.unsqueeze(-1)",
                "torch.gather(shuffled, 1, torch.argsort(masking.ids_restore).unsqueeze(-1)",
            ),
        ),
    ),
    Target(
        "reference/symbolic.py",
        first=("test_symbolic.py",),
        mutations=(
            Mutation(
                "symbolic logdet constant",
                "(sp.eye(Y.shape[1]) + a * Y.T * Y).det()) / 2",
                "(sp.eye(Y.shape[1]) + a * Y.T * Y).det()) / 3",
            ),
            Mutation(
                "symbolic prox branch", "(stationary, stationary >= 0)", "(stationary, stationary >= 1)"
            ),
        ),
    ),
    Target(
        "crate/models/layers.py",
        first=(
            "test_outputs.py",
            "test_training_mode.py",
            "test_initialisation.py",
            "test_patch_embedding.py",
            "test_mssa_kernel.py",
            "test_model.py",
        ),
        mutations=(
            Mutation(
                "fast: patch embedding not shifted",
                "return patches - patches[..., :1]",
                "return patches",
            ),
            Mutation(
                "fast: attention softmax over queries",
                "* scale).softmax(dim=-1) @ w",
                "* scale).softmax(dim=-2) @ w",
            ),
            Mutation(
                "fast: SDPA without the p^-½ scale",
                "F.scaled_dot_product_attention(w, w, w, scale=scale)",
                "F.scaled_dot_product_attention(w, w, w, scale=1.0)",
            ),
            Mutation("fast: LayerNorm eps 1e-6", "NORM_EPS = 1e-5", "NORM_EPS = 1e-6"),
            Mutation(
                "fast: patch flattened (channel, row, column)",
                "grid.permute(0, 2, 4, 3, 5, 1)",
                "grid.permute(0, 2, 4, 1, 3, 5)",
            ),
            Mutation(
                "fast: heads interleaved",
                "self.qkv(y).reshape(B, N, self.heads, self.head_dim)",
                "self.qkv(y).reshape(B, N, self.head_dim, self.heads).transpose(-1, -2)",
            ),
            Mutation(
                "fast: attention map softmax over queries",
                "return ((w @ w.transpose(-2, -1)) * self.scale).softmax(dim=-1)",
                "return ((w @ w.transpose(-2, -1)) * self.scale).softmax(dim=-2)",
            ),
            Mutation("fast: drop-path without 1/keep", "return x * mask / keep", "return x * mask"),
            Mutation(
                "fast: drop-path mask per entry, not per sample",
                "mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)",
                "mask = x.new_empty(x.shape).bernoulli_(keep)",
            ),
            Mutation(
                "fast: drop-path keeps with the drop probability",
                "bernoulli_(keep)",
                "bernoulli_(self.probability)",
            ),
            Mutation("fast: drop-path active in eval", "if not self.training:", "if self.probability == 0:"),
            Mutation(
                "fast: no dropout after W_out", "return self.proj_drop(self.proj(o))", "return self.proj(o)"
            ),
            Mutation(
                "fast: the kernel whatever the switch says",
                "return _kernel_on and _kernel_fits(w)",
                "return _kernel_fits(w)",
            ),
            Mutation(
                "fast: the kernel switch read from the environment at each call",
                "return _kernel_on and _kernel_fits(w)",
                'return os.environ.get(KERNEL_VARIABLE) == "1" and _kernel_fits(w)',
            ),
            Mutation(
                "fast: export told by is_exporting(), which older dynamo answers True under compile",
                "return torch.compiler.is_exporting() if flag is None else flag",
                "return torch.compiler.is_exporting()",
            ),
        ),
    ),
    Target(
        "crate/models/model.py",
        first=(
            "test_outputs.py",
            "test_training_mode.py",
            "test_initialisation.py",
            "test_position_embedding.py",
            "test_fast_model.py",
        ),
        mutations=(
            Mutation(
                "fast: ISTA Gram transposed",
                "(W_wide - W_wide.T @ W_wide)",
                "(W_wide - W_wide @ W_wide.T)",
            ),
            Mutation("fast: ISTA matrix computed in W's dtype", "W_wide = W.to(wide)", "W_wide = W"),
            Mutation(
                "fast: ISTA uses D = Wᵀ",
                "(W_wide - W_wide.T @ W_wide)",
                "(W_wide.T - W_wide.T @ W_wide)",
            ),
            Mutation(
                "fast: ISTA threshold constant",
                "u + u @ ista_matrix(W, eta) - eta * lam",
                "u + u @ ista_matrix(W, eta) - lam",
            ),
            Mutation(
                "fast: missing MSSA residual",
                "return x + self.drop_path(self.attn(self.norm1(x)))",
                "return self.drop_path(self.attn(self.norm1(x)))",
            ),
            Mutation(
                "fast: residual adds LN(x)",
                "return x + self.drop_path(self.attn(self.norm1(x)))",
                "return self.norm1(x) + self.drop_path(self.attn(self.norm1(x)))",
            ),
            Mutation(
                "fast: pool the last token",
                'x = x[:, 0] if self.global_pool == "cls"',
                'x = x[:, -1] if self.global_pool == "cls"',
            ),
            Mutation("fast: no position embedding", "x], dim=1) + self.pos_embed", "x], dim=1)"),
            Mutation(
                "fast: attention maps of the raw stream, not LN₁",
                "attention = block.attn.attention(block.norm1(x)) if return_attention else None",
                "attention = block.attn.attention(x) if return_attention else None",
            ),
            Mutation(
                "fast: NCHW intermediates transposed",
                "y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2)",
                "y.reshape(y.shape[0], h, w, -1).permute(0, 3, 2, 1)",
            ),
            Mutation(
                "fast: intermediates norm=True without the LayerNorm",
                "state = self.fc_norm(x) if norm else x",
                "state = x",
            ),
            Mutation(
                "fast: prefix tokens taken from the end",
                "prefix = [y[:, : self.num_prefix_tokens] for y in outputs]",
                "prefix = [y[:, -self.num_prefix_tokens :] for y in outputs]",
            ),
            Mutation(
                "fast: mean pool leaves out the cls token",
                'x = x[:, 0] if self.global_pool == "cls" else x.mean(dim=1)',
                'x = x[:, 0] if self.global_pool == "cls" else x[:, 1:].mean(dim=1)',
            ),
            Mutation("fast: timm's avg pool means cls", '"avg": "mean"', '"avg": "cls"'),
            Mutation(
                "fast: pre-logits without the head LayerNorm",
                "x = self.head_drop(self.fc_norm(x))",
                "x = self.head_drop(x if pre_logits else self.fc_norm(x))",
            ),
            Mutation(
                "fast: drop-path schedule rate·ℓ/L",
                "config.drop_path_rate * i / max(config.depth - 1, 1)",
                "config.drop_path_rate * i / config.depth",
            ),
            Mutation(
                "fast: drop-path rate constant over depth",
                "config.drop_path_rate * i / max(config.depth - 1, 1)",
                "config.drop_path_rate + 0 * i",
            ),
            Mutation(
                "fast: no dropout after the position embedding",
                "+ self.pos_embed\n        return self.pos_drop(x)",
                "+ self.pos_embed\n        return x",
            ),
            Mutation(
                "fast: no dropout before the head",
                "x = self.head_drop(self.fc_norm(x))",
                "x = self.fc_norm(x)",
            ),
            Mutation(
                "fast: position dropout at the drop-path rate",
                "self.pos_drop = nn.Dropout(config.drop_rate)",
                "self.pos_drop = nn.Dropout(config.drop_path_rate)",
            ),
            Mutation(
                "fast: cls token std 0.02",
                "self.cls_token = nn.Parameter(torch.randn(1, 1, dim))",
                "self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)",
            ),
            Mutation(
                "fast: position embedding std 0.02",
                "torch.randn(1, self.patch_embed.num_patches + 1, dim))",
                "torch.randn(1, self.patch_embed.num_patches + 1, dim) * 0.02)",
            ),
            Mutation(
                "fast: ISTA dictionary with Linear's init",
                "nn.init.kaiming_uniform_(self.weight)",
                "nn.init.kaiming_uniform_(self.weight, a=5**0.5)",
            ),
            Mutation(
                "ISTA's few-token form with W for Wᵀ", "(u - u @ W.T) @ (eta * W)", "(u - u @ W) @ (eta * W)"
            ),
            Mutation(
                "ISTA's few-token form without the residual",
                "F.relu(u + (u - u @ W.T) @ (eta * W) - eta * lam)",
                "F.relu((u - u @ W.T) @ (eta * W) - eta * lam)",
            ),
        ),
    ),
    Target(
        "crate/models/alpha.py",
        first=("test_outputs.py", "test_training_mode.py", "test_initialisation.py"),
        mutations=(
            Mutation(
                "fast α: encoder and decoder swapped",
                ("u @ self.D)", "(a1 @ self.D.T - u) @ self.D)", "self.codes(u)[1] @ self.D1.T"),
                ("u @ self.D1)", "(a1 @ self.D1.T - u) @ self.D1)", "self.codes(u)[1] @ self.D.T"),
            ),
            Mutation(
                "fast α: gradient with D instead of Dᵀ",
                "(a1 @ self.D.T - u) @ self.D)",
                "(a1 @ self.D.T - u) @ self.D.T.T.T)",
            ),
            Mutation("fast α: one step, not two", "return a1, a2", "return a1, a1"),
            Mutation(
                "fast α: warm start at [u, 0]",
                "a1 = F.relu(self.eta * (u @ self.D) - threshold)",
                "a0 = F.pad(u, (0, self.D.shape[1] - u.shape[-1]))\n"
                "        a1 = F.relu(a0 - self.eta * ((a0 @ self.D.T - u) @ self.D) - threshold)",
            ),
            Mutation(
                "fast α: missing ODL residual",
                "return z + self.drop_path(self.odl(self.norm2(z)))",
                "return self.drop_path(self.odl(self.norm2(z)))",
            ),
            Mutation("fast α: block LayerNorm eps 1e-5", "BLOCK_NORM_EPS = 1e-6", "BLOCK_NORM_EPS = 1e-5"),
            Mutation(
                "fast α: patches column-major",
                "self.proj(images).flatten(2)",
                "self.proj(images).transpose(2, 3).flatten(2)",
            ),
            Mutation(
                "fast α: ODL branch never dropped",
                "return z + self.drop_path(self.odl(self.norm2(z)))",
                "return z + self.odl(self.norm2(z))",
            ),
            Mutation(
                "fast α: encoder D xavier-uniform",
                "nn.init.kaiming_uniform_(self.D)",
                "nn.init.xavier_uniform_(self.D)",
            ),
            Mutation(
                "fast α: decoder D₁ on its fan-out",
                "nn.init.kaiming_uniform_(self.D1)",
                'nn.init.kaiming_uniform_(self.D1, mode="fan_out")',
            ),
        ),
    ),
    Target(
        "crate/models/mae.py",
        first=("test_mae.py", "test_mae_model.py"),
        mutations=(
            Mutation(
                "MAE: decoder u + MSSA, not u − MSSA",
                "return u - self.attn(self.norm2(u))",
                "return u + self.attn(self.norm2(u))",
            ),
            Mutation(
                "MAE: mask token not applied",
                "x = torch.where(masked, self.mask_token, x)",
                "x = torch.where(masked, x, x)",
            ),
            Mutation(
                "MAE: loss over all patches, not the masked ones",
                "return (per_patch * mask).sum() / mask.sum()",
                "return per_patch.mean()",
            ),
            Mutation(
                "MAE: encoder adds no position embedding",
                "return torch.cat([cls_tokens, x], dim=1) + self.pos_embed",
                "return torch.cat([cls_tokens, x], dim=1)",
            ),
            Mutation(
                "MAE: the highest noise kept",
                "ids_shuffle = torch.argsort(noise, dim=1)",
                "ids_shuffle = torch.argsort(noise, dim=1, descending=True)",
            ),
            Mutation(
                "MAE: decoder linear step with Wᵀ",
                "return self.linear(self.norm1(x))",
                "return self.norm1(x) @ self.linear.weight",
            ),
            Mutation(
                "MAE: norm_pix_loss with the biased variance",
                "mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)",
                "mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True, unbiased=False)",
            ),
            Mutation(
                "MAE: encoder classifier keeps norm, not fc_norm",
                'encoder[re.sub(r"^norm\\.", "fc_norm.", key)] = value',
                "encoder[key] = value",
            ),
            Mutation(
                "MAE: released checkpoint's shapes not checked",
                "if key in expected and tuple(value.shape) != tuple(expected[key].shape)",
                "if key in expected and False",
            ),
        ),
    ),
    Target(
        "crate/models/released.py",
        first=("test_position_embedding.py",),
        mutations=(
            Mutation(
                "fast: position embedding resampled to the transposed grid",
                'prefix, grid = getattr(model, "num_prefix_tokens", 1), model.patch_embed.grid_size\n',
                'prefix, grid = getattr(model, "num_prefix_tokens", 1), model.patch_embed.grid_size[::-1]\n',
            ),
            Mutation(
                "resampling without antialiasing",
                "list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens",
                "list(new_grid), list(old_grid), num_prefix_tokens=num_prefix_tokens, antialias=False",
            ),
            Mutation(
                "resampling without the h×1 workaround",
                "if new_grid[1] == 1 and new_grid[0] > 1:",
                "if False:",
            ),
            Mutation(
                "fine-tuning: position embedding resampled to the transposed grid",
                "resample_position_embedding(pos_embed, grid, (old, old), num_prefix_tokens=prefix)",
                "resample_position_embedding(pos_embed, grid[::-1], (old, old), num_prefix_tokens=prefix)",
            ),
        ),
    ),
    Target(
        "crate/models/attention.py",
        first=("test_fast_model.py",),
        mutations=(
            Mutation("symmetric attention drops the key gradient", "(ds + ds.transpose(-2, -1))", "(2 * ds)"),
            Mutation("symmetric attention backward forgets the scale", "@ (w * ctx.scale)", "@ w"),
            Mutation(
                "symmetric attention value gradient with P, not Pᵀ", "p.transpose(-2, -1) @ do", "p @ do"
            ),
        ),
    ),
    Target(
        "crate/models/mssa_kernel.py",
        first=("test_mssa_kernel.py",),
        mutations=(
            Mutation(
                "fused kernel drops the dSᵀ term",
                "columns += _dot(tl.trans(p), do) + _dot(tl.trans(ds), w_rows) * scale",
                "columns += _dot(tl.trans(p), do)",
            ),
            Mutation(
                "fused kernel leaves padded keys unmasked",
                'scores = tl.where(keys[None, :] < N, scores, float("-inf"))',
                "scores = scores",
            ),
            Mutation(
                "fused kernel forgets the scale of dS·W",
                "_dot(ds, w_keys) * scale, mask=row_mask",
                "_dot(ds, w_keys), mask=row_mask",
            ),
            Mutation(
                "fused kernel's backward leaves P unnormalised",
                "e / tl.sum(e, 1)[:, None]",
                "e",
            ),
            Mutation(
                "fused kernel's triangle skips the transposed tiles",
                "            if j != i:",
                "            if j < i:",
            ),
            Mutation(
                "fused kernel's gradient operator takes scale 1",
                "dw = _backward(w, do.to(w.dtype).contiguous(), ctx.scale, ctx.rows, ctx.warps)",
                "dw = _backward(w, do.to(w.dtype).contiguous(), 1.0, ctx.rows, ctx.warps)",
            ),
            Mutation(
                "fused kernel's fake forward drops the head dimension",
                "def _(w, scale, tiling, forward_rows, forward_warps, backward_rows, backward_warps):\n"
                "    return torch.empty_like(w)",
                "def _(w, scale, tiling, forward_rows, forward_warps, backward_rows, backward_warps):\n"
                "    return torch.empty_like(w[..., :1])",
            ),
            Mutation(
                "fused kernel's correction Δ = rowsum(dO ∘ O)",
                "delta = tl.sum(p_wide * dp, 1)",
                "delta = tl.sum(do.to(dp.dtype) * _to(_dot(p, w_keys), W.dtype.element_ty).to(dp.dtype), 1)",
            ),
        ),
    ),
    Target(
        "crate/models/recompute.py",
        first=("test_recompute.py",),
        mutations=(
            Mutation(
                "recomputed norm output without its view's offset",
                ".as_strided(*view)",
                ".as_strided(view[0], view[1])",
            ),
            Mutation(
                "recomputed norm output from the output, not the input",
                "outputs[output.untyped_storage().data_ptr()] = (module, args[0], output, autocast)",
                "outputs[output.untyped_storage().data_ptr()] = (module, output, output, autocast)",
            ),
            Mutation(
                "norm recomputation outside the forward's autocast",
                "torch.autocast(inputs.device.type, dtype, enabled)",
                "torch.autocast(inputs.device.type, dtype, False)",
            ),
            Mutation(
                "recomputation packs saved tensors as themselves", "return saved.detach()", "return saved"
            ),
            Mutation("norm recipes keep the outputs alive", "outputs.clear()", "outputs.copy()"),
        ),
    ),
    Target(
        "crate/weights/sources.py",
        first=("test_position_embedding.py",),
        mutations=(
            Mutation(
                "fine-tuning: the position embedding not loaded",
                "model.load_state_dict(state, strict=False)",
                'model.load_state_dict({k: v for k, v in state.items() if k != "pos_embed"}, strict=False)',
            ),
        ),
    ),
    Target(
        "crate/analysis/measures.py",
        first=("test_audit.py",),
        mutations=(
            Mutation(
                "white-box subspaces interleaved",
                "unflatten(0, (block.attn.heads, -1)).transpose(-2, -1)",
                "unflatten(0, (-1, block.attn.heads)).permute(1, 2, 0)",
            ),
            Mutation(
                "white-box α: LASSO of a₁ reported after step 2",
                "lasso_step2=stats(reference.lasso_objective(a2, u, D, lam))",
                "lasso_step2=stats(reference.lasso_objective(a1, u, D, lam))",
            ),
            Mutation(
                "white-box α: decoder drift against D₁ itself",
                "decoder_drift=((D1 - D).norm() / D.norm()).item()",
                "decoder_drift=((D1 - D1).norm() / D.norm()).item()",
            ),
            Mutation(
                "white-box: compression change reversed",
                'compression_change=stats(compression["out"] - compression["in"])',
                'compression_change=stats(compression["in"] - compression["out"])',
            ),
            Mutation(
                "white-box: raw R^c after MSSA measured on the input",
                '("raw_out", y_out, False)',
                '("raw_out", y_in, False)',
            ),
            Mutation(
                "white-box: R^c of the input under LN₂",
                "y_in, y_out = layer_norm64(state.input, block.norm1)",
                "y_in, y_out = layer_norm64(state.input, block.norm2)",
            ),
            Mutation(
                "white-box: sparsity of the MSSA stream",
                "nonzero=stats((state.ista != 0)",
                "nonzero=stats((state.mssa != 0)",
            ),
            Mutation(
                "white-box: η‖D‖₂ not squared",
                "matrix_norm(D, ord=2).item() ** 2",
                "matrix_norm(D, ord=2).item()",
            ),
            Mutation(
                "white-box: LASSO start without |·|", "lam * u.abs().sum((-2, -1))", "lam * u.sum((-2, -1))"
            ),
            Mutation(
                "white-box: orthonormality gap of the best head",
                "@ U - eye, ord=2).max()",
                "@ U - eye, ord=2).min()",
            ),
            Mutation(
                "white-box: coherence normalised by one head",
                "norms[:, None] * norms[None]",
                "norms[:, None] * norms[:, None]",
            ),
            Mutation(
                "white-box: population std over the batch",
                "values.std().item()",
                "values.std(unbiased=False).item()",
            ),
            Mutation(
                "white-box α: η‖D‖² from the smallest eigenvalue",
                "torch.linalg.eigvalsh(gram)[-1]",
                "torch.linalg.eigvalsh(gram)[0]",
            ),
            Mutation(
                "white-box α: a₂ counted as a₁", "nonzero_a1=stats((a1 != 0)", "nonzero_a1=stats((a2 != 0)"
            ),
        ),
    ),
    Target(
        "crate/analysis/figures.py",
        first=("test_outputs.py",),
        mutations=(
            Mutation(
                "white-box: cls maps are the patches' attention to cls",
                "states[0].attention[..., 1:]",
                "states[0].attention[..., 1:, :].transpose(-2, -1)",
            ),
            Mutation(
                "white-box: cls maps transposed on the grid",
                "attention.unflatten(-1, model.patch_embed.grid_size)",
                "attention.unflatten(-1, model.patch_embed.grid_size).transpose(-2, -1)",
            ),
            Mutation("white-box: patch PCA without centring", "flat = flat - flat.mean(0)", "flat = flat"),
            Mutation(
                "white-box: patch PCA on the last directions",
                "components = flat @ V[:3].T",
                "components = flat @ V[-3:].T",
            ),
        ),
    ),
    # the data: built-in datasets, their augmentation, the training order and the evaluation shards
    Target(
        "crate/data/builtin.py",
        first=("test_datasets.py",),
        mutations=(
            Mutation(
                "data: IDX truncation check only catches extra bytes",
                "if len(data) != expected:",
                "if len(data) > expected:",
            ),
            Mutation("data: IDX sizes read little-endian", '8 + 4 * i], "big")', '8 + 4 * i], "little")'),
            Mutation(
                "data: flip probability inverted",
                "torch.rand((), generator=generator) < self.hflip",
                "torch.rand((), generator=generator) >= self.hflip",
            ),
            Mutation(
                "data: augmentation seed ignores the epoch",
                "hash((self.seed, self.epoch, index)) % 2**63",
                "hash((self.seed, index)) % 2**63",
            ),
            Mutation(
                "data: digits test split inside the train split",
                'members[:test_count] if split == "test" else members[test_count:]',
                'members[:test_count] if split == "test" else members',
            ),
        ),
    ),
    Target(
        "crate/data/samplers.py",
        first=("test_datasets.py", "test_distributed_evaluation.py"),
        mutations=(
            Mutation(
                "data: resumed epoch skips start_batch samples, not batches",
                "indices[self.start_batch * self.batch_per_rank : usable]",
                "indices[self.start_batch : usable]",
            ),
            Mutation(
                "data: every epoch the same permutation",
                "self.inner.set_epoch(epoch)",
                "self.inner.set_epoch(0)",
            ),
            Mutation(
                "data: resumable sampler keeps the ragged last batch",
                "usable = len(indices) // self.batch_per_rank * self.batch_per_rank",
                "usable = len(indices)",
            ),
            Mutation(
                "data: shard sampler without its stride", "range(rank, size, world_size)", "range(rank, size)"
            ),
            Mutation(
                "data: seeded samples leave torch's RNG reseeded",
                "torch.set_rng_state(saved[2])",
                "torch.get_rng_state()",
            ),
            Mutation(
                "data: seeded samples ignore the epoch",
                "hash((self.seed, self.epoch, index)) % 2**32",
                "hash((self.seed, index)) % 2**32",
            ),
        ),
    ),
    # checkpoints, the training loop, its set-up, configuration and faults
    Target(
        "crate/weights/checkpoint.py",
        first=("test_train_faults.py", "test_train.py"),
        mutations=(
            Mutation(
                "checkpoint: digest not checked",
                "and actual != digests[path.name]:",
                "and actual is None:",
            ),
            Mutation(
                "checkpoint: latest written before the rename",
                (
                    "    temporary.mkdir(parents=True)\n    try:",
                    '    _sync(output)\n    _replace_file(output / LATEST, folder.name + "\\n")\n',
                ),
                (
                    "    temporary.mkdir(parents=True)\n"
                    '    _replace_file(output / LATEST, folder.name + "\\n")\n'
                    "    try:",
                    "    _sync(output)\n",
                ),
            ),
            Mutation("checkpoint: keeps one checkpoint too few", "[:-keep]", "[: -keep + 1]"),
        ),
    ),
    Target(
        "crate/train/loop.py",
        first=("test_train_faults.py", "test_train.py"),
        mutations=(
            Mutation(
                "training: a non-finite step still steps the optimizer",
                "    if finite:\n        run.optimizer.step()\n",
                "    run.optimizer.step()\n    if finite:\n",
            ),
            Mutation(
                "training: accumulated loss not divided by accum_steps",
                "run.forward_loss(images, targets) / config.accum_steps",
                "run.forward_loss(images, targets)",
            ),
        ),
    ),
    Target(
        "crate/train/compiled.py",
        first=("test_train_compile.py",),
        mutations=(
            Mutation(
                "training: cudnn SDPA pinned in a float32 CUDA run",
                '"cuda": {"cudnn": True,',
                '"cuda": {"cudnn": False,',
            ),
            Mutation(
                "training: efficient SDPA let through on a CPU",
                '"cpu": {"flash": False, "math": False},',
                '"cpu": {"flash": False, "efficient": False, "math": False},',
            ),
        ),
    ),
    Target(
        "crate/train/setup.py",
        first=("test_train.py", "test_finetune.py", "test_train_compile.py"),
        mutations=(
            Mutation(
                "training: lr not scaled to the global batch",
                "lr = config.lr * config.batch_size / config.lr_batch",
                "lr = config.lr",
            ),
        ),
    ),
    Target(
        "crate/train/config.py",
        first=("test_train_faults.py",),
        mutations=(
            Mutation(
                "config: accumulation left out of the batch divisibility check",
                "if self.batch_size % (world_size * self.accum_steps):",
                "if self.batch_size % world_size:",
            ),
            Mutation(
                "config: a negative lr accepted",
                '            "lr",\n            "lr_batch",',
                '            "lr_batch",',
            ),
        ),
    ),
    Target(
        "crate/train/faults.py",
        first=("test_train_faults.py",),
        mutations=(
            Mutation(
                "training: ranks agree on finite flags, not non-finite ones",
                "torch.stack([~finite,",
                "torch.stack([finite,",
            ),
            Mutation(
                "training: stop handler left in place",
                "signal.signal(number, handler)",
                "signal.signal(number, self._handle)",
            ),
        ),
    ),
    # the gate
    Target(
        "crate/verify/rule.py",
        first=("test_rule.py", "test_gate.py"),
        mutations=(
            Mutation("gate: the rule allows 20 times the plain error", "FACTOR = 2 ", "FACTOR = 20 "),
            Mutation(
                "gate: the rule's slack without the reference's size",
                "4 * self.u * (1 + self.reference_max)",
                "4 * self.u",
            ),
            Mutation(
                "gate: a NaN error holds",
                "return self.fast <= self.bound",
                "return not self.fast > self.bound",
            ),
        ),
    ),
    Target(
        "crate/verify/gate.py",
        first=("test_gate.py", "test_command.py"),
        mutations=(
            Mutation(
                "gate: the inference model runs with gradients (the training kernels)",
                "_model_errors(models, runners, images, grad=False)",
                "_model_errors(models, runners, images, grad=True)",
            ),
            Mutation(
                "gate: the reference's construction draws from the run's random stream",
                "with torch.random.fork_rng(devices=devices):",
                "with contextlib.nullcontext():",
            ),
            Mutation("gate: the model left in eval mode", "model.train(training)", "model.eval()"),
            Mutation(
                "gate: drop-path's kept samples not rescaled in the expectation",
                "expected = x64 + (ref_full - x64) / keep",
                "expected = x64 + (ref_full - x64)",
            ),
            Mutation(
                "gate: the head's parameters not checked",
                '"head": ("mlp_head.",),',
                '"head": ("no such parameter",),',
            ),
        ),
    ),
    Target(
        "crate/verify/layers.py",
        first=("test_gate.py", "test_fast_model.py"),
        mutations=(
            Mutation(
                "gate: the layer's training run bypasses run_block",
                "fast_out = run_block(block, fast_inputs[0])",
                "fast_out = block(fast_inputs[0])",
            ),
            Mutation(
                "gate: the layer's output errors not reported",
                "errors(fast_out, plain_out, ref_out, models.u),\n        int(keep.sum())",
                "errors(ref_out, ref_out, ref_out, models.u),\n        int(keep.sum())",
            ),
        ),
    ),
    Target(
        "crate/train/verification.py",
        first=("test_train_gate.py",),
        mutations=(
            Mutation("training: a failing gate does not stop the run", "    if failed:\n", "    if False:\n"),
            Mutation(
                "training: --skip-verify checks anyway",
                "    if config.skip_verify:",
                "    if config.skip_verify and False:",
            ),
        ),
    ),
    Target(
        "crate/verify/command.py",
        first=("test_command.py",),
        mutations=(
            Mutation(
                "crate verify: a failure exits 0",
                "raise SystemExit(EXIT_FAILED)",
                "return report",
            ),
        ),
    ),
    # evaluation
    Target(
        "crate/evaluate.py",
        first=("test_evaluate.py", "test_distributed_evaluation.py"),
        mutations=(
            Mutation(
                "evaluation: top-5 counts top-1",
                "correct5 += (top == targets[:, None])",
                "correct5 += (top[:, :1] == targets[:, None])",
            ),
            Mutation(
                "evaluation: loss not divided by the count", "eval_loss=loss / total,", "eval_loss=loss,"
            ),
            Mutation(
                "evaluation: counts not summed over ranks",
                "dist.all_reduce(counts)",
                "dist.all_reduce(counts, op=dist.ReduceOp.MAX)",
            ),
        ),
    ),
)


def entries() -> list[tuple[Target, Mutation]]:
    """Every mutation with its target, in catalogue order."""
    return [(target, mutation) for target in TARGETS for mutation in target.mutations]
