"""FSDP per data shard: the reduce-scatter of the FSDP gradients on torch_xla SPMD (torch only).

Used by :class:`torch_impl.data_parallel.FSDPModule` and the pipeline loop
(``torch_impl.pipeline_loop``), so that a sharded parameter's gradient is reduced with the
collectives JAX emits under ``shard_map`` (``gather_array_with_mean_grads`` + ``sync_gradients``):
one ``reduce-scatter`` over the FSDP axis, then an ``all-reduce`` of the slice over the other data
axes.

Why a per-shard view: in the global view a parameter's gradient is already the sum over the
batch, so the partitioner computes it with an ``all-reduce`` of the whole gradient and slices it
(XLA's CPU pipeline does not turn that into a reduce-scatter; JAX's own partitioner does the same
on CPU, measured). A reduce-scatter needs each data shard's PARTIAL gradient. Here the module
runs under ``torch.func.vmap`` over the data shards (the batch ``[B, ...]`` viewed as ``[D, B/D,
...]``, declared to the annotations inside with :func:`torch_impl.vmap_axes.vmapped_axis`, the
twin of JAX's per-device view) and takes each gathered parameter as one row per shard
``[D, *shape]`` (:func:`data_shard_rows`): the gradient of the rows holds the partials, and the
backward reduce-scatters them in a manual-sharding region (``torch_impl.xla``).

Example::

    rows = data_shard_rows(w, 4, (("dp", "fsdp"), None, None), mesh=mesh)  # w [F, O] on fsdp
    # forward: all-gather over fsdp, rows [4, F, O] (row d = data shard d's copy)
    # backward: reduce-scatter over fsdp + all-reduce over dp -> w.grad [F, O] sharded like w
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ringpar.partition_specs import axes_of

from . import mesh as _mesh
from . import vmap_axes, xla

__all__ = ["data_shard_rows", "batch_layout", "per_shard_call", "keep_batch_layout", "copy_cast"]

_BATCH_ATTR = "_ringpar_fsdp_batch"  # (data axes, batch dim) of a per_shard_call output


def copy_cast(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A new lazy tensor (so an annotation does not touch ``x``), cast to ``dtype`` if given."""
    return x.to(dtype) if dtype is not None and dtype != x.dtype else x * 1


def _spec_of(x: torch.Tensor, mesh) -> tuple | None:
    """``x``'s partition names read from its annotation (None if it has none over ``mesh``)."""
    from .linear_specs import get_sharding

    spec = get_sharding(x, mesh=mesh)
    return None if spec is None else tuple(spec)


class _GatherRows(torch.autograd.Function):
    """Forward: all-gather over the FSDP axis, then one copy per data shard ``[D, *shape]``
    (an expand: no communication). Backward: row d is data shard d's partial gradient; in a
    manual-sharding region each device reduce-scatters its row over the FSDP axis (JAX's
    ``psum_scatter``) and all-reduces the block over the other data axes (JAX's
    ``sync_gradients``), which leaves exactly the parameter's FSDP layout."""

    @staticmethod
    def forward(ctx, x, mesh, entry, shard, axis_name, gather_dt, scatter_dt):
        dim = shard.index(axis_name)
        full = shard[:dim] + (None,) + shard[dim + 1:]
        ctx.mesh, ctx.entry, ctx.shard, ctx.full, ctx.dim = mesh, entry, shard, full, dim
        ctx.axis_name, ctx.scatter_dt, ctx.param_dt = axis_name, scatter_dt, x.dtype
        ctx.shape = tuple(x.shape)
        rows = math.prod(_mesh.check_axis(mesh, a) for a in axes_of(entry))
        gathered = _mesh.mark_sharding(copy_cast(x, gather_dt), mesh, full)
        return vmap_axes.aot_constrain(gathered.unsqueeze(0).expand(rows, *x.shape), mesh,
                                       (entry,) + full)

    @staticmethod
    def backward(ctx, grad):
        mesh, spec = ctx.mesh, (ctx.entry,) + ctx.full
        g = vmap_axes.aot_constrain(copy_cast(grad, ctx.scatter_dt or ctx.param_dt), mesh, spec)
        local = xla.enable_manual_sharding(g, mesh, spec)  # [1, *block]: this shard's partial
        groups = _mesh.axis_groups(mesh, ctx.axis_name)
        local = xla.spmd_reduce_scatter(local, 1 + ctx.dim, groups)
        rest = [a for a in axes_of(ctx.entry)
                if a != ctx.axis_name and _mesh.check_axis(mesh, a) > 1]
        if rest:
            local = xla.spmd_all_reduce(local, _mesh.axis_groups(mesh, rest))
        out = xla.disable_manual_sharding(local.squeeze(0), mesh, ctx.shard, ctx.shape)
        return out.to(ctx.param_dt), None, None, None, None, None, None


def data_shard_rows(x: torch.Tensor, rows: int, spec: Sequence, *, mesh) -> torch.Tensor:
    """``x`` (a parameter) as one copy per data shard, ``[rows, *x.shape]`` sharded by ``spec``.

    ``spec[0]`` is the data axes the rows are sharded over. If ``x`` is annotated as sharded
    over one of them (FSDP), the rows come from an all-gather and their gradient goes back by a
    reduce-scatter over that axis and an all-reduce over the others (JAX's collectives);
    otherwise they are an expand, whose backward sum the partitioner turns into one all-reduce.
    """
    spec = tuple(spec)
    names = _spec_of(x, mesh)
    axes = [a for a in axes_of(spec[0])
            if names is not None and any(a in axes_of(e) for e in names)]
    if len(axes) != 1 or names.count(axes[0]) != 1:
        return vmap_axes.constrain_with_gradients(x.unsqueeze(0).expand(rows, *x.shape), mesh,
                                                  spec)
    return _GatherRows.apply(x, mesh, spec[0], names, axes[0], None, None)


def batch_layout(args: Sequence, kwargs: dict, axis_name: str, *, mesh):
    """``(entry, rows, batch dims)`` when every tensor argument is positional and its batch dim
    is sharded over ``axis_name`` (read from its annotation, or the output of a
    :func:`per_shard_call`), all over the same data axes ``entry`` (``rows`` shards; one dim per
    argument, None for non-tensors); else None (the caller stays in the global view)."""
    if pytree.tree_any(torch.is_tensor, kwargs):
        return None
    entry, dims = None, []
    for a in args:
        if not isinstance(a, torch.Tensor):
            if pytree.tree_any(torch.is_tensor, a):
                return None
            dims.append(None)
            continue
        spec = () if vmap_axes.is_traced(a) else (_spec_of(a, mesh) or ())
        found = [(i, e) for i, e in enumerate(spec) if axis_name in axes_of(e)]
        if getattr(a, _BATCH_ATTR, None) is not None:
            found = [getattr(a, _BATCH_ATTR)[::-1]]
        if len(found) != 1 or (entry is not None and axes_of(found[0][1]) != axes_of(entry)):
            return None
        dim, entry = found[0]
        dims.append(dim)
    if entry is None:
        return None
    return entry, math.prod(_mesh.check_axis(mesh, a) for a in axes_of(entry)), dims


def per_shard_call(module: nn.Module, fsdp_names: dict, axis_name: str, gather_dtype: Any,
                   grad_scatter_dtype: Any, args: Sequence, kwargs: dict, layout, *, mesh):
    """``module(*args, **kwargs)`` under ``vmap`` over the data shards of ``layout``
    (:func:`batch_layout`), its parameters named in ``fsdp_names`` gathered as rows."""
    entry, rows, dims = layout
    params, in_dims = {}, {}
    for k, p in module.named_parameters():
        if k in fsdp_names:
            p = _GatherRows.apply(p, mesh, entry, tuple(fsdp_names[k]), axis_name, gather_dtype,
                                  grad_scatter_dtype)
        params[k], in_dims[k] = p, (0 if k in fsdp_names else None)
    split = [a if d is None else a.unflatten(d, (rows, a.shape[d] // rows)).movedim(d, 0)
             for a, d in zip(args, dims)]

    def run(ps, *a):
        return torch.func.functional_call(module, ps, a, kwargs)

    arg_dims = tuple(None if d is None else 0 for d in dims)
    with vmap_axes.vmapped_axis(entry):
        out = torch.func.vmap(run, in_dims=(in_dims, *arg_dims))(params, *split)
    return pytree.tree_map(lambda o: _merge_rows(o, entry, rows, args, dims), out)


def _merge_rows(out, entry, rows: int, args: Sequence, dims: list):
    """``[rows, *per-shard shape]`` -> the global tensor (shards joined on the batch dim: that
    of an argument of the same rank, else the one dim of the per-shard batch size)."""
    if not isinstance(out, torch.Tensor):
        return out
    i = next(i for i, d in enumerate(dims) if d is not None)
    b = args[i].shape[dims[i]] // rows
    same = [d for a, d in zip(args, dims) if d is not None and a.dim() == out.dim() - 1]
    sizes = tuple(out.shape[1:])
    cands = same[:1] if same and sizes[same[0]] == b else [k for k, s in enumerate(sizes)
                                                          if s == b]
    if len(cands) != 1:
        raise RuntimeError(f"FSDP per data shard: cannot tell the batch dim (per-shard size {b}) "
                           f"of an output of per-shard shape {sizes}")
    k = cands[0]
    merged = out.movedim(0, k).flatten(k, k + 1)
    # The partitioner keeps the batch dim sharded through the reshape, but the result has no
    # annotation to read back: the next per-shard call finds the batch dim here.
    setattr(merged, _BATCH_ATTR, (entry, k))
    return merged


def keep_batch_layout(sources: Sequence, targets: Sequence) -> list:
    """``targets`` with the batch layout a :func:`per_shard_call` output carries copied over from
    the matching ``sources``. A checkpoint recomputes on detached copies of its inputs, which
    would send the FSDP module inside back to the global view."""
    out = list(targets)
    for s, t in zip(sources, out):
        layout = getattr(s, _BATCH_ATTR, None)
        if layout is not None and isinstance(t, torch.Tensor) and t is not s:
            setattr(t, _BATCH_ATTR, layout)
    return out
