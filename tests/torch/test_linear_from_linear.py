"""torch_impl.linear without and from nn.Linear: ``from_linear`` (exact weights, its own
copies, the parallel classes, bf16 and its errors), the no-parallel-config path that is a plain
linear layer, and seeding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_impl import mesh as M
from torch_impl.linear import (ColumnParallelLinear, ParallelLinear, RowParallelLinear,
                               TensorParallelConfig)
from tests.linear_cases import FP32_RTOL, IN, OUT
from tests.torch.linear_helpers import MM, input_spec, rel_err


# ------------------------------------------------------------------------------ from_linear
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_without_config_is_nn_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(IN, 24, bias=bias)
    ours = ParallelLinear.from_linear(lin)
    assert not ours.is_parallel
    assert torch.equal(ours.kernel, lin.weight.detach().t())  # exactly, no rounding
    assert (ours.bias is None) == (not bias)
    if bias:
        assert torch.equal(ours.bias, lin.bias.detach())
    # its own copies: changing the layer does not change the nn.Linear
    with torch.no_grad():
        ours.kernel.add_(1.0)
    assert not torch.equal(ours.kernel, lin.weight.detach().t())
    ours = ParallelLinear.from_linear(lin)
    for shape in ((IN,), (5, IN), (2, 3, IN)):
        # not bitwise: the GEMM sums in another order for the transposed layout (measured max
        # abs difference 3.6e-7 on outputs of size ~1)
        x = torch.randn(shape)
        y, y_ref = ours(x), lin(x)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
        assert rel_err(y, y_ref) <= 1e-6
    x = torch.randn(4, IN)
    torch.sin(ours(x)).sum().backward()
    torch.sin(lin(x)).sum().backward()
    assert torch.allclose(ours.kernel.grad, lin.weight.grad.t(), rtol=1e-6, atol=1e-7)
    scaled = ParallelLinear.from_linear(lin, scale=0.5)
    assert torch.allclose(scaled(x), 0.5 * (x @ lin.weight.t()) + (lin.bias if bias else 0),
                          rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,method,rs", [
    (ColumnParallelLinear, MM.ALL_GATHER, False),
    (RowParallelLinear, MM.REDUCE_SCATTER_BIDIRECTIONAL, True),
    (ParallelLinear, MM.PLAIN, False),
])
def test_from_linear_parallel(make_torch_mesh, cls, method, rs):
    mesh = make_torch_mesh(model_axis_size=4)
    torch.manual_seed(1)
    lin = nn.Linear(IN, OUT)
    cfg = TensorParallelConfig(mesh=mesh, matmul_method=method, reduce_scatter_output=rs)
    layer = cls.from_linear(lin, cfg)
    assert type(layer) is cls and layer.is_parallel
    assert torch.equal(layer.kernel.cpu(), lin.weight.detach().t())
    assert torch.equal(layer.bias.cpu(), lin.bias.detach())
    assert lin.weight.device.type == "cpu"  # the source layer is untouched
    x_cpu = torch.randn(3, IN)
    x = M.mark_sharding(x_cpu.to(M.xla_device()), mesh, input_spec(layer, 2))
    assert rel_err(layer(x), lin(x_cpu)) <= FP32_RTOL


def test_from_linear_bf16_and_errors(make_torch_mesh):
    lin = nn.Linear(IN, 8, dtype=torch.bfloat16)
    ours = RowParallelLinear.from_linear(lin)
    assert ours.kernel.dtype == torch.bfloat16 and torch.equal(ours.kernel, lin.weight.t())
    with pytest.raises(ValueError, match=r"linear=Conv1d: expected a torch.nn.Linear"):
        ParallelLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"from_linear got \['in_features'\]: set by linear"):
        ParallelLinear.from_linear(lin, in_features=4)
    with pytest.raises(ValueError, match=r"from_linear got \['bogus'\]: not a constructor"):
        ParallelLinear.from_linear(lin, bogus=1)
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=8))
    with pytest.raises(ValueError, match=r"in_features=12: expected a multiple of the 'tp' axis"):
        RowParallelLinear.from_linear(nn.Linear(12, 8), cfg)


# ------------------------------------------------------------------ no parallel config: nn.Linear
@pytest.mark.parametrize("config", [None, TensorParallelConfig()], ids=["none", "inactive"])
def test_no_parallel_config_is_plain_linear(config):
    ours = ParallelLinear(IN, 24, parallel_config=config, seed=3)
    assert not ours.is_parallel and ours.kernel.device.type == "cpu"
    assert set(ours.state_dict()) == {"kernel", "bias"}
    assert torch.equal(ours.bias, torch.zeros(24))
    # lecun_normal: truncated normal with variance 1/fan_in
    assert abs(ours.kernel.std().item() - IN ** -0.5) < 0.05
    lin = nn.Linear(IN, 24)
    with torch.no_grad():
        lin.weight.copy_(ours.kernel.t())
        lin.bias.normal_()
        ours.bias.copy_(lin.bias)
    x = torch.randn(5, IN)
    assert rel_err(ours(x), lin(x)) <= 1e-6
    bf = ParallelLinear(IN, 24, dtype=torch.bfloat16, parallel_config=config)
    assert bf(x).dtype == torch.bfloat16 and bf.kernel.dtype == torch.float32


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = ParallelLinear(IN, 8)
    torch.manual_seed(5)
    b = ParallelLinear(IN, 8)
    assert torch.equal(a.kernel, b.kernel)
    assert not torch.equal(ParallelLinear(IN, 8, seed=1).kernel,
                           ParallelLinear(IN, 8, seed=2).kernel)
