"""Collective primitives of the tensor-parallel layers in the global "stacked" view (torch_xla).

Twin of :mod:`jax_impl.collectives`: the same public names in the same order, the same options
and defaults. Where the JAX function sees one device's value of shape ``S`` inside ``shard_map``,
the torch function sees the global tensor ``[n, *S]`` whose dim 0 (size n, the size of the mesh
axis ``axis_name``) is sharded over that axis: row j is device j's value. All other mesh axes
(data-parallel rows, ...) keep these tensors replicated, so every ring runs within each row, as
``ppermute`` over one axis does in JAX.

Because torch has no bound axis names, every function that needs the mesh takes it as the
keyword-only argument ``mesh`` (after the JAX arguments, so ``f(x, "tp", mesh=mesh)`` reads like
the JAX call ``f(x, "tp")``).

Communication (each checked against the compiled, partitioned HLO in the tests):

- ``ring_permute``: one ``collective-permute`` with the ring pairs forward, one with the inverse
  pairs backward (a custom ``autograd.Function``; autograd of the plain cat/narrow shift would
  emit three permutes in the backward).
- ``all_gather_features``: one ``all-gather`` forward, one ``reduce-scatter`` backward.
- ``reduce_scatter_features``: one ``reduce-scatter`` forward, one ``all-gather`` backward.

These are the ops JAX emits for ``ppermute`` / ``all_gather(tiled)`` / ``psum_scatter(tiled)`` and
their transposes, with the same ``source_target_pairs`` / ``replica_groups``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import mesh as _mesh

__all__ = ["ring_perm", "ring_permute", "axis_index", "all_gather_features",
           "reduce_scatter_features", "split_features", "axis_size"]


def axis_size(axis_name: str, *, mesh) -> int:
    """Size of ``axis_name`` in ``mesh``; ValueError if the mesh has no such axis."""
    return _mesh.check_axis(mesh, axis_name)


def _check_stacked(x: torch.Tensor, n: int, axis_name: str, argument: str = "x") -> None:
    _mesh.check_on_device(x, argument)
    if x.dim() < 1 or x.shape[0] != n:
        raise ValueError(f"{argument}.shape={tuple(x.shape)}: expected the stacked view [n, ...] "
                         f"with dim 0 of size n={n}, the size of axis {axis_name!r}")


def ring_perm(n: int, shift_up: bool = True) -> list[tuple[int, int]]:
    """Pairs ``(j, j+1 mod n)`` of a cyclic shift up, or ``(j+1 mod n, j)`` for a shift down.

    Shift up means device 0 sends to device 1 (device j receives from j-1); shift down means
    device 1 sends to device 0 (device j receives from j+1). Indices are positions along the axis.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive int ring size")
    if shift_up:
        return [(j, (j + 1) % n) for j in range(n)]
    return [((j + 1) % n, j) for j in range(n)]


def _shift(x: torch.Tensor, shift_up: bool, mesh, axis_name: str) -> torch.Tensor:
    """Cyclic shift of dim 0 by one (``out[j] = x[j-1]`` up, ``x[j+1]`` down), then re-shard.

    On a dim 0 sharded n ways, cat of two narrows compiles to exactly one collective-permute
    (``torch.roll`` would compile to all-to-all + all-gather).
    """
    n = x.shape[0]
    if shift_up:
        y = torch.cat([x.narrow(0, n - 1, 1), x.narrow(0, 0, n - 1)], 0)
    else:
        y = torch.cat([x.narrow(0, 1, n - 1), x.narrow(0, 0, 1)], 0)
    return _mesh.mark_stacked(y, mesh, axis_name)


class _RingShift(torch.autograd.Function):
    """Forward: one cyclic shift of dim 0; backward: the inverse shift (one permute each way)."""

    @staticmethod
    def forward(ctx, x, shift_up, mesh, axis_name):
        ctx.shift_up, ctx.mesh, ctx.axis_name = shift_up, mesh, axis_name
        return _shift(x, shift_up, mesh, axis_name)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, not ctx.shift_up, ctx.mesh, ctx.axis_name), None, None, None


def ring_permute(x: Any, axis_name: str, shift_up: bool = True, *, mesh) -> Any:
    """Cyclically shift every tensor leaf of ``x`` by one position over ``axis_name``.

    Args:
        x: A stacked-view tensor ``[n, ...]`` (dim 0 = devices of ``axis_name``) or a pytree
            (dict/list/tuple) of them.
        axis_name: The mesh axis of the ring (size n).
        shift_up: Device j receives the value of device j-1 (mod n), else of device j+1.
        mesh: The torch_xla mesh holding ``axis_name``.

    Returns:
        The shifted pytree (``out[j] = x[j-1]`` for shift up), dim 0 sharded over ``axis_name``.
        One ``collective-permute`` per leaf forward and one backward (the inverse pairs). On an
        axis of size 1 this is the identity (no collective).

    Raises:
        ValueError: if the mesh has no ``axis_name``, a leaf is not on the XLA device or its dim 0
            is not n.
    """
    n = axis_size(axis_name, mesh=mesh)
    leaves = pytree.tree_leaves(x)
    for i, leaf in enumerate(leaves):
        _check_stacked(leaf, n, axis_name, "x" if len(leaves) == 1 else f"x (leaf {i})")
    if n == 1:
        return x
    return pytree.tree_map(lambda t: _RingShift.apply(t, bool(shift_up), mesh, axis_name), x)


def axis_index(axis_name: str, *, mesh) -> torch.Tensor:
    """Each device's index along ``axis_name``: ``arange(n)`` (int32, shape ``[n]``, stacked view).

    Row j (device j's value) is j, so it broadcasts against stacked tensors as ``idx.view(n, 1,
    ...)``; ValueError if the mesh has no such axis.
    """
    n = axis_size(axis_name, mesh=mesh)
    idx = torch.arange(n, dtype=torch.int32, device=_mesh.xla_device())
    return _mesh.mark_stacked(idx, mesh, axis_name)


def _gather_last(x: torch.Tensor, mesh, axis_name: str) -> torch.Tensor:
    """``[n, *S, F]`` -> ``[n, *S, n*F]``: every row is the concat of all rows (features)."""
    n, feats = x.shape[0], x.shape[-1]
    rest = tuple(x.shape[1:-1])
    y = x.movedim(0, -2).reshape(*rest, n * feats)
    y = y.unsqueeze(0).expand(n, *rest, n * feats)
    return _mesh.mark_stacked(y, mesh, axis_name)


class _AllGatherFeatures(torch.autograd.Function):
    """Forward: all-gather along the features; backward: reduce-scatter (its transpose)."""

    @staticmethod
    def forward(ctx, x, mesh, axis_name):
        ctx.mesh, ctx.axis_name = mesh, axis_name
        return _gather_last(x, mesh, axis_name)

    @staticmethod
    def backward(ctx, grad):
        grad = _mesh.mark_stacked(grad, ctx.mesh, ctx.axis_name)
        out = _mesh.manual_reduce_scatter(grad, ctx.mesh, ctx.axis_name, grad.dim() - 1)
        return out, None, None


class _ReduceScatterFeatures(torch.autograd.Function):
    """Forward: reduce-scatter along the features; backward: all-gather (its transpose)."""

    @staticmethod
    def forward(ctx, x, mesh, axis_name):
        ctx.mesh, ctx.axis_name = mesh, axis_name
        x = _mesh.mark_stacked(x, mesh, axis_name)
        return _mesh.manual_reduce_scatter(x, mesh, axis_name, x.dim() - 1)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.mesh, ctx.axis_name), None, None


def all_gather_features(x: torch.Tensor, axis_name: str, *, mesh) -> torch.Tensor:
    """Concatenate the per-device ``x`` of all devices along the last axis, in device order.

    Stacked view: ``[n, ..., F]`` -> ``[n, ..., n*F]`` where every row ``d`` equals
    ``cat([x[0], ..., x[n-1]], -1)``. One ``all-gather`` forward, one ``reduce-scatter`` backward.
    Identity on an axis of size 1.
    """
    n = axis_size(axis_name, mesh=mesh)
    _check_stacked(x, n, axis_name)
    if x.dim() < 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected [n, ..., features] (rank >= 2)")
    if n == 1:
        return x
    return _AllGatherFeatures.apply(x, mesh, axis_name)


def reduce_scatter_features(x: torch.Tensor, axis_name: str, *, mesh) -> torch.Tensor:
    """Sum ``x`` over the devices of ``axis_name`` and keep each device's block of the last axis.

    Stacked view: ``[n, ..., F]`` -> ``[n, ..., F/n]`` with row j =
    ``sum_d x[d, ..., j*F/n:(j+1)*F/n]``. One ``reduce-scatter`` forward, one ``all-gather``
    backward. Raises ValueError if F is not divisible by n. Identity on an axis of size 1.
    """
    n = axis_size(axis_name, mesh=mesh)
    _check_stacked(x, n, axis_name)
    if x.dim() < 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected [n, ..., features] (rank >= 2)")
    if x.shape[-1] % n:
        raise ValueError(f"x.shape[-1]={x.shape[-1]}: expected the number of features to be "
                         f"divisible by the size {n} of axis {axis_name!r}")
    if n == 1:
        return x
    return _ReduceScatterFeatures.apply(x, mesh, axis_name)


def split_features(x: Any, num: int, argument: str = "x") -> list[Any]:
    """Split every tensor leaf of the pytree ``x`` into ``num`` equal parts along the last axis.

    Returns a list of ``num`` pytrees. Raises ValueError (naming ``argument``) if a leaf's last
    dimension is not divisible by ``num``. Needs no mesh: the last axis is never the device dim.
    """
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ValueError(f"num={num!r}: expected a positive int")
    leaves, spec = pytree.tree_flatten(x)
    for leaf in leaves:
        if leaf.shape[-1] % num:
            raise ValueError(f"{argument}.shape[-1]={leaf.shape[-1]}: expected the number of "
                             f"features to be divisible by {num}")
    parts = [torch.chunk(leaf, num, dim=-1) for leaf in leaves]
    return [pytree.tree_unflatten([p[k] for p in parts], spec) for k in range(num)]
