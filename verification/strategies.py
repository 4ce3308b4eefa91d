"""hypothesis strategies for the verification suite (docs/math.md §8.5).

Shapes include odd sizes, N < p and p < N; scales and ε are log-uniform; every tensor comes from a
drawn integer seed through a torch.Generator, so a failing example is reproduced by its printed
fields. Each strategy `note()`s what it drew.
"""

import math
from dataclasses import dataclass

import torch
from hypothesis import note, settings
from hypothesis import strategies as st

import reference

DTYPE = torch.float64


def log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(low), math.log10(high)).map(lambda exponent: 10.0**exponent)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(0, 2**31 - 1)


def randn(shape: tuple[int, ...], generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=DTYPE) * scale


def orthonormal_columns(dim: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """(dim, count) with orthonormal columns, count <= dim."""
    return torch.linalg.qr(randn((dim, dim), generator)).Q[:, :count]


@dataclass(frozen=True)
class HeadProblem:
    """Tokens Z (B, N, d), subspaces U (K, d, p) and a coding precision ε."""

    batch: int
    tokens: int
    dim: int
    heads: int
    head_dim: int
    seed: int
    scale: float
    eps: float
    orthonormal: bool

    @property
    def Z(self) -> torch.Tensor:
        return randn((self.batch, self.tokens, self.dim), self._generator(0), self.scale)

    @property
    def U(self) -> torch.Tensor:
        generator = self._generator(1)
        K, d, p = self.heads, self.dim, self.head_dim
        if self.orthonormal:
            return orthonormal_columns(d, K * p, generator).reshape(d, K, p).transpose(0, 1).contiguous()
        return randn((K, d, p), generator, d**-0.5)

    @property
    def gamma(self) -> float:
        return self.head_dim / (self.tokens * self.eps**2)

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 2 + stream)


@st.composite
def head_problems(
    draw,
    *,
    max_dim: int = 9,
    max_tokens: int = 11,
    max_heads: int = 3,
    max_batch: int = 2,
    scales: tuple[float, float] = (1e-2, 10.0),
    eps: tuple[float, float] = (0.05, 2.0),
    orthonormal: bool = False,
    complete: bool = False,
    min_heads: int = 1,
) -> HeadProblem:
    """orthonormal: U_[K] has orthonormal columns (K·p <= d); complete: also K·p = d."""
    if complete:
        heads = draw(st.integers(min_heads, max_heads))
        head_dim = draw(st.integers(1, max(1, max_dim // heads)))
        dim = heads * head_dim
    else:
        dim = draw(st.integers(max(1, min_heads), max_dim))
        heads = draw(st.integers(min_heads, min(max_heads, dim) if orthonormal else max_heads))
        head_dim = draw(st.integers(1, dim // heads if orthonormal else dim))
    problem = HeadProblem(
        batch=draw(st.integers(1, max_batch)),
        tokens=draw(st.integers(1, max_tokens)),
        dim=dim,
        heads=heads,
        head_dim=head_dim,
        seed=draw(seeds()),
        scale=draw(log_uniform(*scales)),
        eps=draw(log_uniform(*eps)),
        orthonormal=orthonormal or complete,
    )
    note(f"{problem}, gamma={problem.gamma:.4g}")
    return problem


@st.composite
def token_matrices(draw, *, max_tokens: int = 9, max_dim: int = 7, scales=(1e-2, 3.0), batch: int = 2):
    """A (batch, N, p) float64 tensor: the per-head tokens W_k of one attention head."""
    shape = (batch, draw(st.integers(1, max_tokens)), draw(st.integers(1, max_dim)))
    seed, scale = draw(seeds()), draw(log_uniform(*scales))
    note(f"tokens shape={shape}, seed={seed}, scale={scale:.4g}")
    return randn(shape, torch.Generator().manual_seed(seed), scale)


def step_fractions() -> st.SearchStrategy[float]:
    """A fraction of a step-size limit, bounded away from subnormals (docs/math.md §8.5)."""
    return st.floats(1e-3, 1.0)


def randomise_affine(state: dict, generator: torch.Generator) -> dict:
    """Every vector of the state dict — each LayerNorm's weight and bias (the patch embedding's and the
    head's too) and every bias — moved off its init (1, 0, small) by N(0, 0.3²), so that a test cannot
    pass because an affine term or bias happens to be neutral."""
    return {
        key: value + 0.3 * randn(value.shape, generator) if value.ndim == 1 else value
        for key, value in state.items()
    }


@dataclass(frozen=True)
class OfficialProblem:
    """A randomly initialised official CRATE (LayerNorm affine and biases randomised too) and a
    stream X (B, N, d) to feed its transformer."""

    batch: int
    tokens: int
    heads: int
    head_dim: int
    depth: int
    seed: int
    scale: float
    peaky: bool = False  # W_qkv × 4: attention rows close to one-hot (docs/math.md A5)

    patch_size = 2
    channels = 2  # more than one, or a patch flattened (channel, row, column) would go unnoticed
    num_patches = 4
    num_classes = 3

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def model(self, rho: float = 1.0, pool: str = "cls") -> reference.OfficialCRATE:
        return reference.OfficialCRATE.from_state_dict(
            self.state_dict(),
            heads=self.heads,
            patch_size=self.patch_size,
            channels=self.channels,
            rho=rho,
            pool=pool,
        )

    def _sizes(self) -> dict[str, int]:
        return dict(
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            head_dim=self.head_dim,
            patch_size=self.patch_size,
            channels=self.channels,
            num_patches=self.num_patches,
            num_classes=self.num_classes,
        )

    def _random_state_dict(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return reference.random_official_state_dict(**self._sizes(), generator=generator)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """float64, official (for CRATE-α: released) key names."""
        generator = torch.Generator().manual_seed(self.seed)
        state = randomise_affine(self._random_state_dict(generator), generator)
        for key in state:
            if self.peaky and key.endswith("qkv.weight"):
                state[key] = 4 * state[key]
        return state

    @property
    def images(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 2)
        side = self.patch_size * int(self.num_patches**0.5)
        return randn((self.batch, self.channels, side, side), generator)

    @property
    def X(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 1)
        return randn((self.batch, self.tokens, self.dim), generator, self.scale)


@dataclass(frozen=True)
class OfficialAlphaProblem(OfficialProblem):
    """A randomly initialised released CRATE-α (LayerNorm affine, the head's included, and every bias
    randomised) with dictionaries of ``overcomplete``·d atoms, and a stream X (B, N, d) to feed its
    transformer. ``peaky``: W_qkv × 4. Images: 2 channels, 2×2 patches on a 2×2 grid, as OfficialProblem."""

    overcomplete: int = 4  # m / d, the released models' 4

    def model(self, pool: str = "cls") -> reference.OfficialCRATEAlpha:
        return reference.OfficialCRATEAlpha.from_state_dict(self.state_dict(), heads=self.heads, pool=pool)

    def _random_state_dict(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return reference.random_official_alpha_state_dict(
            **self._sizes(), ratio=self.overcomplete, generator=generator
        )


def _official_fields(draw, max_heads: int, max_head_dim: int, max_depth: int, peaky: bool) -> dict:
    """The fields that OfficialProblem and OfficialAlphaProblem share, drawn in this order."""
    return dict(
        batch=draw(st.integers(1, 2)),
        tokens=draw(st.integers(1, 9)),
        heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.integers(1, max_head_dim)),
        depth=draw(st.integers(1, max_depth)),
        seed=draw(seeds()),
        scale=draw(log_uniform(1e-1, 10.0)),
        peaky=draw(st.booleans()) if peaky else False,
    )


@st.composite
def official_problems(
    draw, *, max_heads: int = 3, max_head_dim: int = 5, max_depth: int = 3, peaky: bool = False
) -> OfficialProblem:
    problem = OfficialProblem(**_official_fields(draw, max_heads, max_head_dim, max_depth, peaky))
    note(str(problem))
    return problem


def scaled_settings(fraction: float) -> settings:
    """The loaded profile with a fraction of its examples, for properties that build whole models."""
    return settings(max_examples=max(5, int(settings.default.max_examples * fraction)))


@st.composite
def official_alpha_problems(
    draw,
    *,
    max_heads: int = 3,
    max_head_dim: int = 5,
    max_depth: int = 3,
    max_overcomplete: int = 4,
    peaky: bool = False,
) -> OfficialAlphaProblem:
    """Odd sizes as official_problems (one head of full width included), dictionaries of 1 to
    ``max_overcomplete`` times d atoms, soft or (with ``peaky``) also W_qkv × 4 attention."""
    problem = OfficialAlphaProblem(
        **_official_fields(draw, max_heads, max_head_dim, max_depth, peaky),
        overcomplete=draw(st.integers(1, max_overcomplete)),
    )
    note(str(problem))
    return problem
