"""Tensor-parallel linear layers (Flax nnx) with the API of EasyDeL's ``easydel.layers.linear``;
twin of :mod:`torch_impl.linear`.

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

Per-device helpers in ``linear_ring`` (twin files on both backends), one per matmul method;
the partition-spec helpers are in ``linear_specs`` and re-exported here:

    dot(x, w, precision)                         x[..., k] @ w[k, j] (lax.dot_general)
    ring_split(n, bidirectional)                 (up, down) ring steps, up + down = n - 1
    all_gather_matmul(x, w, axis_name, bidirectional, precision)
    reduce_scatter_matmul(x, w, axis_name, bidirectional, precision)
    column_local(...), row_local(...)            the per-device body of each direction
    tp_forward(x, kernel, bias, ...)             jitted shard_map of that body (global view)

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
import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jax import lax
from jax.sharding import Mesh, NamedSharding

from ringpar.linear_args import (check_axis_name, check_reduce_options, check_tp_sizes,
                                 mesh_request, resolve_out_features, resolve_scale)
from ringpar.matmul_methods import MatrixMultiplyMethod, resolve_method
from ringpar.validation import positive_int

from .linear_ring import dot, param_specs, scale_and_bias, tp_forward
from .linear_specs import (  # noqa: F401  (re-exported: the EasyDeL names live in linear)
    get_matmul_output_sharding, get_output_partition_spec, get_sharding)
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
# Deliberate twin of torch_impl.linear.TensorParallelConfig: same fields, defaults and checks
# (the shared rules are in ringpar.linear_args); only the mesh type and where a default mesh
# comes from differ.
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
        mesh, asked = self.mesh, mesh_request(method, self.reduce_scatter_output)
        if mesh is None and asked:
            mesh = jax.sharding.get_mesh()
            if mesh.empty:
                raise ValueError(
                    f"mesh=None with {asked}: expected a jax.sharding.Mesh, either as mesh=... or "
                    f"from an enclosing `with jax.set_mesh(mesh):`")
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise ValueError(f"mesh={mesh!r}: expected a concrete jax.sharding.Mesh")
            check_axis(mesh, check_axis_name(self.axis_name), "axis_name")
            object.__setattr__(self, "mesh", mesh)
        check_reduce_options(self.reduce_output, self.reduce_scatter_output)

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


# ----------------------------------------------------------------------------------------- layers
# Deliberate twin of torch_impl.linear.ParallelLinear (and the two subclasses below): same
# constructor steps, attributes, parameter names and forward methods.
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
        self._set_sizes(in_features, out_features, scale)
        self._set_options(use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
                          parallel_config)
        kernel, bias = self._init_params(rngs)
        self._place_params(kernel, bias)

    # ------------------------------------------------------------------------- construction
    # The constructor's steps, the same on both backends (torch_impl.linear.ParallelLinear).
    def _set_sizes(self, in_features: int, out_features: int | tp.Sequence[int],
                   scale: float | str) -> None:
        """Check and store the feature sizes and the output scale (rules in ringpar.linear_args)."""
        self.in_features = positive_int("in_features", in_features)
        self.out_features, self.tp_merged, self.out_features_total = \
            resolve_out_features(out_features)
        self.scale = scale
        self.scale_value = resolve_scale(scale, in_features=self.in_features,
                                         out_total=self.out_features_total)

    def _set_options(self, use_bias: bool, dtype: Dtype | None, param_dtype: Dtype,
                     precision: PrecisionLike, kernel_init: Initializer, bias_init: Initializer,
                     parallel_config: TensorParallelConfig | None) -> None:
        """Check and store the other arguments; a parallel layer checks its tp sizes."""
        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
        self.use_bias = use_bias
        self.dtype = dtype
        self.param_dtype = param_dtype
        # a static jit argument of tp_forward: must be hashable
        self.precision = tuple(precision) if isinstance(precision, list) else precision
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.parallel_config = parallel_config
        self.direction = self._direction or "column"
        self.is_parallel = parallel_config is not None and parallel_config.active
        if self.is_parallel:
            self._check_parallel(parallel_config)

    def _check_parallel(self, cfg: TensorParallelConfig) -> None:
        check_tp_sizes(self.direction, cfg.method, in_features=self.in_features,
                       out_features=self.out_features, axis_name=cfg.axis_name,
                       axis_size=cfg.axis_size, reduce_scatter_output=cfg.reduce_scatter_output,
                       layer=type(self).__name__)

    def _init_params(self, rngs: nnx.Rngs) -> tuple[Array, Array | None]:
        """The initial kernel then bias, each drawn from a ``params`` key (as ``nnx.Linear``)."""
        shape = (self.in_features, self.out_features_total)
        kernel = self.kernel_init(rngs.params(), shape, self.param_dtype)
        bias = (self.bias_init(rngs.params(), (shape[1],), self.param_dtype)
                if self.use_bias else None)
        return kernel, bias

    def _place_params(self, kernel: Array, bias: Array | None) -> None:
        """Store ``kernel`` and ``bias`` as ``nnx.Param``; a parallel layer places them sharded
        over the config's mesh (the module docstring's table)."""
        if not self.is_parallel:
            self.kernel = nnx.Param(kernel)
            self.bias = nnx.Param(bias) if self.use_bias else nnx.data(None)
            return
        cfg = self.parallel_config
        kspec, bspec = param_specs(self.direction, cfg.axis_name, cfg.reduce_scatter_output)

        def placed(value: Array, spec) -> nnx.Param:  # put on the mesh, carrying its sharding
            return nnx.Param(jax.device_put(value, NamedSharding(cfg.mesh, spec)),
                             out_sharding=tuple(spec), mesh=cfg.mesh)

        self.kernel = placed(kernel, kspec)
        self.bias = placed(bias, bspec) if self.use_bias else nnx.data(None)

    # ---------------------------------------------------------------------------- forward
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
        return scale_and_bias(dot(x, kernel, self.precision), bias, self.scale_value)

    def collective_forward(self, inputs: Array, w: Array | None = None) -> Array:
        """Tensor-parallel forward inside ``jax.shard_map`` over the config's mesh.

        ``inputs`` is a global [..., in_features] array; the result is the global
        [..., sum(out_features)], sharded on its last dim over the tp axis if
        ``reduce_scatter_output`` else replicated over it.
        """
        cfg = self.parallel_config
        x, kernel, bias = self._params(inputs, w)
        return tp_forward(x, kernel, bias, direction=self.direction, method=cfg.method,
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
