"""torch_impl.pipeline_circular on 8 CPU devices (torch_xla SPMD): the circular pipeline equals
running its r*p layers sequentially, r = 1 equals GPipe, dropout draws a fresh mask per step,
errors.

Meshes are (dp, fsdp, pp, tp) = (8/p, 1, p, 1). Measured (fp32, this machine): outputs and
gradients match the sequential layers to <= 2.2e-6 relative; the tests allow 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torch_impl.mesh import mark_sharding
from torch_impl.pipeline_circular import CircularPipelineModule
from torch_impl.pipeline_parallel import PipelineModule

F = 4
B_LOCAL = 2
RTOL = 1e-5
BATCH = ("dp", "fsdp")
CASES = [(p, r, p) for p in (2, 4, 8) for r in (2, 4)]  # m > p: tests/jax, tests/parity


class Dense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(F, F) / F ** 0.5)
        self.bias = torch.nn.Parameter(torch.randn(F) * 0.5)

    def forward(self, x):
        return x @ self.kernel + self.bias


class Stage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.Dense_0 = Dense()

    def forward(self, x):
        return torch.tanh(self.Dense_0(x))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _key(k: int, leaf: str) -> str:
    return f"RepeatedStage_0.repeats_{k}.sharded.Dense_0.{leaf}"


def _setup(make_torch_mesh, xla_device, p, m, r, loop="scan"):
    mesh = make_torch_mesh(pipeline_axis_size=p)
    torch.manual_seed(0)
    model = CircularPipelineModule("pp", m, Stage, mesh=mesh, num_pipeline_repeats=r, loop=loop)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.stage.shard_()
    x = torch.randn(8 // p * m * B_LOCAL, F)
    xx = mark_sharding(x.to(xla_device), mesh, (BATCH, None)).requires_grad_()
    return mesh, model, weights, x, xx


@pytest.mark.parametrize("p,r,m", CASES, ids=[f"p{p}-r{r}-m{m}" for p, r, m in CASES])
def test_circular_equals_sequential_layers(make_torch_mesh, xla_device, p, r, m):
    mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m, r)
    w_out = torch.randn(x.shape)
    y = model(xx)
    (y * w_out.to(xla_device)).sum().backward()

    ref = {k: v.clone().requires_grad_() for k, v in weights.items()}
    rx = x.clone().requires_grad_()
    h = rx
    for layer in range(r * p):  # layer k*p + d is row d of repeat k
        k, d = divmod(layer, p)
        h = torch.tanh(h @ ref[_key(k, "kernel")][d] + ref[_key(k, "bias")][d])
    (h * w_out).sum().backward()

    assert _rel(y.detach().cpu(), h.detach()) < RTOL
    assert _rel(xx.grad.cpu(), rx.grad) < RTOL
    for name, prm in model.named_parameters():
        assert _rel(prm.grad.cpu(), ref[name].grad) < RTOL, name


def test_one_repeat_equals_gpipe(make_torch_mesh, xla_device):
    p, m = 4, 5
    mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m, 1)
    gpipe = PipelineModule("pp", m, Stage, mesh=mesh)
    gpipe.load_state_dict({k.replace("RepeatedStage_0.repeats_0", "ModelParallelismWrapper_0"): v
                           for k, v in weights.items()})
    gpipe.stage.shard_()
    np.testing.assert_array_equal(model(xx).detach().cpu().numpy(),
                                  gpipe(xx).detach().cpu().numpy())


def _dropout_outputs(make_torch_mesh, xla_device, loop, r=1):
    p, m = 2, 4
    mesh = make_torch_mesh(pipeline_axis_size=p)
    model = CircularPipelineModule("pp", m, lambda: torch.nn.Dropout(0.5), mesh=mesh,
                                   num_pipeline_repeats=r, loop=loop).train()
    x = mark_sharding(torch.ones(8 // p * m * 8, F, device=xla_device), mesh, (BATCH, None))
    y = model(x).cpu().numpy().reshape(8 // p, m, 8, F)
    assert set(np.unique(y)) <= {0.0, 2.0 ** (p * r)}  # p*r layers of p=0.5 dropout
    return y


@pytest.mark.parametrize("loop", ["scan", "unrolled"])
def test_dropout_mask_differs_per_step_and_shard(make_torch_mesh, xla_device, loop):
    y = _dropout_outputs(make_torch_mesh, xla_device, loop)
    blocks = [y[d, i] for d in range(y.shape[0]) for i in range(y.shape[1])]
    # Every (data shard, micro-batch) block has its own mask: 32 values of 1/4 keep probability.
    assert len({blk.tobytes() for blk in blocks}) == len(blocks)
    assert 0.1 < float(np.mean(y > 0)) < 0.4


def test_repeats_need_enough_microbatches(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(pipeline_axis_size=4)
    with pytest.raises(ValueError, match=r"num_microbatches=2 < num_stages=4"):
        CircularPipelineModule("pp", 2, Stage, mesh=mesh, num_pipeline_repeats=2)


def test_scan_body_is_traced_once_and_reads_current_values(make_torch_mesh, xla_device):
    """The scan's loop body is built once per module and reused (``pipeline_loop.cached_body``):
    later calls neither re-trace it nor compile again, and still read the current parameters
    and inputs (nothing frozen at the first trace: equal to the unrolled loop after updates).
    A forward under ``no_grad`` first must not leave a body without input gradients (torch_xla's
    scan cache keys on shapes only; the GPipe parity cases lost their input gradient so).
    Checked to fail: with the body closing over ``x`` (as first written), call 1 compiled again
    (the first step's graph had x as an extra output); without grad mode in the body's key, the
    input gradient was wrong (relative error 1.0)."""
    from torch_impl import xla

    p, m, r = 2, 4, 1  # r = 1: the micro-batches enter as scan inputs, which need gradients
    mesh, model, weights, x, xx = _setup(make_torch_mesh, xla_device, p, m, r)
    with torch.no_grad():
        model(xx)
    unrolled = CircularPipelineModule("pp", m, Stage, mesh=mesh, num_pipeline_repeats=r,
                                      loop="unrolled")
    unrolled.load_state_dict(weights)
    unrolled.stage.shard_()
    compiles = []
    for call in range(3):
        ys = []
        for net in (model, unrolled):
            xx.grad = None
            net.zero_grad(set_to_none=True)
            xla.sync()
            before = xla.compile_count()
            y = net(xx * (1.5 + call))  # a new input value every call (never 0 or 1: torch_xla
            # bakes those scalars into the graph)
            (y * y).sum().backward()
            xla.sync()
            if net is model:
                compiles.append(xla.compile_count() - before)
            ys.append([y.detach().cpu(), xx.grad.cpu()] + [q.grad.cpu() for q in net.parameters()])
        for a, b in zip(*ys):
            assert _rel(a, b) < RTOL
        with torch.no_grad():  # an optimizer-like update between calls
            for net in (model, unrolled):
                for q in net.parameters():
                    q.mul_(0.9).add_(0.01)
    assert compiles[0] >= 1 and compiles[1:] == [0, 0], compiles
    assert float(xx.grad.abs().max()) > 0
    assert len(model.stage.__dict__["_ringpar_loop_bodies"]) == 2  # with and without grad
