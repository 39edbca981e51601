"""torch_impl.mesh.sharded_batch: stacked-view activations keep their batch sharded.

On the mesh (dp, fsdp, pp, tp) = (2, 2, 1, 2), a TPDense gather -> scatter pair on a stacked
input ``[n, B, F]`` whose batch is sharded over (dp, fsdp). Outside the context the layers mark
their activations replicated over (dp, fsdp), so the partitioner all-gathers the batch; inside it
every all-gather / reduce-scatter runs over the tp rings only (as under JAX's shard_map), and the
numbers are the same up to summation order (measured: equal on one machine, 1.3e-6 absolute /
3.3e-5 relative on one element of the input gradient on another CPU, where the two partitionings
reduce in a different order; tolerance 1e-5 absolute, 1e-4 relative).
"""

import os

# torch_xla reads this once per process: see torch_impl.mesh.compiled_hlo
os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from parity import hlo  # noqa: E402
from torch_impl import mesh as M  # noqa: E402
from torch_impl import tensor_parallel as tp  # noqa: E402

B, F = 8, 4
DATA = ("dp", "fsdp")


@pytest.fixture(scope="module")
def mesh(xla_device):
    from torch_impl.configs import ParallelConfig

    return M.create_mesh(ParallelConfig(data_axis_size=2, fsdp_axis_size=2, model_axis_size=2))


def test_validation(mesh):
    with pytest.raises(ValueError, match="axes"):
        with M.sharded_batch(mesh, ("dp", "nope")):
            pass
    with pytest.raises(ValueError, match="dim=0"):
        with M.sharded_batch(mesh, DATA, dim=0):
            pass
    with pytest.raises(ValueError, match=r"axes=\(\)"):
        with M.sharded_batch(mesh, ()):
            pass


def test_activation_spec(mesh):
    assert M.activation_spec((2, B, F), mesh, "tp") == ("tp", None, None)  # no context
    with M.sharded_batch(mesh, DATA):
        assert M.activation_spec((2, B, F), mesh, "tp") == ("tp", DATA, None)
        assert M.activation_spec((B, F), mesh, None) == (DATA, None)  # summed over tp
        assert M.activation_spec((2, 3, F), mesh, "tp") == ("tp", None, None)  # 3 % 4
        assert M.activation_spec((2,), mesh, "tp") == ("tp",)
        with M.sharded_batch(mesh, "dp", dim=2):  # the innermost context wins
            assert M.activation_spec((2, 3, B), mesh, "tp") == ("tp", None, "dp")
    assert M.stacked_spec(3, "tp") == ("tp", None, None)  # parameters: unchanged


def _run(mesh, sharded: bool):
    dev = M.xla_device()
    torch.manual_seed(0)
    x0 = torch.randn(2, B, F)
    fc = tp.TPDense(F, 2 * F, "tp", tp_mode="gather", mesh=mesh, seed=1)
    proj = tp.TPDense(2 * F, 2 * F, "tp", tp_mode="scatter", mesh=mesh, seed=2)
    x = M.mark_sharding(x0.to(dev), mesh, ("tp", DATA, None)).requires_grad_(True)
    if sharded:
        with M.sharded_batch(mesh, DATA):
            y = proj(torch.tanh(fc(x)))
    else:
        y = proj(torch.tanh(fc(x)))
    loss = (y * y).sum()
    loss.backward()
    grads = [x.grad] + [p.grad for p in (*fc.parameters(), *proj.parameters())]
    text = M.compiled_hlo([loss, *grads])
    return [loss.detach().cpu()] + [g.cpu() for g in grads], text


def test_tp_layers_keep_the_batch_sharded(mesh):
    ref, text_plain = _run(mesh, sharded=False)
    got, text = _run(mesh, sharded=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    tp_groups = "{{0,1},{2,3},{4,5},{6,7}}"
    moved = [op for op in hlo.collectives(text) if op.kind in ("all-gather", "reduce-scatter")]
    assert moved and all(op.replica_groups == tp_groups for op in moved), moved
    # the fix is visible: without the context the batch is gathered over the data axes
    plain = [op for op in hlo.collectives(text_plain) if op.kind == "all-gather"]
    assert any(op.replica_groups != tp_groups for op in plain)
