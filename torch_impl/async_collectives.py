"""All-gather and scatter-sum as rings of collective-permutes: the communication of
:class:`torch_impl.tensor_parallel.TPAsyncDense` (twin of :mod:`jax_impl.async_collectives`).

Stacked view (``docs/design.md``): every tensor is ``[n, ...]`` with dim 0 sharded over
``axis_name`` (size n), row j = device j's value. Each function issues n-1 ring steps of one
``collective-permute`` (:func:`torch_impl.collectives.ring_permute`) instead of one all-gather /
reduce-scatter. Also importable from :mod:`torch_impl.tensor_parallel`, where they were first
defined.

Example (a mesh with axis ``'tp'`` of size 4, ``x`` ``[4, ..., F]``)::

    xs = async_gather(x, "tp", mesh=mesh)      # xs[i][d] is x[d - i (mod 4)]
    y = async_scatter(parts, "tp", mesh=mesh)  # row e of parts[i] is added into row e - 1 - i
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import mesh as _mesh
from .collectives import axis_size, ring_permute, split_features

__all__ = ["async_gather", "async_gather_bidirectional", "async_gather_split", "async_scatter",
           "async_scatter_split"]

PyTree = Any


def async_gather(x: PyTree, axis_name: str, shift_up: bool = True, *, mesh) -> list[PyTree]:
    """All-gather by n-1 ring permutations.

    Args:
        x: Stacked-view tensor ``[n, ...]`` (or pytree of them).
        axis_name: The axis to gather over (size n).
        shift_up: Send from device j to j+1 (else to j-1).
        mesh: The torch_xla mesh (keyword-only).

    Returns:
        List of n stacked tensors: element i has row d = ``x[d - i]`` (shift up) or ``x[d + i]``
        (shift down), mod n. Element 0 is ``x`` itself.
    """
    n = axis_size(axis_name, mesh=mesh)
    ps = [x]
    for _ in range(1, n):
        ps.append(ring_permute(ps[-1], axis_name, shift_up=shift_up, mesh=mesh))
    return ps


def async_gather_bidirectional(x: torch.Tensor, axis_name: str, shift_up: bool = True, *,
                               mesh) -> list[torch.Tensor]:
    """All-gather by ring permutations in both directions (ceil((n-1)/2) up, floor((n-1)/2) down).

    Steps alternate: odd steps shift the "up" chain, even steps the "down" chain, so each value
    travels at most n/2 hops. Returns the same list, in the same order, as :func:`async_gather`
    with the same ``shift_up``.
    """
    n = axis_size(axis_name, mesh=mesh)
    ups, downs = [], []
    p_up = p_down = x
    for step in range(1, n):
        if step % 2:
            p_up = ring_permute(p_up, axis_name, shift_up=True, mesh=mesh)
            ups.append(p_up)
        else:
            p_down = ring_permute(p_down, axis_name, shift_up=False, mesh=mesh)
            downs.append(p_down)
    if shift_up:
        return [x] + ups + downs[::-1]
    return [x] + downs + ups[::-1]


def async_gather_split(x: torch.Tensor, axis_name: str, *, mesh) -> list[torch.Tensor]:
    """All-gather with the features split in halves, one half travelling each way round the ring.

    Returns a list of length ``2n - 1`` with rows d: ``[x, lo(d-1), ..., lo(d-n+1), hi(d+1), ...,
    hi(d+n-1)]`` (indices mod n), where ``lo(e)`` / ``hi(e)`` are the first / second half of the
    features of ``x[e]``. For n == 1: ``[x]``. ValueError if the features are odd (n > 1).
    """
    n = axis_size(axis_name, mesh=mesh)
    if n == 1:
        return [x]
    lo, hi = split_features(x, 2, argument="x")
    return [x] + async_gather(lo, axis_name, shift_up=True, mesh=mesh)[1:] + async_gather(
        hi, axis_name, shift_up=False, mesh=mesh)[1:]


def _check_scatter_inputs(xs: Sequence[PyTree], axis_name: str, mesh) -> int:
    n = axis_size(axis_name, mesh=mesh)
    if len(xs) != n:
        raise ValueError(f"len(xs)={len(xs)}: expected one input per device, the size {n} of axis "
                         f"{axis_name!r}")
    return n


def async_scatter(xs: Sequence[PyTree], axis_name: str, shift_up: bool = True, *,
                  mesh) -> PyTree:
    """Scatter-sum by n-1 ring permutations (the ring form of ``psum_scatter``).

    Args:
        xs: n stacked-view tensors (or pytrees) of equal shapes. With ``shift_up``, row e of
            ``xs[i]`` is added into row ``e - 1 - i (mod n)`` of the result (shift down:
            ``e + 1 + i``).
        axis_name: The axis to scatter over (size n).
        shift_up: Send partial sums from device j to j+1 (else to j-1).
        mesh: The torch_xla mesh (keyword-only).

    Returns:
        The stacked sum, shaped like ``xs[0]``.

    Raises:
        ValueError: if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name, mesh)
    y = xs[0]
    for x in xs[1:]:
        y = pytree.tree_map(torch.add, ring_permute(y, axis_name, shift_up=shift_up, mesh=mesh), x)
    return y


def async_scatter_split(xs: Sequence[PyTree], axis_name: str, *, mesh) -> PyTree:
    """Scatter-sum with the features split: the first ``F//2`` go up the ring, the rest down.

    Row e of ``xs[i]``: its first ``F//2`` features go to row ``e - 1 - i``, the other
    ``F - F//2`` to row ``e + 1 + i`` (mod n). Returns the stacked sum ``[n, ..., F]``.
    ValueError if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name, mesh)

    def halves(x):
        lo = pytree.tree_map(lambda a: a[..., : a.shape[-1] // 2], x)
        hi = pytree.tree_map(lambda a: a[..., a.shape[-1] // 2:], x)
        return lo, hi

    y_up, y_down = halves(xs[0])
    for x in xs[1:]:
        x_up, x_down = halves(x)
        y_up = pytree.tree_map(torch.add, ring_permute(y_up, axis_name, shift_up=True, mesh=mesh),
                               x_up)
        y_down = pytree.tree_map(torch.add,
                                 ring_permute(y_down, axis_name, shift_up=False, mesh=mesh), x_down)
    return pytree.tree_map(
        lambda a, b: _mesh.mark_activation(torch.cat([a, b], -1), mesh, axis_name), y_up, y_down)
