"""Partition-spec helpers of the ParallelLinear family (EasyDeL names): twin of
:mod:`jax_impl.linear_specs`; re-exported by :mod:`torch_impl.linear`. A spec is a tuple with one
entry (None, an axis name, or a tuple of names) per dim.

Example:
    >>> get_matmul_output_sharding(("dp", None), (None, "tp"))
    ('dp', 'tp')
"""

from __future__ import annotations

import itertools
import math
import typing as tp

import numpy as np
import torch

from ringpar.matmul_methods import MatrixMultiplyMethod, resolve_method  # neutral, shared

from . import xla

__all__ = ["get_sharding", "get_matmul_output_sharding", "get_output_partition_spec"]

Spec = tuple  # one entry per dim: None, an axis name, or a tuple of names


def _tile_layout(mesh, spec: tp.Sequence) -> tuple[tuple[int, ...], tuple[int, ...], bool]:
    """(tile dims, device order, replicated last tile dim) of ``spec`` over ``mesh``, as torch_xla
    prints them (``{devices=[dims]ids last_tile_dim_replicate}``); all-1 dims for replicated."""
    names = tuple(mesh.axis_names)
    sizes = dict(zip(names, (int(s) for s in mesh.mesh_shape)))
    used = [a for entry in spec for a in _axes_of(entry)]
    rest = [a for a in names if a not in used]
    ids = np.asarray(mesh.device_ids).reshape(tuple(int(s) for s in mesh.mesh_shape))
    ids = ids.transpose([names.index(a) for a in used + rest])
    dims = tuple(math.prod(sizes[a] for a in _axes_of(entry)) for entry in spec)
    replicated = math.prod(sizes[a] for a in rest)
    if math.prod(dims) == 1:
        return dims, (), False
    return dims + ((replicated,) if replicated > 1 else ()), tuple(ids.reshape(-1).tolist()), \
        replicated > 1


def _parse_sharding(text: str, rank: int):
    """torch_xla's sharding string -> (tile dims, device order, replicated last dim) or None."""
    text = text.strip()
    if text in ("{replicated}",):
        return (1,) * rank, (), False
    import re

    m = re.fullmatch(r"\{devices=\[([\d,]+)\]([\d,]+)( last_tile_dim_replicate)?\}", text)
    if not m:
        return None
    dims = tuple(int(d) for d in m.group(1).split(","))
    ids = tuple(int(d) for d in m.group(2).split(","))
    replicated = bool(m.group(3))
    if math.prod(dims[:rank]) == 1 and len(dims) == rank + replicated:
        return (1,) * rank, (), False
    return dims, ids, replicated


def _candidate_specs(mesh, rank: int):
    """Every partition spec of a rank-``rank`` tensor over the mesh axes of size > 1."""
    axes = [a for a, s in zip(mesh.axis_names, mesh.mesh_shape) if int(s) > 1]
    seen = set()
    for k in range(len(axes) + 1):
        for chosen in itertools.permutations(axes, k):
            for dims in itertools.product(range(rank), repeat=k):
                entries = [[] for _ in range(rank)]
                for a, d in zip(chosen, dims):
                    entries[d].append(a)
                spec = tuple(None if not e else (e[0] if len(e) == 1 else tuple(e))
                             for e in entries)
                if spec not in seen:
                    seen.add(spec)
                    yield spec


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
    parsed = _parse_sharding(text, arr.dim())
    if parsed is None:
        return None
    for spec in _candidate_specs(mesh, arr.dim()):
        if _tile_layout(mesh, spec) == parsed:
            return spec
    return None


def _spec_entries(spec: tp.Sequence, ndim: int) -> tuple:
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


def get_matmul_output_sharding(lhs_pspec: Spec | None, rhs_pspec: Spec | None) -> Spec:
    """Partition spec of ``X @ W`` from the specs of X [..., k] and W [k, j].

    Both specs must have one entry per dimension. The result has the non-contracting dims of X
    followed by the last dim of W; each mesh axis may appear once, so an axis already used by an
    earlier output dim is dropped from a later one (the entry becomes None, or the tuple loses it).
    The spec describes the layout only: if the contracting dims are sharded on the same axis the
    per-device products are partial sums that still need a reduction. Returns ``()`` if either
    spec is None.
    """
    if lhs_pspec is None or rhs_pspec is None:
        return ()
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
    return tuple(out)


def get_output_partition_spec(lhs: tp.Any, rhs: tp.Any, method: MatrixMultiplyMethod | str | None,
                              axis_name: str, *, mesh=None) -> Spec | None:
    """Partition spec of the result of the tensor-parallel matmul ``lhs @ rhs`` under ``method``.

    None if either tensor has no sharding annotation over ``mesh`` (see :func:`get_sharding`).
    For a ring method (ALL_GATHER*, REDUCE_SCATTER*) the result is sharded on its last dim over
    ``axis_name`` and its leading dims keep the lhs spec without ``axis_name``; for PLAIN (or None)
    it is :func:`get_matmul_output_sharding` of the two specs. Raises ValueError for an unknown
    method.
    """
    method = resolve_method(method)
    lhs_spec, rhs_spec = get_sharding(lhs, mesh=mesh), get_sharding(rhs, mesh=mesh)
    if lhs_spec is None or rhs_spec is None:
        return None
    lhs_entries = _spec_entries(lhs_spec, lhs.dim())
    rhs_entries = _spec_entries(rhs_spec, rhs.dim())
    if method is None or method is MatrixMultiplyMethod.PLAIN:
        return get_matmul_output_sharding(lhs_entries, rhs_entries)
    lead = []
    for entry in lhs_entries[:-1]:
        kept = tuple(a for a in _axes_of(entry) if a != axis_name)
        lead.append(None if not kept else (kept if isinstance(entry, (tuple, list)) else kept[0]))
    return (*lead, axis_name)


