"""Partition-spec helpers of the ParallelLinear family (EasyDeL names): deliberate twin of
:mod:`torch_impl.linear_specs`; re-exported by :mod:`jax_impl.linear`.

The spec algebra itself is framework-neutral and lives in :mod:`ringpar.partition_specs` (specs
as plain tuples); this module reads an array's ``NamedSharding`` and converts to and from
``jax.sharding.PartitionSpec`` at its edge.

Example:
    >>> from jax.sharding import PartitionSpec as Ps
    >>> get_matmul_output_sharding(Ps("dp", None), Ps(None, "tp"))
    P('dp', 'tp')
"""

from __future__ import annotations

import typing as tp

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Ps

from ringpar.matmul_methods import MatrixMultiplyMethod, resolve_method
from ringpar.partition_specs import matmul_output_spec, tp_matmul_output_spec

__all__ = ["get_sharding", "get_matmul_output_sharding", "get_output_partition_spec"]


def get_sharding(arr: tp.Any) -> Ps | None:
    """PartitionSpec of an array placed with a ``NamedSharding``; None for anything else.

    Anything else: numpy arrays, single-device arrays, tracers inside ``jit`` (their sharding is
    decided by the compiler), and objects without a ``sharding`` attribute.
    """
    if isinstance(arr, jax.core.Tracer):
        return None
    sharding = getattr(arr, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.spec
    return None


def get_matmul_output_sharding(lhs_pspec: Ps | None, rhs_pspec: Ps | None) -> Ps:
    """PartitionSpec of ``X @ W`` from the specs of X [..., k] and W [k, j].

    Both specs must have one entry per dimension. The result has the non-contracting dims of X
    followed by the last dim of W; each mesh axis may appear once, so an axis already used by an
    earlier output dim is dropped from a later one (the entry becomes None, or the tuple loses it).
    The spec describes the layout only: if the contracting dims are sharded on the same axis the
    per-device products are partial sums that still need a reduction. Returns ``P()`` if either
    spec is None. (:func:`ringpar.partition_specs.matmul_output_spec` on tuples.)
    """
    if lhs_pspec is None or rhs_pspec is None:
        return Ps()
    return Ps(*matmul_output_spec(tuple(lhs_pspec), tuple(rhs_pspec)))


def get_output_partition_spec(lhs: tp.Any, rhs: tp.Any, method: MatrixMultiplyMethod | str | None,
                              axis_name: str) -> Ps | None:
    """PartitionSpec of the result of the tensor-parallel matmul ``lhs @ rhs`` under ``method``.

    None if either array has no ``NamedSharding`` (see :func:`get_sharding`). For a ring method
    (ALL_GATHER*, REDUCE_SCATTER*) the result is sharded on its last dim over ``axis_name`` and its
    leading dims keep the lhs spec without ``axis_name``; for PLAIN (or None) it is
    :func:`get_matmul_output_sharding` of the two specs. Raises ValueError for an unknown method.
    (:func:`ringpar.partition_specs.tp_matmul_output_spec` on tuples.)
    """
    method = resolve_method(method)
    lhs_spec, rhs_spec = get_sharding(lhs), get_sharding(rhs)
    if lhs_spec is None or rhs_spec is None:
        return None
    return Ps(*tp_matmul_output_spec(tuple(lhs_spec), tuple(rhs_spec), method, axis_name,
                                     lhs_ndim=lhs.ndim, rhs_ndim=rhs.ndim))
