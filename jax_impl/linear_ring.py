"""Per-device bodies of the ParallelLinear family: the ring collective matmuls (n-1
``ppermute``s, no all-gather / reduce-scatter of the activation) and the jitted ``shard_map``
that runs them on global arrays. Twin of :mod:`torch_impl.linear_ring`; the layers are in
:mod:`jax_impl.linear` (its docstring has the method table).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as Ps

from ringpar.matmul_methods import MatrixMultiplyMethod

from .collectives import ring_permute

__all__ = ["dot", "ring_split", "pick_block", "all_gather_matmul",
           "reduce_scatter_matmul", "scale_and_bias", "column_local", "row_local",
           "LOCAL_FORWARD", "param_specs", "io_specs", "tp_forward"]

Array = jax.Array
PrecisionLike = lax.PrecisionLike


def dot(x: Array, w: Array, precision: PrecisionLike = None) -> Array:
    """x[..., k] @ w[k, j] -> [..., j] (the contraction nnx.Linear uses)."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def ring_split(n: int, bidirectional: bool) -> tuple[int, int]:
    """Ring steps (up, down) that cover the n-1 other devices: up + down = n - 1."""
    if not bidirectional:
        return n - 1, 0
    return n // 2, (n - 1) // 2


def pick_block(w: Array, k: Array, size: int, axis: int) -> Array:
    """Block ``k`` (a traced index) of ``size`` rows (axis 0) or columns (axis 1) of ``w``."""
    return lax.dynamic_slice_in_dim(w, k * size, size, axis=axis)


def all_gather_matmul(x: Array, w: Array, axis_name: str, bidirectional: bool = False,
                       precision: PrecisionLike = None) -> Array:
    """Per device: x holds in-feature block i of the input [..., in/n], w is [in, j].

    Returns the full contraction ``all_gather(x, features) @ w`` [..., j] without an all-gather:
    the input blocks travel round the ring (n-1 ppermutes in all, ``up`` of them i -> i+1 and
    ``down`` of them i -> i-1), and each block is multiplied by the matching row block of w while
    the next one is in flight. After s up-shifts a device holds block i-s, after s down-shifts
    block i+s.
    """
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    c = x.shape[-1]
    up, down = ring_split(n, bidirectional)
    fwd, bwd = x, x
    acc = dot(x, pick_block(w, idx, c, 0), precision)
    for s in range(1, max(up, down) + 1):
        # issue this step's permutes before its matmuls, so each matmul overlaps the transfer
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False)
        if s <= up:
            acc = acc + dot(fwd, pick_block(w, (idx - s) % n, c, 0), precision)
        if s <= down:
            acc = acc + dot(bwd, pick_block(w, (idx + s) % n, c, 0), precision)
    return acc


def reduce_scatter_matmul(x: Array, w: Array, axis_name: str, bidirectional: bool = False,
                           precision: PrecisionLike = None) -> Array:
    """Per device: x [..., k_i] and w [k_i, out] give a partial product of the full x @ W.

    Returns out-feature block i [..., out/n] of the sum over devices of ``x @ w`` (what
    ``psum_scatter(x @ w, -1, tiled=True)`` returns) without a reduce-scatter: the accumulator of
    block b starts ``up`` devices below b and moves up the ring (``up`` ppermutes i -> i+1), a
    second one starts ``down`` devices above b and moves down (``down`` ppermutes i -> i-1); every
    device it passes adds its partial product of block b, computed while the accumulator is in
    flight, and device b adds its own at the end. n-1 permutes in all.
    """
    n = lax.axis_size(axis_name)
    idx = lax.axis_index(axis_name)
    out = w.shape[-1]
    if out % n:
        raise ValueError(f"out_features={out}: expected a multiple of the {axis_name!r} axis "
                         f"size {n}")
    c = out // n
    up, down = ring_split(n, bidirectional)
    fwd = dot(x, pick_block(w, (idx + up) % n, c, 1), precision) if up else None
    bwd = dot(x, pick_block(w, (idx - down) % n, c, 1), precision) if down else None
    for s in range(1, max(up, down) + 1):
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True)
            if s < up:
                fwd = fwd + dot(x, pick_block(w, (idx + up - s) % n, c, 1), precision)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False)
            if s < down:
                bwd = bwd + dot(x, pick_block(w, (idx - down + s) % n, c, 1), precision)
    acc = dot(x, pick_block(w, idx, c, 1), precision)
    if fwd is not None:
        acc = acc + fwd
    if bwd is not None:
        acc = acc + bwd
    return acc


def scale_and_bias(y: Array, b: Array | None, scale: float) -> Array:
    """``y * scale + b`` (scale skipped when 1.0, as in the seed's scale operator)."""
    if scale != 1.0:
        y = y * scale
    if b is not None:
        y = y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))
    return y


def column_local(x: Array, w: Array, b: Array | None, *, axis_name: str,
                  method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
                  precision: PrecisionLike) -> Array:
    """Column direction, per device: w is out block i [in, out/n], b is bias block i.

    PLAIN: x is the replicated input [..., in]; ALL_GATHER*: x is in-feature block i [..., in/n].
    Returns out block i [..., out/n] if ``reduce_scatter_output``, else the gathered [..., out].
    """
    if method is MatrixMultiplyMethod.PLAIN:
        y = dot(x, w, precision)
    else:
        y = all_gather_matmul(x, w, axis_name, method.bidirectional, precision)
    y = scale_and_bias(y, b, scale)
    if not reduce_scatter_output:
        y = lax.all_gather(y, axis_name, axis=y.ndim - 1, tiled=True, to="invarying")
    return y


def row_local(x: Array, w: Array, b: Array | None, *, axis_name: str,
               method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
               precision: PrecisionLike) -> Array:
    """Row direction, per device: x is in-feature block i [..., in/n], w is in block i [in/n, out].

    b is bias block i if ``reduce_scatter_output`` (and the result is out block i [..., out/n]),
    else the full bias (and the result is the replicated [..., out]).
    """
    if method is MatrixMultiplyMethod.PLAIN:
        partial = dot(x, w, precision)
        if reduce_scatter_output:
            y = lax.psum_scatter(partial, axis_name, scatter_dimension=partial.ndim - 1, tiled=True)
        else:
            y = lax.psum(partial, axis_name)
        return scale_and_bias(y, b, scale)
    y = reduce_scatter_matmul(x, w, axis_name, method.bidirectional, precision)
    if reduce_scatter_output:
        return scale_and_bias(y, b, scale)
    y = lax.all_gather(y, axis_name, axis=y.ndim - 1, tiled=True, to="invarying")
    return scale_and_bias(y, b, scale)


LOCAL_FORWARD = {"column": column_local, "row": row_local}


def param_specs(direction: str, axis_name: str, reduce_scatter_output: bool) -> tuple[Ps, Ps]:
    """(kernel spec, bias spec) of a layer (see the table in the module docstring)."""
    if direction == "column":
        return Ps(None, axis_name), Ps(axis_name)
    return Ps(axis_name, None), (Ps(axis_name) if reduce_scatter_output else Ps())


def io_specs(direction: str, method: MatrixMultiplyMethod, axis_name: str,
              reduce_scatter_output: bool, ndim: int) -> tuple[Ps, Ps]:
    """(input spec, output spec) of the shard_map for an input of rank ``ndim``."""
    lead = (None,) * (ndim - 1)
    input_sharded = direction == "row" or method is not MatrixMultiplyMethod.PLAIN
    in_spec = Ps(*lead, axis_name if input_sharded else None)
    out_spec = Ps(*lead, axis_name if reduce_scatter_output else None)
    return in_spec, out_spec


@functools.partial(jax.jit, static_argnames=("direction", "method", "mesh", "axis_name",
                                             "reduce_scatter_output", "scale", "precision"))


def tp_forward(x: Array, kernel: Array, bias: Array | None, *, direction: str,
                method: MatrixMultiplyMethod, mesh: Mesh, axis_name: str,
                reduce_scatter_output: bool, scale: float, precision: PrecisionLike) -> Array:
    """Global-view forward: ``jax.shard_map`` of the direction's per-device body over ``mesh``.

    Jitted with the layout as static arguments, so an eager call compiles once per shape and
    configuration instead of running the shard_map op by op; under an outer ``jit`` it inlines.
    """
    kspec, bspec = param_specs(direction, axis_name, reduce_scatter_output)
    in_spec, out_spec = io_specs(direction, method, axis_name, reduce_scatter_output, x.ndim)
    local = functools.partial(LOCAL_FORWARD[direction], axis_name=axis_name, method=method,
                              reduce_scatter_output=reduce_scatter_output, scale=scale,
                              precision=precision)
    if bias is None:
        return jax.shard_map(lambda x_, w_: local(x_, w_, None), mesh=mesh,
                             in_specs=(in_spec, kspec), out_specs=out_spec)(x, kernel)
    return jax.shard_map(local, mesh=mesh, in_specs=(in_spec, kspec, bspec),
                         out_specs=out_spec)(x, kernel, bias)


