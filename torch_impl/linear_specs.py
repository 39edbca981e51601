"""Partition-spec helpers of the ParallelLinear family (EasyDeL names): deliberate twin of
:mod:`jax_impl.linear_specs`; re-exported by :mod:`torch_impl.linear`. A spec is a tuple with one
entry (None, an axis name, or a tuple of names) per dim.

The spec algebra and the reading of XLA's sharding strings are framework-neutral and live in
:mod:`ringpar.partition_specs`; this module reads a tensor's ``mark_sharding`` annotation through
the torch_xla boundary (:mod:`torch_impl.xla`) and matches it against the specs over a mesh.

Example:
    >>> get_matmul_output_sharding(("dp", None), (None, "tp"))
    ('dp', 'tp')
"""

from __future__ import annotations

import typing as tp

import numpy as np
import torch

from ringpar.matmul_methods import MatrixMultiplyMethod, resolve_method  # neutral, shared
from ringpar.partition_specs import (Spec, candidate_specs, matmul_output_spec,
                                     parse_sharding_text, tile_layout, tp_matmul_output_spec)

from . import xla

__all__ = ["get_sharding", "get_matmul_output_sharding", "get_output_partition_spec"]


def get_sharding(arr: tp.Any, *, mesh=None) -> Spec | None:
    """Partition spec (a tuple, one entry per dim) of a tensor annotated with ``mark_sharding``.

    The annotation is read back as a spec over ``mesh`` (default: torch_xla's global mesh),
    naming mesh axes of size > 1 only. None for anything else: CPU tensors, XLA tensors without a
    sharding annotation (e.g. intermediate results: the partitioner decides their sharding),
    objects that are not tensors, no mesh, or a sharding that is not a layout over that mesh.
    """
    if not isinstance(arr, torch.Tensor) or arr.device.type != "xla":
        return None
    if mesh is None:
        mesh = xla.get_global_mesh()
        if mesh is None:
            return None
    text = xla.sharding_text(arr)
    if not text:
        return None
    parsed = parse_sharding_text(text, arr.dim())
    if parsed is None:
        return None
    names = tuple(mesh.axis_names)
    sizes = tuple(int(s) for s in mesh.mesh_shape)
    ids = np.asarray(mesh.device_ids).reshape(-1).tolist()
    for spec in candidate_specs(names, sizes, arr.dim()):
        if tile_layout(names, sizes, ids, spec) == parsed:
            return spec
    return None


def get_matmul_output_sharding(lhs_pspec: Spec | None, rhs_pspec: Spec | None) -> Spec:
    """Partition spec of ``X @ W`` from the specs of X [..., k] and W [k, j].

    Both specs must have one entry per dimension. The result has the non-contracting dims of X
    followed by the last dim of W; each mesh axis may appear once, so an axis already used by an
    earlier output dim is dropped from a later one (the entry becomes None, or the tuple loses it).
    The spec describes the layout only: if the contracting dims are sharded on the same axis the
    per-device products are partial sums that still need a reduction. Returns ``()`` if either
    spec is None. (:func:`ringpar.partition_specs.matmul_output_spec`.)
    """
    return matmul_output_spec(lhs_pspec, rhs_pspec)


def get_output_partition_spec(lhs: tp.Any, rhs: tp.Any, method: MatrixMultiplyMethod | str | None,
                              axis_name: str, *, mesh=None) -> Spec | None:
    """Partition spec of the result of the tensor-parallel matmul ``lhs @ rhs`` under ``method``.

    None if either tensor has no sharding annotation over ``mesh`` (see :func:`get_sharding`).
    For a ring method (ALL_GATHER*, REDUCE_SCATTER*) the result is sharded on its last dim over
    ``axis_name`` and its leading dims keep the lhs spec without ``axis_name``; for PLAIN (or None)
    it is :func:`get_matmul_output_sharding` of the two specs. Raises ValueError for an unknown
    method. (:func:`ringpar.partition_specs.tp_matmul_output_spec`.)
    """
    method = resolve_method(method)
    lhs_spec, rhs_spec = get_sharding(lhs, mesh=mesh), get_sharding(rhs, mesh=mesh)
    if lhs_spec is None or rhs_spec is None:
        return None
    return tp_matmul_output_spec(lhs_spec, rhs_spec, method, axis_name,
                                 lhs_ndim=lhs.dim(), rhs_ndim=rhs.dim())
