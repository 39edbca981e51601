"""Sequence- and feature-parallel LayerNorm / RMSNorm (Flax nnx; twin of :mod:`torch_impl.norms`).

A norm normalizes each token over its features. Under tensor parallelism the activations around
it are sharded in one of two ways, chosen with ``sharding``:

    ============  ===================  ===============================  ========================
    sharding      input / output       forward communication            backward communication
    ============  ===================  ===============================  ========================
    "none"        as given (global)    none (plain norm; parameters     none
                                       replicated over the mesh)
    "sequence"    [..., S, D] sharded  none: every token is whole on    one psum (all-reduce) of
                  on S (dim -2)        its device                       the scale/bias gradients
    "features"    [..., D] sharded on  psum of the per-token sums       psums of per-token sums
                  D (dim -1)           (LayerNorm: 2, mean then the     (the transpose of the
                                       centred 2nd moment; RMS: 1)      forward psums); the
                                                                        scale/bias are sharded
                                                                        like D: grads local
    ============  ===================  ===============================  ========================

"sequence" is Megatron-style sequence parallelism (the norm between a row-parallel layer whose
output is reduce-scattered on the sequence and a column-parallel layer that gathers it);
"features" keeps the residual stream of the ring (async) layers sharded on its features, where
``RowParallelLinear`` with ``reduce_scatter_output=True`` leaves it.

Definitions (as ``torch.nn.LayerNorm`` / HF ``LlamaRMSNorm``): LayerNorm ``(x - mean) /
sqrt(var + eps) * scale + bias`` with the biased variance; RMSNorm ``x / sqrt(mean(x^2) + eps) *
scale``. Statistics are computed in float32 (or wider); the output has ``dtype`` (default: the
input's). Parameters ``scale`` [D] (ones) and ``bias`` [D] (zeros): the ``nnx.LayerNorm`` names.

Public API (same order in the torch twin): ``SHARDINGS``, ``ParallelLayerNorm``,
``ParallelRMSNorm``.
"""

from __future__ import annotations

import functools
import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringpar.layer_args import SHARDINGS, check_feature_split, check_norm_args

from .collectives import reduce_from_axis
from .linear import TensorParallelConfig

__all__ = ["SHARDINGS", "ParallelLayerNorm", "ParallelRMSNorm"]


def _stats_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def _normalize(x, kind: str, eps: float, axis_name: str | None):
    """Normalized float32 ``x`` over its last dim; the sums are psum'd over ``axis_name``."""
    x = x.astype(_stats_dtype(x.dtype))
    d = x.shape[-1] * (lax.axis_size(axis_name) if axis_name else 1)

    def total(v):
        s = jnp.sum(v, axis=-1, keepdims=True)
        return reduce_from_axis(s, axis_name) if axis_name else s

    if kind == "layer":
        xc = x - total(x) / d
        return xc * lax.rsqrt(total(xc * xc) / d + eps)
    return x * lax.rsqrt(total(x * x) / d + eps)


def _affine(xhat, scale, bias, out_dtype):
    y = xhat
    if scale is not None:
        y = y * scale.astype(y.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(out_dtype)


def _norm_local(x, scale, bias, *, kind, eps, axis_name, out_dtype):
    return _affine(_normalize(x, kind, eps, axis_name), scale, bias, out_dtype)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "sharding", "mesh", "axis_name",
                                             "out_dtype"))
def _parallel_norm(x, scale, bias, *, kind, eps, sharding, mesh, axis_name, out_dtype):
    spec = [None] * x.ndim
    spec[-2 if sharding == "sequence" else -1] = axis_name
    pspec = P() if sharding == "sequence" else P(axis_name)
    body = functools.partial(_norm_local, kind=kind, eps=eps, out_dtype=out_dtype,
                             axis_name=axis_name if sharding == "features" else None)
    args = [x] + [a for a in (scale, bias) if a is not None]
    specs = [P(*spec)] + [pspec for a in (scale, bias) if a is not None]

    def local(xl, *params):
        it = iter(params)
        s = next(it) if scale is not None else None
        b = next(it) if bias is not None else None
        return body(xl, s, b)

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=P(*spec))(*args)


# Deliberate twin of torch_impl.norms._ParallelNorm, kept line-for-line parallel on purpose: same
# constructor steps, attributes and methods (the shared checks are in ringpar.layer_args).
class _ParallelNorm(nnx.Module):
    _kind: tp.ClassVar[str] = "layer"

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, use_scale: bool = True,
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 parallel_config: TensorParallelConfig | None = None, sharding: str = "none",
                 rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones / zeros); kept for the nnx constructor convention
        num_features, epsilon = check_norm_args(num_features, epsilon, sharding)
        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
        self.num_features, self.epsilon = num_features, epsilon
        self.use_scale, self.use_bias = bool(use_scale), bool(use_bias)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.parallel_config = parallel_config
        self.is_parallel = parallel_config is not None and parallel_config.active
        self.sharding = sharding if self.is_parallel else "none"
        if self.sharding == "features":
            check_feature_split(num_features, parallel_config.axis_name, parallel_config.axis_size)

        def param(value):
            if not self.is_parallel:
                return nnx.Param(value)
            cfg = self.parallel_config
            spec = P(cfg.axis_name) if self.sharding == "features" else P()
            return nnx.Param(jax.device_put(value, NamedSharding(cfg.mesh, spec)),
                             out_sharding=tuple(spec), mesh=cfg.mesh)

        self.scale = param(jnp.ones((num_features,), param_dtype)) if self.use_scale \
            else nnx.data(None)
        self.bias = param(jnp.zeros((num_features,), param_dtype)) if self.use_bias \
            else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalize ``x`` ``[..., D]`` over its last dim (global view, see module docstring)."""
        if x.ndim < 1 or x.shape[-1] != self.num_features:
            raise ValueError(f"x.shape={tuple(x.shape)}: expected the last dim to be "
                             f"num_features={self.num_features}")
        scale = self.scale[...] if self.use_scale else None
        bias = self.bias[...] if self.use_bias else None
        out_dtype = self.dtype or x.dtype
        if self.sharding == "none":
            return _norm_local(x, scale, bias, kind=self._kind, eps=self.epsilon, axis_name=None,
                               out_dtype=out_dtype)
        cfg = self.parallel_config
        if self.sharding == "sequence":
            if x.ndim < 2 or x.shape[-2] % cfg.axis_size:
                raise ValueError(f"x.shape={tuple(x.shape)}: expected [..., seq, features] with "
                                 f"seq divisible by the {cfg.axis_name!r} axis size "
                                 f"{cfg.axis_size} (sharding='sequence')")
        return _parallel_norm(x, scale, bias, kind=self._kind, eps=self.epsilon,
                              sharding=self.sharding, mesh=cfg.mesh, axis_name=cfg.axis_name,
                              out_dtype=jnp.dtype(out_dtype))


class ParallelLayerNorm(_ParallelNorm):
    """LayerNorm over the last dim whose input may be sharded on the sequence or the features.

    Args:
        num_features: D.
        epsilon: Added to the variance.
        use_scale, use_bias: Whether to learn ``scale`` [D] (ones) and ``bias`` [D] (zeros).
        dtype: Output dtype (default: the input's); statistics are float32.
        param_dtype: Parameter dtype.
        parallel_config: A ``TensorParallelConfig`` (mesh and ``axis_name``), or None.
        sharding: "none", "sequence" or "features" (module docstring table).
        rngs: Unused (deterministic init), accepted for the nnx convention.
    """

    _kind = "layer"


class ParallelRMSNorm(_ParallelNorm):
    """RMSNorm ``x / sqrt(mean(x^2) + eps) * scale`` (no bias by default); see ParallelLayerNorm.

    Args: as :class:`ParallelLayerNorm`, with ``use_bias=False`` by default and ``epsilon=1e-6``.
    """

    _kind = "rms"

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, use_scale: bool = True,
                 use_bias: bool = False, dtype=None, param_dtype=jnp.float32,
                 parallel_config: TensorParallelConfig | None = None, sharding: str = "none",
                 rngs: nnx.Rngs | None = None):
        super().__init__(num_features, epsilon=epsilon, use_scale=use_scale, use_bias=use_bias,
                         dtype=dtype, param_dtype=param_dtype, parallel_config=parallel_config,
                         sharding=sharding, rngs=rngs)
