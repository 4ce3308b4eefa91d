"""The precision rule as stated (docs/math.md §8.2): the bound 2·plain + 4u(1 + max|ref|) and the
errors it is applied to are max abs differences to the float64 reference; exact arithmetic, so exact
comparisons."""

import math

import torch

from crate.verify.rule import PRECISIONS, Errors, errors


def test_bound_is_twice_the_plain_error_plus_four_units_of_roundoff():
    u = PRECISIONS["bfloat16"][2]
    assert u == 2.0**-8
    e = Errors(fast=0.5, plain=0.25, reference_max=3.0, u=u)
    assert e.bound == 2 * 0.25 + 4 * u * (1 + 3.0)
    assert Errors(fast=e.bound, plain=0.25, reference_max=3.0, u=u).holds
    assert not Errors(fast=math.nextafter(e.bound, math.inf), plain=0.25, reference_max=3.0, u=u).holds
    assert not Errors(fast=math.nan, plain=0.25, reference_max=3.0, u=u).holds
    assert e.ratio == 2.0 and Errors(1.0, 0.0, 1.0, u).ratio == math.inf


def test_errors_are_max_abs_differences_to_the_reference():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]], dtype=torch.float64)
    fast = ref + torch.tensor([[0.0, 0.25], [-0.5, 0.0]], dtype=torch.float64)
    plain = ref + torch.tensor([[0.125, 0.0], [0.0, 0.0]], dtype=torch.float64)
    e = errors(fast.float(), plain.bfloat16(), ref, 2.0**-8)
    assert (e.fast, e.plain, e.reference_max) == (0.5, 0.125, 4.0)


def test_unit_roundoffs_are_half_an_ulp_of_one():
    """Of the tensors' dtype, or of the autocast dtype where one is set (TF32: a 10-bit mantissa)."""
    for name, (dtype, autocast_dtype, u) in PRECISIONS.items():
        eps = 2.0**-10 if name == "tf32" else torch.finfo(autocast_dtype or dtype).eps
        assert u == eps / 2, name
