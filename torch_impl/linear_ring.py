"""Per-device bodies of the ParallelLinear family in the stacked view: the ring collective
matmuls (n-1 one-permute ring shifts, no all-gather / reduce-scatter of the activation) and the
global -> stacked -> global forward. Twin of :mod:`jax_impl.linear_ring`; the layers are in
:mod:`torch_impl.linear` (its docstring has the method table and the stacked view).
"""

from __future__ import annotations

import typing as tp

import torch

from ringpar.matmul_methods import MatrixMultiplyMethod  # neutral, shared

from . import mesh as _mesh
from .collectives import axis_index, reduce_scatter_features, ring_permute

__all__ = ["dot", "ring_split", "pick_block", "all_gather_matmul",
           "reduce_scatter_matmul", "scale_and_bias", "column_local", "row_local",
           "LOCAL_FORWARD", "param_specs", "io_specs", "tp_forward",
           "features_to_stacked", "features_from_stacked"]

Spec = tuple  # one entry per dim: None, an axis name, or a tuple of names

# All of these work in the stacked view: x [n, ..., k] is device i's x in row i.


def dot(x: torch.Tensor, w: torch.Tensor, precision: tp.Any = None) -> torch.Tensor:
    """Per device i: x[i] [..., k] @ w[i] [k, j] -> [n, ..., j] (``precision``: see module doc).

    An einsum, not ``bmm``: torch_xla lowers it and its backward to dots with the contracting
    dims named, as JAX emits them; ``bmm``'s backward transposed x and w explicitly, and XLA:CPU
    compiled each small transpose into an unrolled kernel (325 KB of LLVM IR at 64 -> 256, tp=4;
    the largest kernel is 18 KB with the einsum; issue 14).
    """
    n, k = x.shape[0], x.shape[-1]
    y = torch.einsum("nbk,nkj->nbj", x.reshape(n, -1, k), w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def ring_split(n: int, bidirectional: bool) -> tuple[int, int]:
    """Ring steps (up, down) that cover the n-1 other devices: up + down = n - 1."""
    if not bidirectional:
        return n - 1, 0
    return n // 2, (n - 1) // 2


def pick_block(w: torch.Tensor, k: torch.Tensor, size: int, axis: int, *, mesh,
           axis_name: str) -> torch.Tensor:
    """Per device i: block ``k[i]`` of ``size`` rows (axis 0) or columns (axis 1) of ``w[i]``.

    ``w`` is stacked ``[n, R, C]``, ``k`` an integer tensor ``[n]`` (a function of
    :func:`collectives.axis_index`). The block is picked by a one-hot mask over the unsharded
    block dim and a sum (JAX: ``dynamic_slice`` at ``k * size``): elementwise work on each
    device, no communication, and a backward that is the same mask. Not ``torch.gather``: its
    per-element index tensor and the scatter-add of its backward made XLA:CPU's LLVM unroll
    1024-element index loops, a 50-120 s compile at 64 -> 256, tp=4 (issue 14).
    """
    n, rows, cols = w.shape
    nb = (rows if axis == 0 else cols) // size
    picks = torch.arange(nb, device=k.device, dtype=k.dtype)
    mask = picks.unsqueeze(0) == k.unsqueeze(1)  # [n, nb], one True per row
    # where, not a product: an inf in an unpicked block must not turn the picked one into NaN
    if axis == 0:
        out = torch.where(mask.view(n, nb, 1, 1), w.reshape(n, nb, size, cols), 0.0).sum(1)
    else:
        out = torch.where(mask.view(n, 1, nb, 1), w.reshape(n, rows, nb, size), 0.0).sum(2)
    return _mesh.mark_stacked(out, mesh, axis_name)


def all_gather_matmul(x: torch.Tensor, w: torch.Tensor, axis_name: str,
                       bidirectional: bool = False, precision: tp.Any = None, *,
                       mesh) -> torch.Tensor:
    """Stacked x [n, ..., in/n] (row i = in-feature block i of the input), w [n, in, j].

    Returns ``[n, ..., j]`` with row i = ``all_gather(x, features) @ w[i]``, without an all-gather:
    the input blocks travel round the ring (n-1 collective-permutes in all, ``up`` of them i ->
    i+1 and ``down`` of them i -> i-1), and each block is multiplied by the matching row block of
    w while the next one is in flight. After s up-shifts device i holds block i-s, after s
    down-shifts block i+s.
    """
    n = x.shape[0]
    idx = axis_index(axis_name, mesh=mesh)
    c = x.shape[-1]
    blk = dict(mesh=mesh, axis_name=axis_name)
    up, down = ring_split(n, bidirectional)
    fwd, bwd = x, x
    acc = dot(x, pick_block(w, idx, c, 0, **blk), precision)
    for s in range(1, max(up, down) + 1):
        # issue this step's permutes before its matmuls, so each matmul overlaps the transfer
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True, mesh=mesh)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False, mesh=mesh)
        if s <= up:
            acc = acc + dot(fwd, pick_block(w, (idx - s) % n, c, 0, **blk), precision)
        if s <= down:
            acc = acc + dot(bwd, pick_block(w, (idx + s) % n, c, 0, **blk), precision)
    return _mesh.mark_stacked(acc, mesh, axis_name)


def reduce_scatter_matmul(x: torch.Tensor, w: torch.Tensor, axis_name: str,
                           bidirectional: bool = False, precision: tp.Any = None, *,
                           mesh) -> torch.Tensor:
    """Stacked x [n, ..., k] and w [n, k, out]: row i gives a partial product of the full x @ W.

    Returns ``[n, ..., out/n]`` whose row i is out-feature block i of the sum over devices of
    ``x[d] @ w[d]`` (what ``reduce_scatter_features`` of the partial products returns) without a
    reduce-scatter: the accumulator of block b starts ``up`` devices below b and moves up the ring
    (``up`` permutes i -> i+1), a second one starts ``down`` devices above b and moves down
    (``down`` permutes i -> i-1); every device it passes adds its partial product of block b,
    computed while the accumulator is in flight, and device b adds its own at the end.
    """
    n = x.shape[0]
    idx = axis_index(axis_name, mesh=mesh)
    out = w.shape[-1]
    if out % n:
        raise ValueError(f"out_features={out}: expected a multiple of the {axis_name!r} axis "
                         f"size {n}")
    c = out // n
    blk = dict(mesh=mesh, axis_name=axis_name)
    up, down = ring_split(n, bidirectional)
    fwd = dot(x, pick_block(w, (idx + up) % n, c, 1, **blk), precision) if up else None
    bwd = dot(x, pick_block(w, (idx - down) % n, c, 1, **blk), precision) if down else None
    for s in range(1, max(up, down) + 1):
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True, mesh=mesh)
            if s < up:
                fwd = fwd + dot(x, pick_block(w, (idx + up - s) % n, c, 1, **blk), precision)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False, mesh=mesh)
            if s < down:
                bwd = bwd + dot(x, pick_block(w, (idx - down + s) % n, c, 1, **blk), precision)
    acc = dot(x, pick_block(w, idx, c, 1, **blk), precision)
    if fwd is not None:
        acc = acc + fwd
    if bwd is not None:
        acc = acc + bwd
    return _mesh.mark_stacked(acc, mesh, axis_name)


def scale_and_bias(y: torch.Tensor, b: torch.Tensor | None, scale: float,
                    stacked: bool = False) -> torch.Tensor:
    """``y * scale + b`` (scale skipped when 1.0). ``stacked``: y [n, ..., o] and b [n, o]."""
    if scale != 1.0:
        y = y * scale
    if b is not None:
        if stacked:
            y = y + b.reshape((b.shape[0],) + (1,) * (y.dim() - 2) + (b.shape[-1],))
        else:
            y = y + b.reshape((1,) * (y.dim() - 1) + (-1,))
    return y


def features_to_stacked(x: torch.Tensor, n: int, *, mesh, axis_name: str) -> torch.Tensor:
    """Global [..., F] (sharded on F over the axis) -> stacked [n, ..., F/n] (no data moves)."""
    y = x.reshape(*x.shape[:-1], n, x.shape[-1] // n).movedim(-2, 0)
    return _mesh.mark_stacked(y, mesh, axis_name)


def features_from_stacked(y: torch.Tensor, *, mesh, axis_name: str,
                          replicated: bool) -> torch.Tensor:
    """Stacked [n, ..., o] (row i = out block i) -> global [..., n*o] sharded on its last dim
    over the axis, or replicated (one all-gather: the JAX ``all_gather(tiled=True)``)."""
    n = y.shape[0]
    out = y.movedim(0, -2).reshape(*y.shape[1:-1], n * y.shape[-1])
    _mesh.mark_sharding(out, mesh, (None,) * (out.dim() - 1) + (axis_name,))
    if replicated:
        out = _mesh.mark_sharding(out.clone(), mesh, (None,) * out.dim())
    return out


def column_local(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, axis_name: str,
                  method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
                  precision: tp.Any, mesh) -> torch.Tensor:
    """Column direction: w stacked [n, in, out/n] (row i = out block i), b stacked [n, out/n].

    PLAIN: x is the replicated input broadcast to [n, ..., in]; ALL_GATHER*: x is stacked
    [n, ..., in/n] (row i = in-feature block i). Returns the GLOBAL [..., out], sharded on its last
    dim if ``reduce_scatter_output``, else replicated (one all-gather).
    """
    if method is MatrixMultiplyMethod.PLAIN:
        y = dot(x, w, precision)
    else:
        y = all_gather_matmul(x, w, axis_name, method.bidirectional, precision, mesh=mesh)
    y = scale_and_bias(y, b, scale, stacked=True)
    return features_from_stacked(y, mesh=mesh, axis_name=axis_name,
                                 replicated=not reduce_scatter_output)


def row_local(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, axis_name: str,
               method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
               precision: tp.Any, mesh) -> torch.Tensor:
    """Row direction: x stacked [n, ..., in/n], w stacked [n, in/n, out] (row i = in block i).

    b is the stacked bias [n, out/n] if ``reduce_scatter_output`` (and the result is the global
    [..., out] sharded on its last dim), else the full bias [out] (and the result is the
    replicated global [..., out]).
    """
    if method is MatrixMultiplyMethod.PLAIN:
        partial = _mesh.mark_stacked(dot(x, w, precision), mesh, axis_name)
        if reduce_scatter_output:
            y = reduce_scatter_features(partial, axis_name, mesh=mesh)
            y = scale_and_bias(y, b, scale, stacked=True)
            return features_from_stacked(y, mesh=mesh, axis_name=axis_name, replicated=False)
        y = _mesh.mark_sharding(partial.sum(0), mesh, (None,) * (partial.dim() - 1))  # psum
        return scale_and_bias(y, b, scale)
    y = reduce_scatter_matmul(x, w, axis_name, method.bidirectional, precision, mesh=mesh)
    if reduce_scatter_output:
        y = scale_and_bias(y, b, scale, stacked=True)
        return features_from_stacked(y, mesh=mesh, axis_name=axis_name, replicated=False)
    y = features_from_stacked(y, mesh=mesh, axis_name=axis_name, replicated=True)
    return scale_and_bias(y, b, scale)


LOCAL_FORWARD = {"column": column_local, "row": row_local}


def param_specs(direction: str, axis_name: str, reduce_scatter_output: bool) -> tuple[Spec, Spec]:
    """(kernel spec, bias spec) of a layer (see the table in the module docstring)."""
    if direction == "column":
        return (None, axis_name), (axis_name,)
    return (axis_name, None), ((axis_name,) if reduce_scatter_output else (None,))


def io_specs(direction: str, method: MatrixMultiplyMethod, axis_name: str,
              reduce_scatter_output: bool, ndim: int) -> tuple[Spec, Spec]:
    """(input spec, output spec) of the global tensors for an input of rank ``ndim``."""
    lead = (None,) * (ndim - 1)
    input_sharded = direction == "row" or method is not MatrixMultiplyMethod.PLAIN
    in_spec = (*lead, axis_name if input_sharded else None)
    out_spec = (*lead, axis_name if reduce_scatter_output else None)
    return in_spec, out_spec


def tp_forward(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, *,
                direction: str, method: MatrixMultiplyMethod, mesh, axis_name: str,
                reduce_scatter_output: bool, scale: float, precision: tp.Any) -> torch.Tensor:
    """Global tensors in, global tensor out: the twin of JAX's ``shard_map`` of the local body.

    Annotates x, kernel and bias with their specs, moves them to the stacked view (reshapes: no
    data moves when they already have those specs), runs the direction's per-device body and
    annotates the global output with the output spec.
    """
    n = _mesh.check_axis(mesh, axis_name)
    kspec, bspec = param_specs(direction, axis_name, reduce_scatter_output)
    in_spec, out_spec = io_specs(direction, method, axis_name, reduce_scatter_output, x.dim())
    stk = dict(mesh=mesh, axis_name=axis_name)
    if in_spec[-1] is None:  # every device sees the whole input
        x = _mesh.mark_stacked(x.unsqueeze(0).expand(n, *x.shape), mesh, axis_name)
    else:
        x = features_to_stacked(x, n, **stk)
    in_f, out_f = kernel.shape
    if direction == "column":  # [in, out] -> [n, in, out/n]
        w = _mesh.mark_stacked(kernel.reshape(in_f, n, out_f // n).movedim(1, 0), mesh, axis_name)
    else:  # [in, out] -> [n, in/n, out]
        w = _mesh.mark_stacked(kernel.reshape(n, in_f // n, out_f), mesh, axis_name)
    if bias is not None and bspec[0] is not None:
        bias = _mesh.mark_stacked(bias.reshape(n, -1), mesh, axis_name)
    y = LOCAL_FORWARD[direction](x, w, bias, axis_name=axis_name, method=method,
                                  reduce_scatter_output=reduce_scatter_output, scale=scale,
                                  precision=precision, mesh=mesh)
    return _mesh.mark_sharding(y, mesh, out_spec)


