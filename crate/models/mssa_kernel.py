"""MSSA's attention softmax_row(s·WWᵀ)·W (query = key = value = W) as fused Triton kernels.

The same function and the same backward as crate/models/attention.py's symmetric_attention, in two
kernels that never write the N×N matrices: autograd keeps W alone (not P), and the backward, which
holds whole rows, recomputes S and P = softmax_row(S) itself and computes, in one pass,

    dW = Pᵀ·dO + s·(dS + dSᵀ)·W,   dS = P ∘ (dP − Δ),   dP = dO·Wᵀ,   Δ = rowsum(P ∘ dP).

Δ is taken from the full row of P and dP held in the program (a row of N ≤ MAX_TOKENS keys fits one
block), not as FlashAttention's rowsum(dO ∘ O): attention.py explains why that correction breaks the
precision rule with peaky attention in bf16 (verification/mutations/ keeps it as a mutation the rule
catches). Nor is P recomputed from statistics the forward saved: as FlashAttention's exp(S − LSE)
it adds LSE's rounding, u·|LSE|, to every exponent (with peaky attention, |S| in the tens, float32
gradients broke the rule: 6.1× the plain error at CRATE-T's shapes, under the interpreter); as
exp(S − m)/l with the forward's max and sum, a recomputed S that differs from the forward's by an
ulp (other tile shapes) leaves rows of P that do not sum to 1, which dW = s·dS·W amplifies (float64,
N 40, p 20, s 3: 3.3e-10 against 1.2e-14 for autograd). Normalised in the backward, P sums to 1.

Tiling: the forward runs one program per (image·head, block of BLOCK_M query rows), each holding
the whole key row (BLOCK_N = the next power of two ≥ N, padded keys masked to −∞). The backward
runs one program per image·head, looping over the row blocks i: the row part s·dS_i·W of dW is
final after block i and is written to a scratch buffer; the column part Pᵢᵀ·dOᵢ + s·dSᵢᵀ·Wᵢ is
summed over i in a (BLOCK_N, p) accumulator and added to the scratch at the end. No atomics, no
race: each program owns its head.

The second forward tiling, "triangle", computes only the upper triangle of the symmetric S: one
program per image·head visits the tiles (i, j ≥ i) of BLOCK_M × BLOCK_M, and each tile S_ij serves
row block i (keys j) and, transposed, row block j (keys i), through FlashAttention's online softmax
(running max, sum and unnormalised output per row, in a float32 scratch, so exp(S − running max)
is what is rounded to W's dtype before the product with W); the backward is the same. FLOPs per
head at N = 197, p = 64, BLOCK_M = 64 (4 row blocks, padded): rows: S 2·256·256·64 = 8.4 M + P·W
8.4 M = 16.8 M; triangle: S on 10 of the 16 tiles 5.2 M + P·W 8.4 M = 13.6 M, 19% fewer (the
function's own 4·N²·p: 9.9 M), for one program per head in sequence over its 10 tiles instead of
four in parallel, and the scratch read and written per tile. Which one serves training is for
benchmarks/test_attention_kernel.py on a GPU to decide; "rows" is the default.

Rounding, by the precision rule (docs/math.md §8: as accurate as the plain path in W's dtype): every
tl.dot takes operands in W's dtype and accumulates in float32 (float64 for float64 W), as the plain
path's matmuls do; P is rounded to W's dtype before P·W, Pᵀ·dO and before Δ and dS are formed
from it (as symmetric_attention saves it), so that Δ and dS's diagonal cancel on the same values;
dS is rounded to W's dtype before the two dS products, as the plain path's dS is a tensor of W's
dtype; the softmax, Δ and dS themselves are computed in float32 (float64). Padded rows and keys are
loaded as zeros and their P set to zero, so they add nothing.

Triton is optional: this module imports it, crate.models.layers imports this module only when the
kernel is selected (MSSA's docstring). With TRITON_INTERPRET=1 set before Triton is first imported
(the root conftest.py does without CUDA) the kernels run on CPU tensors under Triton's interpreter.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# The longest key row and the widest head one program holds, by W's dtype: sized by compiling the
# kernels for sm_90 (H100) with Triton 3.8 on the CPU, whose shared memory then stays within an
# A100's 163 KiB (bf16 backward 113 KiB, float32 forward 128 KiB and backward 116 KiB with 16-row
# steps; float64 backward 117 KiB at 128 tokens, 360 KiB at 256). crate/models/layers.py repeats
# the first (KERNEL_MAX_*) to choose the kernel without importing Triton.
MAX_TOKENS, MAX_HEAD_DIM = 256, 64
FLOAT64_MAX_TOKENS, FLOAT64_MAX_HEAD_DIM = 128, 32
WIDE_BACKWARD_BLOCK_M = 16  # the most query rows per backward step in float32 and float64 (shared memory)
TILINGS = ("rows", "triangle")  # the forward's: row blocks of BLOCK_M, or S's upper triangle of tiles


@dataclass(frozen=True)
class Tiles:
    """The launch shape of the two kernels: the forward's query rows per program (the triangle's tile
    side) and the backward's per step (BLOCK_M, powers of two ≥ 16: tl.dot's smallest), and the warps
    of each program. TILES is the default; benchmarks/test_attention_kernel.py's tile sweep measures
    the others on a GPU (each checked against the precision rule there), to choose it."""

    forward_rows: int = 64
    forward_warps: int = 4
    backward_rows: int = 64
    backward_warps: int = 4

    def __post_init__(self):
        for name, value, allowed in (
            ("forward_rows", self.forward_rows, (16, 32, 64, 128)),
            ("backward_rows", self.backward_rows, (16, 32, 64, 128)),
            ("forward_warps", self.forward_warps, (1, 2, 4, 8, 16)),
            ("backward_warps", self.backward_warps, (1, 2, 4, 8, 16)),
        ):
            if value not in allowed:
                raise ValueError(f"fused_symmetric_attention: {name} {value}; expected one of {allowed}")


TILES = Tiles()
CANDIDATE_ROWS, CANDIDATE_WARPS = (16, 32, 64), (4, 8)  # the tile sweep's, each row block verified
# Triton 3.8's interpreter gets bfloat16 wrong twice: its dot multiplies bf16 blocks as their raw
# uint16 bits (it converts fp8 only), and its float32 → bf16 cast truncates (its round-to-nearest
# drops a carry into the exponent). Interpreted, _dot widens bf16 operands to float32 (exact, and
# what a tensor core computes: exact products, float32 sums) and _to rounds to nearest even by hand,
# as compiled kernels do. Compiled kernels take the plain branches.
_INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def _to(x, dtype: tl.constexpr):
    """x (float32, or float64) rounded to dtype, to nearest even."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # to nearest even at bf16's 8 bits
        x = bits.to(tl.float32, bitcast=True)  # now exactly a bf16 value: the cast below is exact
    return x.to(dtype)


@triton.jit
def _dot(a, b):
    """a·b with float32 (float64) accumulation; float32 operands in IEEE float32, not TF32."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b, input_precision="ieee")
    return result


@triton.jit
def _forward_kernel(W, OUT, SCALE, N, P, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    # W, OUT: (heads, N, P) contiguous, W's dtype; SCALE: (1,), float32 (float64 for float64 W)
    scale = tl.load(SCALE)
    head = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_P)
    w = W + head * N * P
    row_mask = (rows[:, None] < N) & (dims[None, :] < P)
    key_mask = (keys[:, None] < N) & (dims[None, :] < P)
    w_rows = tl.load(w + rows[:, None] * P + dims[None, :], mask=row_mask, other=0.0)  # (BLOCK_M, BLOCK_P)
    w_keys = tl.load(w + keys[:, None] * P + dims[None, :], mask=key_mask, other=0.0)  # (BLOCK_N, BLOCK_P)
    scores = _dot(w_rows, tl.trans(w_keys)) * scale  # (BLOCK_M, BLOCK_N), float32 / float64
    scores = tl.where(keys[None, :] < N, scores, float("-inf"))
    top = tl.max(scores, 1)
    e = tl.exp(scores - top[:, None])
    total = tl.sum(e, 1)
    p = _to(e / total[:, None], W.dtype.element_ty)
    o = _dot(p, w_keys)  # (BLOCK_M, BLOCK_P)
    row_offsets = head * N * P + rows[:, None] * P + dims[None, :]
    tl.store(OUT + row_offsets, _to(o, OUT.dtype.element_ty), mask=row_mask)


@triton.jit
def _online_update(ACC, TOP, TOTAL, offset, stats, rows, scores, w_keys, N, P, dims):
    """Rows ``rows`` meet one block of keys: their running max, sum and unnormalised output in the
    scratch (FlashAttention's online softmax) take ``scores`` (BLOCK_M, BLOCK_M) into account."""
    row_mask = (rows[:, None] < N) & (dims[None, :] < P)
    row_offsets = offset + rows[:, None] * P + dims[None, :]
    top = tl.load(TOP + stats + rows, mask=rows < N, other=0.0)
    total = tl.load(TOTAL + stats + rows, mask=rows < N, other=0.0)
    acc = tl.load(ACC + row_offsets, mask=row_mask, other=0.0)
    new_top = tl.maximum(top, tl.max(scores, 1))
    rescale = tl.exp(top - new_top)
    e = tl.exp(scores - new_top[:, None])
    tl.store(TOP + stats + rows, new_top, mask=rows < N)
    tl.store(TOTAL + stats + rows, total * rescale + tl.sum(e, 1), mask=rows < N)
    acc = acc * rescale[:, None] + _dot(_to(e, w_keys.dtype), w_keys)
    tl.store(ACC + row_offsets, acc, mask=row_mask)


@triton.jit
def _triangle_forward_kernel(
    W, OUT, TOP, TOTAL, ACC, SCALE, N, P, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr
):
    # W, OUT: (heads, N, P), W's dtype; scratch TOP, TOTAL: (heads, N), ACC: (heads, N, P), float32
    # (float64); SCALE: (1,)
    scale = tl.load(SCALE)
    head = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_P)
    offset, stats = head * N * P, head * N
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        tl.store(TOP + stats + rows, tl.full((BLOCK_M,), float("-inf"), TOP.dtype.element_ty), mask=rows < N)
        tl.store(TOTAL + stats + rows, tl.zeros((BLOCK_M,), TOTAL.dtype.element_ty), mask=rows < N)
        row_mask = (rows[:, None] < N) & (dims[None, :] < P)
        tl.store(
            ACC + offset + rows[:, None] * P + dims[None, :],
            tl.zeros((BLOCK_M, BLOCK_P), ACC.dtype.element_ty),
            mask=row_mask,
        )
    tl.debug_barrier()
    for i in range(0, N, BLOCK_M):
        rows_i = i + tl.arange(0, BLOCK_M)
        mask_i = (rows_i[:, None] < N) & (dims[None, :] < P)
        w_i = tl.load(W + offset + rows_i[:, None] * P + dims[None, :], mask=mask_i, other=0.0)
        for j in range(i, N, BLOCK_M):
            rows_j = j + tl.arange(0, BLOCK_M)
            mask_j = (rows_j[:, None] < N) & (dims[None, :] < P)
            w_j = tl.load(W + offset + rows_j[:, None] * P + dims[None, :], mask=mask_j, other=0.0)
            scores = _dot(w_i, tl.trans(w_j)) * scale  # S_ij (BLOCK_M, BLOCK_M), and S_ji = S_ijᵀ
            _online_update(
                ACC,
                TOP,
                TOTAL,
                offset,
                stats,
                rows_i,
                tl.where(rows_j[None, :] < N, scores, float("-inf")),
                w_j,
                N,
                P,
                dims,
            )
            if j != i:
                _online_update(
                    ACC,
                    TOP,
                    TOTAL,
                    offset,
                    stats,
                    rows_j,
                    tl.where(rows_i[None, :] < N, tl.trans(scores), float("-inf")),
                    w_i,
                    N,
                    P,
                    dims,
                )
            tl.debug_barrier()  # the next tile reads what this one stored
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = (rows[:, None] < N) & (dims[None, :] < P)
        row_offsets = offset + rows[:, None] * P + dims[None, :]
        total = tl.load(TOTAL + stats + rows, mask=rows < N, other=1.0)
        o = tl.load(ACC + row_offsets, mask=row_mask, other=0.0) / total[:, None]
        tl.store(OUT + row_offsets, _to(o, OUT.dtype.element_ty), mask=row_mask)


@triton.jit
def _backward_kernel(
    W,
    DO,
    SCRATCH,
    DW,
    SCALE,
    N,
    P,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # W, DO, DW: (heads, N, P), W's dtype; SCRATCH: (heads, N, P) and SCALE: (1,), float32 (float64)
    scale = tl.load(SCALE)
    head = tl.program_id(0).to(tl.int64)
    keys = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_P)
    offset = head * N * P
    key_mask = (keys[:, None] < N) & (dims[None, :] < P)
    key_offsets = keys[:, None] * P + dims[None, :]
    w_keys = tl.load(W + offset + key_offsets, mask=key_mask, other=0.0)  # (BLOCK_N, BLOCK_P)
    columns = tl.zeros((BLOCK_N, BLOCK_P), dtype=SCRATCH.dtype.element_ty)  # Σᵢ Pᵢᵀ·dOᵢ + s·dSᵢᵀ·Wᵢ
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = (rows[:, None] < N) & (dims[None, :] < P)
        row_offsets = rows[:, None] * P + dims[None, :]
        w_rows = tl.load(W + offset + row_offsets, mask=row_mask, other=0.0)  # (BLOCK_M, BLOCK_P)
        do = tl.load(DO + offset + row_offsets, mask=row_mask, other=0.0)
        scores = _dot(w_rows, tl.trans(w_keys)) * scale  # (BLOCK_M, BLOCK_N)
        keyed = keys[None, :] < N
        e = tl.where(keyed, tl.exp(scores - tl.max(tl.where(keyed, scores, float("-inf")), 1)[:, None]), 0.0)
        valid = (rows[:, None] < N) & keyed
        p = _to(tl.where(valid, e / tl.sum(e, 1)[:, None], 0.0), W.dtype.element_ty)  # softmax_row(S)
        dp = _dot(do, tl.trans(w_keys))  # (BLOCK_M, BLOCK_N)
        p_wide = p.to(dp.dtype)
        delta = tl.sum(p_wide * dp, 1)  # rowsum(P ∘ dP) over the whole row
        ds = _to(p_wide * (dp - delta[:, None]), W.dtype.element_ty)
        tl.store(SCRATCH + offset + row_offsets, _dot(ds, w_keys) * scale, mask=row_mask)
        columns += _dot(tl.trans(p), do) + _dot(tl.trans(ds), w_rows) * scale
    tl.debug_barrier()  # the row parts stored above are read back by other threads of the program
    dw = tl.load(SCRATCH + offset + key_offsets, mask=key_mask, other=0.0) + columns
    tl.store(DW + offset + key_offsets, _to(dw, DW.dtype.element_ty), mask=key_mask)


def _blocks(w: torch.Tensor) -> dict:
    *_, tokens, head_dim = w.shape
    max_tokens, max_head_dim = (MAX_TOKENS, MAX_HEAD_DIM)
    if w.dtype == torch.float64:
        max_tokens, max_head_dim = (FLOAT64_MAX_TOKENS, FLOAT64_MAX_HEAD_DIM)
    if not 1 <= tokens <= max_tokens or not 1 <= head_dim <= max_head_dim:
        raise ValueError(
            f"fused_symmetric_attention: {tokens} tokens of head dimension {head_dim} in {w.dtype}; the "
            f"kernel holds a whole key row: 1 to {max_tokens} tokens, head dimension 1 to {max_head_dim}"
        )
    power = triton.next_power_of_2
    return dict(BLOCK_N=max(16, power(tokens)), BLOCK_P=max(16, power(head_dim)))


def _check_device(w: torch.Tensor) -> None:
    if not w.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"fused_symmetric_attention: W is on {w.device}; the Triton kernels run on CUDA tensors, "
            "or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before Triton is imported)"
        )


# The kernels as two PyTorch operators (torch.library.custom_op), the backward registered as the
# forward's gradient: torch.compile traces a model through them without a graph break and calls each
# as one opaque kernel. Dynamo does not trace Triton's launcher (under the interpreter an
# autograd.Function around the launches broke the graph at the launcher's reading of its settings).
@torch.library.custom_op("crate::symmetric_attention_forward", mutates_args=())
def _forward(
    w: torch.Tensor,
    scale: float,
    tiling: str,
    forward_rows: int,
    forward_warps: int,
    backward_rows: int,
    backward_warps: int,
) -> torch.Tensor:
    """softmax_row(scale·WWᵀ)·W, W contiguous (..., N, p); the backward's launch shape rides along
    for _setup_backward."""
    _check_device(w)
    *lead, tokens, head_dim = w.shape
    blocks = _blocks(w)  # refuses what one program cannot hold
    heads = w.numel() // (tokens * head_dim)
    wide = torch.promote_types(w.dtype, torch.float32)
    o = torch.empty_like(w)
    scale_ = torch.full((1,), scale, dtype=wide, device=w.device)  # a float argument would be fp32
    launch = dict(BLOCK_M=forward_rows, num_warps=forward_warps)
    if tiling == "rows":
        grid = (heads, triton.cdiv(tokens, forward_rows))
        _forward_kernel[grid](w, o, scale_, tokens, head_dim, **launch, **blocks)
    else:
        top, total = torch.empty(2, *lead, tokens, dtype=wide, device=w.device)  # running max, sum
        accumulator = torch.empty(w.shape, dtype=wide, device=w.device)  # Σⱼ exp(Sᵢⱼ − mᵢ)·Wⱼ
        arguments = (w, o, top, total, accumulator, scale_, tokens, head_dim)
        _triangle_forward_kernel[(heads,)](*arguments, **launch, BLOCK_P=blocks["BLOCK_P"])
    return o


@torch.library.custom_op("crate::symmetric_attention_backward", mutates_args=())
def _backward(w: torch.Tensor, do: torch.Tensor, scale: float, rows: int, warps: int) -> torch.Tensor:
    """dW of softmax_row(scale·WWᵀ)·W for the upstream gradient dO, both contiguous in W's dtype."""
    *_, tokens, head_dim = w.shape
    heads = w.numel() // (tokens * head_dim)
    wide = torch.promote_types(w.dtype, torch.float32)
    scale_ = torch.full((1,), scale, dtype=wide, device=w.device)
    scratch = torch.empty(w.shape, dtype=wide, device=w.device)  # the row parts s·dSᵢ·W
    dw = torch.empty_like(w)
    if w.element_size() > 2:
        rows = min(rows, WIDE_BACKWARD_BLOCK_M)
    arguments = (w, do, scratch, dw, scale_, tokens, head_dim)
    _backward_kernel[(heads,)](*arguments, BLOCK_M=rows, num_warps=warps, **_blocks(w))
    return dw


@_forward.register_fake
def _(w, scale, tiling, forward_rows, forward_warps, backward_rows, backward_warps):
    return torch.empty_like(w)


@_backward.register_fake
def _(w, do, scale, rows, warps):
    return torch.empty_like(w)


def _setup_backward(ctx, inputs: tuple, output: torch.Tensor) -> None:
    w, scale, _, _, _, rows, warps = inputs
    ctx.save_for_backward(w)  # W alone: the backward recomputes S and P
    ctx.scale, ctx.rows, ctx.warps = scale, rows, warps


def _gradient(ctx, do: torch.Tensor) -> tuple:
    (w,) = ctx.saved_tensors
    dw = _backward(w, do.to(w.dtype).contiguous(), ctx.scale, ctx.rows, ctx.warps)
    return dw, None, None, None, None, None, None


_forward.register_autograd(_gradient, setup_context=_setup_backward)


def fused_symmetric_attention(
    w: torch.Tensor, scale: float, tiling: str = "rows", tiles: Tiles = TILES
) -> torch.Tensor:
    """softmax_row(scale·WWᵀ)·W, (..., N, p) → (..., N, p), N ≤ MAX_TOKENS, p ≤ MAX_HEAD_DIM (float64:
    FLOAT64_MAX_*), on CUDA (or on the CPU under TRITON_INTERPRET=1); the gradient equals
    symmetric_attention's. ``tiling``: the forward's, "rows" or "triangle" (the module's docstring);
    ``tiles``: the kernels' launch shape (Tiles; in float32 and float64 the backward takes at most
    WIDE_BACKWARD_BLOCK_M rows per step)."""
    device = w.device.type
    if torch.is_autocast_enabled(device):
        w = w.to(torch.get_autocast_dtype(device))  # as autocast's matmuls would (symmetric_attention)
    if tiling not in TILINGS:
        raise ValueError(f"fused_symmetric_attention: tiling {tiling!r}; expected one of {TILINGS}")
    launch = (tiles.forward_rows, tiles.forward_warps, tiles.backward_rows, tiles.backward_warps)
    return _forward(w.contiguous(), scale, tiling, *launch)
