"""Speed-ups of the flow layers that must not change what they compute.

Each fast path is checked against the plain formula it replaces, bit for bit where the
arithmetic is the same, and for independence of the dtype history, grad mode and inference
mode (the layers keep small derived constants between calls).
"""

from __future__ import annotations

import pytest
import torch

from pyro_flowvi.flows import IAF
from pyro_flowvi.flows.householder import reflect_rows
from pyro_flowvi.flows.made import MaskedLinear


def _masked_linear(weight_scale: float) -> MaskedLinear:
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) > 0.4
    layer = MaskedLinear(mask, weight_scale=weight_scale)
    with torch.no_grad():
        layer.weight.normal_()
    return layer


@pytest.mark.parametrize("weight_scale", [1.0, 1.0 / 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_linear_weight_is_the_masked_product(weight_scale, dtype):
    layer = _masked_linear(weight_scale).to(dtype)
    expected = (layer.weight * layer.mask) * weight_scale
    assert torch.equal(layer.effective_weight(), expected)


def test_masked_linear_weight_does_not_depend_on_the_dtype_history():
    # float64 -> float32 -> float64 gives what a float64 layer gives: the scaled mask is made
    # from the boolean mask in the weight's current dtype, not converted along.
    layer = _masked_linear(1.0 / 3.0).float()
    layer.effective_weight()
    layer.double()
    expected = (layer.weight * layer.mask) * (1.0 / 3.0)
    assert torch.equal(layer.effective_weight(), expected)


def test_masked_linear_follows_a_loaded_mask():
    layer = _masked_linear(1.0)
    layer.effective_weight()
    state = layer.state_dict()
    state["mask"] = ~state["mask"]
    layer.load_state_dict(state)
    assert torch.equal(layer.effective_weight(), layer.weight * layer.mask)


def test_iaf_trains_after_a_call_in_inference_mode():
    layer = IAF(4)
    x = torch.randn(3, 4)
    with torch.inference_mode():
        y_inference, _ = layer(x)
    y, ladj = layer(x)
    (y.sum() + ladj.sum()).backward()
    assert torch.equal(y.detach(), y_inference)
    assert layer.made.output_layer.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
def test_reflect_rows_matches_the_triangular_form(dtype, reverse):
    # The compact WY factor S is formed as gram * W; the former triu + diag form, bit for bit.
    vectors = torch.randn(3, 6, 7, dtype=dtype)
    x = torch.randn(3, 5, 7, dtype=dtype)
    gram = vectors @ vectors.transpose(-1, -2)
    s = gram.triu(1) + torch.diag_embed(0.5 * gram.diagonal(dim1=-2, dim2=-1))
    coefficients = x @ vectors.transpose(-1, -2)
    if reverse:
        solved = torch.linalg.solve_triangular(
            s.transpose(-1, -2), coefficients, upper=False, left=False
        )
    else:
        solved = torch.linalg.solve_triangular(s, coefficients, upper=True, left=False)
    assert torch.equal(reflect_rows(x, vectors, reverse), x - solved @ vectors)


def test_reflect_rows_trains_after_a_call_in_inference_mode():
    vectors = torch.randn(4, 5, dtype=torch.float32, requires_grad=True)
    x = torch.randn(2, 5, dtype=torch.float32)
    with torch.inference_mode():
        reflect_rows(x, vectors.detach())
    reflect_rows(x, vectors).sum().backward()
    assert vectors.grad is not None
