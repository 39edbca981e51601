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

Random numbers cannot match JAX's (different generators): the two backends agree by loading the
same weights (``state_dict`` keys = JAX paths joined by '.'), not by drawing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import mesh as _mesh

__all__ = ["fold_rng_over_axis", "split_array_over_mesh", "stack_params", "unstack_params"]

PyTree = Any
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def fold_in(seed: int, index: int) -> int:
    """A new 63-bit seed from ``seed`` and ``index`` (deterministic, well mixed: splitmix64)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: expected an int")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 1


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
    n = _mesh.check_axis(mesh, axis_name)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= split_axis < x.dim():
        raise ValueError(f"split_axis={split_axis}: expected an axis of a tensor with {x.dim()} "
                         f"dimensions (shape {tuple(x.shape)})")
    ax = split_axis % x.dim()
    dim = x.shape[ax]
    if dim % n:
        raise ValueError(f"x.shape[{split_axis}]={dim}: expected a size divisible by the size {n} "
                         f"of axis {axis_name!r}")
    shape = tuple(x.shape)
    y = x.reshape(shape[:ax] + (n, dim // n) + shape[ax + 1:]).movedim(ax, 0)
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
