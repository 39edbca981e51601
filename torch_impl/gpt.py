"""A small GPT-style decoder built from the tensor-parallel layers on torch_xla SPMD (twin of
:mod:`jax_impl.gpt`).

Same modules, same parameter tree (``state_dict`` keys = the JAX ``nnx.state`` paths joined by
'.', same global shapes and layouts: kernels ``[in, out]``, the fused ``attn.qkv`` kernel
head-major), same tensor-parallel modes and the same communication as the JAX module, whose
docstring has the parameter table and the per-mode collectives. Tensors are global (docs/design.md):
``model(tokens)`` takes ``[B, S]`` ids on the XLA device and returns global logits ``[B, S, V]``
annotated as sharded on V. The attention core runs in the stacked view ``[n, B, S, H/n, 3, hd]``
(a reshape of the head-sharded qkv: no data moves), the twin of the JAX per-device body.

With ``mesh=None`` the model is unsharded: plain layers, parameters on the CPU (move it with
``.to(device)``), the reference the tests compare against.

Deviations from the JAX twin: ``rngs`` -> ``seed`` (random values differ; weights convert by
name with :func:`load_params`).

Harness helpers (same names as the JAX twin): ``gpt_param_shapes(config)``,
``load_params(model, flat)``, ``flat_params(model)``, ``loss_and_grads(model, tokens, targets)``,
``cached_loss_and_grads(model, tokens, targets)`` (compiled once), ``forward_hlo(model, tokens)``.
"""

from __future__ import annotations

import typing as tp

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ringpar.gpt_config import NORMS, TP_MODES, GPTConfig, gpt_param_shapes  # noqa: F401

from . import mesh as _mesh
from .array_utils import from_stacked, to_stacked
from .embedding import VocabParallelEmbed
from .linear import (ColumnParallelLinear, MatrixMultiplyMethod, RowParallelLinear,
                     TensorParallelConfig)
from .losses import cross_entropy, vocab_parallel_cross_entropy
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
    """What every sub-module needs: the config, mesh, axis, dtypes and a seed counter."""

    config: GPTConfig
    mesh: tp.Any
    axis_name: str
    dtype: torch.dtype | None
    param_dtype: torch.dtype
    seeds: tp.Iterator[int]

    @property
    def ring(self) -> bool:
        return self.mesh is not None and self.config.tp_mode == "ring"

    @property
    def n(self) -> int:
        return 1 if self.mesh is None else _mesh.check_axis(self.mesh, self.axis_name)

    def column(self, i, o, use_bias=None):
        method = None
        if self.ring:
            method = (MatrixMultiplyMethod.ALL_GATHER_BIDIRECTIONAL if self.config.bidirectional
                      else MatrixMultiplyMethod.ALL_GATHER)
        return ColumnParallelLinear(
            i, o, use_bias=self.config.use_bias if use_bias is None else use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype,
            parallel_config=_tp_config(self.mesh, self.axis_name, method, rso=True),
            seed=next(self.seeds))

    def row(self, i, o):
        method = None
        if self.ring:
            method = (MatrixMultiplyMethod.REDUCE_SCATTER_BIDIRECTIONAL
                      if self.config.bidirectional else MatrixMultiplyMethod.REDUCE_SCATTER)
        return RowParallelLinear(
            i, o, use_bias=self.config.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
            parallel_config=_tp_config(self.mesh, self.axis_name, method, rso=self.ring),
            seed=next(self.seeds))

    def norm(self):
        cls = ParallelRMSNorm if self.config.norm == "rmsnorm" else ParallelLayerNorm
        return cls(self.config.hidden_size, epsilon=self.config.norm_eps, dtype=self.dtype,
                   param_dtype=self.param_dtype,
                   parallel_config=_tp_config(self.mesh, self.axis_name),
                   sharding="features" if self.ring else "none")


class PositionEmbed(nn.Module):
    """Learned position embedding ``embedding`` [max_seq_len, D]; adds rows ``0..S-1`` to x.

    Sharded on D like the residual stream in ring mode, replicated otherwise.
    """

    def __init__(self, ctx: _Ctx):
        super().__init__()
        cfg = ctx.config
        gen = torch.Generator().manual_seed(next(ctx.seeds))
        table = torch.empty(cfg.max_seq_len, cfg.hidden_size, dtype=torch.float32)
        table.normal_(0.0, 0.02, generator=gen)
        table = table.to(ctx.param_dtype)
        self.mesh, self.axis_name, self.ring = ctx.mesh, ctx.axis_name, ctx.ring
        if ctx.mesh is not None:
            table = table.to(_mesh.xla_device())
        self.embedding = nn.Parameter(table)
        if ctx.mesh is not None:
            self.reshard()
            self.register_load_state_dict_post_hook(lambda module, keys: module.reshard())

    def reshard(self) -> None:
        """Annotate the table: (None, tp) in ring mode, replicated otherwise."""
        if self.mesh is not None:
            spec = (None, self.axis_name) if self.ring else (None, None)
            _mesh.mark_sharding(self.embedding, self.mesh, spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + embedding[:S]`` for ``x`` [B, S, D]."""
        s = x.shape[-2]
        if s > self.embedding.shape[0]:
            raise ValueError(f"sequence length {s}: expected at most max_seq_len="
                             f"{self.embedding.shape[0]}")
        return x + self.embedding[:s].to(x.dtype)


def _attention_local(qkv: torch.Tensor, *, head_dim: int) -> torch.Tensor:
    """Causal attention of the heads in ``qkv`` [..., B, S, Hl*3*hd] (head-major; leading dims
    are batch-like, e.g. the stacked device dim) -> [..., B, S, Hl*hd]."""
    *lead, b, s, w = qkv.shape
    hl = w // (3 * head_dim)
    qkv = qkv.reshape(*lead, b, s, hl, 3, head_dim)
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    scores = torch.einsum("...qhd,...khd->...hqk", q, k).to(torch.float32) * (head_dim ** -0.5)
    causal = torch.ones(s, s, dtype=torch.bool, device=qkv.device).tril()
    scores = torch.where(causal, scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("...hqk,...khd->...qhd", probs, v)
    return out.reshape(*lead, b, s, hl * head_dim)


def _parallel_attention(qkv: torch.Tensor, *, mesh, axis_name: str, head_dim: int):
    """Global qkv [B, S, 3D] sharded on its last dim -> global [B, S, D] sharded on its last dim;
    per device in the stacked view (no communication)."""
    stacked = to_stacked(qkv, axis_name, mesh=mesh)  # [n, B, S, 3D/n]
    return from_stacked(_attention_local(stacked, head_dim=head_dim), axis_name, mesh=mesh)


class CausalSelfAttention(nn.Module):
    """Causal self-attention: fused head-major ``qkv`` (column), heads split over tp, ``proj``
    (row)."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        d = ctx.config.hidden_size
        self.mesh, self.axis_name, self.head_dim = ctx.mesh, ctx.axis_name, ctx.config.head_dim
        self.qkv = ctx.column(d, 3 * d)
        self.proj = ctx.row(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        qkv = self.qkv(x)
        if self.mesh is None:
            out = _attention_local(qkv, head_dim=self.head_dim)
        else:
            out = _parallel_attention(qkv, mesh=self.mesh, axis_name=self.axis_name,
                                      head_dim=self.head_dim)
        return self.proj(out)


class MLP(nn.Module):
    """``proj(gelu(fc(x)))``: fc column-parallel, proj row-parallel (exact erf GELU)."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        d, f = ctx.config.hidden_size, ctx.config.ffn
        self.fc = ctx.column(d, f)
        self.proj = ctx.row(f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm decoder block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        self.ln_1 = ctx.norm()
        self.attn = CausalSelfAttention(ctx)
        self.ln_2 = ctx.norm()
        self.mlp = MLP(ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, S, D]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The decoder: ``logits = model(tokens)``, ``loss = model.loss(tokens, targets)``.

    Args:
        config: A :class:`GPTConfig`.
        mesh: A torch_xla mesh with ``axis_name`` (tensor parallel over it; parameters on the XLA
            device, sharded), or None for the unsharded model (parameters on the CPU).
        axis_name: The tensor-parallel mesh axis.
        dtype: Computation dtype (default: promoted from inputs and parameters).
        param_dtype: Parameter dtype.
        seed: Init seed (None: drawn from torch's global generator).

    Raises:
        ValueError: naming the module path, when vocab_size, num_heads, hidden_size or
            mlp_hidden_size is not divisible by the tp size; a mesh without ``axis_name``.
    """

    def __init__(self, config: GPTConfig, *, mesh=None, axis_name: str = "tp",
                 dtype: torch.dtype | None = None, param_dtype: torch.dtype = torch.float32,
                 seed: int | None = None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config={config!r}: expected a GPTConfig")
        if mesh is not None:
            _mesh.require_spmd()
            config.check_tp(_mesh.check_axis(mesh, axis_name))
        if seed is None:
            seed = int(torch.randint(0, 2**31, (1,)).item())
        seeds = iter(range(seed * 1000, seed * 1000 + 10**6))
        ctx = _Ctx(config, mesh, axis_name, dtype, param_dtype, seeds)
        self.config, self.mesh, self.axis_name = config, mesh, axis_name

        def small_normal(generator, shape, dtype):
            out = torch.empty(tuple(shape), dtype=torch.float32)
            return out.normal_(0.0, 0.02, generator=generator).to(dtype)

        self.wte = VocabParallelEmbed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=small_normal, parallel_config=_tp_config(mesh, axis_name, rso=ctx.ring),
            seed=next(seeds))
        self.wpe = PositionEmbed(ctx)
        self.blocks = nn.ModuleList([Block(ctx) for _ in range(config.num_layers)])
        self.ln_f = ctx.norm()
        self.lm_head = ctx.column(config.hidden_size, config.vocab_size, use_bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Integer ``tokens`` [B, S] -> logits [B, S, V] (sharded on V over tp when parallel)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens.shape={tuple(tokens.shape)}: expected [batch, seq]")
        x = self.wpe(self.wte(tokens))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (config's label smoothing / ignore_index), vocab-parallel."""
        cfg = self.config
        if self.mesh is None:
            return cross_entropy(logits, targets, cfg.label_smoothing, cfg.ignore_index)
        return vocab_parallel_cross_entropy(logits, targets, mesh=self.mesh,
                                            axis_name=self.axis_name,
                                            label_smoothing=cfg.label_smoothing,
                                            ignore_index=cfg.ignore_index)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``self(tokens)`` against ``targets`` [B, S]."""
        return self.loss_from_logits(self(tokens), targets)


# ------------------------------------------------------------------------- harness helpers
def load_params(model: GPT, flat: tp.Mapping[str, tp.Any]) -> None:
    """Set every parameter of ``model`` from ``flat`` {path: global array} (numpy or torch).

    Values keep the parameter's dtype, device and sharding. Raises ValueError on missing or
    unexpected keys or a shape mismatch (naming the path).
    """
    own = dict(model.named_parameters())
    missing, unexpected = sorted(set(own) - set(flat)), sorted(set(flat) - set(own))
    if missing or unexpected:
        raise ValueError(f"flat params do not match the model: missing {missing}, unexpected "
                         f"{unexpected}")
    state = {}
    for path, param in own.items():
        value = torch.as_tensor(np.asarray(flat[path]) if not isinstance(flat[path], torch.Tensor)
                                else flat[path])
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{path}: shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        state[path] = value.to(param.dtype)
    model.load_state_dict(state, strict=True)


def flat_params(model: GPT) -> dict[str, np.ndarray]:
    """{path: global parameter value as numpy} (the keys of :func:`gpt_param_shapes`)."""
    return {k: v.detach().to("cpu").float().numpy() if v.dtype == torch.bfloat16
            else v.detach().to("cpu").numpy() for k, v in model.named_parameters()}


def _ids(a, device) -> torch.Tensor:
    """Integer ids (array or tensor) as an int64 tensor on ``device``."""
    a = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return a.to(device, torch.int64)


def _loss_logits_grads(model: GPT, tokens: torch.Tensor, targets: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss = model.loss_from_logits(logits, targets)
    loss.backward()
    return loss, logits, {k: p.grad for k, p in model.named_parameters()}


def loss_and_grads(model: GPT, tokens, targets, *, hlo: bool = False):
    """One forward + backward of the mean loss (parameters' ``.grad`` are overwritten).

    Args:
        model: A :class:`GPT`.
        tokens, targets: Integer [B, S] arrays or tensors (moved to the model's device).
        hlo: Also return the compiled (partitioned) HLO text of the program (parallel model).

    Returns:
        ``(loss, logits, grads)`` (``+ (hlo_text,)`` if ``hlo``): the scalar loss, the global
        logits [B, S, V] and {path: gradient} of every parameter, as tensors on the model's
        device (the lazy graph is executed before returning).
    """
    device = next(model.parameters()).device
    out = _loss_logits_grads(model, _ids(tokens, device), _ids(targets, device))
    if device.type != "xla":
        if hlo:
            raise ValueError("hlo=True: expected a model on the XLA device")
        return out
    loss, logits, grads = out
    text = _mesh.compiled_hlo([loss, logits] + list(grads.values())) if hlo else None
    _mesh.sync()
    return out + (text,) if hlo else out


def cached_loss_and_grads(model: GPT, tokens, targets):
    """:func:`loss_and_grads` traced and compiled once; returns ``step() -> (loss, logits, grads)``.

    Each call runs the compiled program on the parameters' current values (update them in place
    between calls, e.g. with an optimizer) and the given ``tokens`` / ``targets`` (fixed, as for
    a benchmark or an overfitting check; a new batch of the same shape can be copied into
    ``step.tokens`` / ``step.targets`` in place). The lazy step re-traces the model on the host
    every call; this one does not (:mod:`torch_impl.cached_step`: the same compiled program).

    Example::

        step = cached_loss_and_grads(model, tokens, targets)   # trace + compile once
        for _ in range(10):
            loss, logits, grads = step()
    """
    from .cached_step import CachedStep

    device = next(model.parameters()).device
    if device.type != "xla":
        raise ValueError("model: expected a model on the XLA device (GPT built with a mesh)")
    names, params = zip(*model.named_parameters())
    tokens, targets = _ids(tokens, device), _ids(targets, device)

    def fn(*args):
        loss, logits, grads = _loss_logits_grads(model, tokens, targets)
        return [loss, logits] + [grads[k] for k in names]

    cached = CachedStep(fn, list(params) + [tokens, targets])
    model.zero_grad(set_to_none=True)  # the traced grads were dropped with the pending graph

    def step():
        loss, logits, *grads = cached()
        return loss, logits, dict(zip(names, grads))

    step.tokens, step.targets = tokens, targets
    return step


def forward_hlo(model: GPT, tokens) -> str:
    """Compiled (partitioned) HLO text of the forward pass ``logits = model(tokens)`` alone
    (parallel model on the XLA device; the lazy graph is executed afterwards)."""
    device = next(model.parameters()).device
    if device.type != "xla":
        raise ValueError("model: expected a model on the XLA device (GPT built with a mesh)")
    with torch.no_grad():
        logits = model(_ids(tokens, device))
    text = _mesh.compiled_hlo([logits])
    _mesh.sync()
    return text
