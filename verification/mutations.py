"""Every test can fail: break the implementation on purpose, once per mutation, and see which test
catches it.

    python -m verification.mutations          # all mutations (a few minutes on 2 cores)
    python -m verification.mutations -k ista  # those whose name contains "ista"
    python -m verification.mutations verification  # caught by verification/ alone?

Each mutation is applied to a copy of the tree in a temporary folder (this checkout is never
modified); the suite runs there with the ci hypothesis profile and stops at the first failure. A
mutation that no test catches is reported as MISSED and makes the exit status non-zero.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutation(NamedTuple):
    """Replace ``old`` by ``new`` in ``path``; tuples of the same length replace several places."""

    name: str
    path: str
    old: str | tuple[str, ...]
    new: str | tuple[str, ...]


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
        "M = self.eta * (W - W.T @ W)",
        "M = self.eta * (W - W @ W.T)",
    ),
    Mutation(
        "fast: ISTA uses D = Wᵀ",
        "crate/model.py",
        "M = self.eta * (W - W.T @ W)",
        "M = self.eta * (W.T - W.T @ W)",
    ),
    Mutation(
        "fast: ISTA threshold constant",
        "crate/model.py",
        "u + u @ M - self.eta * self.lam",
        "u + u @ M - self.lam",
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
        "symbolic prox branch",
        "reference/symbolic.py",
        "(stationary, stationary >= 0)",
        "(stationary, stationary >= 1)",
    ),
]


def run(mutation: Mutation, suites: list[str]) -> str:
    """'caught by <test>' or 'MISSED'."""
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "tree"
        shutil.copytree(
            ROOT, tree, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", ".hypothesis")
        )
        target = tree / mutation.path
        source = target.read_text()
        olds, news = (
            (mutation.old, mutation.new)
            if isinstance(mutation.old, tuple)
            else ([mutation.old], [mutation.new])
        )
        for old, new in zip(olds, news, strict=True):
            if source.count(old) != 1:
                raise RuntimeError(f"{mutation.name}: {old!r} must occur once in {mutation.path}")
            source = source.replace(old, new)
        target.write_text(source)
        environment = dict(os.environ, CI="1", PYTHONPATH=str(tree))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *suites],
            cwd=tree,
            env=environment,
            capture_output=True,
            text=True,
        )
    if result.returncode == 0:
        return "MISSED"
    failed = [line.split(" ")[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    return f"caught by {failed[0] if failed else result.stdout.strip().splitlines()[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Break the implementation on purpose; check a test fails.")
    parser.add_argument("-k", default="", help="only the mutations whose name contains this text")
    parser.add_argument("suites", nargs="*", default=["tests", "verification"], help="test folders to run")
    args = parser.parse_args()
    missed = 0
    for mutation in MUTATIONS:
        if args.k.lower() not in mutation.name.lower():
            continue
        outcome = run(mutation, args.suites)
        missed += outcome == "MISSED"
        print(f"{mutation.name:50s} {outcome}", flush=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
