"""The fast CRATE-MAE (crate/models/mae.py) equals the float64 reference.OfficialCRATEMAE of the same
weights part by part and whole, forward and backward, in every precision, through the gate's machinery
(crate/verify/mae.py): the embedding (mask token where masked), every encoder layer's z_half and ISTA
output, the encoder's norm, every decoder layer's u and output u − MSSA(LN u), the head and the loss,
each fed the reference's input of that part, the gradients of every parameter and of each part's input,
and the whole model images -> (loss, pred, mask) under one seeded masking noise.

float64: max|fast − ref| <= 1e-10·(1 + max|ref|), and the same of the plain implementation
(crate/verify/plain_mae.py), which is thereby an independent check of the reference. Low precision: the
precision rule (crate/verify/rule.py) with plain_mae.py in the same precision as the baseline; each
precision with fused (SDPA) and explicit attention, TF32 on CUDA only. Hypothesis draws small shapes:
1 to 3 heads, one head spanning the width (no W_out, as released), odd grids and channel counts,
mask ratios 0 to 0.75, soft and peaky attention.
"""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from crate.verify import check_model
from crate.verify.mae import models_from_state
from crate.verify.rule import PRECISIONS
from reference import random_official_mae_state_dict
from verification import options
from verification.strategies import scaled_settings, seeds

LOW_PRECISIONS = ["float32", "bfloat16", "float16", "bf16-autocast"]
FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as test_fast_model.py: tiny shapes, where two OpenMP threads on a loaded
    2-core machine spin-wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class MAEProblem:
    """A released-layout CRATE-MAE state dict at the released initialisation's scales (``peaky``:
    every W_qkv × 4, the concentrated attention of trained weights) and its images."""

    batch: int = 2
    grid: int = 3
    patch_size: int = 2
    channels: int = 1
    heads: int = 2
    head_dim: int = 4
    depth: int = 1
    mask_ratio: float = 0.75
    peaky: bool = False
    seed: int = 0

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim

    def state_dict(self) -> dict:
        state = random_official_mae_state_dict(
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
            head_dim=self.head_dim,
            patch_size=self.patch_size,
            channels=self.channels,
            num_patches=self.grid**2,
            generator=torch.Generator().manual_seed(self.seed),
        )
        if self.peaky:
            state = {key: 4 * value if key.endswith("qkv.weight") else value for key, value in state.items()}
        return state

    @property
    def images(self) -> torch.Tensor:
        size = self.grid * self.patch_size
        generator = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.batch, self.channels, size, size, generator=generator, dtype=torch.float64)

    def model(self, precision: str, fused: bool, device: str = "cpu"):
        kwargs = dict(precision=precision, fused=fused, device=device, mask_ratio=self.mask_ratio)
        return models_from_state(self.state_dict(), heads=self.heads, **kwargs).fast.train()


@st.composite
def mae_problems(draw, *, peaky_one_head: bool = True) -> MAEProblem:
    """Small problems; ``peaky_one_head=False`` draws one full-width head with soft attention only
    (the case that test_one_full_width_head_with_peaky_attention_breaks_the_rule_in_training pins)."""
    heads = draw(st.integers(1, 3))
    return MAEProblem(
        batch=draw(st.integers(1, 2)),
        grid=draw(st.integers(2, 3)),
        patch_size=draw(st.integers(1, 3)),
        channels=draw(st.integers(1, 3)),
        heads=heads,
        head_dim=draw(st.sampled_from([4, 8] if heads > 1 else [4, 8, 12])),  # d divisible by 4: sin-cos
        depth=draw(st.integers(1, 2)),
        mask_ratio=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75])),
        peaky=draw(st.booleans()) and (peaky_one_head or heads > 1),
        seed=draw(seeds()),
    )


ONE_HEAD = MAEProblem(heads=1, head_dim=8, depth=2)  # one head spanning the width: no W_out
NOTHING_MASKED = MAEProblem(mask_ratio=0.0)


def _precisions():
    return [
        options.on_device(device, precision, device)
        for device in options.devices()
        for precision in ([*LOW_PRECISIONS, "tf32"] if device == "cuda" else LOW_PRECISIONS)
    ]


@FUSED
@scaled_settings(0.1)
@given(problem=mae_problems())
@example(problem=ONE_HEAD)
@example(problem=NOTHING_MASKED)
def test_fast_and_plain_mae_equal_reference_in_float64(fused, problem):
    report = check_model(problem.model("float64", fused), "float64", images=problem.images)
    for row in report.rows:
        tolerance = 1e-10 * (1 + row.errors.reference_max)
        assert row.errors.fast <= tolerance, f"fast: {row}"
        assert row.errors.plain <= tolerance, f"plain: {row}"


@pytest.mark.parametrize("precision, device", _precisions())
@FUSED
@scaled_settings(0.1)
@given(problem=mae_problems(peaky_one_head=False))
@example(problem=ONE_HEAD)
@example(problem=NOTHING_MASKED)
@example(problem=MAEProblem(peaky=True, depth=2, batch=2, grid=3, channels=3))
def test_fast_mae_parts_follow_precision_rule(precision, device, fused, problem):
    """Every part's every output on both paths, and the whole model's mask (exact). The gradients and
    the whole model's loss and pred are printed, not asserted, over these drawn problems, as the CRATE
    suite asserts the low-precision forward only over drawn shapes (test_fast_model.py): at tiny random
    shapes fast/plain ratios past 2 occur where the rule's additive slack is small (float32, peaky, 2
    heads of 4: an encoder layer's input gradient 2.52 with explicit attention, 2.22 fused; the whole
    model in bfloat16, one peaky layer, 12 seeds: 0.43 to 1.96, one draw 4.7), chance orderings of
    sums, not faults. The next test asserts every row at fixed shapes."""
    dtype = PRECISIONS[precision][0]
    report = check_model(problem.model(precision, fused, device), precision, images=problem.images.to(dtype))
    for row in report.rows:
        if row.quantity.startswith("grad") or (row.part == "model" and row.quantity != "mask"):
            print(row)
        else:
            assert row.holds, f"{row}\n{report.table()}"


@pytest.mark.parametrize("precision, device", _precisions())
@pytest.mark.parametrize("peaky", [False, True], ids=["soft", "peaky"])
@FUSED
def test_fast_mae_follows_precision_rule_at_fixed_shapes(precision, device, peaky, fused):
    """Every row, forward and backward, the whole model from images to (loss, pred, mask) included:
    depth 3 (errors compound with depth), 16 patches of 2×2×3, 4 heads of 8, soft and peaky, as
    test_fast_model.py asserts CRATE's layer gradients and logits at fixed shapes."""
    problem = MAEProblem(
        batch=2, grid=4, patch_size=2, channels=3, heads=4, head_dim=8, depth=3, peaky=peaky, seed=3
    )
    dtype = PRECISIONS[precision][0]
    report = check_model(problem.model(precision, fused, device), precision, images=problem.images.to(dtype))
    assert report.passed, report.table()


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="measured: symmetric_attention's backward, one peaky full-width head",
)
@pytest.mark.parametrize("precision", ["bfloat16", "float16", "bf16-autocast"])
def test_one_full_width_head_with_peaky_attention_breaks_the_rule_in_training(precision):
    """A finding, pinned so that a fix shows (strict xfail; only the assertion counts as the expected
    failure, an error elsewhere fails the test): with one head spanning the width (no W_out)
    and peaky attention (W_qkv × 4), the CPU training kernel (crate/models/attention.py's
    symmetric_attention, fused_attn) gives decoder-layer gradients (LN weights and biases, the linear
    step's W) 3 to 11 times the plain autograd error, past the rule's bound, on 5 tokens at depth 2:
    of seeds 0-14 the problems of seeds 4, 6 in bfloat16, 1, 4, 5 in float16, 0, 2, 3, 10 in bf16
    autocast (seeds 0-4 here: at least one in each); explicit attention keeps the rule on all of them,
    and the fused path with 2 or 4 heads on 9 patches too (10 seeds). No released model has one head.
    """
    violations = 0
    for seed in range(5):
        problem = MAEProblem(
            batch=1, grid=2, patch_size=1, heads=1, head_dim=8, depth=2, mask_ratio=0.0, peaky=True, seed=seed
        )
        dtype = PRECISIONS[precision][0]
        report = check_model(problem.model(precision, fused=True), precision, images=problem.images.to(dtype))
        violations += sum(not row.holds for row in report.rows if row.part != "model")
    assert violations == 0


def test_one_head_spanning_the_width_has_no_w_out_and_is_checked():
    """The released Attention drops to_out when heads = 1 and head_dim = dim; the fast MSSA's proj is
    the identity then, and the gate checks the rest of each attention's parameters."""
    state = ONE_HEAD.state_dict()
    assert not any("to_out" in key for key in state)
    model = ONE_HEAD.model("float32", fused=True)
    assert all(isinstance(block.attn.proj, torch.nn.Identity) for block in model.blocks)
    report = check_model(model, "float32", images=ONE_HEAD.images.float())
    assert report.passed, report.table()
    checked = {row.quantity for row in report.rows if row.part == "decoder 1"}
    assert {"grad 1.fn.qkv.weight", "grad 0.fn.weight"} <= checked
    assert not any("to_out" in quantity for quantity in checked)


def test_nothing_masked_has_no_loss_and_no_mask_token_gradient():
    """Mask ratio 0: every patch kept, so the mask token enters nowhere (its gradient is zero in the
    three implementations alike) and the release's loss is 0/0: no loss rows, pred and mask checked."""
    model = NOTHING_MASKED.model("float32", fused=True)
    report = check_model(model, "float32", images=NOTHING_MASKED.images.float())
    assert report.passed, report.table()
    rows = {(row.path, row.part, row.quantity): row.errors for row in report.rows}
    mask_token = rows["train", "embed", "grad mask_token"]
    assert mask_token.fast == mask_token.plain == mask_token.reference_max == 0.0
    assert not any(part == "loss" or quantity == "loss" for _, part, quantity in rows)
    assert ("train", "model", "pred") in rows and ("inference", "model", "mask") in rows
