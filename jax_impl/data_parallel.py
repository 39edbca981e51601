"""Data parallelism and FSDP (API of xlstm-jax ``distributed.data_parallel``; twin of
:mod:`torch_impl.data_parallel`).

Per-device code: call these inside ``jax.shard_map`` over a mesh with the data axis and the FSDP
axis (ParallelConfig ``data_axis_name`` / ``fsdp_axis_name``). The batch is split over both axes;
the parameters are replicated over the data axis and, for the modules listed in
``ParallelConfig.fsdp_modules``, sharded over the FSDP axis.

- :func:`shard_params`: keep this device's slice of each large-enough parameter, as an
  ``nn.Partitioned`` naming the FSDP axis on the sharded dim. Which dim: one rule for both
  backends, :func:`ringpar.fsdp_layout.fsdp_shard_dim` (largest free dim divisible by the axis
  size; parameters with ``<= min_weight_size`` elements, or with no such dim, stay replicated).
- :func:`gather_params` / :func:`gather_array_with_mean_grads`: ``all_gather`` (tiled) in the
  forward; in the backward ``psum_scatter`` (tiled) divided by the axis size, i.e. the MEAN of
  the per-device gradients, scattered back to the shards. Optional casts: ``gather_dtype`` before
  the all-gather, ``grad_scatter_dtype`` before the reduce-scatter (then back to the parameter
  dtype).
- :func:`shard_module_params`: a linen module whose ``params`` are stored sharded and gathered on
  every use (``nn.map_variables``); the parameter tree keeps its paths.
- :func:`sync_gradients`: ``pmean`` of the gradients over the given axes, skipping for each
  ``nn.Partitioned`` gradient the axes it is partitioned over (FSDP-sharded gradients already
  hold the mean over the FSDP axis).
- :func:`prepare_module`: FSDP for ``config.fsdp_modules``, then remat for ``config.remat``.

Collectives per FSDP-sharded parameter: forward one ``all-gather`` over the FSDP axis, backward
one ``reduce-scatter`` over it; ``sync_gradients`` adds one ``all-reduce`` over the data axis (XLA
may combine the all-reduces of several parameters into one).

Example (per device, inside ``shard_map`` over ``('dp', 'fsdp')``)::

    cfg = ParallelConfig(fsdp_axis_size=4, fsdp_modules=["MLP"], fsdp_min_weight_size=0)
    mlp = prepare_module(MLP, "MLP", cfg)(name="mlp")   # params stored sharded over 'fsdp'
    grads = jax.grad(loss)(params, x_local)
    grads = sync_gradients(grads, ("dp", "fsdp"))       # mean over all data shards
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ringpar.fsdp_layout import check_module_name, fsdp_shard_dim, sharded_names

from .configs import ParallelConfig
from .mesh import axis_size

__all__ = ["shard_params", "gather_array_with_mean_grads", "gather_params", "shard_module_params",
           "sync_gradients", "prepare_module"]

PyTree = Any
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(value: Any, argument: str) -> Any:
    """``None`` or a jnp dtype from a dtype or one of the ParallelConfig dtype strings."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"{argument}={value!r}: expected None or one of {tuple(_DTYPES)}")
        return _DTYPES[value]
    return jnp.dtype(value)


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


@jax.named_scope("shard_params")
def shard_params(params: PyTree, axis_name: str, min_weight_size: int = 2**18) -> PyTree:
    """Keep this device's slice of each large-enough parameter, sharded over ``axis_name``.

    Args:
        params: Pytree of per-device parameters (arrays or ``nn.Partitioned``).
        axis_name: The FSDP mesh axis (size n), bound by the surrounding ``shard_map``.
        min_weight_size: Parameters with at most this many elements stay replicated.

    Returns:
        The same pytree; each parameter sharded by the rule of
        :func:`ringpar.fsdp_layout.fsdp_shard_dim` becomes ``nn.Partitioned`` holding slice
        ``axis_index`` of that dim (per-device size / n) with ``axis_name`` in its names. Others
        (too small, already sharded over ``axis_name``, no free dim divisible by n) are unchanged.

    Example:
        >>> # inside shard_map over 'fsdp' (n = 4): a [64, 256] kernel -> Partitioned [64, 64],
        >>> # names (None, 'fsdp'); a [256] bias (256 <= min_weight_size) stays an array.
    """
    n = axis_size(axis_name)
    idx = lax.axis_index(axis_name)

    def split(x):
        value, names = (x.value, x.names) if _is_partitioned(x) else (x, (None,) * jnp.ndim(x))
        dim = fsdp_shard_dim(value.shape, n, min_weight_size, names, axis_name)
        if dim is None:
            return x
        size = value.shape[dim] // n
        local = lax.dynamic_slice_in_dim(value, idx * size, size, axis=dim)
        return nn.Partitioned(local, names=sharded_names(names, value.ndim, dim, axis_name))

    return jax.tree.map(split, params, is_leaf=_is_partitioned)


def gather_array_with_mean_grads(x: jax.Array, axis: int, axis_name: str,
                                 gather_dtype: Any = None,
                                 grad_scatter_dtype: Any = None) -> jax.Array:
    """All-gather ``x`` along ``axis`` over ``axis_name``; the gradient is the scattered mean.

    Forward: ``all_gather(x.astype(gather_dtype), axis_name, axis=axis, tiled=True)``.
    Backward: the cotangent cast to ``grad_scatter_dtype`` (default: ``x.dtype``), then
    ``psum_scatter(..., scatter_dimension=axis, tiled=True) / n``, cast back to ``x.dtype``.

    Args:
        x: This device's shard.
        axis: The dim of ``x`` to gather along.
        axis_name: The mesh axis to gather over (size n).
        gather_dtype: None (no cast), a dtype or "float32" / "bfloat16" / "float16".
        grad_scatter_dtype: The same choices; None uses ``x.dtype``.

    Returns:
        The gathered array (``x.shape`` with ``axis`` times n), dtype ``gather_dtype or x.dtype``.
    """
    gather_dt = _dtype(gather_dtype, "gather_dtype")
    param_dt = x.dtype
    scatter_dt = _dtype(grad_scatter_dtype, "grad_scatter_dtype") or param_dt
    n = axis_size(axis_name)

    @jax.custom_vjp
    def gather(v):
        if gather_dt is not None:
            v = v.astype(gather_dt)
        return lax.all_gather(v, axis_name, axis=axis, tiled=True)

    def fwd(v):
        return gather(v), None

    def bwd(_, g):
        g = g.astype(scatter_dt)
        g = lax.psum_scatter(g, axis_name, scatter_dimension=axis, tiled=True) / n
        return (g.astype(param_dt),)

    gather.defvjp(fwd, bwd)
    return gather(x)


@jax.named_scope("gather_params")
def gather_params(params: PyTree, axis_name: str, gather_dtype: Any = None,
                  grad_scatter_dtype: Any = None) -> PyTree:
    """Gather every parameter partitioned over ``axis_name`` (:func:`gather_array_with_mean_grads`).

    Returns the pytree with those leaves replaced by the gathered arrays; a leaf still
    partitioned over other axes (e.g. the model axis) stays ``nn.Partitioned`` with
    ``axis_name`` removed from its names. Other leaves are unchanged.
    """

    def gather(p):
        if not (_is_partitioned(p) and axis_name in p.names):
            return p
        dim = p.names.index(axis_name)
        value = gather_array_with_mean_grads(p.value, dim, axis_name, gather_dtype,
                                             grad_scatter_dtype)
        names = p.names[:dim] + (None,) + p.names[dim + 1:]
        if any(name is not None for name in names):
            return nn.Partitioned(value, names)
        return value

    return jax.tree.map(gather, params, is_leaf=_is_partitioned)


def shard_module_params(target: nn.Module | Callable, axis_name: str, min_weight_size: int = 2**18,
                        gather_dtype: Any = None, grad_scatter_dtype: Any = None) -> Any:
    """Store the ``params`` of ``target`` sharded over ``axis_name``; gather them on every use.

    ``target`` is a linen module class (or a ``functools.partial`` of one); the result is used the
    same way (``shard_module_params(MLP, "fsdp")(features=8, name="mlp")``). The parameter tree
    keeps its paths; sharded leaves are ``nn.Partitioned`` (see :func:`shard_params`).
    """
    return nn.map_variables(
        target,
        trans_in_fn=functools.partial(gather_params, axis_name=axis_name,
                                      gather_dtype=gather_dtype,
                                      grad_scatter_dtype=grad_scatter_dtype),
        trans_out_fn=functools.partial(shard_params, axis_name=axis_name,
                                       min_weight_size=min_weight_size),
        mapped_collections="params",
        mutable=True,
    )


def sync_gradients(grads: PyTree, axis_names: Sequence[str]) -> PyTree:
    """Average the per-device gradients over ``axis_names`` (``pmean``).

    A gradient that is ``nn.Partitioned`` over some of these axes is averaged over the others
    only: an FSDP-sharded gradient already holds the mean over the FSDP axis (the reduce-scatter
    of :func:`gather_array_with_mean_grads`). With the per-device loss the mean over the local
    batch, the result is the gradient of the mean loss over the global batch.

    Example:
        >>> # grads = sync_gradients(jax.grad(loss)(params, x_local), ("dp", "fsdp"))
    """
    axis_names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)

    def sync(g):
        if _is_partitioned(g):
            taken = set(jax.tree.leaves(g.names))
            rest = tuple(a for a in axis_names if a not in taken)
            return g.replace(value=lax.pmean(g.value, rest)) if rest else g
        return lax.pmean(g, axis_names) if axis_names else g

    return jax.tree.map(sync, grads, is_leaf=_is_partitioned)


def prepare_module(module: Callable[..., nn.Module], name: str,
                   config: ParallelConfig | None) -> Callable[..., nn.Module]:
    """Apply FSDP (``name in config.fsdp_modules``), then remat (``name in config.remat``).

    FSDP comes first, as in xlstm-jax, so that the gather happens inside the rematerialised
    function. Remat is ``nn.remat`` with ``prevent_cse=True`` (xlstm-jax passes False, which is
    safe only under ``scan``): its optimization barrier keeps XLA from merging the recomputation
    back into the forward. Measured on CPU (tests): the lowered program has an ``opt-barrier``
    and the compiled one computes the module's activations twice (the gelu's ``tanh``); the two
    all-gathers still appear once each.

    Args:
        module: A linen module class or ``functools.partial`` of one.
        name: The module's kind as listed in the config (e.g. ``"Block"``, ``"MLP"``).
        config: The ParallelConfig, or None (module returned unchanged).

    Returns:
        The (possibly transformed) module class, used like ``module``.

    Raises:
        ValueError: if ``name`` is not a non-empty string or ``config`` not a ParallelConfig.
            Unknown names in the config's lists are checked by the model against its own list
            with :func:`ringpar.fsdp_layout.check_module_names`.

    Example:
        >>> cfg = ParallelConfig(fsdp_modules=["MLP"], remat=["MLP"])
        >>> # layer = prepare_module(MLP, "MLP", cfg)(features=64, name="mlp")
    """
    check_module_name(name)
    if config is None:
        return module
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"config={config!r}: expected a ParallelConfig or None")
    if name in (config.fsdp_modules or ()):
        module = shard_module_params(module, config.fsdp_axis_name, config.fsdp_min_weight_size,
                                     config.fsdp_gather_dtype, config.fsdp_grad_scatter_dtype)
    if name in (config.remat or ()):
        module = nn.remat(module, prevent_cse=True)
    return module
