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

Conjugate pairs (in the style of Megatron-LM's ``mappings.py``: one ``autograd.Function`` per
pair, named by its forward, whose ``backward`` is the transpose; each checked against the
compiled, partitioned HLO in the tests). Every collective of the torch layers is one of these;
no other module open-codes a cross-device sum:

=========================  =====================================  ===============================
function (Function)        forward                                backward
=========================  =====================================  ===============================
``ring_permute``           one ``collective-permute`` (ring)      one permute, inverse pairs
(``_RingShift``)
``all_gather_features``    one ``all-gather`` (last dim)          one ``reduce-scatter``
(``_AllGatherFeatures``)
``reduce_scatter_features``  one ``reduce-scatter`` (last dim)    one ``all-gather``
(``_ReduceScatterFeatures``)
``copy_to_axis``           none (replicated -> stacked rows)      one ``all-reduce``
(``_CopyToAxis``)
``reduce_from_axis``       one ``all-reduce`` (stacked ->         none (broadcast)
(``_ReduceFromAxis``)      replicated)
``max_from_axis``          one ``all-reduce(max)``, no gradient   --
=========================  =====================================  ===============================

These are the ops JAX emits for ``ppermute`` / ``all_gather(tiled)`` / ``psum_scatter(tiled)`` /
the implicit psum of a replicated input's cotangent / ``psum`` / ``pmax`` and their transposes,
with the same ``source_target_pairs`` / ``replica_groups`` (``docs/design.md``, "Matching a
collective across backends"). The pipeline's ring between stages is ``ring_permute`` too (with
``spec`` keeping the data-parallel dims sharded).

Batch sharding: inside :func:`torch_impl.mesh.sharded_batch` (the GPT sets it), the activations
these functions mark keep their batch dim sharded over the data axes
(:func:`torch_impl.mesh.mark_activation`), so no collective runs over the data axes; the specs
are fixed in the forward and reused by the backward. Outside it, every other axis replicates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ringpar.rings import ring_perm  # noqa: F401  (re-export: one definition)

from . import mesh as _mesh
from . import vmap_axes

__all__ = ["ring_perm", "ring_permute", "axis_index", "all_gather_features",
           "reduce_scatter_features", "copy_to_axis", "reduce_from_axis", "max_from_axis",
           "split_features", "axis_size"]


def axis_size(axis_name: str, *, mesh) -> int:
    """Size of ``axis_name`` in ``mesh``; ValueError if the mesh has no such axis."""
    return _mesh.check_axis(mesh, axis_name)


def _check_stacked(x: torch.Tensor, n: int, axis_name: str, argument: str = "x") -> None:
    _mesh.check_on_device(x, argument)
    if x.dim() < 1 or x.shape[0] != n:
        raise ValueError(f"{argument}.shape={tuple(x.shape)}: expected the stacked view [n, ...] "
                         f"with dim 0 of size n={n}, the size of axis {axis_name!r}")


def _shift(x: torch.Tensor, shift_up: bool, mesh, spec: tuple) -> torch.Tensor:
    """Cyclic shift of dim 0 by one (``out[j] = x[j-1]`` up, ``x[j+1]`` down), re-sharded by spec.

    On a dim 0 sharded n ways, cat of two narrows compiles to exactly one collective-permute
    (``torch.roll`` would compile to all-to-all + all-gather). The constraint is the traceable
    one, so the same shift runs inside ``torch_impl.xla.scan`` (the pipeline loop).
    """
    n = x.shape[0]
    if shift_up:
        y = torch.cat([x.narrow(0, n - 1, 1), x.narrow(0, 0, n - 1)], 0)
    else:
        y = torch.cat([x.narrow(0, 1, n - 1), x.narrow(0, 0, 1)], 0)
    return vmap_axes.aot_constrain(y, mesh, spec)


# The Functions below also run inside the pipeline's vmaps (torch_impl.vmap_axes):
# generate_vmap_rule needs the setup_context form; the backward re-declares the forward's vmaps.
class _RingShift(torch.autograd.Function):
    """Forward: one cyclic shift of dim 0; backward: the inverse shift (one permute each way)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, shift_up, mesh, spec):
        return _shift(x, shift_up, mesh, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.shift_up, ctx.mesh, ctx.spec = inputs
        ctx.vmap_axes = vmap_axes.current()

    @staticmethod
    def backward(ctx, grad):
        with vmap_axes.restored(ctx.vmap_axes):
            return _shift(grad, not ctx.shift_up, ctx.mesh, ctx.spec), None, None, None


def _leaf_spec(leaf: torch.Tensor, axis_name: str, spec, mesh) -> tuple:
    if spec is None:
        return _mesh.activation_spec(tuple(leaf.shape), mesh, axis_name)
    spec = tuple(spec)
    if len(spec) != leaf.dim() or spec[0] != axis_name:
        raise ValueError(f"spec={spec!r}: expected {leaf.dim()} entries (the rank of x) starting "
                         f"with axis_name={axis_name!r}")
    return spec


def ring_permute(x: Any, axis_name: str, shift_up: bool = True, *, mesh, spec=None) -> Any:
    """Cyclically shift every tensor leaf of ``x`` by one position over ``axis_name``.

    Args:
        x: A stacked-view tensor ``[n, ...]`` (dim 0 = devices of ``axis_name``) or a pytree
            (dict/list/tuple) of them.
        axis_name: The mesh axis of the ring (size n).
        shift_up: Device j receives the value of device j-1 (mod n), else of device j+1.
        mesh: The torch_xla mesh holding ``axis_name``.
        spec: The sharding of each shifted leaf (torch only; default: dim 0 over ``axis_name``,
            all else replicated but the batch inside ``mesh.sharded_batch``). The pipeline
            passes ``(pp, data axes, None, ...)`` so the data-parallel batch stays sharded
            through the ring.

    Returns:
        The shifted pytree (``out[j] = x[j-1]`` for shift up), sharded by ``spec``.
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
    return pytree.tree_map(lambda t: _RingShift.apply(
        t, bool(shift_up), mesh, _leaf_spec(t, axis_name, spec, mesh)), x)


def axis_index(axis_name: str, *, mesh) -> torch.Tensor:
    """Each device's index along ``axis_name``: ``arange(n)`` (int32, shape ``[n]``, stacked view).

    Row j (device j's value) is j, so it broadcasts against stacked tensors as ``idx.view(n, 1,
    ...)``; ValueError if the mesh has no such axis.
    """
    n = axis_size(axis_name, mesh=mesh)
    idx = torch.arange(n, dtype=torch.int32, device=_mesh.xla_device())
    return _mesh.mark_stacked(idx, mesh, axis_name)


def _gather_last(x: torch.Tensor, mesh, axis_name: str, spec: tuple) -> torch.Tensor:
    """``[n, *S, F]`` -> ``[n, *S, n*F]``: every row is the concat of all rows (features)."""
    n, feats = x.shape[0], x.shape[-1]
    rest = tuple(x.shape[1:-1])
    y = x.movedim(0, -2).reshape(*rest, n * feats)
    y = y.unsqueeze(0).expand(n, *rest, n * feats)
    return _mesh.mark_sharding(y, mesh, spec)


class _AllGatherFeatures(torch.autograd.Function):
    """Forward: all-gather along the features; backward: reduce-scatter (its transpose).

    ``spec`` (input, output and gradients alike: the feature dim is never sharded) is fixed by
    the caller in the forward, so the backward keeps the forward's batch sharding."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mesh, axis_name, spec):
        return _gather_last(x, mesh, axis_name, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.mesh, ctx.axis_name, ctx.spec = inputs
        ctx.vmap_axes = vmap_axes.current()

    @staticmethod
    def backward(ctx, grad):
        with vmap_axes.restored(ctx.vmap_axes):
            grad = _mesh.mark_sharding(grad, ctx.mesh, ctx.spec)
            out = _mesh.manual_reduce_scatter(grad, ctx.mesh, ctx.axis_name, grad.dim() - 1,
                                              ctx.spec)
        return out, None, None, None


class _ReduceScatterFeatures(torch.autograd.Function):
    """Forward: reduce-scatter along the features; backward: all-gather (its transpose)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, mesh, axis_name, spec):
        x = _mesh.mark_sharding(x, mesh, spec)
        return _mesh.manual_reduce_scatter(x, mesh, axis_name, x.dim() - 1, spec)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.mesh, ctx.axis_name, ctx.spec = inputs
        ctx.vmap_axes = vmap_axes.current()

    @staticmethod
    def backward(ctx, grad):
        with vmap_axes.restored(ctx.vmap_axes):
            return _gather_last(grad, ctx.mesh, ctx.axis_name, ctx.spec), None, None, None


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
    spec = _mesh.activation_spec(tuple(x.shape), mesh, axis_name)
    return _AllGatherFeatures.apply(x, mesh, axis_name, spec)


def reduce_scatter_features(x: torch.Tensor, axis_name: str, dim: int = -1, *,
                            mesh) -> torch.Tensor:
    """Sum ``x`` over the devices of ``axis_name`` and keep each device's block of axis ``dim``.

    Stacked view: ``[n, ..., F]`` -> ``[n, ..., F/n]`` with row j =
    ``sum_d x[d, ..., j*F/n:(j+1)*F/n]`` (``dim=-1``, the default). ``dim`` counts the
    per-device dims, as in JAX: dim 0 is the first dim after the stacked device dim. One
    ``reduce-scatter`` forward, one ``all-gather`` backward. Raises ValueError if the size of
    ``dim`` is not divisible by n. Identity on an axis of size 1.
    """
    n = axis_size(axis_name, mesh=mesh)
    _check_stacked(x, n, axis_name)
    if x.dim() < 2:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected [n, ..., features] (rank >= 2)")
    rank = x.dim() - 1
    if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank:
        raise ValueError(f"dim={dim!r}: expected an int in [-{rank}, {rank}) for the per-device "
                         f"rank {rank}")
    d = 1 + dim % rank  # the dim in the stacked view
    if x.shape[d] % n:
        shown = dim if dim < 0 else d  # the index into the stacked x, as the user wrote it
        raise ValueError(f"x.shape[{shown}]={x.shape[d]}: expected the number of features to be "
                         f"divisible by the size {n} of axis {axis_name!r}")
    if n == 1:
        return x
    if d == x.dim() - 1:
        spec = _mesh.activation_spec(tuple(x.shape), mesh, axis_name)
        return _ReduceScatterFeatures.apply(x, mesh, axis_name, spec)
    moved = x.movedim(d, -1)
    spec = _mesh.activation_spec(tuple(moved.shape), mesh, axis_name)
    moved = _mesh.mark_sharding(moved, mesh, spec)
    return _ReduceScatterFeatures.apply(moved, mesh, axis_name, spec).movedim(-1, d)


def _sum_rows(x: torch.Tensor, mesh, axis_name: str, activation: bool = False) -> torch.Tensor:
    """Stacked ``[n, *S]`` -> replicated ``S``: the sum over the devices (one all-reduce).

    ``activation``: keep the batch sharded (:func:`torch_impl.mesh.mark_activation`); parameter
    gradients (``copy_to_axis``) have no batch dim."""
    if not activation:
        y = _mesh.mark_stacked(x, mesh, axis_name).sum(0)
        return _mesh.mark_sharding(y, mesh, (None,) * y.dim())
    y = _mesh.mark_activation(x, mesh, axis_name).sum(0)
    return _mesh.mark_activation(y, mesh, None)


def _broadcast_rows(x: torch.Tensor, n: int, mesh, axis_name: str) -> torch.Tensor:
    """Replicated ``S`` -> stacked ``[n, *S]``, every row ``x`` (an expand: no copy, no comm)."""
    return _mesh.mark_stacked(x.unsqueeze(0).expand(n, *x.shape), mesh, axis_name)


class _CopyToAxis(torch.autograd.Function):
    """Forward: replicated -> one copy per device (no comm); backward: all-reduce (the sum).

    The gradients of ALL leaves are flattened into one ``[n, K]`` tensor and summed at once: ONE
    all-reduce, as XLA combines JAX's per-parameter psums under ``shard_map`` into one (torch_xla's
    pipeline does not combine them).
    """

    generate_vmap_rule = True  # runs inside torch_impl.data_parallel's vmap over data shards

    @staticmethod
    def forward(n, mesh, axis_name, *leaves):
        return tuple(_broadcast_rows(t, n, mesh, axis_name) for t in leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n, ctx.mesh, ctx.axis_name = inputs[:3]
        ctx.shapes = [tuple(t.shape) for t in inputs[3:]]
        ctx.vmap_axes = vmap_axes.current()

    @staticmethod
    def backward(ctx, *grads):
        with vmap_axes.restored(ctx.vmap_axes):
            flat = torch.cat([g.reshape(ctx.n, -1) for g in grads], 1)
            flat = _sum_rows(flat, ctx.mesh, ctx.axis_name)
        sizes = [math.prod(s) for s in ctx.shapes]
        out = [g.reshape(s) for g, s in zip(torch.split(flat, sizes), ctx.shapes)]
        return (None, None, None, *out)


class _ReduceFromAxis(torch.autograd.Function):
    """Forward: all-reduce (sum over the devices); backward: broadcast to every device (no comm)."""

    generate_vmap_rule = True  # runs inside torch_impl.data_parallel's vmap over data shards

    @staticmethod
    def forward(x, mesh, axis_name):
        return _sum_rows(x, mesh, axis_name, activation=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.n = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, grad):
        # the plain expand autograd would give for ``sum(0)``: the partitioner keeps it local
        return grad.unsqueeze(0).expand(ctx.n, *grad.shape), None, None


def copy_to_axis(x: Any, axis_name: str, *, mesh) -> Any:
    """Use replicated values on every device of ``axis_name``; their gradients are summed.

    Stacked view: each replicated leaf ``S`` of the pytree ``x`` -> ``[n, *S]`` with every row
    equal (an expand: no communication); the backward sums the row gradients of all leaves in ONE
    ``all-reduce``. JAX twin: the identity, whose cotangent ``shard_map`` psums for a replicated
    input. Megatron: ``copy_to_tensor_model_parallel_region``. Example::

        w_rows = copy_to_axis(w, "tp", mesh=mesh)     # [n, *w.shape]
    """
    n = axis_size(axis_name, mesh=mesh)
    leaves, spec = pytree.tree_flatten(x)
    for i, leaf in enumerate(leaves):
        _mesh.check_on_device(leaf, "x" if len(leaves) == 1 else f"x (leaf {i})")
    if not leaves:
        return x
    return pytree.tree_unflatten(list(_CopyToAxis.apply(n, mesh, axis_name, *leaves)), spec)


def reduce_from_axis(x: torch.Tensor, axis_name: str, *, mesh) -> torch.Tensor:
    """Sum the per-device values over ``axis_name`` (``psum``); the gradient is broadcast back.

    Stacked view: ``[n, *S]`` -> replicated ``S`` (one ``all-reduce``); backward: the gradient of
    every row is the incoming gradient (no communication). Example: ``reduce_from_axis(rows,
    "tp", mesh=mesh)`` adds the vocab-parallel embedding rows of all devices.
    """
    n = axis_size(axis_name, mesh=mesh)
    _check_stacked(x, n, axis_name)
    return _ReduceFromAxis.apply(x, mesh, axis_name)


def max_from_axis(x: torch.Tensor, axis_name: str, *, mesh) -> torch.Tensor:
    """Maximum of the per-device values over ``axis_name`` (``pmax``), without gradient.

    Stacked view: ``[n, *S]`` -> replicated ``S`` (one ``all-reduce`` with max). The input is
    detached: as in JAX, where ``pmax`` has no transpose, callers use it for a stabilizing shift.
    """
    n = axis_size(axis_name, mesh=mesh)
    _check_stacked(x, n, axis_name)
    y = _mesh.mark_activation(x.detach(), mesh, axis_name).amax(0)
    return _mesh.mark_activation(y, mesh, None)


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
