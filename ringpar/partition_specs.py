"""Partition-spec algebra shared by both backends: specs as plain tuples, no framework.

A spec has one entry per array dim: None (not split), a mesh axis name, or a tuple of names (split
over their product, the first name outermost). ``jax_impl.linear_specs`` converts to and from
``jax.sharding.PartitionSpec`` at its edge; ``torch_impl.linear_specs`` uses the tuples as they
are (``mark_sharding`` takes them). The tile layout and sharding-string helpers describe how XLA
prints a sharding (``{devices=[2,1,2]0,2,1,3 last_tile_dim_replicate}``), which torch_xla uses to
read an annotation back as a spec.

Example:
    >>> matmul_output_spec(("dp", None), (None, "tp"))
    ('dp', 'tp')
    >>> tp_matmul_output_spec(("dp", "tp"), ("tp", None), "reduce_scatter_matmul", "tp",
    ...                       lhs_ndim=2, rhs_ndim=2)
    ('dp', 'tp')
    >>> tile_layout(("dp", "tp"), (2, 2), range(4), (None, "tp"))
    ((1, 2, 2), (0, 2, 1, 3), True)
"""

from __future__ import annotations

import itertools
import math
import re
import typing as tp

from .matmul_methods import MatrixMultiplyMethod, resolve_method

__all__ = ["Spec", "axes_of", "spec_entries", "matmul_output_spec", "tp_matmul_output_spec",
           "candidate_specs", "tile_layout", "parse_sharding_text"]

Spec = tuple  # one entry per dim: None, an axis name, or a tuple of names

_TILED = re.compile(r"\{devices=\[([\d,]+)\]([\d,]+)( last_tile_dim_replicate)?\}")


def axes_of(entry: tp.Any) -> tuple:
    """Mesh axes named by one spec entry (None, a name, or a tuple / list of names).

    >>> axes_of(None), axes_of("tp"), axes_of(("dp", "fsdp"))
    ((), ('tp',), ('dp', 'fsdp'))
    """
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def spec_entries(spec: tp.Sequence, ndim: int) -> Spec:
    """The entries of ``spec`` padded with None to ``ndim`` (a spec may omit trailing dims).

    Raises ValueError if ``spec`` has more entries than ``ndim``.
    """
    entries = tuple(spec)
    if len(entries) > ndim:
        raise ValueError(f"partition spec {spec} has {len(entries)} entries for a {ndim}-D array")
    return entries + (None,) * (ndim - len(entries))


def _entry_without(entry: tp.Any, excluded: tp.Container) -> tp.Any:
    """``entry`` without the axes in ``excluded``: None if none is left, a tuple stays a tuple."""
    kept = tuple(a for a in axes_of(entry) if a not in excluded)
    if not kept:
        return None
    return kept if isinstance(entry, (tuple, list)) else kept[0]


def matmul_output_spec(lhs_spec: tp.Sequence | None, rhs_spec: tp.Sequence | None) -> Spec:
    """Spec of ``X @ W`` from the specs of X [..., k] and W [k, j] (one entry per dim each).

    The result has the non-contracting dims of X followed by the last dim of W; each mesh axis may
    appear once, so an axis already used by an earlier output dim is dropped from a later one (the
    entry becomes None, or the tuple loses it). The spec describes the layout only: if the
    contracting dims are split on the same axis the per-device products are partial sums that
    still need a reduction. ``()`` if either spec is None.

    >>> matmul_output_spec(("tp", None), (None, "tp"))
    ('tp', None)
    """
    if lhs_spec is None or rhs_spec is None:
        return ()
    lhs, rhs = tuple(lhs_spec), tuple(rhs_spec)
    candidates = list(lhs[:-1]) + ([rhs[-1]] if rhs else [])
    used: set = set()
    out: list = []
    for entry in candidates:
        out.append(_entry_without(entry, used))
        used.update(axes_of(entry))
    out += [None] * (len(lhs) - len(out))
    return tuple(out)


def tp_matmul_output_spec(lhs_spec: tp.Sequence, rhs_spec: tp.Sequence,
                          method: MatrixMultiplyMethod | str | None, axis_name: str, *,
                          lhs_ndim: int, rhs_ndim: int) -> Spec:
    """Spec of the tensor-parallel matmul ``lhs @ rhs`` under ``method`` (ParallelLinear).

    For a ring method (ALL_GATHER*, REDUCE_SCATTER*) the result is split on its last dim over
    ``axis_name`` and its leading dims keep the lhs spec without ``axis_name``; for PLAIN (or
    None) it is :func:`matmul_output_spec` of the two specs padded to their ranks. Raises
    ValueError for an unknown method or a spec longer than its rank.
    """
    method = resolve_method(method)
    lhs = spec_entries(lhs_spec, lhs_ndim)
    rhs = spec_entries(rhs_spec, rhs_ndim)
    if method is None or method is MatrixMultiplyMethod.PLAIN:
        return matmul_output_spec(lhs, rhs)
    return (*(_entry_without(entry, (axis_name,)) for entry in lhs[:-1]), axis_name)


def candidate_specs(axis_names: tp.Sequence[str], axis_sizes: tp.Sequence[int],
                    rank: int) -> tp.Iterator[Spec]:
    """Every spec of a rank-``rank`` array over the mesh axes of size > 1, each once.

    >>> list(candidate_specs(("dp", "tp"), (1, 2), 2))
    [(None, None), ('tp', None), (None, 'tp')]
    """
    axes = [a for a, s in zip(axis_names, axis_sizes) if int(s) > 1]
    seen = set()
    for k in range(len(axes) + 1):
        for chosen in itertools.permutations(axes, k):
            for dims in itertools.product(range(rank), repeat=k):
                entries: list[list[str]] = [[] for _ in range(rank)]
                for a, d in zip(chosen, dims):
                    entries[d].append(a)
                spec = tuple(None if not e else (e[0] if len(e) == 1 else tuple(e))
                             for e in entries)
                if spec not in seen:
                    seen.add(spec)
                    yield spec


def _transposed_ids(device_ids: tp.Sequence[int], sizes: tp.Sequence[int],
                    order: tp.Sequence[int]) -> tuple[int, ...]:
    """``device_ids`` laid out row-major over ``sizes``, read back with the axes in ``order``."""
    strides = [math.prod(sizes[i + 1:]) for i in range(len(sizes))]
    ids = [int(i) for i in device_ids]
    return tuple(ids[sum(c * strides[a] for c, a in zip(coords, order))]
                 for coords in itertools.product(*(range(sizes[a]) for a in order)))


def tile_layout(axis_names: tp.Sequence[str], axis_sizes: tp.Sequence[int],
                device_ids: tp.Iterable[int], spec: tp.Sequence) -> tuple[tuple, tuple, bool]:
    """(tile dims, device order, replicated last tile dim) of ``spec`` over a mesh, as XLA prints
    a sharding (``{devices=[dims]ids last_tile_dim_replicate}``); all-1 dims and no ids when
    nothing is split. ``device_ids`` lists the mesh's devices row-major over ``axis_sizes``.
    """
    names = tuple(axis_names)
    sizes_of = dict(zip(names, (int(s) for s in axis_sizes)))
    used = [a for entry in spec for a in axes_of(entry)]
    rest = [a for a in names if a not in used]
    dims = tuple(math.prod(sizes_of[a] for a in axes_of(entry)) for entry in spec)
    replicated = math.prod(sizes_of[a] for a in rest)
    if math.prod(dims) == 1:
        return dims, (), False
    ids = _transposed_ids(device_ids, [sizes_of[a] for a in names],
                          [names.index(a) for a in used + rest])
    return dims + ((replicated,) if replicated > 1 else ()), ids, replicated > 1


def parse_sharding_text(text: str, rank: int) -> tuple[tuple, tuple, bool] | None:
    """XLA's sharding string of a rank-``rank`` array -> :func:`tile_layout`'s triple, or None
    for a string that is not a replicated or tiled sharding (e.g. manual or maximal).

    >>> parse_sharding_text("{devices=[1,2,2]0,2,1,3 last_tile_dim_replicate}", 2)
    ((1, 2, 2), (0, 2, 1, 3), True)
    """
    text = text.strip()
    if text == "{replicated}":
        return (1,) * rank, (), False
    m = _TILED.fullmatch(text)
    if not m:
        return None
    dims = tuple(int(d) for d in m.group(1).split(","))
    ids = tuple(int(d) for d in m.group(2).split(","))
    replicated = bool(m.group(3))
    if math.prod(dims[:rank]) == 1 and len(dims) == rank + replicated:
        return (1,) * rank, (), False
    return dims, ids, replicated
