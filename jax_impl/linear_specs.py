"""Partition-spec helpers of the ParallelLinear family (EasyDeL names): twin of
:mod:`torch_impl.linear_specs`; re-exported by :mod:`jax_impl.linear`.

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


def _spec_entries(spec: Ps, ndim: int) -> tuple:
    """The entries of ``spec`` padded with None to ``ndim`` (a spec may omit trailing dims)."""
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"partition spec {spec} has {len(entries)} entries for a {ndim}-D array")
    return entries + (None,) * (ndim - len(entries))


def _axes_of(entry: tp.Any) -> tuple:
    """Mesh axes named by one spec entry (None, a name, or a tuple of names)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def get_matmul_output_sharding(lhs_pspec: Ps | None, rhs_pspec: Ps | None) -> Ps:
    """PartitionSpec of ``X @ W`` from the specs of X [..., k] and W [k, j].

    Both specs must have one entry per dimension. The result has the non-contracting dims of X
    followed by the last dim of W; each mesh axis may appear once, so an axis already used by an
    earlier output dim is dropped from a later one (the entry becomes None, or the tuple loses it).
    The spec describes the layout only: if the contracting dims are sharded on the same axis the
    per-device products are partial sums that still need a reduction. Returns ``P()`` if either
    spec is None.
    """
    if lhs_pspec is None or rhs_pspec is None:
        return Ps()
    lhs, rhs = tuple(lhs_pspec), tuple(rhs_pspec)
    candidates = list(lhs[:-1]) + ([rhs[-1]] if rhs else [])
    used: set = set()
    out: list = []
    for entry in candidates:
        axes = _axes_of(entry)
        kept = tuple(a for a in axes if a not in used)
        used.update(axes)
        if not kept:
            out.append(None)
        elif isinstance(entry, (tuple, list)):
            out.append(kept)
        else:
            out.append(kept[0])
    out += [None] * (len(lhs) - len(out))
    return Ps(*out)


def get_output_partition_spec(lhs: tp.Any, rhs: tp.Any, method: MatrixMultiplyMethod | str | None,
                              axis_name: str) -> Ps | None:
    """PartitionSpec of the result of the tensor-parallel matmul ``lhs @ rhs`` under ``method``.

    None if either array has no ``NamedSharding`` (see :func:`get_sharding`). For a ring method
    (ALL_GATHER*, REDUCE_SCATTER*) the result is sharded on its last dim over ``axis_name`` and its
    leading dims keep the lhs spec without ``axis_name``; for PLAIN (or None) it is
    :func:`get_matmul_output_sharding` of the two specs. Raises ValueError for an unknown method.
    """
    method = resolve_method(method)
    lhs_spec, rhs_spec = get_sharding(lhs), get_sharding(rhs)
    if lhs_spec is None or rhs_spec is None:
        return None
    lhs_entries = _spec_entries(lhs_spec, lhs.ndim)
    rhs_entries = _spec_entries(rhs_spec, rhs.ndim)
    if method is None or method is MatrixMultiplyMethod.PLAIN:
        return get_matmul_output_sharding(Ps(*lhs_entries), Ps(*rhs_entries))
    lead = []
    for entry in lhs_entries[:-1]:
        kept = tuple(a for a in _axes_of(entry) if a != axis_name)
        lead.append(None if not kept else (kept if isinstance(entry, (tuple, list)) else kept[0]))
    return Ps(*lead, axis_name)


