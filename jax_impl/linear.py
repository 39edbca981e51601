"""Tensor-parallel linear layers (Flax nnx) with the API of EasyDeL's ``easydel.layers.linear``.

Public API (names, constructor arguments and defaults as in the seed)::

    MatrixMultiplyMethod      how the sharded matmul communicates (table below)
    TensorParallelConfig      mesh, axis_name, matmul_method, reduce_output, reduce_scatter_output
    ParallelLinear            nnx.Linear twin; with a parallel_config it is column-parallel
    ColumnParallelLinear      kernel [in, out] sharded on out
    RowParallelLinear         kernel [in, out] sharded on in
    get_sharding, get_output_partition_spec, get_matmul_output_sharding

Parameters are ``kernel`` [in_features, sum(out_features)] and ``bias`` [sum(out_features)], both
``nnx.Param`` with GLOBAL shapes (a plain ``nnx.Linear`` layout, so weights load by name). In the
parallel case they are placed with ``jax.device_put`` on a ``NamedSharding`` of the config's mesh
(and carry ``out_sharding`` metadata, so ``nnx.get_partition_spec`` reports it):

    ============  =============  ==============================================
    direction     kernel spec    bias spec
    ============  =============  ==============================================
    column        P(None, tp)    P(tp)
    row           P(tp, None)    P(tp) if reduce_scatter_output else P()
    ============  =============  ==============================================

The forward pass runs inside ``jax.shard_map`` over the config's mesh; only the ``tp`` axis is
named in the specs, so the leading (batch) dims of the input are replicated over the other mesh
axes (a batch sharded over ``dp`` is gathered first: not yet supported without that gather).
Partial products are added in the compute dtype, by the ring as by ``psum``. Per device
(n = size of the tp axis, i = its axis index):

``column`` (x [..., in] replicated, W_i = kernel[:, i-th out block]):
    y_i = x @ W_i, scaled, plus bias_i; ``reduce_scatter_output=True`` returns y sharded on its
    last dim (no forward communication), otherwise y is all-gathered (replicated).
``row`` (x [..., in] sharded on in, W_i = kernel[i-th in block, :]):
    p_i = x_i @ W_i is a partial sum of the full product; it is psum'd (replicated output) or
    reduce-scattered on the out dim (``reduce_scatter_output=True``), then scaled plus bias.

Matrix-multiply methods (``MatrixMultiplyMethod``) and the direction each applies to:

    ===================================  =========  ============================================
    method (value)                       direction  communication (forward)
    ===================================  =========  ============================================
    PLAIN ("plain"), the default         both       column: all_gather of y (none if
                                                    reduce_scatter_output); row: psum, or
                                                    psum_scatter if reduce_scatter_output
    ALL_GATHER ("all_gather_matmul")     column     the input is taken sharded on its features
                                                    and gathered by a ring of n-1 ppermutes,
                                                    each overlapped with a partial matmul
    ALL_GATHER_BIDIRECTIONAL             column     same, chunks travel both ways round the ring
    ("all_gather_matmul_bidirectional")             (n//2 up, (n-1)//2 down: n-1 permutes, about
                                                    half the latency)
    REDUCE_SCATTER                       row        partial sums of one output block travel a
    ("reduce_scatter_matmul")                       ring of n-1 ppermutes, each step adding the
                                                    local partial product of the next block
    REDUCE_SCATTER_BIDIRECTIONAL         row        same with two accumulators, one each way
    ("reduce_scatter_matmul_bidirectional")
    ===================================  =========  ============================================

A ring method leaves the output sharded on its last dim. With ``reduce_scatter_output=False``
(replicated output) one all_gather of the [..., out/n] result follows the ring; set
``reduce_scatter_output=True`` to keep the whole forward pass to the n-1 permutes. An all-gather
matmul on a row layer (nothing to gather: both operands are already split on the contracted dim)
or a reduce-scatter matmul on a column layer (no partial sums) raises ValueError.

Module-level helpers, one per matmul method (the torch twin mirrors them one by one):

    _dot(x, w, precision)                         x[..., k] @ w[k, j] (lax.dot_general)
    _ring_split(n, bidirectional)                 (up, down) ring steps, up + down = n - 1
    _all_gather_matmul(x, w, axis_name, bidirectional, precision)
    _reduce_scatter_matmul(x, w, axis_name, bidirectional, precision)
    _column_local(...), _row_local(...)           the per-device body of each direction
    _tp_forward(x, kernel, bias, ...)             jitted shard_map of that body (global view)

One ring step is ``collectives.ring_permute(x, axis_name, shift_up)`` (one collective-permute:
device i sends to i+1 when shifting up, to i-1 when shifting down).

Deviations from the seed, on purpose: no eformer (the config is a frozen dataclass; with no mesh
it takes ``jax.sharding.get_mesh()``, the mesh of an enclosing ``jax.set_mesh``); the bias of a
merged projection is [sum(out_features)] (the seed used the sequence as a shape); ``rngs`` is not
kept on the module (as in ``nnx.Linear``), so the state holds only ``kernel`` and ``bias``;
``get_output_partition_spec`` does not swap the kernel's spec entries for a 2-D input.
"""

from __future__ import annotations

import dataclasses
import functools
import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Ps

from ringpar.matmul_methods import MatrixMultiplyMethod, resolve_method
from ringpar.validation import positive_int

from .collectives import ring_permute
from .mesh import check_axis

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

Array = jax.Array
Dtype = tp.Any
Initializer = nnx.initializers.Initializer
PrecisionLike = lax.PrecisionLike

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros


# --------------------------------------------------------------------------------------- methods
# MatrixMultiplyMethod and resolve_method live in the framework-neutral ringpar.matmul_methods.
# ---------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class TensorParallelConfig:
    """Configuration for tensor parallelism (a frozen dataclass: hashable, static for nnx).

    Attributes:
        mesh: The ``jax.sharding.Mesh``. If None and a ``matmul_method`` (or
            ``reduce_scatter_output=True``) is given, the mesh of an enclosing
            ``jax.set_mesh(...)`` is used; with neither, ValueError. With no mesh and nothing
            asked for (``TensorParallelConfig()``) the config is inactive: a plain Linear.
        axis_name: Mesh axis used for tensor parallelism (must be an axis of the mesh).
        matmul_method: A :class:`MatrixMultiplyMethod` or its string value; None means PLAIN
            when a mesh is given.
        reduce_output: Kept from the seed (unused there): True states that the layer must return
            a replicated output, which is what it does unless ``reduce_scatter_output`` is set;
            asking for both raises ValueError.
        reduce_scatter_output: If True the output stays sharded on its last (out-features) dim
            over ``axis_name``: column layers skip the output all-gather, row layers
            reduce-scatter instead of psum, ring methods skip their trailing all-gather.
    """

    mesh: Mesh | None = None
    axis_name: str = "tp"
    matmul_method: MatrixMultiplyMethod | str | None = None
    reduce_output: bool = False
    reduce_scatter_output: bool = False

    def __post_init__(self) -> None:
        method = resolve_method(self.matmul_method)
        object.__setattr__(self, "matmul_method", method)
        mesh = self.mesh
        if mesh is None and (method is not None or self.reduce_scatter_output):
            context_mesh = jax.sharding.get_mesh()
            if context_mesh.empty:
                asked = (f"matmul_method={method.value!r}" if method is not None
                         else "reduce_scatter_output=True")
                raise ValueError(
                    f"mesh=None with {asked}: expected a jax.sharding.Mesh, either as mesh=... or "
                    f"from an enclosing `with jax.set_mesh(mesh):`")
            mesh = context_mesh
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise ValueError(f"mesh={mesh!r}: expected a concrete jax.sharding.Mesh")
            if not isinstance(self.axis_name, str):
                raise ValueError(f"axis_name={self.axis_name!r}: expected a mesh axis name (str)")
            check_axis(mesh, self.axis_name, "axis_name")
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
        return int(self.mesh.shape[self.axis_name]) if self.mesh is not None else 1


# ------------------------------------------------------------------------ partition-spec helpers
def get_sharding(arr: tp.Any) -> Ps | None:
    """PartitionSpec of an array placed with a ``NamedSharding``; None for anything else.

    Anything else: numpy arrays, single-device arrays, tracers inside ``jit`` (their sharding is
    decided by the compiler), and objects without a ``sharding`` attribute.
    """
    if isinstance(arr, jax.core.Tracer):
        return None
    sharding = getattr(arr, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.spec
    return None


def _spec_entries(spec: Ps, ndim: int) -> tuple:
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


def get_matmul_output_sharding(lhs_pspec: Ps | None, rhs_pspec: Ps | None) -> Ps:
    """PartitionSpec of ``X @ W`` from the specs of X [..., k] and W [k, j].

    Both specs must have one entry per dimension. The result has the non-contracting dims of X
    followed by the last dim of W; each mesh axis may appear once, so an axis already used by an
    earlier output dim is dropped from a later one (the entry becomes None, or the tuple loses it).
    The spec describes the layout only: if the contracting dims are sharded on the same axis the
    per-device products are partial sums that still need a reduction. Returns ``P()`` if either
    spec is None.
    """
    if lhs_pspec is None or rhs_pspec is None:
        return Ps()
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
    return Ps(*out)


def get_output_partition_spec(lhs: tp.Any, rhs: tp.Any, method: MatrixMultiplyMethod | str | None,
                              axis_name: str) -> Ps | None:
    """PartitionSpec of the result of the tensor-parallel matmul ``lhs @ rhs`` under ``method``.

    None if either array has no ``NamedSharding`` (see :func:`get_sharding`). For a ring method
    (ALL_GATHER*, REDUCE_SCATTER*) the result is sharded on its last dim over ``axis_name`` and its
    leading dims keep the lhs spec without ``axis_name``; for PLAIN (or None) it is
    :func:`get_matmul_output_sharding` of the two specs. Raises ValueError for an unknown method.
    """
    method = resolve_method(method)
    lhs_spec, rhs_spec = get_sharding(lhs), get_sharding(rhs)
    if lhs_spec is None or rhs_spec is None:
        return None
    lhs_entries = _spec_entries(lhs_spec, lhs.ndim)
    rhs_entries = _spec_entries(rhs_spec, rhs.ndim)
    if method is None or method is MatrixMultiplyMethod.PLAIN:
        return get_matmul_output_sharding(Ps(*lhs_entries), Ps(*rhs_entries))
    lead = []
    for entry in lhs_entries[:-1]:
        kept = tuple(a for a in _axes_of(entry) if a != axis_name)
        lead.append(None if not kept else (kept if isinstance(entry, (tuple, list)) else kept[0]))
    return Ps(*lead, axis_name)


# ---------------------------------------------------------------------- per-device matmul helpers
def _dot(x: Array, w: Array, precision: PrecisionLike = None) -> Array:
    """x[..., k] @ w[k, j] -> [..., j] (the contraction nnx.Linear uses)."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _ring_split(n: int, bidirectional: bool) -> tuple[int, int]:
    """Ring steps (up, down) that cover the n-1 other devices: up + down = n - 1."""
    if not bidirectional:
        return n - 1, 0
    return n // 2, (n - 1) // 2


def _block(w: Array, k: Array, size: int, axis: int) -> Array:
    """Block ``k`` (a traced index) of ``size`` rows (axis 0) or columns (axis 1) of ``w``."""
    return lax.dynamic_slice_in_dim(w, k * size, size, axis=axis)


def _all_gather_matmul(x: Array, w: Array, axis_name: str, bidirectional: bool = False,
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
    up, down = _ring_split(n, bidirectional)
    fwd, bwd = x, x
    acc = _dot(x, _block(w, idx, c, 0), precision)
    for s in range(1, max(up, down) + 1):
        # issue this step's permutes before its matmuls, so each matmul overlaps the transfer
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False)
        if s <= up:
            acc = acc + _dot(fwd, _block(w, (idx - s) % n, c, 0), precision)
        if s <= down:
            acc = acc + _dot(bwd, _block(w, (idx + s) % n, c, 0), precision)
    return acc


def _reduce_scatter_matmul(x: Array, w: Array, axis_name: str, bidirectional: bool = False,
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
    up, down = _ring_split(n, bidirectional)
    fwd = _dot(x, _block(w, (idx + up) % n, c, 1), precision) if up else None
    bwd = _dot(x, _block(w, (idx - down) % n, c, 1), precision) if down else None
    for s in range(1, max(up, down) + 1):
        if s <= up:
            fwd = ring_permute(fwd, axis_name, shift_up=True)
            if s < up:
                fwd = fwd + _dot(x, _block(w, (idx + up - s) % n, c, 1), precision)
        if s <= down:
            bwd = ring_permute(bwd, axis_name, shift_up=False)
            if s < down:
                bwd = bwd + _dot(x, _block(w, (idx - down + s) % n, c, 1), precision)
    acc = _dot(x, _block(w, idx, c, 1), precision)
    if fwd is not None:
        acc = acc + fwd
    if bwd is not None:
        acc = acc + bwd
    return acc


def _scale_and_bias(y: Array, b: Array | None, scale: float) -> Array:
    """``y * scale + b`` (scale skipped when 1.0, as in the seed's scale operator)."""
    if scale != 1.0:
        y = y * scale
    if b is not None:
        y = y + jnp.reshape(b, (1,) * (y.ndim - 1) + (-1,))
    return y


def _column_local(x: Array, w: Array, b: Array | None, *, axis_name: str,
                  method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
                  precision: PrecisionLike) -> Array:
    """Column direction, per device: w is out block i [in, out/n], b is bias block i.

    PLAIN: x is the replicated input [..., in]; ALL_GATHER*: x is in-feature block i [..., in/n].
    Returns out block i [..., out/n] if ``reduce_scatter_output``, else the gathered [..., out].
    """
    if method is MatrixMultiplyMethod.PLAIN:
        y = _dot(x, w, precision)
    else:
        y = _all_gather_matmul(x, w, axis_name, method.bidirectional, precision)
    y = _scale_and_bias(y, b, scale)
    if not reduce_scatter_output:
        y = lax.all_gather(y, axis_name, axis=y.ndim - 1, tiled=True, to="invarying")
    return y


def _row_local(x: Array, w: Array, b: Array | None, *, axis_name: str,
               method: MatrixMultiplyMethod, reduce_scatter_output: bool, scale: float,
               precision: PrecisionLike) -> Array:
    """Row direction, per device: x is in-feature block i [..., in/n], w is in block i [in/n, out].

    b is bias block i if ``reduce_scatter_output`` (and the result is out block i [..., out/n]),
    else the full bias (and the result is the replicated [..., out]).
    """
    if method is MatrixMultiplyMethod.PLAIN:
        partial = _dot(x, w, precision)
        if reduce_scatter_output:
            y = lax.psum_scatter(partial, axis_name, scatter_dimension=partial.ndim - 1, tiled=True)
        else:
            y = lax.psum(partial, axis_name)
        return _scale_and_bias(y, b, scale)
    y = _reduce_scatter_matmul(x, w, axis_name, method.bidirectional, precision)
    if reduce_scatter_output:
        return _scale_and_bias(y, b, scale)
    y = lax.all_gather(y, axis_name, axis=y.ndim - 1, tiled=True, to="invarying")
    return _scale_and_bias(y, b, scale)


_LOCAL_FORWARD = {"column": _column_local, "row": _row_local}


def _param_specs(direction: str, axis_name: str, reduce_scatter_output: bool) -> tuple[Ps, Ps]:
    """(kernel spec, bias spec) of a layer (see the table in the module docstring)."""
    if direction == "column":
        return Ps(None, axis_name), Ps(axis_name)
    return Ps(axis_name, None), (Ps(axis_name) if reduce_scatter_output else Ps())


def _io_specs(direction: str, method: MatrixMultiplyMethod, axis_name: str,
              reduce_scatter_output: bool, ndim: int) -> tuple[Ps, Ps]:
    """(input spec, output spec) of the shard_map for an input of rank ``ndim``."""
    lead = (None,) * (ndim - 1)
    input_sharded = direction == "row" or method is not MatrixMultiplyMethod.PLAIN
    in_spec = Ps(*lead, axis_name if input_sharded else None)
    out_spec = Ps(*lead, axis_name if reduce_scatter_output else None)
    return in_spec, out_spec


@functools.partial(jax.jit, static_argnames=("direction", "method", "mesh", "axis_name",
                                             "reduce_scatter_output", "scale", "precision"))
def _tp_forward(x: Array, kernel: Array, bias: Array | None, *, direction: str,
                method: MatrixMultiplyMethod, mesh: Mesh, axis_name: str,
                reduce_scatter_output: bool, scale: float, precision: PrecisionLike) -> Array:
    """Global-view forward: ``jax.shard_map`` of the direction's per-device body over ``mesh``.

    Jitted with the layout as static arguments, so an eager call compiles once per shape and
    configuration instead of running the shard_map op by op; under an outer ``jit`` it inlines.
    """
    kspec, bspec = _param_specs(direction, axis_name, reduce_scatter_output)
    in_spec, out_spec = _io_specs(direction, method, axis_name, reduce_scatter_output, x.ndim)
    local = functools.partial(_LOCAL_FORWARD[direction], axis_name=axis_name, method=method,
                              reduce_scatter_output=reduce_scatter_output, scale=scale,
                              precision=precision)
    if bias is None:
        return jax.shard_map(lambda x_, w_: local(x_, w_, None), mesh=mesh,
                             in_specs=(in_spec, kspec), out_specs=out_spec)(x, kernel)
    return jax.shard_map(local, mesh=mesh, in_specs=(in_spec, kspec, bspec),
                         out_specs=out_spec)(x, kernel, bias)


# ----------------------------------------------------------------------------------------- layers
class ParallelLinear(nnx.Module):
    """A Linear layer with optional tensor parallelism.

    Without ``parallel_config`` (or with an inactive one: no mesh, no method) it computes exactly
    what ``nnx.Linear`` computes with the same parameters (plus the optional ``scale``). With an
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
        param_dtype: Parameter dtype (default float32).
        precision: ``lax.Precision`` of the dot products.
        kernel_init, bias_init: Initializers (lecun_normal / zeros).
        parallel_config: A :class:`TensorParallelConfig`, or None.
        rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``); the kernel then the bias take a
            ``params`` key each, as in ``nnx.Linear``.

    Raises:
        ValueError: non-positive feature sizes, an unknown scale, features not divisible by the
            tp axis size, a matmul method that does not apply to the layer's direction.
    """

    _direction: tp.ClassVar[tp.Literal["row", "column"] | None] = None

    def __init__(
        self,
        in_features: int,
        out_features: int | tp.Sequence[int],
        *,
        scale: float | tp.Literal["fan_in", "fan_out"] = 1.0,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        parallel_config: TensorParallelConfig | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if rngs is None:
            rngs = nnx.Rngs(0)
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

        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
        self.in_features = in_features
        self.out_features = out_features
        self.out_features_total = out_total
        self.tp_merged = tp_merged
        self.scale = scale
        self.scale_value = scale_value
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        # a static jit argument of _tp_forward: must be hashable
        self.precision = tuple(precision) if isinstance(precision, list) else precision
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.parallel_config = parallel_config
        self.direction = self._direction or "column"
        self.is_parallel = parallel_config is not None and parallel_config.active
        if self.is_parallel:
            self._check_parallel(parallel_config)

        kernel = kernel_init(rngs.params(), (in_features, out_total), param_dtype)
        bias = bias_init(rngs.params(), (out_total,), param_dtype) if use_bias else None
        if self.is_parallel:
            cfg = parallel_config
            kspec, bspec = _param_specs(self.direction, cfg.axis_name, cfg.reduce_scatter_output)
            self.kernel = nnx.Param(jax.device_put(kernel, NamedSharding(cfg.mesh, kspec)),
                                    out_sharding=tuple(kspec), mesh=cfg.mesh)
            self.bias = (nnx.Param(jax.device_put(bias, NamedSharding(cfg.mesh, bspec)),
                                   out_sharding=tuple(bspec), mesh=cfg.mesh)
                         if use_bias else nnx.data(None))
        else:
            self.kernel = nnx.Param(kernel)
            self.bias = nnx.Param(bias) if use_bias else nnx.data(None)

    def _check_parallel(self, cfg: TensorParallelConfig) -> None:
        method, n, ax = cfg.method, cfg.axis_size, cfg.axis_name
        if self.direction not in method.directions:
            raise ValueError(
                f"matmul_method={method.value!r} does not apply to a {self.direction}-parallel "
                f"layer ({type(self).__name__}): expected one of "
                f"{[m.value for m in MatrixMultiplyMethod if self.direction in m.directions]}")
        need_in = self.direction == "row" or method.is_ring
        need_out = (self.direction == "column" or cfg.reduce_scatter_output or method.is_ring)
        if need_in and self.in_features % n:
            raise ValueError(f"in_features={self.in_features}: expected a multiple of the "
                             f"{ax!r} axis size {n} ({self.direction}-parallel, {method.value})")
        if need_out and self.out_features_total % n:
            raise ValueError(f"out_features={self.out_features!r} (total "
                             f"{self.out_features_total}): expected a multiple of the {ax!r} axis "
                             f"size {n} ({self.direction}-parallel, {method.value})")

    def _scale_operator(self, y: Array) -> Array:
        return y * self.scale_value if self.scale_value != 1.0 else y

    def _params(self, inputs: Array, w: Array | None) -> tuple[Array, Array, Array | None]:
        if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs.shape={tuple(inputs.shape)}: expected the last dim to be "
                             f"in_features={self.in_features}")
        kernel = self.kernel[...] if w is None else w
        if tuple(kernel.shape) != (self.in_features, self.out_features_total):
            raise ValueError(f"w.shape={tuple(kernel.shape)}: expected "
                             f"{(self.in_features, self.out_features_total)}")
        bias = self.bias[...] if self.use_bias else None
        return promote_dtype((inputs, kernel, bias), dtype=self.dtype)

    def native_forward(self, inputs: Array, w: Array | None = None) -> Array:
        """Unsharded forward: ``(inputs @ kernel) * scale + bias`` (``nnx.Linear`` when scale=1)."""
        x, kernel, bias = self._params(inputs, w)
        return _scale_and_bias(_dot(x, kernel, self.precision), bias, self.scale_value)

    def collective_forward(self, inputs: Array, w: Array | None = None) -> Array:
        """Tensor-parallel forward inside ``jax.shard_map`` over the config's mesh.

        ``inputs`` is a global [..., in_features] array; the result is the global
        [..., sum(out_features)], sharded on its last dim over the tp axis if
        ``reduce_scatter_output`` else replicated over it.
        """
        cfg = self.parallel_config
        x, kernel, bias = self._params(inputs, w)
        return _tp_forward(x, kernel, bias, direction=self.direction, method=cfg.method,
                           mesh=cfg.mesh, axis_name=cfg.axis_name,
                           reduce_scatter_output=cfg.reduce_scatter_output,
                           scale=self.scale_value, precision=self.precision)

    def __call__(self, inputs: Array, w: Array | None = None) -> Array:
        """Apply the layer to ``inputs`` [..., in_features] (``w`` overrides the kernel)."""
        if self.is_parallel:
            return self.collective_forward(inputs, w)
        return self.native_forward(inputs, w)


class RowParallelLinear(ParallelLinear):
    """Row-parallel Linear: kernel sharded on in-features, partial sums reduced over tp.

    The input is consumed sharded on its features (a replicated input is sliced locally, no
    communication). Methods: PLAIN (psum / psum_scatter), REDUCE_SCATTER[_BIDIRECTIONAL].
    """

    _direction = "row"


class ColumnParallelLinear(ParallelLinear):
    """Column-parallel Linear: kernel sharded on out-features, output gathered or kept sharded.

    Methods: PLAIN (input replicated, output all_gather unless reduce_scatter_output),
    ALL_GATHER[_BIDIRECTIONAL] (input consumed sharded on its features, gathered by a ring).
    """

    _direction = "column"
