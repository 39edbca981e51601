"""A small GPT-style decoder built from the tensor-parallel layers (Flax nnx; twin of
:mod:`torch_impl.gpt`).

Token embedding (vocab-parallel), learned position embedding, ``num_layers`` pre-norm blocks
(causal self-attention with the heads split over the tp axis, MLP column -> GELU -> row), a final
norm, a column-parallel LM head whose logits stay sharded on the vocabulary, and the vocab-parallel
cross-entropy. The torch twin has the same modules, parameter tree and communication.

Parameter tree (``nnx.state`` paths joined by '.' = the torch ``state_dict`` keys; global shapes;
D = hidden_size, F = mlp_hidden_size, V = vocab_size, S = max_seq_len, H = num_heads, hd = D/H)::

    wte.embedding                 [V, D]      sharded (tp, None)
    wpe.embedding                 [S, D]      replicated ("plain") / (None, tp) ("ring")
    blocks.{i}.ln_1.scale|bias    [D]         replicated / (tp,)
    blocks.{i}.attn.qkv.kernel    [D, 3D]     (None, tp)   columns head-major: h*3*hd + c*hd + j
    blocks.{i}.attn.qkv.bias      [3D]        (tp,)        (c = 0, 1, 2 for q, k, v)
    blocks.{i}.attn.proj.kernel   [D, D]      (tp, None)
    blocks.{i}.attn.proj.bias     [D]         replicated / (tp,)
    blocks.{i}.ln_2.scale|bias    [D]
    blocks.{i}.mlp.fc.kernel|bias [D, F] [F]  column
    blocks.{i}.mlp.proj.kernel|bias [F, D] [D] row
    ln_f.scale|bias               [D]
    lm_head.kernel                [D, V]      (None, tp)   no bias

(``norm="rmsnorm"`` drops the norm biases; ``use_bias=False`` drops the linear biases.) The fused
qkv kernel is laid out HEAD-MAJOR, so the contiguous column split over any tp size that divides
H gives every device whole heads with their q, k and v: the layout does not depend on tp.

Tensor-parallel modes (``GPTConfig.tp_mode``), n = tp size:

``"plain"`` (Megatron-style): the residual stream is replicated. qkv / fc are
    ``ColumnParallelLinear`` (PLAIN, output kept sharded), proj is ``RowParallelLinear`` (PLAIN:
    one all-reduce). Per block forward: 2 all-reduces; backward: 2 more (input gradients of the
    column layers). The embedding adds one all-reduce, the loss two, the LM head one backward.
``"ring"`` (async collective matmuls): the residual stream stays sharded on its features. Column
    layers use ``all_gather_matmul`` (n-1 collective-permutes, input consumed sharded), row layers
    ``reduce_scatter_matmul`` (n-1 permutes, output sharded), norms are feature-sharded (small
    all-reduces of per-token sums), the embedding reduce-scatters onto the features. No
    all-gather anywhere; in particular no weight is ever gathered.

Attention runs per device on its H/n heads (no communication): ``softmax(q k^T / sqrt(hd) +
causal mask) v``, softmax in float32.

Harness helpers (same names in the torch twin): ``gpt_param_shapes(config)``,
``load_params(model, flat)``, ``flat_params(model)``, ``loss_and_grads(model, tokens, targets)``,
``cached_loss_and_grads(model, tokens, targets)`` (compiled once), ``forward_hlo(model, tokens)``.
"""

from __future__ import annotations

import functools
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ringpar.gpt_config import NORMS, TP_MODES, GPTConfig, gpt_param_shapes  # noqa: F401

from .embedding import VocabParallelEmbed
from .linear import (ColumnParallelLinear, MatrixMultiplyMethod, RowParallelLinear,
                     TensorParallelConfig)
from .losses import cross_entropy, vocab_parallel_cross_entropy
from .mesh import check_axis
from .norms import ParallelLayerNorm, ParallelRMSNorm

__all__ = ["GPTConfig", "gpt_param_shapes", "PositionEmbed", "CausalSelfAttention", "MLP",
           "Block", "GPT", "load_params", "flat_params", "loss_and_grads", "cached_loss_and_grads",
           "forward_hlo"]


# -------------------------------------------------------------------------------- modules
def _tp_config(mesh, axis_name, method=None, rso=False) -> TensorParallelConfig:
    if mesh is None:
        return TensorParallelConfig()
    return TensorParallelConfig(mesh=mesh, axis_name=axis_name, matmul_method=method,
                                reduce_scatter_output=rso)


class _Ctx(tp.NamedTuple):
    """What every sub-module needs: the config, mesh, axis, dtypes."""

    config: GPTConfig
    mesh: Mesh | None
    axis_name: str
    dtype: tp.Any
    param_dtype: tp.Any

    @property
    def ring(self) -> bool:
        return self.mesh is not None and self.config.tp_mode == "ring"

    def column(self, i, o, rngs, use_bias=None):
        method = None
        if self.ring:
            method = (MatrixMultiplyMethod.ALL_GATHER_BIDIRECTIONAL if self.config.bidirectional
                      else MatrixMultiplyMethod.ALL_GATHER)
        return ColumnParallelLinear(
            i, o, use_bias=self.config.use_bias if use_bias is None else use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype,
            parallel_config=_tp_config(self.mesh, self.axis_name, method, rso=True), rngs=rngs)

    def row(self, i, o, rngs):
        method = None
        if self.ring:
            method = (MatrixMultiplyMethod.REDUCE_SCATTER_BIDIRECTIONAL
                      if self.config.bidirectional else MatrixMultiplyMethod.REDUCE_SCATTER)
        return RowParallelLinear(
            i, o, use_bias=self.config.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            parallel_config=_tp_config(self.mesh, self.axis_name, method, rso=self.ring),
            rngs=rngs)

    def norm(self, rngs):
        cls = ParallelRMSNorm if self.config.norm == "rmsnorm" else ParallelLayerNorm
        return cls(self.config.hidden_size, epsilon=self.config.norm_eps, dtype=self.dtype,
                   param_dtype=self.param_dtype, parallel_config=_tp_config(self.mesh,
                                                                            self.axis_name),
                   sharding="features" if self.ring else "none", rngs=rngs)


class PositionEmbed(nnx.Module):
    """Learned position embedding ``embedding`` [max_seq_len, D]; adds rows ``0..S-1`` to x.

    Sharded on D like the residual stream in ring mode, replicated otherwise.
    """

    def __init__(self, ctx: _Ctx, rngs: nnx.Rngs):
        cfg = ctx.config
        table = nnx.initializers.normal(0.02)(rngs.params(), (cfg.max_seq_len, cfg.hidden_size),
                                               ctx.param_dtype)
        if ctx.mesh is None:
            self.embedding = nnx.Param(table)
        else:
            spec = P(None, ctx.axis_name) if ctx.ring else P()
            self.embedding = nnx.Param(jax.device_put(table, NamedSharding(ctx.mesh, spec)),
                                       out_sharding=tuple(spec), mesh=ctx.mesh)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x + embedding[:S]`` for ``x`` [B, S, D]."""
        s = x.shape[-2]
        if s > self.embedding.shape[0]:
            raise ValueError(f"sequence length {s}: expected at most max_seq_len="
                             f"{self.embedding.shape[0]}")
        return x + self.embedding[...][:s].astype(x.dtype)


def _attention_local(qkv: jax.Array, *, head_dim: int) -> jax.Array:
    """Per device: causal attention of its heads. ``qkv`` [B, S, Hl*3*hd] (head-major) ->
    [B, S, Hl*hd]."""
    b, s, w = qkv.shape
    hl = w // (3 * head_dim)
    qkv = qkv.reshape(b, s, hl, 3, head_dim)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (head_dim ** -0.5)
    causal = jnp.tril(jnp.ones((s, s), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(b, s, hl * head_dim)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "head_dim"))
def _parallel_attention(qkv, *, mesh, axis_name, head_dim):
    spec = P(None, None, axis_name)
    return jax.shard_map(functools.partial(_attention_local, head_dim=head_dim), mesh=mesh,
                         in_specs=(spec,), out_specs=spec)(qkv)


class CausalSelfAttention(nnx.Module):
    """Causal self-attention: fused head-major ``qkv`` (column), heads split over tp, ``proj``
    (row)."""

    def __init__(self, ctx: _Ctx, rngs: nnx.Rngs):
        d = ctx.config.hidden_size
        self.ctx = ctx
        self.qkv = ctx.column(d, 3 * d, rngs)
        self.proj = ctx.row(d, d, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, S, D] -> [B, S, D]."""
        ctx = self.ctx
        qkv = self.qkv(x)
        if ctx.mesh is None:
            out = _attention_local(qkv, head_dim=ctx.config.head_dim)
        else:
            out = _parallel_attention(qkv, mesh=ctx.mesh, axis_name=ctx.axis_name,
                                      head_dim=ctx.config.head_dim)
        return self.proj(out)


class MLP(nnx.Module):
    """``proj(gelu(fc(x)))``: fc column-parallel, proj row-parallel (exact erf GELU)."""

    def __init__(self, ctx: _Ctx, rngs: nnx.Rngs):
        d, f = ctx.config.hidden_size, ctx.config.ffn
        self.fc = ctx.column(d, f, rngs)
        self.proj = ctx.row(f, d, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, S, D] -> [B, S, D]."""
        return self.proj(jax.nn.gelu(self.fc(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm decoder block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, ctx: _Ctx, rngs: nnx.Rngs):
        self.ln_1 = ctx.norm(rngs)
        self.attn = CausalSelfAttention(ctx, rngs)
        self.ln_2 = ctx.norm(rngs)
        self.mlp = MLP(ctx, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, S, D] -> [B, S, D]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
    """The decoder: ``logits = model(tokens)``, ``loss = model.loss(tokens, targets)``.

    Args:
        config: A :class:`GPTConfig`.
        mesh: A ``jax.sharding.Mesh`` with ``axis_name`` (tensor parallel over it), or None for
            the unsharded model (same parameters, plain layers).
        axis_name: The tensor-parallel mesh axis.
        dtype: Computation dtype (default: promoted from inputs and parameters).
        param_dtype: Parameter dtype.
        rngs: ``nnx.Rngs`` (default ``nnx.Rngs(0)``).

    Raises:
        ValueError: naming the module path, when vocab_size, num_heads, hidden_size or
            mlp_hidden_size is not divisible by the tp size; a mesh without ``axis_name``.
    """

    def __init__(self, config: GPTConfig, *, mesh: Mesh | None = None, axis_name: str = "tp",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config={config!r}: expected a GPTConfig")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise ValueError(f"mesh={mesh!r}: expected a jax.sharding.Mesh or None")
            config.check_tp(check_axis(mesh, axis_name))
        ctx = _Ctx(config, mesh, axis_name, dtype, param_dtype)
        self.config, self.mesh, self.axis_name = config, mesh, axis_name
        self.wte = VocabParallelEmbed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=nnx.initializers.normal(0.02),
            parallel_config=_tp_config(mesh, axis_name, rso=ctx.ring), rngs=rngs)
        self.wpe = PositionEmbed(ctx, rngs)
        self.blocks = nnx.List([Block(ctx, rngs) for _ in range(config.num_layers)])
        self.ln_f = ctx.norm(rngs)
        self.lm_head = ctx.column(config.hidden_size, config.vocab_size, rngs, use_bias=False)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Integer ``tokens`` [B, S] -> logits [B, S, V] (sharded on V over tp when parallel)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens.shape={tuple(tokens.shape)}: expected [batch, seq]")
        x = self.wpe(self.wte(tokens))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss_from_logits(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean cross-entropy (config's label smoothing / ignore_index), vocab-parallel."""
        cfg = self.config
        if self.mesh is None:
            return cross_entropy(logits, targets, cfg.label_smoothing, cfg.ignore_index)
        return vocab_parallel_cross_entropy(logits, targets, mesh=self.mesh,
                                            axis_name=self.axis_name,
                                            label_smoothing=cfg.label_smoothing,
                                            ignore_index=cfg.ignore_index)

    def loss(self, tokens: jax.Array, targets: jax.Array) -> jax.Array:
        """Mean cross-entropy of ``self(tokens)`` against ``targets`` [B, S]."""
        return self.loss_from_logits(self(tokens), targets)


# ------------------------------------------------------------------------- harness helpers
def _flat_vars(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {".".join(str(k) for k in path): var
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_params(model: GPT, flat: tp.Mapping[str, tp.Any]) -> None:
    """Set every parameter of ``model`` from ``flat`` {path: global array} (numpy or jax).

    Values keep the parameter's dtype and sharding. Raises ValueError on missing or unexpected
    keys or a shape mismatch (naming the path).
    """
    variables = _flat_vars(model)
    missing, unexpected = sorted(set(variables) - set(flat)), sorted(set(flat) - set(variables))
    if missing or unexpected:
        raise ValueError(f"flat params do not match the model: missing {missing}, unexpected "
                         f"{unexpected}")
    for path, var in variables.items():
        old = var.value
        value = jnp.asarray(flat[path], dtype=old.dtype)
        if value.shape != old.shape:
            raise ValueError(f"{path}: shape {tuple(value.shape)}, expected {tuple(old.shape)}")
        var.value = jax.device_put(value, old.sharding)


def flat_params(model: GPT) -> dict[str, np.ndarray]:
    """{path: global parameter value as numpy} (the keys of :func:`gpt_param_shapes`)."""
    return {path: np.asarray(var.value) for path, var in _flat_vars(model).items()}


def _ids(a) -> jax.Array:
    """Integer ids (array) as int32."""
    return jnp.asarray(a, jnp.int32)


def _value_and_grad(graphdef, rest):
    """``(params, tokens, targets) -> ((loss, logits), grads)`` of the model ``graphdef``."""
    def f(p, tok, tgt):
        m = nnx.merge(graphdef, p, rest)
        logits = m(tok)
        return m.loss_from_logits(logits, tgt), logits

    return jax.value_and_grad(f, has_aux=True)


def _flat_grads(grads) -> dict[str, jax.Array]:
    return {".".join(str(k) for k in path): var.value for path, var in nnx.to_flat_state(grads)}


def loss_and_grads(model: GPT, tokens, targets, *, hlo: bool = False):
    """One jitted forward + backward of the mean loss.

    Args:
        model: A :class:`GPT`.
        tokens, targets: Integer [B, S] arrays (targets may hold ``ignore_index``).
        hlo: Also return the compiled (partitioned) HLO text of the program.

    Returns:
        ``(loss, logits, grads)`` (``+ (hlo_text,)`` if ``hlo``): the scalar loss, the global
        logits [B, S, V] and {path: gradient} of every parameter, as jax arrays.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, targets = _ids(tokens), _ids(targets)
    compiled = jax.jit(_value_and_grad(graphdef, rest)).lower(params, tokens, targets).compile()
    (loss, logits), grads = compiled(params, tokens, targets)
    out = (loss, logits, _flat_grads(grads))
    return out + (compiled.as_text(),) if hlo else out


def cached_loss_and_grads(model: GPT, tokens, targets):
    """:func:`loss_and_grads` compiled once; returns ``step() -> (loss, logits, grads)``.

    Each call runs the compiled program on the model's current parameters (e.g. after
    ``nnx.update``) and the given ``tokens`` / ``targets`` (fixed; twin of the torch step, where
    this is what saves re-tracing; here it saves the compile of every :func:`loss_and_grads`).

    Example::

        step = cached_loss_and_grads(model, tokens, targets)   # compiles once
        for _ in range(10):
            loss, logits, grads = step()
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, targets = _ids(tokens), _ids(targets)
    compiled = jax.jit(_value_and_grad(graphdef, rest)).lower(params, tokens, targets).compile()

    def step():
        (loss, logits), grads = compiled(nnx.state(model, nnx.Param), tokens, targets)
        return loss, logits, _flat_grads(grads)

    return step


def forward_hlo(model: GPT, tokens) -> str:
    """Compiled (partitioned) HLO text of the forward pass ``logits = model(tokens)`` alone."""
    graphdef, state = nnx.split(model)
    tokens = _ids(tokens)

    def f(st, tok):
        return nnx.merge(graphdef, st)(tok)

    return jax.jit(f).lower(state, tokens).compile().as_text()
