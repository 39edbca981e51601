"""The layers that :mod:`torch_impl.parallelize` swaps in for layouts the plain column layer lacks.

- :class:`Layout`: how a parameter of a swapped module relates to the original one (transposed,
  features permuted), both ways: the name map, ``gather_state_dict`` and ``load_state_dict`` use
  it.
- :class:`FusedQKVLinear`: a fused q|k|v projection (GPT-2 ``c_attn``: ``[q | k | v]`` blocks;
  GPT-NeoX ``query_key_value``: interleaved per head ``[h0: q k v | h1: q k v | ...]``) sharded so
  that every device holds whole heads of each of q, k and v.
- :class:`ReplicatedKVLinear`: grouped-query attention with fewer key/value heads than tp: the
  kv heads are replicated to tp heads (the Megatron rule), device j holding original kv head
  ``j * kv_heads // tp``; the parameter stays the ORIGINAL one (replicated), so the copies'
  gradients are summed into it by autograd.
- :class:`TiedVocabHead`: an LM head tied to a vocab-parallel embedding: it holds the very same
  Parameter (one vocab-sharded table), so the tie survives and its gradient is summed once.
- :func:`as_linear`: (in, out, kernel [in, out], bias, weight-is-transposed) of an ``nn.Linear``
  or a Hugging Face ``Conv1D`` (weight stored [in, out], ``y = x @ W + b``).

Example::

    layer = FusedQKVLinear.from_module(gpt2.transformer.h[0].attn.c_attn, cfg, heads=12,
                                       layout="blocks")
    q, k, v = layer(x).split(768, dim=-1)   # the original order, each sharded on whole heads
"""

from __future__ import annotations

import torch
from torch import nn

from . import mesh as _mesh
from . import xla
from .linear import ColumnParallelLinear, TensorParallelConfig
from .linear_ring import tp_forward

__all__ = ["Layout", "IDENTITY", "TRANSPOSE", "is_conv1d", "as_linear", "build_linear",
           "FusedQKVLinear", "ReplicatedKVLinear", "TiedVocabHead", "set_origin", "origin_of"]

QKV_LAYOUTS = ("blocks", "interleaved")
ORIGIN = "_ringpar_origin"  # attribute of a swapped module: {original name: (new name, Layout)}


class Layout:
    """Original parameter <-> parallel parameter: optional transpose, then optional permutation
    of the last dim (``parallel = original.T[..., perm]``)."""

    def __init__(self, transpose: bool = False, perm: torch.Tensor | None = None):
        self.transpose, self.perm = transpose, perm
        self.inverse = None if perm is None else torch.argsort(perm)

    def to_parallel(self, t: torch.Tensor, is_bias: bool = False) -> torch.Tensor:
        """The parallel module's value of the original tensor ``t``."""
        if self.transpose and not is_bias:
            t = t.t()
        return t if self.perm is None else t[..., self.perm.to(t.device)]

    def to_original(self, t: torch.Tensor, is_bias: bool = False) -> torch.Tensor:
        """The original module's value of the parallel tensor ``t``."""
        if self.perm is not None:
            t = t[..., self.inverse.to(t.device)]
        return t.t() if self.transpose and not is_bias else t

    def __repr__(self) -> str:
        return f"Layout(transpose={self.transpose}, permuted={self.perm is not None})"


IDENTITY, TRANSPOSE = Layout(), Layout(transpose=True)


def is_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (``transformers.pytorch_utils``): weight [in, out], attr nf."""
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2)


def as_linear(module: nn.Module):
    """(in_features, out_features, kernel [in, out], bias or None, weight transposed?)."""
    if isinstance(module, nn.Linear):
        weight = module.weight.detach()
        return module.in_features, module.out_features, weight.t(), module.bias, True
    if is_conv1d(module):
        weight = module.weight.detach()
        return weight.shape[0], weight.shape[1], weight, module.bias, False
    raise ValueError(f"module={type(module).__name__}: expected an nn.Linear or a Conv1D")


def build_linear(cls, kernel: torch.Tensor, bias: torch.Tensor | None,
                 cfg: TensorParallelConfig, **kwargs):
    """A ParallelLinear subclass ``cls`` holding exactly ``kernel`` [in, out] and ``bias``."""
    kernel = kernel.detach()
    bias = None if bias is None else bias.detach()

    def kernel_init(generator, shape, dtype):
        return kernel.to("cpu", dtype, copy=True).contiguous()

    def bias_init(generator, shape, dtype):
        return bias.to("cpu", dtype, copy=True).contiguous()

    return cls(kernel.shape[0], kernel.shape[1], use_bias=bias is not None,
               param_dtype=kernel.dtype, kernel_init=kernel_init, bias_init=bias_init,
               parallel_config=cfg, seed=0, **kwargs)


def qkv_permutation(out_features: int, n: int, layout: str) -> torch.Tensor | None:
    """Permutation of a fused q|k|v output dim that gives device i (contiguous block i) its
    heads of q, k and v; None when the layout already does (interleaved per head)."""
    if layout == "interleaved":
        return None
    d = out_features // 3
    return torch.arange(out_features).view(3, n, d // n).transpose(0, 1).reshape(-1)


class FusedQKVLinear(ColumnParallelLinear):
    """Column-parallel fused q|k|v projection, sharded on whole heads of each of q, k and v.

    The kernel is stored in the parallel order (``Layout.perm``); the output is returned in the
    ORIGINAL order, so the model's own ``split`` / ``chunk`` code runs unchanged.
    """

    layout: str = "interleaved"

    @classmethod
    def from_module(cls, module: nn.Module, cfg: TensorParallelConfig, *, layout: str):
        """The layer holding ``module``'s (``nn.Linear`` or ``Conv1D``) weights."""
        _, out_f, kernel, bias, transposed = as_linear(module)
        perm = qkv_permutation(out_f, cfg.axis_size, layout)
        lay = Layout(transpose=transposed, perm=perm)
        if perm is not None:
            kernel = kernel[:, perm]
            bias = None if bias is None else bias.detach()[perm]
        new = build_linear(cls, kernel, bias, cfg)
        new.layout = layout
        return set_origin(new, lay, weight="kernel", bias="bias")

    def collective_forward(self, inputs, w=None):
        """The column-parallel product, reordered back to the original q|k|v order."""
        y = super().collective_forward(inputs, w)
        if self.layout == "interleaved":
            return y
        # [q | k | v] is no tiled layout of the parallel order: the partitioner moves these
        # activations (measured on GPT-2: one all-gather of [B, S, 3D] per layer, no weight)
        n = self.parallel_config.axis_size
        return y.unflatten(-1, (n, 3, y.shape[-1] // (3 * n))).transpose(-3, -2).flatten(-3)


class ReplicatedKVLinear(ColumnParallelLinear):
    """Key or value projection with ``kv_heads`` < tp heads: replicated to tp heads.

    The output has tp heads of ``head_dim`` (device j: original head ``j * kv_heads // tp``),
    sharded on the heads; an attention that infers the group size from the shapes (ringpar's
    :func:`~torch_impl.parallelize.head_parallel_attention`) pairs query heads with the right
    copy. Parameters: the original ``kernel`` [in, kv_heads * head_dim] (and bias), REPLICATED;
    the expansion is a local slice (no forward communication) and autograd sums the copies'
    gradients into them (one all-reduce in the backward pass).
    """

    head_dim: int = 1

    @classmethod
    def from_module(cls, module: nn.Module, cfg: TensorParallelConfig, *, head_dim: int):
        """The layer holding ``module``'s (``nn.Linear`` or ``Conv1D``) weights."""
        _, _, kernel, bias, transposed = as_linear(module)
        new = build_linear(cls, kernel, bias, cfg)
        new.head_dim = head_dim
        return set_origin(new, Layout(transpose=transposed), weight="kernel", bias="bias")

    def _check_parallel(self, cfg: TensorParallelConfig) -> None:
        _mesh.require_spmd()  # the output has tp heads: no divisibility of out_features needed

    def param_specs(self):
        """Replicated kernel (and bias)."""
        specs = {"kernel": (None, None)}
        return {**specs, "bias": (None,)} if self.use_bias else specs

    def heads_index(self) -> torch.Tensor:
        """Original kv head of each of the tp heads."""
        n = self.parallel_config.axis_size
        kv = self.out_features_total // self.head_dim
        return torch.arange(n) * kv // n

    def collective_forward(self, inputs, w=None):
        """Expand the kv heads to tp (local slices), then the column-parallel product."""
        cfg = self.parallel_config
        x, kernel, bias = self._params(inputs, w)
        idx = self.heads_index().to(kernel.device)
        kernel = kernel.unflatten(1, (-1, self.head_dim)).index_select(1, idx).flatten(1)
        if bias is not None:
            bias = bias.unflatten(0, (-1, self.head_dim)).index_select(0, idx).flatten(0)
        return tp_forward(x, kernel, bias, direction="column", method=cfg.method, mesh=cfg.mesh,
                          axis_name=cfg.axis_name, reduce_scatter_output=True,
                          scale=self.scale_value, precision=self.precision)


class TiedVocabHead(nn.Module):
    """LM head whose weight IS a vocab-parallel embedding's table (one Parameter).

    ``logits = x @ weight.T + bias`` column-parallel over the vocabulary (``weight`` [V, D] is
    sharded on V, so its transpose is the column layout: no communication of the weight).

    Args:
        weight: The embedding's Parameter (already sharded on the vocabulary).
        bias: The original head's bias [V] or None (moved to the device, sharded on V).
        parallel_config: Mesh, axis name, ``reduce_scatter_output`` (logits left sharded) and
            ``matmul_method`` (PLAIN or a column ring).
    """

    def __init__(self, weight: nn.Parameter, bias: torch.Tensor | None,
                 parallel_config: TensorParallelConfig):
        super().__init__()
        self.weight = weight
        self.parallel_config = parallel_config
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(_mesh.xla_device()).clone())
        self.bias = bias
        self.reshard()
        self.register_load_state_dict_post_hook(TiedVocabHead._reshard_after_load)

    def reshard(self) -> None:
        """Annotate the bias as sharded on the vocabulary (the weight is the embedding's)."""
        if self.bias is not None:
            cfg = self.parallel_config
            _mesh.mark_sharding(self.bias, cfg.mesh, (cfg.axis_name,))

    @staticmethod
    def _reshard_after_load(module, incompatible_keys) -> None:
        if module.bias is not None and not xla.has_sharding(module.bias):
            module.reshard()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of ``x`` [..., D] (global tensors)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.weight.shape[1]:
            raise ValueError(f"x: expected a tensor [..., {self.weight.shape[1]}], got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        _mesh.check_on_device(x, "x")
        cfg = self.parallel_config
        kernel = self.weight.t()
        bias = self.bias
        dtype = torch.promote_types(x.dtype, kernel.dtype)
        return tp_forward(x.to(dtype), kernel.to(dtype), None if bias is None else
                          bias.to(dtype), direction="column", method=cfg.method, mesh=cfg.mesh,
                          axis_name=cfg.axis_name,
                          reduce_scatter_output=cfg.reduce_scatter_output, scale=1.0,
                          precision=None)

    def extra_repr(self) -> str:
        return (f"vocab={self.weight.shape[0]}, features={self.weight.shape[1]}, "
                f"bias={self.bias is not None}, tied=True")


def set_origin(module: nn.Module, layout: Layout, **names: str) -> nn.Module:
    """Record on ``module`` where each original parameter went: ``names`` maps an original
    parameter name to the new one, both related by ``layout``."""
    setattr(module, ORIGIN, {old: (new, layout) for old, new in names.items()})
    return module


def origin_of(module: nn.Module) -> dict[str, tuple[str, Layout]] | None:
    """{original parameter name: (parallel name, Layout)} of a swapped module, else None."""
    return getattr(module, ORIGIN, None)
