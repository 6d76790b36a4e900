"""Speed-ups of the flow layers that must not change what they compute.

Each fast path is checked against the plain formula it replaces, bit for bit where the
arithmetic is the same, and for independence of the dtype history, grad mode and inference
mode (the layers keep small derived constants between calls).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pyro.optim.clipped_adam import ClippedAdam

from pyro_flowvi.flows import IAF, ElementwiseAffine
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


def test_elementwise_affine_learns_location_and_scale_as_one_parameter():
    layer = ElementwiseAffine(3, loc=torch.tensor([0.5, -1.0, 2.0]), scale=0.3)
    assert [name for name, _ in layer.named_parameters()] == ["loc_raw_scale"]
    torch.testing.assert_close(layer.loc, torch.tensor([0.5, -1.0, 2.0]))
    loc, scale = layer.loc_scale()
    assert torch.equal(loc, layer.loc)
    torch.testing.assert_close(scale, torch.full((3,), 0.3))
    fixed = ElementwiseAffine(3, scale=0.3, learn_loc=False)
    assert [name for name, _ in fixed.named_parameters()] == ["raw_scale"]
    assert [name for name, _ in fixed.named_buffers()] == ["loc"]


def test_elementwise_affine_loads_a_state_with_two_parameters():
    # The state of a layer saved when loc and raw_scale were separate parameters.
    layer = ElementwiseAffine(3)
    loc, raw = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-0.5, 0.0, 0.5])
    layer.load_state_dict({"loc": loc, "raw_scale": raw})
    assert torch.equal(layer.loc, loc) and torch.equal(layer.raw_scale, raw)
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({"loc": loc})


@pytest.mark.parametrize(
    ("optimizer", "options"),
    [(torch.optim.Adam, {"lr": 0.05}), (ClippedAdam, {"lr": 0.05, "clip_norm": 0.1})],
    ids=["adam", "clipped"],
)
def test_elementwise_affine_joint_parameter_trains_as_two(optimizer, options):
    # Elementwise optimizers update the joint (2, D) parameter as they would update the
    # location and the raw scale as two tensors: bit for bit with Pyro's ClippedAdam (fit's
    # optimizer; it clips elementwise), to rounding with torch's Adam (its multi-tensor
    # kernels group the elements otherwise).
    torch.manual_seed(0)
    layer = ElementwiseAffine(4, loc=torch.randn(4), scale=torch.rand(4) + 0.5)
    loc = layer.loc.detach().clone().requires_grad_()
    raw = layer.raw_scale.detach().clone().requires_grad_()
    joint_opt = optimizer([layer.loc_raw_scale], **options)
    split_opt = optimizer([loc, raw], **options)
    x = torch.randn(16, 4)
    for _ in range(5):
        for optimizer, (y, ladj) in (
            (joint_opt, layer(x)),
            (split_opt, (loc + F.softplus(raw) * x, F.softplus(raw).log().sum(-1).expand(16))),
        ):
            optimizer.zero_grad()
            ((y**3).sum() - ladj.sum()).backward()
            optimizer.step()
    if optimizer is ClippedAdam:
        assert torch.equal(layer.loc, loc) and torch.equal(layer.raw_scale, raw)
    torch.testing.assert_close(layer.loc, loc, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(layer.raw_scale, raw, rtol=1e-12, atol=1e-14)
