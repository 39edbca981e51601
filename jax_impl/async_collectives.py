"""All-gather and scatter-sum as rings of ``ppermute`` steps: the communication of
:class:`jax_impl.tensor_parallel.TPAsyncDense` (twin of :mod:`torch_impl.async_collectives`).

Per-device code: call inside ``jax.shard_map`` over a mesh with the axis ``axis_name`` (size n).
Each function issues n-1 ring steps of one ``collective-permute`` (pairs ``(j, j+1 mod n)`` up,
``(j+1 mod n, j)`` down) instead of one all-gather / reduce-scatter, so that each step's matmul in
``TPAsyncDense`` can overlap the next step's communication. Also importable from
:mod:`jax_impl.tensor_parallel`, where they were first defined.

Example (inside ``shard_map`` over an axis ``'tp'`` of size 4)::

    xs = async_gather(x, "tp")        # xs[i] is x of device d - i (mod 4), on device d
    y = async_scatter(parts, "tp")    # parts[i] of device e is added on device e - 1 - i
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .collectives import ring_permute, split_features
from .mesh import axis_size

__all__ = ["async_gather", "async_gather_bidirectional", "async_gather_split", "async_scatter",
           "async_scatter_split"]

PyTree = Any


def async_gather(x: PyTree, axis_name: str, shift_up: bool = True) -> list[PyTree]:
    """All-gather by n-1 ring permutations.

    Args:
        x: Per-device pytree.
        axis_name: The axis to gather over (size n).
        shift_up: Send from device j to j+1 (else to j-1).

    Returns:
        List of n per-device pytrees: element i is ``x`` of device ``d - i`` (shift up) or ``d + i``
        (shift down), mod n, on device d. Element 0 is ``x`` itself.
    """
    n = axis_size(axis_name)
    ps = [x]
    for _ in range(1, n):
        ps.append(ring_permute(ps[-1], axis_name, shift_up=shift_up))
    return ps


def async_gather_bidirectional(x: jax.Array, axis_name: str, shift_up: bool = True) -> list[jax.Array]:
    """All-gather by ring permutations in both directions (ceil((n-1)/2) up, floor((n-1)/2) down).

    Steps alternate: odd steps shift the "up" chain, even steps the "down" chain, so each value
    travels at most n/2 hops.

    Args:
        x: Per-device array (or pytree).
        axis_name: The axis to gather over (size n).
        shift_up: Order the result like ``async_gather(x, axis_name, shift_up)``.

    Returns:
        The same list, in the same order, as :func:`async_gather` with the same ``shift_up``.
    """
    n = axis_size(axis_name)
    ups, downs = [], []
    p_up = p_down = x
    for step in range(1, n):
        if step % 2:
            p_up = ring_permute(p_up, axis_name, shift_up=True)
            ups.append(p_up)
        else:
            p_down = ring_permute(p_down, axis_name, shift_up=False)
            downs.append(p_down)
    # ups[k-1] comes from d-k and downs[k-1] from d+k = d-(n-k).
    if shift_up:
        return [x] + ups + downs[::-1]
    return [x] + downs + ups[::-1]


def async_gather_split(x: jax.Array, axis_name: str) -> list[jax.Array]:
    """All-gather with the features split in halves, one half travelling each way round the ring.

    Args:
        x: Per-device array ``[..., F]`` (or pytree); F must be even when n > 1.
        axis_name: The axis to gather over (size n).

    Returns:
        List of length ``2n - 1`` on device d: ``[x, lo(d-1), ..., lo(d-n+1), hi(d+1), ...,
        hi(d+n-1)]`` (indices mod n), where ``lo(e)`` / ``hi(e)`` are the first / second half of the
        features ``[..., F/2]`` of device e's ``x``. Element 0 is the full local ``x``; each other
        device's input appears once, split across the two halves. For n == 1: ``[x]``.
    """
    n = axis_size(axis_name)
    if n == 1:
        return [x]
    lo, hi = split_features(x, 2, argument="x")
    return [x] + async_gather(lo, axis_name, shift_up=True)[1:] + async_gather(
        hi, axis_name, shift_up=False)[1:]


def _check_scatter_inputs(xs: Sequence[PyTree], axis_name: str) -> int:
    n = axis_size(axis_name)
    if len(xs) != n:
        raise ValueError(f"len(xs)={len(xs)}: expected one input per device, the size {n} of axis "
                         f"{axis_name!r}")
    return n


def async_scatter(xs: Sequence[PyTree], axis_name: str, shift_up: bool = True) -> PyTree:
    """Scatter-sum by n-1 ring permutations (the ring form of ``psum_scatter``).

    Args:
        xs: n per-device pytrees of equal structure and shapes. With ``shift_up``, ``xs[i]`` of
            device e is added into the result of device ``e - 1 - i (mod n)`` (shift down: ``e + 1
            + i``). So ``xs[i] = z[block (d-1-i) mod n]`` on each device d reproduces
            ``psum_scatter(z, tiled=True)``.
        axis_name: The axis to scatter over (size n).
        shift_up: Send partial sums from device j to j+1 (else to j-1).

    Returns:
        The per-device sum, shaped like ``xs[0]``.

    Raises:
        ValueError: if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name)
    y = xs[0]
    for x in xs[1:]:
        y = jax.tree.map(jnp.add, ring_permute(y, axis_name, shift_up=shift_up), x)
    return y


def async_scatter_split(xs: Sequence[PyTree], axis_name: str) -> PyTree:
    """Scatter-sum with the features split: the first ``F//2`` go up the ring, the rest down.

    Args:
        xs: n per-device pytrees ``[..., F]``. The first ``F//2`` features of ``xs[i]`` of device e
            go to device ``e - 1 - i``, the other ``F - F//2`` to device ``e + 1 + i`` (mod n).
        axis_name: The axis to scatter over (size n).

    Returns:
        The per-device sum ``[..., F]``.

    Raises:
        ValueError: if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name)

    def halves(x):
        lo = jax.tree.map(lambda a: a[..., : a.shape[-1] // 2], x)
        hi = jax.tree.map(lambda a: a[..., a.shape[-1] // 2:], x)
        return lo, hi

    y_up, y_down = halves(xs[0])
    for x in xs[1:]:
        x_up, x_down = halves(x)
        y_up = jax.tree.map(jnp.add, ring_permute(y_up, axis_name, shift_up=True), x_up)
        y_down = jax.tree.map(jnp.add, ring_permute(y_down, axis_name, shift_up=False), x_down)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=-1), y_up, y_down)
