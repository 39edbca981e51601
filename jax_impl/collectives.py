"""Per-device collective primitives used by the tensor-parallel layers (call inside ``shard_map``).

Public API, in this order (``torch_impl.collectives`` has the same names in the same order, written
for the global "stacked" view where dim 0 of size n is the model axis):

- ``ring_perm(n, shift_up=True)``: the ``(source, target)`` pairs of a cyclic shift on a ring of n.
- ``ring_permute(x, axis_name, shift_up=True)``: one cyclic shift of a pytree over ``axis_name``
  (one ``collective-permute`` per leaf).
- ``axis_index(axis_name)``: this device's index along ``axis_name``.
- ``all_gather_features(x, axis_name)``: tiled all-gather over the last (feature) axis.
- ``reduce_scatter_features(x, axis_name, dim=-1)``: tiled sum-scatter over ``dim`` (default
  the last, feature axis).
- ``copy_to_axis(x, axis_name)``: use a replicated value on every device (identity; the psum of
  its cotangent is the one ``shard_map`` adds for a replicated input).
- ``reduce_from_axis(x, axis_name)``: ``psum`` over ``axis_name`` (backward: no communication).
- ``max_from_axis(x, axis_name)``: ``pmax`` of the stop-gradient of ``x``.
- ``split_features(x, num, argument="x")``: split the last axis into ``num`` equal parts.

All shapes here are per-device: the function sees one device's value, as ``shard_map`` passes it.
``axis_size`` (the size of a bound axis) lives in :mod:`jax_impl.mesh` and is re-exported here.
Every function raises ``ValueError`` (never ``NameError``/``assert``) when ``axis_name`` is not
bound, i.e. not called inside ``shard_map`` over a mesh with that axis. Every cross-device sum of
the layers (embedding, losses, norms) goes through this module; ``docs/design.md`` ("Matching a
collective across backends") lists each function's forward and backward collective on both
backends.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ringpar.rings import ring_perm  # noqa: F401  (re-export: one definition)

from .mesh import axis_size

__all__ = ["ring_perm", "ring_permute", "axis_index", "all_gather_features",
           "reduce_scatter_features", "copy_to_axis", "reduce_from_axis", "max_from_axis",
           "split_features", "axis_size"]


def ring_permute(x: Any, axis_name: str, shift_up: bool = True) -> Any:
    """Cyclically shift every leaf of ``x`` by one position over ``axis_name``.

    With ``shift_up`` device j receives the value of device j-1 (mod n), else of device j+1.
    Shapes are unchanged (per-device). On an axis of size 1 this is the identity (no collective).
    """
    n = axis_size(axis_name)
    if n == 1:
        return x
    return jax.lax.ppermute(x, axis_name, perm=ring_perm(n, shift_up))


def axis_index(axis_name: str) -> jax.Array:
    """This device's index along ``axis_name`` (an int32 scalar); ValueError if not bound."""
    axis_size(axis_name)
    return jax.lax.axis_index(axis_name)


def all_gather_features(x: jax.Array, axis_name: str) -> jax.Array:
    """Concatenate the per-device ``x`` of all devices along the last axis, in device order.

    Per-device input ``[..., F]`` -> per-device output ``[..., n*F]`` (identical on all devices).
    """
    n = axis_size(axis_name)
    if n == 1:
        return x
    return jax.lax.all_gather(x, axis_name, axis=x.ndim - 1, tiled=True)


def reduce_scatter_features(x: jax.Array, axis_name: str, dim: int = -1) -> jax.Array:
    """Sum ``x`` over the devices of ``axis_name`` and keep this device's block of axis ``dim``.

    Per-device input ``[..., F]`` -> per-device output ``[..., F/n]`` (``dim=-1``, the default):
    device j gets ``sum_devices x[..., j*F/n:(j+1)*F/n]``. Raises ValueError if the size of
    ``dim`` is not divisible by n or ``dim`` is out of range.
    """
    n = axis_size(axis_name)
    d = _check_dim(dim, x.ndim)
    if x.shape[d] % n:
        raise ValueError(f"x.shape[{dim}]={x.shape[d]}: expected the number of features to be "
                         f"divisible by the size {n} of axis {axis_name!r}")
    if n == 1:
        return x
    return jax.lax.psum_scatter(x, axis_name, scatter_dimension=d, tiled=True)


def _check_dim(dim, ndim: int) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool) or not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim!r}: expected an int in [-{ndim}, {ndim}) for rank {ndim}")
    return dim % ndim


def copy_to_axis(x: Any, axis_name: str) -> Any:
    """Use the replicated pytree ``x`` on every device of ``axis_name``: the identity here.

    Inside ``shard_map`` a replicated input's cotangent is psum'd by ``shard_map`` itself, which
    is the backward all-reduce the torch twin (stacked view ``S -> [n, *S]``) emits explicitly.
    ValueError if ``axis_name`` is not bound.
    """
    axis_size(axis_name)
    return x


def reduce_from_axis(x: Any, axis_name: str) -> Any:
    """Sum ``x`` over the devices of ``axis_name`` (``psum``: one all-reduce); shapes unchanged.

    Example (inside ``shard_map``): ``y = reduce_from_axis(partial_rows, "tp")``.
    """
    axis_size(axis_name)
    return jax.lax.psum(x, axis_name)


def max_from_axis(x: Any, axis_name: str) -> Any:
    """Maximum of ``x`` over the devices of ``axis_name`` (``pmax``), without gradient."""
    axis_size(axis_name)
    return jax.lax.pmax(jax.lax.stop_gradient(x), axis_name)


def split_features(x: Any, num: int, argument: str = "x") -> list[Any]:
    """Split every leaf of the pytree ``x`` into ``num`` equal parts along the last axis.

    Returns a list of ``num`` pytrees. Raises ValueError (naming ``argument``) if a leaf's last
    dimension is not divisible by ``num``.
    """
    leaves, treedef = jax.tree.flatten(x)
    for leaf in leaves:
        if leaf.shape[-1] % num:
            raise ValueError(f"{argument}.shape[-1]={leaf.shape[-1]}: expected the number of "
                             f"features to be divisible by {num}")
    parts = [jnp.split(leaf, num, axis=-1) for leaf in leaves]
    return [jax.tree.unflatten(treedef, [p[k] for p in parts]) for k in range(num)]
