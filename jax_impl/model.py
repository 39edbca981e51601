"""A GPT trained on a 4-D mesh (dp, fsdp, pp, tp), built from ModelConfig + ParallelConfig alone.

Twin: :mod:`torch_impl.model` (same names, same parameter paths and layouts, same numbers).
Sizes, validation, initial weights and the parameter layout live in
:mod:`ringpar.gpt_model_config` (one place for both backends; its docstring lists every
parameter path and shape).

Per-device program (xlstm-jax style): ONE ``jax.shard_map`` over all four mesh axes runs the
forward and backward pass; the batch is sharded over (dp, fsdp), heads / features / vocabulary
over tp, layers over pp:

- ``embed``: vocab-parallel token table (partial lookup + reduce-scatter onto the features) plus a
  feature-sharded position table -> residual stream ``[b, S, D/tp]`` per device.
- ``pipeline``: ``PipelineModule`` (GPipe, ``num_microbatches``) over pp; stage s holds blocks
  ``s*L/pp .. (s+1)*L/pp - 1`` as ``blocks_{j}``. Block: LayerNorm (statistics all-reduced over
  tp) -> qkv (TPDense/TPAsyncDense "gather", whole heads per device) -> causal attention ->
  proj ("scatter") + bias -> residual; the same with the MLP (fc gather, GELU, proj scatter).
  ``ParallelConfig.tp_async_dense`` picks TPAsyncDense (ring permutes) instead of TPDense.
- ``head``: LayerNorm, lm_head (gather, logits vocab-sharded), vocab-parallel cross-entropy.
  Loss = mean over all tokens: the per-device mean, masked to the last pipeline stage.
- Gradients, xlstm-jax semantics (``shard_map(check_vma=False)``, as ``jax_impl.data_parallel``
  expects): per-device gradients of the per-device loss divided by tp (the tp devices of a data
  shard hold the same loss; the transposes of their psums add the n copies), summed over pp for
  the pp-replicated embedding / head, then ``sync_gradients`` over (dp, fsdp) (mean; FSDP-sharded
  gradients already hold the fsdp mean from the gather's backward).
- FSDP (``fsdp_modules``) and remat (``remat``) are applied per module name ("Embed", "Block",
  "Head") through ``jax_impl.data_parallel.prepare_module``.

Parameters are a flat dict ``{layout path: global jax.Array}`` sharded by
:meth:`GPTModel.param_specs`; optimizers and checkpoints treat it as an ordinary pytree.

Example::

    from ringpar.configs import ParallelConfig
    from ringpar.gpt_model_config import gpt_model_config
    from jax_impl.mesh import create_mesh
    from jax_impl.model import build_gpt

    cfg = gpt_model_config(ParallelConfig(data_axis_size=2, fsdp_axis_size=1,
                                          pipeline_axis_size=2, model_axis_size=2),
                           vocab_size=64, hidden_size=32, num_heads=4, num_layers=2)
    model = build_gpt(cfg, create_mesh(cfg.parallel))
    params = model.init_params(seed=0)
    loss, grads = model.loss_and_grads(params, tokens, targets)   # int32 [B, S] arrays
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    ref = model.to_reference(params)   # {reference name: numpy}, mesh-independent
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ringpar.configs import ModelConfig
from ringpar.gpt_model_config import (GPTModelConfig, MeshSizes, check_batch, check_gpt,
                                      from_layout, init_reference, layout_shapes, layout_specs,
                                      to_layout)

from .gpt import _attention_local
from .losses import vocab_parallel_token_losses
from .collectives import axis_index, reduce_scatter_features
from .data_parallel import prepare_module, sync_gradients
from .pipeline_parallel import PipelineModule
from .tensor_parallel import ModelParallelismWrapper, TPAsyncDense, TPDense

__all__ = ["GPTModel", "build_gpt"]


def _prepare(module_cls, name: str, parallel):
    """FSDP / remat wrapping of a module class by name (``jax_impl.data_parallel``)."""
    if not parallel.fsdp_modules and not parallel.remat:
        return module_cls
    return prepare_module(module_cls, name, parallel)


# ------------------------------------------------------------------------ per-device modules
class _Table(nn.Module):
    """One parameter ``embedding`` of ``shape`` (zeros init: values are always loaded)."""

    shape: tuple

    @nn.compact
    def __call__(self):
        return self.param("embedding", nn.initializers.zeros, self.shape)


class _Bias(nn.Module):
    """``x + bias`` with a parameter ``bias`` [features]."""

    features: int

    @nn.compact
    def __call__(self, x):
        return x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)


class _ShardedLayerNorm(nn.Module):
    """LayerNorm of a feature-sharded ``x`` [..., D/n]; mean and variance all-reduced over tp."""

    features: int
    total: int
    eps: float
    axis: str

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        xf = x.astype(jnp.float32)
        mean = jax.lax.psum(jnp.sum(xf, -1, keepdims=True), self.axis) / self.total
        centred = xf - mean
        var = jax.lax.psum(jnp.sum(centred * centred, -1, keepdims=True), self.axis) / self.total
        y = centred * jax.lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(x.dtype)


def _wrap(tp: str, module_fn, name: str, **kwargs):
    return ModelParallelismWrapper(model_axis_name=tp, module_fn=functools.partial(module_fn,
                                                                                   **kwargs),
                                   name=name)


def _dense(cfg: GPTModelConfig, names, async_dense: bool, kind: str, features: int,
           use_bias: bool, name: str):
    cls = TPAsyncDense if async_dense else TPDense
    return cls(dense_fn=functools.partial(nn.Dense, features=features), model_axis_name=names[3],
               tp_mode=kind, use_bias=use_bias, name=name)


class _Embed(nn.Module):
    """Token ids [b, S] -> residual stream [b, S, D/n] (vocab-parallel lookup + positions)."""

    cfg: GPTModelConfig
    names: tuple
    tp_size: int

    @nn.compact
    def __call__(self, tokens):
        cfg, tp, n = self.cfg, self.names[3], self.tp_size
        table = _wrap(tp, _Table, "wte", shape=(cfg.vocab_size // n, cfg.hidden_size))()
        c = table.shape[0]
        local = tokens - axis_index(tp) * c
        inside = (local >= 0) & (local < c)
        rows = jnp.take(table, jnp.where(inside, local, 0), axis=0)
        rows = jnp.where(inside[..., None], rows, 0.0)
        x = reduce_scatter_features(rows, tp) if n > 1 else rows
        pos = _wrap(tp, _Table, "wpe", shape=(cfg.max_seq_len, cfg.hidden_size // n))()
        return x + pos[: tokens.shape[1]]


class _Sub(nn.Module):
    """Attention (``kind="attn"``: qkv, heads, proj) or MLP (``"mlp"``: fc, GELU, proj) + bias."""

    cfg: GPTModelConfig
    names: tuple
    tp_size: int
    async_dense: bool
    kind: str

    @nn.compact
    def __call__(self, h):
        cfg, n, tp = self.cfg, self.tp_size, self.names[3]
        dense = functools.partial(_dense, cfg, self.names, self.async_dense)
        # TPDense scatter reduce-scatters [.., D] partial sums; TPAsyncDense sends [.., D/n] blocks.
        scatter_out = cfg.hidden_size // n if (self.async_dense or n == 1) else cfg.hidden_size
        if self.kind == "attn":
            qkv = dense("gather", 3 * cfg.hidden_size // n, True, "qkv")(h)
            h = _attention_local(qkv, head_dim=cfg.head_dim)
        else:
            h = jax.nn.gelu(dense("gather", cfg.ffn // n, True, "fc")(h), approximate=False)
        h = dense("scatter", scatter_out, False, "proj")(h)
        # One bias after the reduction: a bias inside the scatter layer would be summed n ways.
        return _wrap(tp, _Bias, "proj_bias", features=cfg.hidden_size // n)(h)


class _Block(nn.Module):
    """Pre-norm decoder block on the feature-sharded residual stream [b, S, D/n]."""

    cfg: GPTModelConfig
    names: tuple
    tp_size: int
    async_dense: bool

    @nn.compact
    def __call__(self, x):
        cfg, n, tp = self.cfg, self.tp_size, self.names[3]
        args = (cfg, self.names, n, self.async_dense)
        for ln, kind in (("ln_1", "attn"), ("ln_2", "mlp")):
            h = _wrap(tp, _ShardedLayerNorm, ln, features=cfg.hidden_size // n,
                      total=cfg.hidden_size, eps=cfg.norm_eps, axis=tp)(x)
            x = x + _Sub(*args, kind, name=kind)(h)
        return x


class _Stage(nn.Module):
    """One pipeline stage: ``blocks_0 .. blocks_{L/pp-1}``."""

    cfg: GPTModelConfig
    names: tuple
    tp_size: int
    pp_size: int
    async_dense: bool
    parallel: Any

    @nn.compact
    def __call__(self, x):
        block = _prepare(_Block, "Block", self.parallel)
        for j in range(self.cfg.num_layers // self.pp_size):
            x = block(self.cfg, self.names, self.tp_size, self.async_dense, name=f"blocks_{j}")(x)
        return x


class _Head(nn.Module):
    """Final LayerNorm, lm_head (logits vocab-sharded over tp), per-token losses [b, S]."""

    cfg: GPTModelConfig
    names: tuple
    tp_size: int
    async_dense: bool

    @nn.compact
    def __call__(self, x, targets):
        cfg, n, tp = self.cfg, self.tp_size, self.names[3]
        h = _wrap(tp, _ShardedLayerNorm, "ln_f", features=cfg.hidden_size // n,
                  total=cfg.hidden_size, eps=cfg.norm_eps, axis=tp)(x)
        logits = _dense(cfg, self.names, self.async_dense, "gather", cfg.vocab_size // n, False,
                        "lm_head")(h)
        return vocab_parallel_token_losses(logits, targets, tp, vocab_size=cfg.vocab_size)


class _GPT(nn.Module):
    """The per-device model: ``loss = _GPT(...)(tokens, targets)`` inside the 4-axis shard_map."""

    cfg: GPTModelConfig
    names: tuple
    sizes: tuple
    async_dense: bool
    parallel: Any

    @nn.compact
    def __call__(self, tokens, targets):
        cfg, pp = self.cfg, self.names[2]
        _, _, p, n = self.sizes
        x = _prepare(_Embed, "Embed", self.parallel)(cfg, self.names, n, name="embed")(tokens)
        stage = functools.partial(_Stage, cfg, self.names, n, p, self.async_dense, self.parallel)
        x = PipelineModule(model_axis_name=pp, num_microbatches=cfg.num_microbatches,
                           module_fn=functools.partial(ModelParallelismWrapper,
                                                       model_axis_name=pp, module_fn=stage),
                           name="pipeline")(x)
        losses = _prepare(_Head, "Head", self.parallel)(cfg, self.names, n, self.async_dense,
                                                        name="head")(x, targets)
        # Only the last stage holds the pipeline output: the loss of the others is masked out.
        return jnp.where(axis_index(pp) == p - 1, jnp.mean(losses), 0.0)


# ------------------------------------------------------------------------------ public API
def _nest(flat: Mapping[str, Any], specs: Mapping[str, tuple]) -> dict:
    """Flat {path: per-device array} -> the linen params tree, boxed in ``nn.Partitioned``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        names = specs[path]
        node[leaf] = nn.Partitioned(value, names=names) if any(names) else value
    return tree


class GPTModel:
    """The GPT on a JAX mesh (see the module docstring). Build it with :func:`build_gpt`.

    Attributes:
        config: The ``ModelConfig`` (``model_config`` a ``GPTModelConfig``).
        mesh: The ``jax.sharding.Mesh`` with axes (dp, fsdp, pp, tp).
        sizes: The resolved ``MeshSizes``.
    """

    def __init__(self, config: ModelConfig, mesh: Mesh):
        if not isinstance(mesh, Mesh):
            raise ValueError(f"mesh={mesh!r}: expected a jax.sharding.Mesh (jax_impl.mesh."
                             f"create_mesh(config.parallel))")
        self.config, self.mesh = config, mesh
        self.sizes: MeshSizes = check_gpt(config, int(mesh.devices.size))
        if (tuple(mesh.axis_names) != self.sizes.names
                or tuple(mesh.devices.shape) != self.sizes.mesh):
            raise ValueError(f"mesh axes {dict(mesh.shape)} do not match config.parallel "
                             f"{dict(zip(self.sizes.names, self.sizes.mesh))}")
        par = config.parallel
        self._module = _GPT(config.model_config, self.sizes.names, self.sizes.mesh,
                            bool(par.tp_async_dense), par)
        self._specs = layout_specs(config, self.sizes)
        self._shapes = layout_shapes(config, self.sizes)
        self._step, self._cache = None, {}

    # -- parameters
    def param_specs(self) -> dict[str, P]:
        """{path: PartitionSpec} of every parameter (tp / pp stacking, FSDP)."""
        return {k: P(*v) for k, v in self._specs.items()}

    def param_layout(self) -> dict[str, tuple[tuple[int, ...], tuple]]:
        """{path: (global shape, partition names)}: the table of ``ringpar.gpt_model_config``."""
        return {k: (self._shapes[k], self._specs[k]) for k in self._shapes}

    def from_reference(self, ref: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Reference (dense, mesh-independent) numpy parameters -> sharded model parameters."""
        lay = to_layout(ref, self.config, self.sizes)
        return {k: jax.device_put(jnp.asarray(v, jnp.float32),
                                  NamedSharding(self.mesh, P(*self._specs[k])))
                for k, v in lay.items()}

    def to_reference(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Model parameters (or gradients) -> reference numpy arrays (comparable across meshes)."""
        return from_layout({k: np.asarray(v) for k, v in params.items()}, self.config, self.sizes)

    def init_params(self, seed: int) -> dict[str, jax.Array]:
        """Seeded initial parameters: ``from_reference(init_reference(model_config, seed))``."""
        return self.from_reference(init_reference(self.config.model_config, seed))

    def batch_sharding(self) -> NamedSharding:
        """Sharding of tokens / targets [B, S]: rows over (dp, fsdp)."""
        dp, fsdp = self.sizes.names[:2]
        return NamedSharding(self.mesh, P((dp, fsdp), None))

    # -- training step
    def _build(self):
        specs, module = self._specs, self._module
        dp, fsdp, pp, tp = self.sizes.names
        n = self.sizes.tp

        compute = jnp.dtype(self.config.model_config.dtype)

        def local(params, tokens, targets):
            def loss_fn(p):
                # Mixed precision: float32 parameters, the step on copies in the compute dtype.
                p = {k: v.astype(compute) for k, v in p.items()}
                # Under check_vma=False the transposes treat the program as the SUM of the
                # per-device outputs; the tp devices of a data shard all hold the same loss, so
                # each contributes 1/n of it (else every gradient would be n times too large).
                loss = module.apply({"params": _nest(p, specs)}, tokens, targets)
                return loss / n, loss

            grads, loss = jax.grad(loss_fn, has_aux=True)(params)
            # Embedding / head are replicated over pp but used on one stage: sum over pp.
            grads = {k: g if pp in specs[k] else jax.lax.psum(g, pp) for k, g in grads.items()}
            boxed = {k: nn.Partitioned(g, names=specs[k]) for k, g in grads.items()}
            boxed = sync_gradients(boxed, (dp, fsdp))   # mean over the data shards
            grads = {k: b.value for k, b in boxed.items()}
            return jax.lax.pmean(jax.lax.psum(loss, pp), (dp, fsdp)), grads

        pspecs = self.param_specs()
        bspec = self.batch_sharding().spec
        # check_vma=False: the semantics of xlstm-jax and of jax_impl.data_parallel (per-device
        # gradients, FSDP gathers whose backward is the mean, explicit sync_gradients).
        fn = jax.shard_map(local, mesh=self.mesh, in_specs=(pspecs, bspec, bspec),
                           out_specs=(P(), pspecs), check_vma=False)
        return jax.jit(fn)

    def _inputs(self, params, tokens, targets):
        check_batch(np.shape(tokens), np.shape(targets), self.config, self.sizes)
        missing = sorted(set(self._specs) - set(params))
        if missing:
            raise ValueError(f"params is missing {missing[:5]}")
        sh = self.batch_sharding()
        tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), sh)
        targets = jax.device_put(jnp.asarray(targets, jnp.int32), sh)
        return {k: params[k] for k in self._specs}, tokens, targets

    def _compiled(self, args):
        """The AOT-compiled step for these argument shapes (compiled once, then reused)."""
        key = tuple((k, v.shape, v.dtype) for k, v in args[0].items()) + (args[1].shape,)
        if key not in self._cache:
            if self._step is None:
                self._step = self._build()
            self._cache[key] = self._step.lower(*args).compile()
        return self._cache[key]

    def loss_and_grads(self, params, tokens, targets):
        """Mean next-token loss over the global batch and its gradient for every parameter.

        One compiled ``shard_map`` over all mesh axes (compiled once per input shape).

        Args:
            params: {path: array} as from :meth:`init_params`.
            tokens, targets: Integer [B, S] (global; B divisible by dp*fsdp*num_microbatches).

        Returns:
            ``(loss, grads)``: scalar float32 and {path: array} sharded like ``params``; the
            gradients are those of the global mean loss (already reduced over dp / fsdp / pp).
        """
        args = self._inputs(params, tokens, targets)
        return self._compiled(args)(*args)

    def compiled_text(self, params, tokens, targets) -> str:
        """HLO text of the compiled (partitioned) training step (for collective signatures)."""
        return self._compiled(self._inputs(params, tokens, targets)).as_text()


def build_gpt(config: ModelConfig, mesh: Mesh | None = None) -> GPTModel:
    """Build the GPT for ``config`` on ``mesh`` (default ``create_mesh(config.parallel)``).

    Raises ValueError (naming the field, before any compile) on a mesh / model mismatch; see
    :func:`ringpar.gpt_model_config.check_gpt`.
    """
    from .mesh import create_mesh

    if not isinstance(config, ModelConfig):
        raise ValueError(f"config={config!r}: expected a ringpar.configs.ModelConfig")
    if mesh is None:
        check_gpt(config, len(jax.devices()))
        mesh = create_mesh(config.parallel)
    return GPTModel(config, mesh)
