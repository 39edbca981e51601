"""torch_impl.vmap_axes: stacked-view collectives run under a vmap that stands for a mesh axis.

Mesh (dp, fsdp, pp, tp) = (1, 1, 2, 4): a vmap over the pp stages of the tp all-gather / reduce-
scatter / ring permute gives the same numbers as applying them stage by stage, and compiles to
the collectives over the tp groups only (none over pp), forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from parity import hlo
from torch_impl import vmap_axes
from torch_impl.collectives import all_gather_features, reduce_scatter_features, ring_permute
from torch_impl.mesh import compiled_hlo, mark_sharding

TP_GROUPS = "{{0,1,2,3},{4,5,6,7}}"
OPS = {
    "gather": (lambda x, mesh: all_gather_features(x, "tp", mesh=mesh),
               ("all-gather", "reduce-scatter")),
    "scatter": (lambda x, mesh: reduce_scatter_features(x, "tp", mesh=mesh),
                ("reduce-scatter", "all-gather")),
    "ring": (lambda x, mesh: ring_permute(x, "tp", mesh=mesh),
             ("collective-permute", "collective-permute")),
}


def test_merged_dims():
    merged = vmap_axes._merged
    assert merged((2, 3, 4, 5, 6, 7), ("pp", None, "tp", None, None, None)) == (
        [6, 840], ["pp", "tp"])
    assert merged((2, 3, 4), (None, None, "tp")) == ([6, 4], [None, "tp"])
    keep = vmap_axes._KEEP
    assert merged((2, 3, 4, 5), ("pp", None, keep, None)) == ([6, 4, 5], ["pp", keep, None])


@pytest.mark.parametrize("which", list(OPS))
def test_collective_under_a_pp_vmap(make_torch_mesh, xla_device, which):
    mesh = make_torch_mesh(pipeline_axis_size=2, model_axis_size=4)
    op, (fwd, bwd) = OPS[which]
    x_cpu = torch.randn(2, 4, 3, 8)
    x = mark_sharding(x_cpu.to(xla_device), mesh, ("pp", "tp", None, None)).requires_grad_()
    with vmap_axes.vmapped_axis("pp"):
        y = torch.func.vmap(lambda h: op(h, mesh))(x)
    (y * y).sum().backward()
    text = compiled_hlo([y, x.grad])
    # stage by stage (no vmap) on CPU copies of the XLA results: the same numbers
    ref_x = x_cpu.to(xla_device).requires_grad_()
    ref_y = torch.stack([op(mark_sharding(ref_x[s], mesh, ("tp", None, None)), mesh)
                         for s in range(2)])
    (ref_y * ref_y).sum().backward()
    torch.testing.assert_close(y.cpu(), ref_y.cpu(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu(), ref_x.grad.cpu(), rtol=1e-6, atol=1e-6)
    ops = hlo.collectives(text)
    kinds = {op.kind for op in ops}
    assert kinds == {fwd, bwd}
    for c in ops:  # every collective stays within a tp ring: nothing crosses pp
        groups = c.replica_groups or TP_GROUPS
        assert groups == TP_GROUPS, c
        assert all(a // 4 == b // 4 for a, b in c.pairs), c


def test_undeclared_vmap_raises(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(pipeline_axis_size=2, model_axis_size=4)
    x = mark_sharding(torch.zeros(2, 4, 8).to(xla_device), mesh, ("pp", "tp", None))
    with pytest.raises(RuntimeError, match="vmapped_axis"):
        torch.func.vmap(lambda h: mark_sharding(h * 2, mesh, ("tp", None)))(x)
