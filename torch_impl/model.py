"""A GPT trained on a 4-D mesh (dp, fsdp, pp, tp) on torch_xla SPMD: twin of :mod:`jax_impl.model`.

Same names, same parameter paths (``named_parameters`` / ``state_dict`` keys = the JAX layout
paths of :mod:`ringpar.gpt_model_config`), same global shapes and partition specs, same initial
weights (:func:`ringpar.gpt_model_config.init_reference`), same loss.

Stacked view (docs/design.md): every per-device value of the JAX program is a tensor ``[n, ...]``
whose dim 0 is sharded over tp. The residual stream is ``[n, B, S, D/n]`` (row d = the features
device d holds); blocks use the stacked-view seed-000 layers of :mod:`torch_impl.tensor_parallel`
(``TPDense`` / ``TPAsyncDense`` by ``ParallelConfig.tp_async_dense``), LayerNorm statistics are
summed over dim 0 (all-reduce over tp), attention runs per row (whole heads per device), the
lm_head leaves the logits vocab-sharded and the loss is the vocab-parallel cross-entropy.

Differences from the JAX program (same numbers, different schedule / communication):

- Batch: the forward runs inside ``torch_impl.mesh.sharded_batch(mesh, (dp, fsdp))``, so every
  stacked activation ``[n, B, ...]`` keeps its batch dim sharded over (dp, fsdp), as JAX's
  per-device rows: no collective over the data axes in the layers (the gradients are those of
  the global mean loss; the partitioner sums parameter gradients over the data axes).
- FSDP gradients (not a difference): reduce-scattered over fsdp, then all-reduced over dp, as
  JAX's psum_scatter + sync_gradients: an FSDP module runs per data shard and the pipeline loop
  takes its stage parameters as per-shard rows (``torch_impl.data_parallel``).
- Pipeline (not a difference): with pp > 1 the blocks run in the GPipe scan of
  ``torch_impl.pipeline_parallel.execute_pipeline`` (the schedule and ring of JAX's
  ``PipelineModule``, ``num_microbatches``) on the stream transposed to [B, n, S, D/n]; the stage
  is applied with ``vmap`` over the data shards and the stages, and the tp layers' annotations
  inside see those vmapped dims through ``torch_impl.vmap_axes``. With pp == 1 the one stage runs
  on the whole batch; with ``remat=["Block"]`` the stages run one after the other on the whole
  batch (same numbers, no GPipe ring: no checkpoint runs inside the loop's vmaps yet).

FSDP (``fsdp_modules``) and remat (``remat``) by module name ("Embed", "Block", "Head") go
through ``torch_impl.data_parallel.prepare_module``, except the remat of "Block", which the stage
does itself (a checkpoint that is handed the stage's slice of the stacked parameters).

Example::

    from ringpar.configs import ParallelConfig
    from ringpar.gpt_model_config import gpt_model_config
    from torch_impl.mesh import create_mesh, enable_spmd
    from torch_impl.model import build_gpt

    enable_spmd()
    cfg = gpt_model_config(ParallelConfig(data_axis_size=2, fsdp_axis_size=1,
                                          pipeline_axis_size=2, model_axis_size=2),
                           vocab_size=64, hidden_size=32, num_heads=4, num_layers=2)
    model = build_gpt(cfg, create_mesh(cfg.parallel))
    params = model.init_params(seed=0)          # {path: nn.Parameter} (the module's own)
    loss, grads = model.loss_and_grads(params, tokens, targets)   # int [B, S] tensors
    with torch.no_grad():
        for k, p in params.items():
            p -= 0.1 * grads[k]
    ref = model.to_reference(params)   # {reference name: numpy}, mesh-independent
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ringpar.configs import ModelConfig
from ringpar.gpt_model_config import (GPTModelConfig, MeshSizes, check_batch, check_gpt,
                                      from_layout, init_reference, layout_shapes, layout_specs,
                                      to_layout)

from . import mesh as _mesh
from . import vmap_axes, xla
from .collectives import reduce_scatter_features
from .data_parallel import FSDPModule, prepare_module
from .embedding import vocab_parallel_lookup
from .fsdp_rows import keep_batch_layout
from .gpt import _attention_local
from .losses import vocab_parallel_token_losses
from .pipeline_parallel import execute_pipeline
from .tensor_parallel import ModelParallelismWrapper, TPAsyncDense, TPDense

__all__ = ["GPTModel", "build_gpt"]


# ----------------------------------------------------------------------------- parameters
class _Table(nn.Module):
    """One parameter ``embedding`` of ``shape`` (zeros: values are always loaded)."""

    def __init__(self, shape):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(shape))


class _Bias(nn.Module):
    """One parameter ``bias`` [features]."""

    def __init__(self, features):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(features))


class _ShardedLayerNorm(nn.Module):
    """Parameters ``scale`` / ``bias`` [features] of a feature-sharded LayerNorm."""

    def __init__(self, features):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))
        self.bias = nn.Parameter(torch.zeros(features))


def _wrap(tp: str, mesh, module_fn, **kwargs) -> ModelParallelismWrapper:
    return ModelParallelismWrapper(tp, functools.partial(module_fn, **kwargs), mesh=mesh, seed=0)


def _stacked(wrapper: ModelParallelismWrapper, name: str) -> torch.Tensor:
    return getattr(wrapper.sharded, name)


# --------------------------------------------------------------------------- stacked ops
class _Ctx:
    """What every layer needs: sizes, mesh, axis names."""

    def __init__(self, cfg: GPTModelConfig, sizes: MeshSizes, mesh, parallel):
        self.cfg, self.sizes, self.mesh, self.parallel = cfg, sizes, mesh, parallel
        self.async_dense = bool(parallel.tp_async_dense)
        self.n, self.tp = sizes.tp, sizes.names[3]

    def prepare(self, module: nn.Module, name: str, remat: bool = True) -> nn.Module:
        """FSDP / remat of ``module`` by name (``torch_impl.data_parallel.prepare_module``)."""
        par = self.parallel
        if not remat:
            par = dataclasses.replace(par, remat=[r for r in par.remat if r != name])
        if not par.fsdp_modules and not par.remat:
            return module
        return prepare_module(module, name, par, mesh=self.mesh)

    def stacked(self, t: torch.Tensor) -> torch.Tensor:
        """An activation [n, B, ...]: dim 0 over tp, the batch over (dp, fsdp) (sharded_batch)."""
        return _mesh.mark_activation(t, self.mesh, self.tp)

    def psum(self, t: torch.Tensor) -> torch.Tensor:
        """Stacked [n, ...] -> every row the sum of the rows (all-reduce over tp)."""
        s = self.stacked(t).sum(0)
        s = _mesh.mark_activation(s, self.mesh, None)
        return self.stacked(s.unsqueeze(0).expand_as(t))

    def layer_norm(self, x: torch.Tensor, wrapper: ModelParallelismWrapper) -> torch.Tensor:
        """LayerNorm of the feature-sharded stacked ``x`` [n, B, S, D/n]."""
        d = self.cfg.hidden_size
        xf = x.to(torch.float32)
        mean = self.psum(xf.sum(-1, keepdim=True)) / d
        centred = xf - mean
        var = self.psum((centred * centred).sum(-1, keepdim=True)) / d
        y = centred * torch.rsqrt(var + self.cfg.norm_eps)
        scale = _stacked(wrapper, "scale")[:, None, None, :]
        bias = _stacked(wrapper, "bias")[:, None, None, :]
        return self.stacked((y * scale + bias).to(x.dtype))

    def dense(self, kind: str, in_features: int, out_features: int, use_bias: bool):
        cls = TPAsyncDense if self.async_dense else TPDense
        return cls(in_features, out_features, self.tp, tp_mode=kind, use_bias=use_bias,
                   mesh=self.mesh, seed=0)

    def norm(self) -> ModelParallelismWrapper:
        return _wrap(self.tp, self.mesh, _ShardedLayerNorm, features=self.cfg.hidden_size // self.n)

    def bias(self) -> ModelParallelismWrapper:
        return _wrap(self.tp, self.mesh, _Bias, features=self.cfg.hidden_size // self.n)


# -------------------------------------------------------------------------------- modules
class _Embed(nn.Module):
    """Token ids [B, S] -> residual stream [n, B, S, D/n] (vocab-parallel lookup + positions)."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        cfg, n = ctx.cfg, ctx.n
        self.ctx = ctx
        self.wte = _wrap(ctx.tp, ctx.mesh, _Table, shape=(cfg.vocab_size // n, cfg.hidden_size))
        self.wpe = _wrap(ctx.tp, ctx.mesh, _Table, shape=(cfg.max_seq_len, cfg.hidden_size // n))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        rows = vocab_parallel_lookup(tokens, _stacked(self.wte, "embedding"), ctx.tp, mesh=ctx.mesh)
        x = reduce_scatter_features(rows, ctx.tp, mesh=ctx.mesh)
        pos = _stacked(self.wpe, "embedding")[:, : tokens.shape[1]]
        return ctx.stacked(x + pos[:, None])


class _Sub(nn.Module):
    """Attention (``kind="attn"``: qkv, heads, proj) or MLP (``"mlp"``: fc, GELU, proj) + bias."""

    def __init__(self, ctx: _Ctx, kind: str):
        super().__init__()
        cfg, n = ctx.cfg, ctx.n
        d = cfg.hidden_size
        self.ctx, self.kind = ctx, kind
        # TPDense scatter reduce-scatters [.., D] partial sums; TPAsyncDense sends [.., D/n] blocks.
        scatter_out = d // n if (ctx.async_dense or n == 1) else d
        if kind == "attn":
            self.qkv = ctx.dense("gather", d // n, 3 * d // n, True)
            self.proj = ctx.dense("scatter", d // n, scatter_out, False)
        else:
            self.fc = ctx.dense("gather", d // n, cfg.ffn // n, True)
            self.proj = ctx.dense("scatter", cfg.ffn // n, scatter_out, False)
        self.proj_bias = ctx.bias()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "attn":
            h = _attention_local(self.qkv(h), head_dim=self.ctx.cfg.head_dim)
        else:
            h = torch.nn.functional.gelu(self.fc(h), approximate="none")
        h = self.proj(h)
        return self.ctx.stacked(h + _stacked(self.proj_bias, "bias")[:, None, None, :])


class _Block(nn.Module):
    """Pre-norm decoder block on the stacked residual stream [n, B, S, D/n]."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        self.ctx = ctx
        self.ln_1, self.attn = ctx.norm(), _Sub(ctx, "attn")
        self.ln_2, self.mlp = ctx.norm(), _Sub(ctx, "mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ctx.layer_norm(x, self.ln_1))
        return x + self.mlp(self.ctx.layer_norm(x, self.ln_2))


class _Stage(nn.Module):
    """One pipeline stage: ``blocks_0 .. blocks_{L/pp-1}`` on the stacked stream [n, b, S, D/n]."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        # Remat of a block is done here, not by prepare_module: the pipeline runs this stage
        # under functional_call with its slice of the stacked parameters, and a recomputation
        # in the backward must see those slices, so they are passed to the checkpoint.
        self.remat = "Block" in ctx.parallel.remat
        for j in range(ctx.cfg.num_layers // ctx.sizes.pp):
            self.add_module(f"blocks_{j}", ctx.prepare(_Block(ctx), "Block", remat=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.children():
            if isinstance(block, FSDPModule) and vmap_axes.is_traced(x):
                # Inside the pipeline loop every data shard holds whole stage parameters (the
                # loop gathers them once, see _Pipeline): the FSDP gather is done, run the block.
                block = block.__dict__["wrapped"]
            if not self.remat:
                x = block(x)
                continue
            names, tensors = zip(*block.named_parameters())

            def run(h, *ts, block=block, names=names, src=x):
                h = keep_batch_layout([src], [h])[0]  # FSDP per data shard on recompute
                return torch.func.functional_call(block, dict(zip(names, ts)), (h,))

            x = _checkpoint(run, x, *tensors)
        return x


def _checkpoint(function, *args):
    """Remat of ``function(*args)`` (torch_xla's checkpoint, outside the pipeline loop only)."""
    if vmap_axes.is_traced(args[0]):
        # torch_xla's checkpoint is an autograd.Function without a vmap rule, and torch's own
        # needs a torch.xla device module that torch 2.9 lacks (both measured): _Pipeline keeps
        # the stages out of the loop when blocks are rematerialised.
        raise RuntimeError("remat of a block inside the pipeline loop is not supported")
    return xla.checkpoint(function, *args)


class _Stacked(nn.Module):
    """Holds ``sharded`` (a stage) whose parameters are stacked [pp, ...] over the stages.

    ``forward(h)`` is the pipeline's stacked stage: ``h`` [pp, b, n, S, D/n] (one data shard of
    the GPipe state, row s = stage s's input) -> row s through stage s, with ``vmap`` over the
    stages (declared as the pp axis for the annotations inside, ``torch_impl.vmap_axes``).
    """

    def __init__(self, stage: nn.Module, pp: int, device, axis: str):
        super().__init__()
        self.sharded, self.axis = stage, axis
        self.specs: dict[str, tuple] = {}
        for name, prm in list(stage.named_parameters()):
            owner_path, _, leaf = name.rpartition(".")
            owner = stage.get_submodule(owner_path) if owner_path else stage
            delattr(owner, leaf)
            owner.register_parameter(leaf, nn.Parameter(
                torch.zeros((pp, *prm.shape), dtype=prm.dtype, device=device)))

    def partition_specs(self) -> dict[str, tuple]:
        """{name: spec} of the stacked parameters for the pipeline loop (data axes dropped:
        the loop maps the data shards itself)."""
        return dict(self.specs)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        stage = self.sharded
        params = dict(stage.named_parameters())

        def one(ps, hs):  # hs [b, n, S, D/n] -> the stage's stacked view [n, b, S, D/n]
            return torch.func.functional_call(stage, ps, (hs.transpose(0, 1),)).transpose(0, 1)

        with vmap_axes.vmapped_axis(self.axis):
            return torch.func.vmap(one)(params, h)


class _Pipeline(nn.Module):
    """``ModelParallelismWrapper_0.sharded``: the stage template, stacked [pp, ...].

    pp > 1: GPipe (``torch_impl.pipeline_parallel.execute_pipeline``, ``num_microbatches``, the
    same schedule and ring as JAX's ``PipelineModule``) on the stream transposed to [B, n, S,
    D/n]; pp == 1, or ``remat`` of "Block": the stages one after the other on the whole batch
    (same numbers; no checkpoint can run inside the loop's vmaps yet, see ``_checkpoint``).
    """

    loop = "scan"  # execute_pipeline's loop ("unrolled": every step in the graph)

    def __init__(self, ctx: _Ctx):
        super().__init__()
        par = ctx.parallel
        if (ctx.sizes.pp > 1 and "Block" in par.fsdp_modules and "Block" not in par.remat
                and (par.fsdp_gather_dtype or par.fsdp_grad_scatter_dtype)):
            raise ValueError(f"fsdp_gather_dtype={par.fsdp_gather_dtype!r}, fsdp_grad_scatter_dtype="
                             f"{par.fsdp_grad_scatter_dtype!r}: with pipeline_axis_size > 1 the "
                             f"torch pipeline gathers FSDP blocks once per step in float32; "
                             f"expected None for both")
        self.ctx = ctx
        self.ModelParallelismWrapper_0 = _Stacked(_Stage(ctx), ctx.sizes.pp, _mesh.xla_device(),
                                                  ctx.sizes.names[2])

    def set_param_specs(self, specs: Mapping[str, tuple]) -> None:
        """The model's {path: spec}; the stage's entries are kept for the pipeline loop."""
        prefix = "pipeline.ModelParallelismWrapper_0."
        data = set(self.ctx.sizes.names[:2])
        self.ModelParallelismWrapper_0.specs = {
            k[len(prefix):]: tuple(None if e in data else e for e in v)
            for k, v in specs.items() if k.startswith(prefix)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, stacked = self.ctx, self.ModelParallelismWrapper_0
        if ctx.sizes.pp == 1 or stacked.sharded.remat:
            # The stages one after the other on the whole batch (same numbers, no GPipe ring):
            # pp == 1, or remat of the blocks, which cannot run inside the loop (_checkpoint).
            for s in range(ctx.sizes.pp):
                params = {k: v[s] for k, v in stacked.sharded.named_parameters()}
                x = torch.func.functional_call(stacked.sharded, params, (x,))
            return x
        dp, fsdp, pp, tp = ctx.sizes.names
        y = execute_pipeline(stacked, x.transpose(0, 1), num_microbatches=ctx.cfg.num_microbatches,
                             model_axis_name=pp, mesh=ctx.mesh, batch_axis_names=(dp, fsdp),
                             loop=self.loop, feature_spec=(tp,) + (None,) * (x.dim() - 2))
        return ctx.stacked(y.transpose(0, 1))


class _Head(nn.Module):
    """Final LayerNorm, lm_head (logits vocab-sharded), per-token losses [B, S]."""

    def __init__(self, ctx: _Ctx):
        super().__init__()
        cfg, n = ctx.cfg, ctx.n
        self.ctx = ctx
        self.ln_f = ctx.norm()
        self.lm_head = ctx.dense("gather", cfg.hidden_size // n, cfg.vocab_size // n, False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        logits = self.lm_head(ctx.layer_norm(x, self.ln_f))
        return vocab_parallel_token_losses(logits, targets, ctx.tp, vocab_size=ctx.cfg.vocab_size,
                                           mesh=ctx.mesh)


# ------------------------------------------------------------------------------ public API
class GPTModel(nn.Module):
    """The GPT on a torch_xla mesh (see the module docstring). Build it with :func:`build_gpt`.

    ``forward(tokens, targets)`` returns the mean loss over the global batch. Parameters (the
    module's own, ``named_parameters`` keys = layout paths) are sharded by :meth:`param_specs`.
    """

    def __init__(self, config: ModelConfig, mesh):
        super().__init__()
        self.config, self.mesh = config, mesh
        self.sizes: MeshSizes = check_gpt(config, _mesh.num_devices())
        names = tuple(mesh.axis_names or ())
        if names != self.sizes.names or tuple(mesh.mesh_shape) != self.sizes.mesh:
            raise ValueError(f"mesh axes {dict(zip(names, mesh.mesh_shape))} do not match "
                             f"config.parallel {dict(zip(self.sizes.names, self.sizes.mesh))}")
        ctx = _Ctx(config.model_config, self.sizes, mesh, config.parallel)
        self.embed = ctx.prepare(_Embed(ctx), "Embed")
        self.pipeline = _Pipeline(ctx)
        self.head = ctx.prepare(_Head(ctx), "Head")
        self._specs = layout_specs(config, self.sizes)
        self.pipeline.set_param_specs(self._specs)
        shapes = layout_shapes(config, self.sizes)
        own = {k: tuple(p.shape) for k, p in self.named_parameters()}
        if own != shapes:  # the module tree must be exactly the documented layout
            raise RuntimeError(f"torch GPT parameters differ from the layout: "
                               f"{sorted(set(own.items()) ^ set(shapes.items()))[:6]}")
        for k, p in self.named_parameters():
            if xla.has_sharding(p):  # re-annotation needs the old one cleared (values kept)
                xla.clear_sharding(p)
            _mesh.mark_sharding(p, mesh, self._specs[k])

    # -- parameters
    def param_specs(self) -> dict[str, tuple]:
        """{path: partition names per dim} of every parameter (tp / pp stacking, FSDP)."""
        return dict(self._specs)

    def param_layout(self) -> dict[str, tuple[tuple[int, ...], tuple]]:
        """{path: (global shape, partition names)}: the table of ``ringpar.gpt_model_config``."""
        return {k: (tuple(p.shape), self._specs[k]) for k, p in self.named_parameters()}

    def from_reference(self, ref: Mapping[str, np.ndarray]) -> dict[str, nn.Parameter]:
        """Load reference (dense, mesh-independent) numpy parameters; return the parameters."""
        lay = to_layout(ref, self.config, self.sizes)
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, p in params.items():
                # A new sharded tensor: copy_ into the parameter would leave it replicated.
                value = torch.from_numpy(np.ascontiguousarray(lay[k], np.float32)).to(p.device)
                p.data = _mesh.mark_sharding(value, self.mesh, self._specs[k])
        xla.sync()
        return params

    def to_reference(self, params: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Parameters (or gradients) {path: tensor} -> reference numpy arrays."""
        return from_layout({k: v.detach().cpu().numpy() for k, v in params.items()}, self.config,
                           self.sizes)

    def init_params(self, seed: int) -> dict[str, nn.Parameter]:
        """Seeded initial parameters: ``from_reference(init_reference(model_config, seed))``."""
        return self.from_reference(init_reference(self.config.model_config, seed))

    # -- training step
    def _batch(self, tokens) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        t = t.to(torch.int64).to(_mesh.xla_device())
        dp, fsdp = self.sizes.names[:2]
        return _mesh.mark_sharding(t, self.mesh, ((dp, fsdp), None))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of ``tokens`` [B, S] against ``targets`` [B, S] (XLA tensors)."""
        with _mesh.sharded_batch(self.mesh, self.sizes.names[:2]):
            x = self.pipeline(self.embed(tokens))
            return self.head(x, targets).mean()

    def loss_and_grads(self, params: Mapping[str, torch.Tensor], tokens, targets):
        """Mean loss over the global batch and its gradient for every parameter.

        Args:
            params: The module's parameters (as returned by :meth:`init_params`).
            tokens, targets: Integer [B, S] (numpy or torch; moved to the XLA device and sharded
                over (dp, fsdp)).

        Returns:
            ``(loss, grads)``: a scalar XLA tensor and {path: gradient tensor}.
        """
        check_batch(tuple(np.shape(tokens)), tuple(np.shape(targets)), self.config, self.sizes)
        own = dict(self.named_parameters())
        if set(params) != set(own) or any(params[k] is not own[k] for k in own):
            raise ValueError("params: expected the model's own parameters (model.init_params)")
        for p in own.values():
            p.grad = None
        batch = (self._batch(tokens), self._batch(targets))
        compute = getattr(torch, self.config.model_config.dtype)
        if compute == torch.float32:
            loss = self(*batch)
        else:  # mixed precision: float32 parameters, the step on copies in the compute dtype
            copies = {k: p.to(compute) for k, p in own.items()}
            loss = torch.func.functional_call(self, copies, batch)
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in own.items()}

    def compiled_text(self, params, tokens, targets) -> str:
        """HLO text of the compiled (partitioned) forward + backward (for collective signatures)."""
        loss, grads = self.loss_and_grads(params, tokens, targets)
        return xla.compiled_hlo([loss] + list(grads.values()))


def build_gpt(config: ModelConfig, mesh=None) -> GPTModel:
    """Build the GPT for ``config`` on ``mesh`` (default ``create_mesh(config.parallel)``).

    Raises ValueError (naming the field, before any compile) on a mesh / model mismatch; see
    :func:`ringpar.gpt_model_config.check_gpt`. SPMD must be enabled (``mesh.enable_spmd()``).
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config={config!r}: expected a ringpar.configs.ModelConfig")
    _mesh.require_spmd()
    check_gpt(config, _mesh.num_devices())
    if mesh is None:
        mesh = _mesh.create_mesh(config.parallel)
    return GPTModel(config, mesh)
