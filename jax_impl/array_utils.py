"""Array and parameter helpers for model-parallel code (API of xlstm-jax ``distributed.array_utils``).

The first four functions are per-device code: call them inside ``jax.shard_map`` over a mesh that
has the axis ``axis_name`` (ValueError otherwise). The last two work on global arrays (inside or
outside ``jit``, not inside ``shard_map``) and take the mesh.

- ``fold_rng_over_axis(rng, axis_name)``: a different key on each device along the axis.
- ``split_array_over_mesh(x, axis_name, split_axis)``: this device's slice of a replicated array.
- ``stack_params(params, axis_name, axis=0, mask_except=None)``: per-device leaves become
  ``nn.Partitioned`` with a new dimension of size 1 named ``axis_name`` at position ``axis``, so
  that ``shard_map(..., out_specs=nn.get_partition_spec(...))`` assembles global leaves of shape
  ``[..., n, ...]`` (n = axis size) holding each device's value.
- ``unstack_params(params, axis_name)``: the inverse of ``stack_params``.
- ``to_stacked(x, axis_name, dim=-1, mesh=...)``: a global array split on ``dim`` -> the stacked
  view ``[n, ...]`` whose row j is device j's block (the torch backend's view of per-device
  values; twin of ``torch_impl.array_utils.to_stacked``).
- ``from_stacked(x, axis_name, dim=-1, mesh=...)``: the inverse.

The stacked view and the layouts table: ``docs/design.md``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .collectives import axis_index
from .mesh import axis_size, check_axis

__all__ = ["fold_rng_over_axis", "split_array_over_mesh", "stack_params", "unstack_params",
           "to_stacked", "from_stacked"]

PyTree = Any


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def fold_rng_over_axis(rng: jax.Array, axis_name: str) -> jax.Array:
    """Fold this device's index along ``axis_name`` into ``rng``.

    Args:
        rng: A PRNG key (raw ``uint32[2]`` or typed), the same on every device.
        axis_name: The mesh axis to fold over.

    Returns:
        ``jax.random.fold_in(rng, axis_index(axis_name))``: a key that differs between the devices
        of the axis and is equal along all other mesh axes.
    """
    return jax.random.fold_in(rng, axis_index(axis_name))


def split_array_over_mesh(x: jax.Array, axis_name: str, split_axis: int) -> jax.Array:
    """Return this device's slice of ``x`` along ``split_axis``.

    Args:
        x: Per-device array (typically the same on every device of the axis).
        axis_name: The mesh axis to split over; device j of n gets block j.
        split_axis: The dimension of ``x`` to split (negative values count from the end).

    Returns:
        ``x`` with dimension ``split_axis`` of size ``x.shape[split_axis] // n``. On an axis of size 1
        ``x`` itself is returned.

    Raises:
        ValueError: if ``split_axis`` is out of range or ``x.shape[split_axis]`` is not divisible
            by the axis size, or the axis is not bound.
    """
    n = axis_size(axis_name)
    if not -x.ndim <= split_axis < x.ndim:
        raise ValueError(f"split_axis={split_axis}: expected an axis of an array with {x.ndim} "
                         f"dimensions (shape {x.shape})")
    dim = x.shape[split_axis]
    if dim % n:
        raise ValueError(f"x.shape[{split_axis}]={dim}: expected a size divisible by the size {n} "
                         f"of axis {axis_name!r}")
    if n == 1:
        return x
    size = dim // n
    return jax.lax.dynamic_slice_in_dim(x, axis_index(axis_name) * size, size,
                                        axis=split_axis % x.ndim)


def stack_params(params: PyTree, axis_name: str, axis: int = 0,
                 mask_except: jax.Array | int | None = None) -> PyTree:
    """Mark every leaf of ``params`` as one device's shard of a parameter stacked over ``axis_name``.

    Args:
        params: PyTree of per-device parameters; leaves are arrays or ``nn.Partitioned``.
        axis_name: The mesh axis to stack over.
        axis: Where the new dimension goes (0 = first; negative counts from the end of the new
            shape).
        mask_except: If not None, only the device with this index along ``axis_name`` keeps its
            values; the leaves of all other devices are zeros.

    Returns:
        The same structure with each leaf replaced by ``nn.Partitioned(value[axis: 1], names)``,
        ``axis_name`` inserted into the names at ``axis`` (``None`` names for plain arrays). The
        per-device shape gains a dimension of size 1; the global shape (through
        ``nn.get_partition_spec``) gains one of size n.
    """
    axis_size(axis_name)

    def _stack(x: Any) -> nn.Partitioned:
        value, names = (x.value, tuple(x.names)) if _is_partitioned(x) else (x, (None,) * x.ndim)
        if not -(value.ndim + 1) <= axis <= value.ndim:
            raise ValueError(f"axis={axis}: expected a position in a parameter with {value.ndim} "
                             f"dimensions (shape {value.shape})")
        pos = axis % (value.ndim + 1)
        if mask_except is not None:
            value = jnp.where(axis_index(axis_name) == mask_except, value, jnp.zeros_like(value))
        return nn.Partitioned(jnp.expand_dims(value, pos), names=names[:pos] + (axis_name,) + names[pos:])

    return jax.tree.map(_stack, params, is_leaf=_is_partitioned)


def unstack_params(params: PyTree, axis_name: str) -> PyTree:
    """Inverse of :func:`stack_params`: drop the ``axis_name`` dimension of each ``nn.Partitioned``.

    Leaves whose names do not contain ``axis_name`` (and plain arrays) are returned unchanged. A
    leaf left with only ``None`` names becomes a plain array. Shapes are per-device.
    """

    def _unstack(x: Any) -> Any:
        if not (_is_partitioned(x) and axis_name in x.names):
            return x
        pos = tuple(x.names).index(axis_name)
        names = tuple(x.names[:pos]) + tuple(x.names[pos + 1:])
        value = jnp.squeeze(x.value, pos)
        if all(name is None for name in names):
            return value
        return nn.Partitioned(value, names=names)

    return jax.tree.map(_unstack, params, is_leaf=_is_partitioned)


def _check_dim(dim, shape: tuple, what: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -len(shape) <= dim < len(shape):
        raise ValueError(f"dim={dim!r}: expected an axis of {what} {shape}")
    return dim % len(shape)


def _constrain(x: jax.Array, mesh: Mesh, spec: tuple) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def to_stacked(x: jax.Array, axis_name: str, dim: int = -1, *, mesh: Mesh) -> jax.Array:
    """The stacked view of the global ``x``: ``dim`` split in n blocks, block j in row j.

    Global ``[..., F, ...]`` (``F`` at ``dim``) -> ``[n, ..., F/n, ...]`` with dim 0 sharded over
    ``axis_name`` (size n): row j is the block device j holds when ``x`` is sharded on ``dim``
    (what ``shard_map`` with ``axis_name`` at ``dim`` of the in_spec passes to device j). When
    ``x`` is sharded that way this moves no data. Twin of ``torch_impl.array_utils.to_stacked``.

    Example::

        xs = to_stacked(x, "tp", mesh=mesh)          # [B, F] -> [n, B, F/n]
        y = from_stacked(xs * 2, "tp", mesh=mesh)    # back to [B, F], sharded on F

    Raises:
        ValueError: ``dim`` out of range, its size not divisible by n, or no ``axis_name``.
    """
    n = check_axis(mesh, axis_name)
    d = _check_dim(dim, tuple(x.shape), "an array of shape")
    if x.shape[d] % n:
        raise ValueError(f"x.shape[{dim}]={x.shape[d]}: expected a size divisible by the size {n} "
                         f"of axis {axis_name!r}")
    y = x.reshape(x.shape[:d] + (n, x.shape[d] // n) + x.shape[d + 1:])
    return _constrain(jnp.moveaxis(y, d, 0), mesh, (axis_name,))


def from_stacked(x: jax.Array, axis_name: str, dim: int = -1, *, mesh: Mesh) -> jax.Array:
    """Inverse of :func:`to_stacked`: the rows of the stacked ``x`` concatenated along ``dim``.

    Stacked ``[n, ..., F/n, ...]`` -> global ``[..., F, ...]`` sharded on ``dim`` over
    ``axis_name`` (``dim`` counts the dims after the stacked dim 0, the per-device dims).

    Raises:
        ValueError: dim 0 not of size n, ``dim`` out of range, or no ``axis_name``.
    """
    n = check_axis(mesh, axis_name)
    if x.ndim < 2 or x.shape[0] != n:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected the stacked view [n, ...] with dim "
                         f"0 of size n={n}, the size of axis {axis_name!r}, and rank >= 2")
    d = _check_dim(dim, tuple(x.shape[1:]), "the per-device shape")
    y = jnp.moveaxis(_constrain(x, mesh, (axis_name,)), 0, d)
    y = y.reshape(y.shape[:d] + (n * y.shape[d + 1],) + y.shape[d + 2:])
    return _constrain(y, mesh, (None,) * d + (axis_name,))
