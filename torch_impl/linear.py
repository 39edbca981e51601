"""Tensor-parallel linear layers for torch_xla SPMD: the twin of :mod:`jax_impl.linear`.

Public API (same names, in the same order, with the same constructor arguments and defaults as the
JAX module; ``rngs`` becomes ``seed`` and dtypes are torch dtypes)::

    MatrixMultiplyMethod      how the sharded matmul communicates (table below)
    TensorParallelConfig      mesh, axis_name, matmul_method, reduce_output, reduce_scatter_output
    ParallelLinear            nn.Linear twin; with a parallel_config it is column-parallel
    RowParallelLinear         kernel [in, out] sharded on in
    ColumnParallelLinear      kernel [in, out] sharded on out
    get_sharding, get_output_partition_spec, get_matmul_output_sharding

plus ``ParallelLinear.from_linear(linear, parallel_config=None, ...)`` (also on the two subclasses),
which takes the weights of an existing ``torch.nn.Linear`` exactly (``kernel = weight.T``).

Layers take ORDINARY global tensors ``[..., in_features]`` on the XLA device and return global
``[..., sum(out_features)]`` tensors annotated with ``mark_sharding``. Parameters are ``kernel``
``[in_features, sum(out_features)]`` (the Flax layout, NOT torch's transposed ``weight``) and
``bias`` ``[sum(out_features)]``, GLOBAL shapes, so ``state_dict()`` has the keys and shapes of the
JAX parameter tree (``kernel``, ``bias``) and weights convert by name. In the parallel case they
live on the XLA device, annotated with a sharding over the config's mesh:

    ============  =============  ==============================================
    direction     kernel spec    bias spec
    ============  =============  ==============================================
    column        (None, tp)     (tp,)
    row           (tp, None)     (tp,) if reduce_scatter_output else (None,)
    ============  =============  ==============================================

Inside, each layer works in the STACKED VIEW of the JAX per-device values (see docs/design.md): a JAX
``shard_map`` value of per-device shape ``S`` is a tensor ``[n, *S]`` whose dim 0 is sharded over
the tp axis (row i = device i's value). A global ``[..., F]`` sharded on its last dim is reshaped to
``[n, ..., F/n]`` (no data moves); the column kernel ``[in, out]`` is the stacked ``[n, in,
out/n]``, the row kernel the stacked ``[n, in/n, out]``. The per-device bodies below are then
line-by-line twins of the JAX ones, and each communication step is the op JAX emits:

    =========================  ===================================================================
    JAX, per device            torch_xla, stacked view
    =========================  ===================================================================
    ``ppermute`` (ring step)   ``collectives.ring_permute``: one collective-permute forward, the
                               inverse one backward
    ``psum``                   sum over dim 0 (all-reduce)
    ``psum_scatter`` (tiled)   ``collectives.reduce_scatter_features`` (reduce-scatter)
    ``all_gather`` (tiled)     ``mark_sharding`` of the global output as replicated (all-gather)
    ``dynamic_slice`` of       a one-hot mask over the unsharded block dim and a sum (local,
    block ``axis_index``-k     no communication; not ``torch.gather``: see ``_block``)
    =========================  ===================================================================

The matrix-multiply methods, the direction each applies to and what each communicates are those
of :mod:`jax_impl.linear` (its module docstring has the table): PLAIN (both), ALL_GATHER[_BIDI-
RECTIONAL] (column: the input is consumed sharded on its features and gathered by a ring of n-1
collective-permutes, each overlapped with a partial matmul), REDUCE_SCATTER[_BIDIRECTIONAL] (row:
partial sums of one output block travel a ring of n-1 permutes). A ring method leaves the output
sharded on its last dim; with ``reduce_scatter_output=False`` one all-gather of the output follows.
The compiled programs have the same collectives (kind, source_target_pairs, replica groups) as the
JAX twin's, forward and forward+backward (``tests/parity/test_linear_twins.py``).

Module-level helpers, one per JAX helper, in the same order (all in the stacked view; those that
communicate or re-annotate take ``mesh`` and ``axis_name`` as keyword arguments):

    _dot(x, w, precision)                         x[n, ..., k] @ w[n, k, j] per device
    _ring_split(n, bidirectional)                 (up, down) ring steps, up + down = n - 1
    _block(w, k, size, axis)                      per device i, block k[i] of w[i] along axis
    _all_gather_matmul(x, w, axis_name, bidirectional, precision)
    _reduce_scatter_matmul(x, w, axis_name, bidirectional, precision)
    _column_local(...), _row_local(...)           the per-device body of each direction
    _tp_forward(x, kernel, bias, ...)             global tensors -> stacked body -> global output

Deviations from the JAX module, on purpose:

- ``rngs`` -> ``seed`` (an int, or None to draw one from torch's global generator, so that
  ``torch.manual_seed`` fixes it); ``kernel_init`` / ``bias_init`` are ``init(generator, shape,
  dtype)`` callables (default: ``tensor_parallel.lecun_normal()``, the Flax initializer's twin,
  and zeros). Random numbers cannot match JAX's; weights convert by name instead.
- ``precision``: torch_xla has no per-op matmul precision (it is process-global,
  ``torch_xla.backends.set_mat_mul_precision``); the argument accepts None, 'default', 'high' or
  'highest' and is stored, not applied.
- ``TensorParallelConfig.mesh`` is a ``torch_xla.distributed.spmd.Mesh``; with no mesh the
  config takes torch_xla's global mesh (``xs.set_global_mesh``) where JAX takes the mesh of
  ``jax.set_mesh``.
- Partition specs are plain tuples (what ``mark_sharding`` takes), one entry per dim;
  ``get_sharding`` reads the sharding annotation of a tensor back as such a tuple over a mesh
  (keyword ``mesh``, default the global mesh), naming only mesh axes of size > 1.
- Without a parallel config the parameters stay on the CPU (like ``nn.Linear``; move the module
  with ``.to(...)``) and the forward pass is ``F.linear(x, kernel.T, bias)`` (times ``scale``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing as tp

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ringpar.matmul_methods import MatrixMultiplyMethod, resolve_method  # neutral, shared
from ringpar.validation import positive_int

from . import mesh as _mesh
from . import xla
from .array_utils import draw_seed
from .collectives import axis_index, reduce_scatter_features, ring_permute
from .tensor_parallel import lecun_normal

__all__ = [
    "MatrixMultiplyMethod",
    "TensorParallelConfig",
    "ParallelLinear",
    "RowParallelLinear",
    "ColumnParallelLinear",
    "get_sharding",
    "get_output_partition_spec",
    "get_matmul_output_sharding",
]

Spec = tuple  # a partition spec: one entry (None, an axis name, or a tuple of names) per dim
Initializer = tp.Callable[..., torch.Tensor]
PRECISIONS = (None, "default", "high", "highest")


def _zeros(generator, shape, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=dtype)


default_kernel_init = lecun_normal()
default_bias_init = _zeros


# --------------------------------------------------------------------------------------- methods
# MatrixMultiplyMethod and resolve_method live in the framework-neutral ringpar.matmul_methods.
# ---------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class TensorParallelConfig:
    """Configuration for tensor parallelism (a frozen dataclass).

    Attributes:
        mesh: The ``torch_xla.distributed.spmd.Mesh``. If None and a ``matmul_method`` (or
            ``reduce_scatter_output=True``) is given, torch_xla's global mesh
            (``xs.set_global_mesh``) is used; with neither, ValueError. With no mesh and nothing
            asked for (``TensorParallelConfig()``) the config is inactive: a plain Linear.
        axis_name: Mesh axis used for tensor parallelism (must be an axis of the mesh).
        matmul_method: A :class:`MatrixMultiplyMethod` or its string value; None means PLAIN
            when a mesh is given.
        reduce_output: Kept from the seed: True states that the layer must return a replicated
            output, which it does unless ``reduce_scatter_output`` is set; asking for both raises
            ValueError.
        reduce_scatter_output: If True the output stays sharded on its last (out-features) dim
            over ``axis_name``: column layers skip the output all-gather, row layers
            reduce-scatter instead of all-reduce, ring methods skip their trailing all-gather.

    Raises:
        ValueError: an unknown method, a mesh that is not a torch_xla Mesh, ``axis_name`` not an
            axis of the mesh, torch_xla SPMD not enabled, both reduce options.
    """

    mesh: tp.Any = None
    axis_name: str = "tp"
    matmul_method: MatrixMultiplyMethod | str | None = None
    reduce_output: bool = False
    reduce_scatter_output: bool = False

    def __post_init__(self) -> None:
        method = resolve_method(self.matmul_method)
        object.__setattr__(self, "matmul_method", method)
        mesh = self.mesh
        if mesh is None and (method is not None or self.reduce_scatter_output):
            mesh = xla.get_global_mesh()
            if mesh is None:
                asked = (f"matmul_method={method.value!r}" if method is not None
                         else "reduce_scatter_output=True")
                raise ValueError(
                    f"mesh=None with {asked}: expected a torch_xla.distributed.spmd.Mesh, either "
                    f"as mesh=... or set with xs.set_global_mesh(mesh)")
        if mesh is not None:
            if not xla.is_mesh(mesh):
                raise ValueError(f"mesh={mesh!r}: expected a torch_xla.distributed.spmd.Mesh")
            if not isinstance(self.axis_name, str):
                raise ValueError(f"axis_name={self.axis_name!r}: expected a mesh axis name (str)")
            _mesh.check_axis(mesh, self.axis_name, "axis_name")
            _mesh.require_spmd()
            object.__setattr__(self, "mesh", mesh)
        if self.reduce_output and self.reduce_scatter_output:
            raise ValueError("reduce_output=True with reduce_scatter_output=True: expected at most "
                             "one (a replicated output or one sharded on the out features)")

    @property
    def active(self) -> bool:
        """Whether the config shards anything (it has a mesh)."""
        return self.mesh is not None

    @property
    def method(self) -> MatrixMultiplyMethod:
        """The matmul method in effect (PLAIN when none was given)."""
        return self.matmul_method or MatrixMultiplyMethod.PLAIN

    @property
    def axis_size(self) -> int:
        """Size of ``axis_name`` in the mesh (1 for an inactive config)."""
        return _mesh.check_axis(self.mesh, self.axis_name) if self.mesh is not None else 1


# ------------------------------------------------------------------------ partition-spec helpers
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


# ---------------------------------------------------------------------- per-device matmul helpers
# All of these work in the stacked view: x [n, ..., k] is device i's x in row i.
def _dot(x: torch.Tensor, w: torch.Tensor, precision: tp.Any = None) -> torch.Tensor:
    """Per device i: x[i] [..., k] @ w[i] [k, j] -> [n, ..., j] (``precision``: see module doc).

    An einsum, not ``bmm``: torch_xla lowers it and its backward to dots with the contracting
    dims named, as JAX emits them; ``bmm``'s backward transposed x and w explicitly, and XLA:CPU
    compiled each small transpose into an unrolled kernel (325 KB of LLVM IR at 64 -> 256, tp=4;
    the largest kernel is 18 KB with the einsum; issue 14).
    """
    n, k = x.shape[0], x.shape[-1]
    y = torch.einsum("nbk,nkj->nbj", x.reshape(n, -1, k), w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def _ring_split(n: int, bidirectional: bool) -> tuple[int, int]:
    """Ring steps (up, down) that cover the n-1 other devices: up + down = n - 1."""
    if not bidirectional:
        return n - 1, 0
    return n // 2, (n - 1) // 2


def _block(w: torch.Tensor, k: torch.Tensor, size: int, axis: int, *, mesh,
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


def _all_gather_matmul(x: torch.Tensor, w: torch.Tensor, axis_name: str,
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
    up, down = _ring_split(n, bidirectional)
    fwd, bwd = x, x
    acc = _dot(x, _block(w, idx, c, 0, **blk), precision)
    for s in range(1, max(up, down) + 1):
        # issue this step's permutes before its matmuls, so each matmul overlaps the transfer
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True, mesh=mesh)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False, mesh=mesh)
        if s <= up:
            acc = acc + _dot(fwd, _block(w, (idx - s) % n, c, 0, **blk), precision)
        if s <= down:
            acc = acc + _dot(bwd, _block(w, (idx + s) % n, c, 0, **blk), precision)
    return _mesh.mark_stacked(acc, mesh, axis_name)


def _reduce_scatter_matmul(x: torch.Tensor, w: torch.Tensor, axis_name: str,
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
    up, down = _ring_split(n, bidirectional)
    fwd = _dot(x, _block(w, (idx + up) % n, c, 1, **blk), precision) if up else None
    bwd = _dot(x, _block(w, (idx - down) % n, c, 1, **blk), precision) if down else None
    for s in range(1, max(up, down) + 1):
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True, mesh=mesh)
            if s < up:
                fwd = fwd + _dot(x, _block(w, (idx + up - s) % n, c, 1, **blk), precision)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False, mesh=mesh)
            if s < down:
                bwd = bwd + _dot(x, _block(w, (idx - down + s) % n, c, 1, **blk), precision)
    acc = _dot(x, _block(w, idx, c, 1, **blk), precision)
    if fwd is not None:
        acc = acc + fwd
    if bwd is not None:
        acc = acc + bwd
    return _mesh.mark_stacked(acc, mesh, axis_name)


def _scale_and_bias(y: torch.Tensor, b: torch.Tensor | None, scale: float,
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


def _to_stacked(x: torch.Tensor, n: int, *, mesh, axis_name: str) -> torch.Tensor:
    """Global [..., F] (sharded on F over the axis) -> stacked [n, ..., F/n] (no data moves)."""
    y = x.reshape(*x.shape[:-1], n, x.shape[-1] // n).movedim(-2, 0)
    return _mesh.mark_stacked(y, mesh, axis_name)


def _from_stacked(y: torch.Tensor, *, mesh, axis_name: str, replicated: bool) -> torch.Tensor:
    """Stacked [n, ..., o] (row i = out block i) -> global [..., n*o] sharded on its last dim
    over the axis, or replicated (one all-gather: the JAX ``all_gather(tiled=True)``)."""
    n = y.shape[0]
    out = y.movedim(0, -2).reshape(*y.shape[1:-1], n * y.shape[-1])
    _mesh.mark_sharding(out, mesh, (None,) * (out.dim() - 1) + (axis_name,))
    if replicated:
        out = _mesh.mark_sharding(out.clone(), mesh, (None,) * out.dim())
    return out


def _column_local(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, axis_name: str,
                  method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
                  precision: tp.Any, mesh) -> torch.Tensor:
    """Column direction: w stacked [n, in, out/n] (row i = out block i), b stacked [n, out/n].

    PLAIN: x is the replicated input broadcast to [n, ..., in]; ALL_GATHER*: x is stacked
    [n, ..., in/n] (row i = in-feature block i). Returns the GLOBAL [..., out], sharded on its last
    dim if ``reduce_scatter_output``, else replicated (one all-gather).
    """
    if method is MatrixMultiplyMethod.PLAIN:
        y = _dot(x, w, precision)
    else:
        y = _all_gather_matmul(x, w, axis_name, method.bidirectional, precision, mesh=mesh)
    y = _scale_and_bias(y, b, scale, stacked=True)
    return _from_stacked(y, mesh=mesh, axis_name=axis_name, replicated=not reduce_scatter_output)


def _row_local(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, axis_name: str,
               method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
               precision: tp.Any, mesh) -> torch.Tensor:
    """Row direction: x stacked [n, ..., in/n], w stacked [n, in/n, out] (row i = in block i).

    b is the stacked bias [n, out/n] if ``reduce_scatter_output`` (and the result is the global
    [..., out] sharded on its last dim), else the full bias [out] (and the result is the
    replicated global [..., out]).
    """
    if method is MatrixMultiplyMethod.PLAIN:
        partial = _mesh.mark_stacked(_dot(x, w, precision), mesh, axis_name)
        if reduce_scatter_output:
            y = reduce_scatter_features(partial, axis_name, mesh=mesh)
            y = _scale_and_bias(y, b, scale, stacked=True)
            return _from_stacked(y, mesh=mesh, axis_name=axis_name, replicated=False)
        y = _mesh.mark_sharding(partial.sum(0), mesh, (None,) * (partial.dim() - 1))  # psum
        return _scale_and_bias(y, b, scale)
    y = _reduce_scatter_matmul(x, w, axis_name, method.bidirectional, precision, mesh=mesh)
    if reduce_scatter_output:
        y = _scale_and_bias(y, b, scale, stacked=True)
        return _from_stacked(y, mesh=mesh, axis_name=axis_name, replicated=False)
    y = _from_stacked(y, mesh=mesh, axis_name=axis_name, replicated=True)
    return _scale_and_bias(y, b, scale)


_LOCAL_FORWARD = {"column": _column_local, "row": _row_local}


def _param_specs(direction: str, axis_name: str, reduce_scatter_output: bool) -> tuple[Spec, Spec]:
    """(kernel spec, bias spec) of a layer (see the table in the module docstring)."""
    if direction == "column":
        return (None, axis_name), (axis_name,)
    return (axis_name, None), ((axis_name,) if reduce_scatter_output else (None,))


def _io_specs(direction: str, method: MatrixMultiplyMethod, axis_name: str,
              reduce_scatter_output: bool, ndim: int) -> tuple[Spec, Spec]:
    """(input spec, output spec) of the global tensors for an input of rank ``ndim``."""
    lead = (None,) * (ndim - 1)
    input_sharded = direction == "row" or method is not MatrixMultiplyMethod.PLAIN
    in_spec = (*lead, axis_name if input_sharded else None)
    out_spec = (*lead, axis_name if reduce_scatter_output else None)
    return in_spec, out_spec


def _tp_forward(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, *,
                direction: str, method: MatrixMultiplyMethod, mesh, axis_name: str,
                reduce_scatter_output: bool, scale: float, precision: tp.Any) -> torch.Tensor:
    """Global tensors in, global tensor out: the twin of JAX's ``shard_map`` of the local body.

    Annotates x, kernel and bias with their specs, moves them to the stacked view (reshapes: no
    data moves when they already have those specs), runs the direction's per-device body and
    annotates the global output with the output spec.
    """
    n = _mesh.check_axis(mesh, axis_name)
    kspec, bspec = _param_specs(direction, axis_name, reduce_scatter_output)
    in_spec, out_spec = _io_specs(direction, method, axis_name, reduce_scatter_output, x.dim())
    stk = dict(mesh=mesh, axis_name=axis_name)
    if in_spec[-1] is None:  # every device sees the whole input
        x = _mesh.mark_stacked(x.unsqueeze(0).expand(n, *x.shape), mesh, axis_name)
    else:
        x = _to_stacked(x, n, **stk)
    in_f, out_f = kernel.shape
    if direction == "column":  # [in, out] -> [n, in, out/n]
        w = _mesh.mark_stacked(kernel.reshape(in_f, n, out_f // n).movedim(1, 0), mesh, axis_name)
    else:  # [in, out] -> [n, in/n, out]
        w = _mesh.mark_stacked(kernel.reshape(n, in_f // n, out_f), mesh, axis_name)
    if bias is not None and bspec[0] is not None:
        bias = _mesh.mark_stacked(bias.reshape(n, -1), mesh, axis_name)
    y = _LOCAL_FORWARD[direction](x, w, bias, axis_name=axis_name, method=method,
                                  reduce_scatter_output=reduce_scatter_output, scale=scale,
                                  precision=precision, mesh=mesh)
    return _mesh.mark_sharding(y, mesh, out_spec)


def _promote(tensors: tp.Sequence[torch.Tensor | None], dtype: torch.dtype | None):
    """Twin of flax's ``promote_dtype``: cast to ``dtype``, or to the promoted type of all."""
    present = [t for t in tensors if t is not None]
    if dtype is None:
        dtype = present[0].dtype
        for t in present[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return [None if t is None else t.to(dtype) for t in tensors]


# ----------------------------------------------------------------------------------------- layers
class ParallelLinear(nn.Module):
    """A Linear layer with optional tensor parallelism (torch_xla SPMD).

    Without ``parallel_config`` (or with an inactive one: no mesh, no method) it computes exactly
    what ``nn.Linear`` computes with ``weight = kernel.T`` (plus the optional ``scale``). With an
    active config the plain ``ParallelLinear`` is COLUMN-parallel (kernel sharded on the out
    features, input replicated); use :class:`RowParallelLinear` for the row direction.

    Args:
        in_features: Number of input features.
        out_features: Number of output features, or a sequence of the sizes of merged projections
            (the kernel is then [in, sum(out_features)] and the output their concatenation; the
            out dim is sharded contiguously, not per projection).
        scale: Output multiplier: a float, ``'fan_in'`` (in_features ** -0.5) or ``'fan_out'``
            (sum(out_features) ** -0.5). Applied to x @ kernel before the bias.
        use_bias: Whether to add a bias [sum(out_features)].
        dtype: Computation dtype (default: promoted from input and parameters).
        param_dtype: Parameter dtype (default torch.float32).
        precision: None, 'default', 'high' or 'highest' (stored only: see the module docstring).
        kernel_init, bias_init: ``init(generator, shape, dtype)`` (lecun_normal / zeros).
        parallel_config: A :class:`TensorParallelConfig`, or None.
        seed: Seed of the initialization (kernel first, then bias, from one generator); None
            draws one from torch's global generator.

    Raises:
        ValueError: non-positive feature sizes, an unknown scale or precision, features not
            divisible by the tp axis size, a matmul method that does not apply to the layer's
            direction, torch_xla SPMD not enabled; at call time an input with the wrong number
            of features, or (parallel) not on the XLA device.
    """

    _direction: tp.ClassVar[tp.Literal["row", "column"] | None] = None

    def __init__(
        self,
        in_features: int,
        out_features: int | tp.Sequence[int],
        *,
        scale: float | tp.Literal["fan_in", "fan_out"] = 1.0,
        use_bias: bool = True,
        dtype: torch.dtype | None = None,
        param_dtype: torch.dtype = torch.float32,
        precision: tp.Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        parallel_config: TensorParallelConfig | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        in_features = positive_int("in_features", in_features)
        if isinstance(out_features, tp.Sequence) and not isinstance(out_features, str):
            if len(out_features) == 0:
                raise ValueError(f"out_features={out_features!r}: expected a positive int or a "
                                 f"non-empty sequence of positive ints")
            for f in out_features:
                positive_int("out_features", f)
            out_features = tuple(out_features)
            tp_merged, out_total = len(out_features), sum(out_features)
        else:
            out_features = positive_int("out_features", out_features)
            tp_merged, out_total = 1, out_features

        if isinstance(scale, str):
            if scale == "fan_in":
                scale_value = in_features ** -0.5
            elif scale == "fan_out":
                scale_value = out_total ** -0.5
            else:
                raise ValueError(f"scale={scale!r}: expected a float, 'fan_in' or 'fan_out'")
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale_value = float(scale)
        else:
            raise ValueError(f"scale={scale!r}: expected a float, 'fan_in' or 'fan_out'")
        for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
            if not (isinstance(value, torch.dtype) or (value is None and name == "dtype")):
                raise ValueError(f"{name}={value!r}: expected a torch.dtype"
                                 + (" or None" if name == "dtype" else ""))
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
        self.in_features = in_features
        self.out_features = out_features
        self.out_features_total = out_total
        self.tp_merged = tp_merged
        self.scale = scale
        self.scale_value = scale_value
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.parallel_config = parallel_config
        self.direction = self._direction or "column"
        self.is_parallel = parallel_config is not None and parallel_config.active
        if self.is_parallel:
            self._check_parallel(parallel_config)

        generator = torch.Generator().manual_seed(draw_seed(seed))
        kernel = kernel_init(generator, (in_features, out_total), param_dtype)
        bias = bias_init(generator, (out_total,), param_dtype) if self.use_bias else None
        self._check_init("kernel_init", kernel, (in_features, out_total))
        if bias is not None:
            self._check_init("bias_init", bias, (out_total,))
        if self.is_parallel:
            device = _mesh.xla_device()
            kernel, bias = kernel.to(device), (None if bias is None else bias.to(device))
        self.kernel = nn.Parameter(kernel)
        if self.use_bias:
            self.bias = nn.Parameter(bias)
        else:
            self.register_parameter("bias", None)
        if self.is_parallel:
            self.reshard()
            self.register_load_state_dict_post_hook(ParallelLinear._reshard_after_load)

    def _check_init(self, name: str, value: tp.Any, shape: tuple) -> None:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} returned {got}: expected a tensor of shape {shape}")

    def _check_parallel(self, cfg: TensorParallelConfig) -> None:
        _mesh.require_spmd()
        method, n, ax = cfg.method, cfg.axis_size, cfg.axis_name
        if self.direction not in method.directions:
            raise ValueError(
                f"matmul_method={method.value!r} does not apply to a {self.direction}-parallel "
                f"layer ({type(self).__name__}): expected one of "
                f"{[m.value for m in MatrixMultiplyMethod if self.direction in m.directions]}")
        # the stacked view splits the kernel on its sharded dim, and the output on its last dim
        need_in = self.direction == "row" or method.is_ring
        need_out = (self.direction == "column" or cfg.reduce_scatter_output or method.is_ring)
        if need_in and self.in_features % n:
            raise ValueError(f"in_features={self.in_features}: expected a multiple of the "
                             f"{ax!r} axis size {n} ({self.direction}-parallel, {method.value})")
        if need_out and self.out_features_total % n:
            raise ValueError(f"out_features={self.out_features!r} (total "
                             f"{self.out_features_total}): expected a multiple of the {ax!r} axis "
                             f"size {n} ({self.direction}-parallel, {method.value})")

    # ------------------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, parallel_config: TensorParallelConfig | None = None,
                    **kwargs) -> "ParallelLinear":
        """A layer holding exactly the weights of ``linear``: ``kernel = weight.T``, same bias.

        Sizes, ``use_bias`` and ``param_dtype`` come from ``linear``; other constructor
        arguments (``scale``, ``dtype``, ``precision``) may be given as keywords. With
        ``parallel_config`` the copies are placed sharded on the XLA device (``linear`` itself is
        not modified); without one the result computes what ``linear`` computes.

        Raises:
            ValueError: ``linear`` is not an ``nn.Linear``, or a keyword that ``linear``
                determines (or an unknown one) is given; the constructor's errors.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear={type(linear).__name__}: expected a torch.nn.Linear")
        fixed = {"in_features", "out_features", "use_bias", "param_dtype", "kernel_init",
                 "bias_init", "seed"}
        allowed = {"scale", "dtype", "precision"}
        bad = sorted(set(kwargs) - allowed)
        if bad:
            why = "set by linear" if set(bad) <= fixed else "not a constructor argument"
            raise ValueError(f"from_linear got {bad}: {why}; expected only {sorted(allowed)}")
        weight = linear.weight.detach()
        bias = None if linear.bias is None else linear.bias.detach()

        def kernel_init(generator, shape, dtype):
            return weight.t().to("cpu", dtype, copy=True).contiguous()

        def bias_init(generator, shape, dtype):
            return bias.to("cpu", dtype, copy=True)

        return cls(linear.in_features, linear.out_features, use_bias=bias is not None,
                   param_dtype=weight.dtype, kernel_init=kernel_init, bias_init=bias_init,
                   parallel_config=parallel_config, seed=0, **kwargs)

    # --------------------------------------------------------------------------- sharding
    def param_specs(self) -> dict[str, Spec]:
        """{'kernel': spec, 'bias': spec} of the parallel layer (the module docstring's table)."""
        cfg = self.parallel_config
        kspec, bspec = _param_specs(self.direction, cfg.axis_name, cfg.reduce_scatter_output)
        return {"kernel": kspec, "bias": bspec} if self.use_bias else {"kernel": kspec}

    def reshard(self) -> None:
        """Annotate the parameters with their specs (e.g. after replacing or loading them)."""
        if not self.is_parallel:
            return
        for name, spec in self.param_specs().items():
            param = getattr(self, name)
            _mesh.check_on_device(param, name)
            _mesh.mark_sharding(param, self.parallel_config.mesh, spec)

    @staticmethod
    def _reshard_after_load(module, incompatible_keys) -> None:
        for name in module.param_specs():
            if not xla.has_sharding(getattr(module, name)):
                module.reshard()
                return

    # ---------------------------------------------------------------------------- forward
    def _scale_operator(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.scale_value if self.scale_value != 1.0 else y

    def _params(self, inputs: torch.Tensor, w: torch.Tensor | None):
        if not isinstance(inputs, torch.Tensor):
            raise ValueError(f"inputs: expected a torch.Tensor, got {type(inputs).__name__}")
        if inputs.dim() < 1 or inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs.shape={tuple(inputs.shape)}: expected the last dim to be "
                             f"in_features={self.in_features}")
        kernel = self.kernel if w is None else w
        if tuple(kernel.shape) != (self.in_features, self.out_features_total):
            raise ValueError(f"w.shape={tuple(kernel.shape)}: expected "
                             f"{(self.in_features, self.out_features_total)}")
        if self.is_parallel:
            _mesh.check_on_device(inputs, "inputs")
            if w is not None:
                _mesh.check_on_device(w, "w")
        return _promote((inputs, kernel, self.bias), self.dtype)

    def native_forward(self, inputs: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Unsharded forward: ``(inputs @ kernel) * scale + bias`` (``nn.Linear`` when scale=1)."""
        x, kernel, bias = self._params(inputs, w)
        if self.scale_value == 1.0:
            return F.linear(x, kernel.t(), bias)
        return _scale_and_bias(F.linear(x, kernel.t()), bias, self.scale_value)

    def collective_forward(self, inputs: torch.Tensor,
                           w: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor-parallel forward in the stacked view over the config's mesh.

        ``inputs`` is a global [..., in_features] tensor on the XLA device; the result is the
        global [..., sum(out_features)], sharded on its last dim over the tp axis if
        ``reduce_scatter_output`` else replicated over it.
        """
        cfg = self.parallel_config
        x, kernel, bias = self._params(inputs, w)
        return _tp_forward(x, kernel, bias, direction=self.direction, method=cfg.method,
                           mesh=cfg.mesh, axis_name=cfg.axis_name,
                           reduce_scatter_output=cfg.reduce_scatter_output,
                           scale=self.scale_value, precision=self.precision)

    def forward(self, inputs: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the layer to ``inputs`` [..., in_features] (``w`` overrides the kernel)."""
        if self.is_parallel:
            return self.collective_forward(inputs, w)
        return self.native_forward(inputs, w)

    def extra_repr(self) -> str:
        cfg = self.parallel_config if self.is_parallel else None
        par = (f", direction={self.direction}, matmul_method={cfg.method.value}, "
               f"axis_name={cfg.axis_name!r}, reduce_scatter_output={cfg.reduce_scatter_output}"
               if cfg is not None else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"use_bias={self.use_bias}, scale={self.scale!r}{par}")


class RowParallelLinear(ParallelLinear):
    """Row-parallel Linear: kernel sharded on in-features, partial sums reduced over tp.

    The input is consumed sharded on its features (a replicated input is sliced locally, no
    communication). Methods: PLAIN (all-reduce / reduce-scatter), REDUCE_SCATTER[_BIDIRECTIONAL].
    """

    _direction = "row"


class ColumnParallelLinear(ParallelLinear):
    """Column-parallel Linear: kernel sharded on out-features, output gathered or kept sharded.

    Methods: PLAIN (input replicated, output all-gather unless reduce_scatter_output),
    ALL_GATHER[_BIDIRECTIONAL] (input consumed sharded on its features, gathered by a ring).
    """

    _direction = "column"
