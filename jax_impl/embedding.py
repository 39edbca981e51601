"""Vocab-parallel embedding (Flax nnx; twin of :mod:`torch_impl.embedding`).

The table ``embedding`` ``[num_embeddings, features]`` (the ``nnx.Embed`` name and layout) is
split on the vocabulary over the tensor-parallel axis: device i holds rows ``[i*c, (i+1)*c)``,
``c = num_embeddings / n``. Per device, ids outside the block look up row 0 and are zeroed, so
each device holds a partial sum of the full ``[..., features]`` output; one collective completes
it:

    ===========================  ============================================  ===============
    option                       forward collective                            output sharding
    ===========================  ============================================  ===============
    default                      psum (all-reduce)                             replicated
    reduce_scatter_output=True   psum_scatter on ``scatter_dim`` (default -1,  sharded on that
                                 the features; -2 is the sequence of a         dim
                                 [batch, seq] input: sequence parallelism)
    ===========================  ============================================  ===============

Backward: the transpose of psum is a broadcast (of psum_scatter, an all-gather of the output
cotangent); the table gradient is a shard-local scatter-add: no collective touches the table.

With no (or an inactive) ``parallel_config`` the module is a plain embedding lookup, identical to
``nnx.Embed`` with the same table. The parameter is a global-shape ``nnx.Param`` placed with a
``NamedSharding`` ``P(axis_name, None)``.

Public API (same order in the torch twin): ``default_embed_init``, ``vocab_parallel_lookup``,
``VocabParallelEmbed``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringpar.layer_args import check_vocab_split
from ringpar.validation import positive_int

from .collectives import reduce_from_axis, reduce_scatter_features
from .linear import TensorParallelConfig

__all__ = ["default_embed_init", "vocab_parallel_lookup", "VocabParallelEmbed"]

default_embed_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
"""``nnx.Embed``'s default initializer: normal with variance 1 / features."""


def vocab_parallel_lookup(ids: jax.Array, table: jax.Array, axis_name: str) -> jax.Array:
    """Per device (inside ``shard_map``): this device's partial sum of ``table_global[ids]``.

    ``table`` is the device's block ``[c, features]`` of the vocabulary (ids ``[i*c, (i+1)*c)``
    on device i of ``axis_name``); ``ids`` (any integer shape) are global ids, the same on every
    device. Rows of ids outside the block are 0. No communication.
    """
    c = table.shape[0]
    local = ids.astype(jnp.int32) - lax.axis_index(axis_name) * c
    inside = (local >= 0) & (local < c)
    rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
    return jnp.where(inside[..., None], rows, jnp.zeros((), rows.dtype))


def _embed_local(ids, table, *, axis_name, reduce_scatter_output, scatter_dim):
    y = vocab_parallel_lookup(ids, table, axis_name)
    if reduce_scatter_output:
        return reduce_scatter_features(y, axis_name, scatter_dim % y.ndim)
    return reduce_from_axis(y, axis_name)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "reduce_scatter_output",
                                             "scatter_dim"))
def _parallel_embed(ids, table, *, mesh, axis_name, reduce_scatter_output, scatter_dim):
    out_ndim = ids.ndim + 1
    out_spec = [None] * out_ndim
    if reduce_scatter_output:
        out_spec[scatter_dim % out_ndim] = axis_name
    body = functools.partial(_embed_local, axis_name=axis_name,
                             reduce_scatter_output=reduce_scatter_output, scatter_dim=scatter_dim)
    return jax.shard_map(body, mesh=mesh, in_specs=(P(), P(axis_name, None)),
                         out_specs=P(*out_spec))(ids, table)


# Deliberate twin of torch_impl.embedding.VocabParallelEmbed, kept line-for-line parallel on
# purpose: same constructor steps, attributes and methods (the shared checks are in
# ringpar.layer_args).
class VocabParallelEmbed(nnx.Module):
    """Embedding whose table is split on the vocabulary over the tensor-parallel axis.

    Args:
        num_embeddings: Vocabulary size V (divisible by the tp axis size when parallel).
        features: Embedding width D.
        dtype: Dtype of the output (default: the parameter dtype).
        param_dtype: Dtype of the table (default float32).
        embedding_init: Initializer of the table (``nnx.Embed``'s default).
        parallel_config: A :class:`jax_impl.linear.TensorParallelConfig` (its mesh and
            ``axis_name``; ``reduce_scatter_output`` scatters the output, see the module
            docstring; ``matmul_method`` must be None or PLAIN). None: unsharded lookup.
        scatter_dim: The output dim that ``reduce_scatter_output`` shards (default -1, features).
        rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``), one ``params`` key for the table.

    Raises:
        ValueError: non-positive sizes, V (or the scattered dim at call time) not divisible by the
            tp axis size, a ring matmul method.
    """

    def __init__(self, num_embeddings: int, features: int, *, dtype=None,
                 param_dtype=jnp.float32, embedding_init=default_embed_init,
                 parallel_config: TensorParallelConfig | None = None, scatter_dim: int = -1,
                 rngs: nnx.Rngs | None = None):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.num_embeddings = positive_int("num_embeddings", num_embeddings)
        self.features = positive_int("features", features)
        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
        if isinstance(scatter_dim, bool) or not isinstance(scatter_dim, int):
            raise ValueError(f"scatter_dim={scatter_dim!r}: expected an int")
        self.dtype, self.param_dtype = dtype, param_dtype
        self.parallel_config, self.scatter_dim = parallel_config, scatter_dim
        self.is_parallel = parallel_config is not None and parallel_config.active
        table = embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
        if self.is_parallel:
            cfg = parallel_config
            check_vocab_split(num_embeddings, cfg.method, cfg.axis_name, cfg.axis_size)
            spec = P(cfg.axis_name, None)
            self.embedding = nnx.Param(jax.device_put(table, NamedSharding(cfg.mesh, spec)),
                                       out_sharding=tuple(spec), mesh=cfg.mesh)
        else:
            self.embedding = nnx.Param(table)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Look up integer ``ids`` ``[...]`` -> ``[..., features]`` (global view)."""
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids.dtype={ids.dtype}: expected an integer dtype")
        table = self.embedding[...]
        out_dtype = self.dtype or table.dtype
        if not self.is_parallel:
            return jnp.take(table, ids.astype(jnp.int32), axis=0).astype(out_dtype)
        cfg = self.parallel_config
        if cfg.reduce_scatter_output:
            out_shape = tuple(ids.shape) + (self.features,)
            d = self.scatter_dim % len(out_shape)
            if out_shape[d] % cfg.axis_size:
                raise ValueError(f"scatter_dim={self.scatter_dim}: output dim of size "
                                 f"{out_shape[d]} is not divisible by the {cfg.axis_name!r} axis "
                                 f"size {cfg.axis_size}")
        y = _parallel_embed(ids, table, mesh=cfg.mesh, axis_name=cfg.axis_name,
                            reduce_scatter_output=cfg.reduce_scatter_output,
                            scatter_dim=self.scatter_dim)
        return y.astype(out_dtype)
