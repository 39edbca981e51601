"""Array and parameter helpers for model-parallel code in the global "stacked" view (torch_xla).

Twin of :mod:`jax_impl.array_utils` (same names, same order). A per-device value of shape ``S`` in
JAX is, here, one tensor ``[n, *S]`` whose dim 0 (size n, the size of the mesh axis
``axis_name``) is sharded over that axis; every other mesh axis keeps it replicated. Functions that
need the mesh take it as the keyword-only argument ``mesh``.

- ``fold_rng_over_axis(rng, axis_name, mesh=...)``: n different CPU generators from one seed, one
  per device along the axis (the twin of folding the axis index into a JAX key).
- ``split_array_over_mesh(x, axis_name, split_axis, mesh=...)``: the value ``x`` that every
  device holds, split in n blocks along ``split_axis`` and stacked ``[n, ...]`` (row j = block j).
- ``stack_params(params, axis_name, axis=0, mask_except=None, mesh=...)``: n per-device parameter
  pytrees -> one pytree of stacked tensors sharded over ``axis_name`` at dim ``axis``.
- ``unstack_params(params, axis_name, axis=0, mesh=...)``: the inverse, a list of n pytrees.
- ``to_stacked(x, axis_name, dim=-1, mesh=...)``: a global tensor split on ``dim`` -> the stacked
  view ``[n, ...]`` (a reshape: no data moves when ``x`` is sharded on ``dim``).
- ``from_stacked(x, axis_name, dim=-1, mesh=...)``: the inverse, a global tensor sharded on ``dim``.

The stacked view and the layouts table: ``docs/design.md``.

Random numbers cannot match JAX's (different generators): the two backends agree by loading the
same weights (``state_dict`` keys = JAX paths joined by '.'), not by drawing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ringpar.seeding import fold_in, resolve_seed  # noqa: F401  (fold_in: re-export)

from . import mesh as _mesh

__all__ = ["fold_rng_over_axis", "split_array_over_mesh", "stack_params", "unstack_params",
           "to_stacked", "from_stacked"]

PyTree = Any


def draw_seed(seed: int | None) -> int:
    """``seed`` checked, or one drawn from torch's global generator (``torch.manual_seed`` fixes it).

    torch-only: JAX layers take an rng key instead of an int seed.
    """
    return resolve_seed(seed, draw=lambda: torch.randint(0, 2**62, (1,)).item())


def _base_seed(rng: int | torch.Generator) -> int:
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=rng).item())
    if isinstance(rng, int) and not isinstance(rng, bool):
        return rng
    raise ValueError(f"rng={rng!r}: expected an int seed or a torch.Generator")


def fold_rng_over_axis(rng: int | torch.Generator, axis_name: str, *,
                       mesh) -> list[torch.Generator]:
    """One generator per device along ``axis_name``, all derived from ``rng``.

    Args:
        rng: An int seed (the same result every call) or a ``torch.Generator`` (one int is drawn
            from it, advancing its state, like splitting a key).
        axis_name: The mesh axis to fold over (size n).
        mesh: The torch_xla mesh holding ``axis_name``.

    Returns:
        ``n`` CPU generators; generator j is seeded with ``fold_in(seed, j)``, so draws differ
        between devices of the axis (and are equal along all other mesh axes, which the stacked
        view does not even represent).

    Raises:
        ValueError: if the mesh has no ``axis_name`` or ``rng`` is neither an int nor a Generator.
    """
    n = _mesh.check_axis(mesh, axis_name)
    seed = _base_seed(rng)
    gens = []
    for j in range(n):
        g = torch.Generator()
        g.manual_seed(fold_in(seed, j))
        gens.append(g)
    return gens


def split_array_over_mesh(x: torch.Tensor, axis_name: str, split_axis: int, *,
                          mesh) -> torch.Tensor:
    """Split ``x`` in n blocks along ``split_axis`` and stack them over ``axis_name``.

    Args:
        x: The value every device of the axis holds, shape ``S`` (a CPU or XLA tensor; the JAX
            twin receives it per device).
        axis_name: The mesh axis to split over (size n); device j gets block j.
        split_axis: The dimension of ``x`` to split (negative values count from the end).
        mesh: The torch_xla mesh holding ``axis_name``.

    Returns:
        The stacked view ``[n, *S']`` on the XLA device, dim 0 sharded over ``axis_name``, where
        ``S'`` is ``S`` with ``split_axis`` divided by n and row j is block j. With n == 1 this is
        ``x[None]`` (the JAX function returns ``x`` itself: the same per-device value).

    Raises:
        ValueError: if ``split_axis`` is out of range, ``x.shape[split_axis]`` is not divisible by
            n, or the mesh has no ``axis_name``.
    """
    return _split_to_stacked(x, axis_name, split_axis, mesh, "split_axis")


def _split_to_stacked(x, axis_name: str, dim: int, mesh, argument: str) -> torch.Tensor:
    n = _mesh.check_axis(mesh, axis_name)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{argument}={dim!r}: expected an axis of a tensor with {x.dim()} "
                         f"dimensions (shape {tuple(x.shape)})")
    ax = dim % x.dim()
    size = x.shape[ax]
    if size % n:
        raise ValueError(f"x.shape[{dim}]={size}: expected a size divisible by the size {n} "
                         f"of axis {axis_name!r}")
    shape = tuple(x.shape)
    y = x.reshape(shape[:ax] + (n, size // n) + shape[ax + 1:]).movedim(ax, 0)
    if y.device.type != "xla":
        y = y.contiguous().to(_mesh.xla_device())
    return _mesh.mark_stacked(y, mesh, axis_name)


def stack_params(params: Sequence[PyTree], axis_name: str, axis: int = 0,
                 mask_except: int | None = None, *, mesh) -> PyTree:
    """Stack n per-device parameter pytrees into one pytree sharded over ``axis_name``.

    Args:
        params: A sequence of n pytrees (e.g. ``state_dict``-like dicts) of equal structure and
            leaf shapes, element j being device j's parameters.
        axis_name: The mesh axis to stack over (size n).
        axis: Where the new dimension of size n goes (0 = first; negative counts from the end of
            the new shape).
        mask_except: If not None, only the device with this index keeps its values; the leaves of
            all other devices are zeros.
        mesh: The torch_xla mesh holding ``axis_name``.

    Returns:
        The same structure with each leaf ``torch.stack([p_0, ..., p_{n-1}], axis)`` on the XLA
        device, sharded over ``axis_name`` at ``axis`` and replicated over the other mesh axes.

    Raises:
        ValueError: if ``len(params)`` is not n, the structures or shapes differ, ``axis`` is out
            of range, ``mask_except`` is not in ``[0, n)``, or the mesh has no ``axis_name``.
    """
    n = _mesh.check_axis(mesh, axis_name)
    params = list(params)
    if len(params) != n:
        raise ValueError(f"len(params)={len(params)}: expected one parameter pytree per device, "
                         f"the size {n} of axis {axis_name!r}")
    bad_mask = not isinstance(mask_except, int) or isinstance(mask_except, bool) or \
        not 0 <= mask_except < n
    if mask_except is not None and bad_mask:
        raise ValueError(f"mask_except={mask_except!r}: expected None or an index in [0, {n})")
    flat, specs = zip(*(pytree.tree_flatten(p) for p in params))
    for j, spec in enumerate(specs):
        if spec != specs[0]:
            raise ValueError(f"params[{j}] has structure {spec}, expected that of params[0]: "
                             f"{specs[0]}")
    out = []
    for leaves in zip(*flat):
        shapes = {tuple(t.shape) for t in leaves}
        if len(shapes) != 1:
            raise ValueError(f"a parameter has different shapes on different devices: {shapes}")
        rank = leaves[0].dim() + 1
        if not -rank <= axis < rank:
            raise ValueError(f"axis={axis}: expected a position in a parameter with {rank - 1} "
                             f"dimensions (shape {tuple(leaves[0].shape)})")
        pos = axis % rank
        values = [t.detach() for t in leaves]
        if mask_except is not None:
            values = [v if j == mask_except else torch.zeros_like(v) for j, v in enumerate(values)]
        stacked = torch.stack([v.to(values[0].device) for v in values], pos)
        if stacked.device.type != "xla":
            stacked = stacked.to(_mesh.xla_device())
        spec = [None] * rank
        spec[pos] = axis_name
        out.append(_mesh.mark_sharding(stacked, mesh, spec))
    return pytree.tree_unflatten(out, specs[0])


def unstack_params(params: PyTree, axis_name: str, axis: int = 0, *, mesh) -> list[PyTree]:
    """Inverse of :func:`stack_params`: n per-device pytrees from a pytree of stacked tensors.

    Torch tensors carry no axis names, so the stacked dimension is given by ``axis`` (default 0,
    the ringpar layout). Element j holds ``leaf.select(axis, j)`` of every leaf (views, on the
    leaves' device).

    Raises:
        ValueError: if a leaf's ``axis`` is out of range or its size is not n.
    """
    n = _mesh.check_axis(mesh, axis_name)
    leaves, spec = pytree.tree_flatten(params)
    for leaf in leaves:
        if not -leaf.dim() <= axis < max(leaf.dim(), 1) or leaf.dim() == 0:
            raise ValueError(f"axis={axis}: out of range for a stacked parameter of shape "
                             f"{tuple(leaf.shape)}")
        if leaf.shape[axis] != n:
            raise ValueError(f"a stacked parameter has shape {tuple(leaf.shape)}: expected size "
                             f"{n} (axis {axis_name!r}) at dim {axis}")
    return [pytree.tree_unflatten([leaf.select(axis, j) for leaf in leaves], spec)
            for j in range(n)]


def to_stacked(x: torch.Tensor, axis_name: str, dim: int = -1, *, mesh) -> torch.Tensor:
    """The stacked view of the global ``x``: ``dim`` split in n blocks, block j in row j.

    Global ``[..., F, ...]`` (``F`` at ``dim``) -> ``[n, ..., F/n, ...]``, dim 0 sharded over
    ``axis_name`` (size n): row j is what device j holds when ``x`` is sharded on ``dim``, the
    value a JAX ``shard_map`` with ``P(..., axis_name at dim, ...)`` passes to device j. When
    ``x`` is sharded that way already this is a reshape (no communication). A CPU tensor is
    moved to the XLA device. Same as ``split_array_over_mesh(x, axis_name, dim, mesh=mesh)``.

    Example::

        xs = to_stacked(x, "tp", mesh=mesh)          # [B, F] -> [n, B, F/n]
        y = from_stacked(xs * 2, "tp", mesh=mesh)    # back to [B, F], sharded on F

    Raises:
        ValueError: ``dim`` out of range, its size not divisible by n, or no ``axis_name``.
    """
    return _split_to_stacked(x, axis_name, dim, mesh, "dim")


def from_stacked(x: torch.Tensor, axis_name: str, dim: int = -1, *, mesh) -> torch.Tensor:
    """Inverse of :func:`to_stacked`: the rows of the stacked ``x`` concatenated along ``dim``.

    Stacked ``[n, ..., F/n, ...]`` -> global ``[..., F, ...]`` sharded on ``dim`` over
    ``axis_name`` (``dim`` counts the dims after the stacked dim 0, as the per-device dims of
    JAX). A reshape: no communication.

    Raises:
        ValueError: ``x`` not on the XLA device, dim 0 not of size n, ``dim`` out of range.
    """
    n = _mesh.check_axis(mesh, axis_name)
    _mesh.check_on_device(x, "x")
    if x.dim() < 2 or x.shape[0] != n:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected the stacked view [n, ...] with dim "
                         f"0 of size n={n}, the size of axis {axis_name!r}, and rank >= 2")
    rank = x.dim() - 1
    if isinstance(dim, bool) or not isinstance(dim, int) or not -rank <= dim < rank:
        raise ValueError(f"dim={dim!r}: expected an axis of the per-device shape "
                         f"{tuple(x.shape[1:])}")
    d = dim % rank
    y = _mesh.mark_stacked(x, mesh, axis_name).movedim(0, d)
    shape = tuple(y.shape)
    y = y.reshape(shape[:d] + (n * shape[d + 1],) + shape[d + 2:])
    spec = [None] * rank
    spec[d] = axis_name
    return _mesh.mark_sharding(y, mesh, spec)
