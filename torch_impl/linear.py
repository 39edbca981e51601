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

Inside, each layer works in the STACKED VIEW of the JAX per-device values (docs/design.md): a JAX
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
    block ``axis_index``-k     no communication; not ``torch.gather``: see
                               ``linear_ring.pick_block``)
    =========================  ===================================================================

The matrix-multiply methods, the direction each applies to and what each communicates are those
of :mod:`jax_impl.linear` (its module docstring has the table): PLAIN (both), ALL_GATHER[_BIDI-
RECTIONAL] (column: the input is consumed sharded on its features and gathered by a ring of n-1
collective-permutes, each overlapped with a partial matmul), REDUCE_SCATTER[_BIDIRECTIONAL] (row:
partial sums of one output block travel a ring of n-1 permutes). A ring method leaves the output
sharded on its last dim; with ``reduce_scatter_output=False`` one all-gather of the output follows.
The compiled programs have the same collectives (kind, source_target_pairs, replica groups) as the
JAX twin's, forward and forward+backward (``tests/parity/test_linear_twins.py``).

Per-device helpers in ``linear_ring``, one per JAX helper, in the same order (all in the stacked
view; those that communicate or re-annotate take ``mesh`` and ``axis_name`` as keyword
arguments); the partition-spec helpers are in ``linear_specs`` and re-exported here:

    dot(x, w, precision)                         x[n, ..., k] @ w[n, k, j] per device
    ring_split(n, bidirectional)                 (up, down) ring steps, up + down = n - 1
    pick_block(w, k, size, axis)                 per device i, block k[i] of w[i] along axis
    all_gather_matmul(x, w, axis_name, bidirectional, precision)
    reduce_scatter_matmul(x, w, axis_name, bidirectional, precision)
    column_local(...), row_local(...)            the per-device body of each direction
    tp_forward(x, kernel, bias, ...)             global tensors -> stacked body -> global output

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
import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from ringpar.linear_args import (check_axis_name, check_reduce_options, check_tp_sizes,
                                 mesh_request, resolve_out_features, resolve_scale)
from ringpar.matmul_methods import MatrixMultiplyMethod, resolve_method  # neutral, shared
from ringpar.partition_specs import Spec
from ringpar.validation import positive_int

from . import mesh as _mesh
from . import xla
from .array_utils import draw_seed
from .linear_ring import param_specs, scale_and_bias, tp_forward
from .linear_specs import (  # noqa: F401  (re-exported: the EasyDeL names live in linear)
    get_matmul_output_sharding, get_output_partition_spec, get_sharding)
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

Initializer = tp.Callable[..., torch.Tensor]
PRECISIONS = (None, "default", "high", "highest")


def _zeros(generator, shape, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=dtype)


default_kernel_init = lecun_normal()
default_bias_init = _zeros


# --------------------------------------------------------------------------------------- methods
# MatrixMultiplyMethod and resolve_method live in the framework-neutral ringpar.matmul_methods.
# ---------------------------------------------------------------------------------------- config
# Deliberate twin of jax_impl.linear.TensorParallelConfig: same fields, defaults and checks
# (the shared rules are in ringpar.linear_args); only the mesh type and where a default mesh
# comes from differ.
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
        mesh, asked = self.mesh, mesh_request(method, self.reduce_scatter_output)
        if mesh is None and asked:
            mesh = xla.get_global_mesh()
            if mesh is None:
                raise ValueError(
                    f"mesh=None with {asked}: expected a torch_xla.distributed.spmd.Mesh, either "
                    f"as mesh=... or set with xs.set_global_mesh(mesh)")
        if mesh is not None:
            if not xla.is_mesh(mesh):
                raise ValueError(f"mesh={mesh!r}: expected a torch_xla.distributed.spmd.Mesh")
            _mesh.check_axis(mesh, check_axis_name(self.axis_name), "axis_name")
            _mesh.require_spmd()
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
        return _mesh.check_axis(self.mesh, self.axis_name) if self.mesh is not None else 1


def _promote(tensors: tp.Sequence[torch.Tensor | None], dtype: torch.dtype | None):
    """Twin of flax's ``promote_dtype``: cast to ``dtype``, or to the promoted type of all."""
    present = [t for t in tensors if t is not None]
    if dtype is None:
        dtype = present[0].dtype
        for t in present[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return [None if t is None else t.to(dtype) for t in tensors]


# ----------------------------------------------------------------------------------------- layers
# Deliberate twin of jax_impl.linear.ParallelLinear (and the two subclasses below): same
# constructor steps, attributes, parameter names and forward methods.
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
        self._set_sizes(in_features, out_features, scale)
        self._set_options(use_bias, dtype, param_dtype, precision, kernel_init, bias_init,
                          parallel_config)
        kernel, bias = self._init_params(seed)
        self._place_params(kernel, bias)

    # ------------------------------------------------------------------------- construction
    # The constructor's steps, the same on both backends (jax_impl.linear.ParallelLinear).
    def _set_sizes(self, in_features: int, out_features: int | tp.Sequence[int],
                   scale: float | str) -> None:
        """Check and store the feature sizes and the output scale (rules in ringpar.linear_args)."""
        self.in_features = positive_int("in_features", in_features)
        self.out_features, self.tp_merged, self.out_features_total = \
            resolve_out_features(out_features)
        self.scale = scale
        self.scale_value = resolve_scale(scale, in_features=self.in_features,
                                         out_total=self.out_features_total)

    def _set_options(self, use_bias: bool, dtype: torch.dtype | None, param_dtype: torch.dtype,
                     precision: tp.Any, kernel_init: Initializer, bias_init: Initializer,
                     parallel_config: TensorParallelConfig | None) -> None:
        """Check and store the other arguments; a parallel layer checks its tp sizes."""
        for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
            if not (isinstance(value, torch.dtype) or (value is None and name == "dtype")):
                raise ValueError(f"{name}={value!r}: expected a torch.dtype"
                                 + (" or None" if name == "dtype" else ""))
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS}")
        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
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

    def _check_parallel(self, cfg: TensorParallelConfig) -> None:
        _mesh.require_spmd()
        # the stacked view splits the kernel on its sharded dim, and the output on its last dim
        check_tp_sizes(self.direction, cfg.method, in_features=self.in_features,
                       out_features=self.out_features, axis_name=cfg.axis_name,
                       axis_size=cfg.axis_size, reduce_scatter_output=cfg.reduce_scatter_output,
                       layer=type(self).__name__)

    def _init_params(self, seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The initial kernel then bias, both drawn from one generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(draw_seed(seed))
        shape = (self.in_features, self.out_features_total)
        kernel = self.kernel_init(generator, shape, self.param_dtype)
        bias = (self.bias_init(generator, (shape[1],), self.param_dtype)
                if self.use_bias else None)
        self._check_init("kernel_init", kernel, shape)
        if bias is not None:
            self._check_init("bias_init", bias, (shape[1],))
        return kernel, bias

    def _check_init(self, name: str, value: tp.Any, shape: tuple) -> None:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} returned {got}: expected a tensor of shape {shape}")

    def _place_params(self, kernel: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Register ``kernel`` and ``bias`` as parameters; a parallel layer moves them to the XLA
        device, annotates their specs (the module docstring's table) and re-annotates after
        ``load_state_dict``."""
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
        kspec, bspec = param_specs(self.direction, cfg.axis_name, cfg.reduce_scatter_output)
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
        return scale_and_bias(F.linear(x, kernel.t()), bias, self.scale_value)

    def collective_forward(self, inputs: torch.Tensor,
                           w: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor-parallel forward in the stacked view over the config's mesh.

        ``inputs`` is a global [..., in_features] tensor on the XLA device; the result is the
        global [..., sum(out_features)], sharded on its last dim over the tp axis if
        ``reduce_scatter_output`` else replicated over it.
        """
        cfg = self.parallel_config
        x, kernel, bias = self._params(inputs, w)
        return tp_forward(x, kernel, bias, direction=self.direction, method=cfg.method,
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
