"""Vocab-parallel embedding on torch_xla SPMD (twin of :mod:`jax_impl.embedding`).

The table ``embedding`` ``[num_embeddings, features]`` (the Flax ``nnx.Embed`` name and layout,
so ``state_dict`` keys match the JAX parameter tree; ``nn.Embedding`` calls it ``weight``, same
layout) is sharded on the vocabulary over the tp axis: device i holds rows ``[i*c, (i+1)*c)``,
``c = num_embeddings / n``. In the stacked view (docs/design.md) the table is ``[n, c, features]``
(a reshape of the dim-0-sharded table: no data moves); each device looks up the ids inside its
block (a ``torch.gather`` along the unsharded dim 1, local) and zeroes the others, giving
partial sums ``[n, ..., features]`` of the output, completed by one collective:

    ===========================  ============================================  ===============
    option                       forward collective                            output sharding
    ===========================  ============================================  ===============
    default                      sum over dim 0 (all-reduce)                   replicated
    reduce_scatter_output=True   reduce-scatter on ``scatter_dim`` (-1:        sharded on that
                                 features; -2: the sequence of [batch, seq]    dim
                                 ids, i.e. sequence parallelism)
    ===========================  ============================================  ===============

The backward pass of the table is a shard-local scatter-add: no collective touches the table.

Deviation from the JAX twin: ``padding_idx`` (torch-only, as in ``nn.Embedding``): the row of
that id gets no gradient. ``from_embedding(nn.Embedding, parallel_config)`` takes an existing
table exactly (``max_norm`` / ``sparse`` / ``scale_grad_by_freq`` are refused).

Public API (same order as the JAX twin): ``default_embed_init``, ``vocab_parallel_lookup``,
``VocabParallelEmbed``.
"""

from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from ringpar.layer_args import check_vocab_split
from ringpar.validation import positive_int

from . import mesh as _mesh
from . import xla
from .array_utils import draw_seed
from .collectives import axis_index, reduce_from_axis, reduce_scatter_features
from .linear import TensorParallelConfig

__all__ = ["default_embed_init", "vocab_parallel_lookup", "VocabParallelEmbed"]


def default_embed_init(generator, shape, dtype=torch.float32) -> torch.Tensor:
    """Normal with variance 1/fan_in (fan_in = features): ``nnx.Embed``'s default initializer."""
    out = torch.empty(tuple(shape), dtype=torch.float32)
    out.normal_(0.0, 1.0 / math.sqrt(shape[-1]), generator=generator)
    return out.to(dtype)


def vocab_parallel_lookup(ids: torch.Tensor, table: torch.Tensor, axis_name: str, *,
                          mesh, padding_idx: int | None = None) -> torch.Tensor:
    """Stacked view: each device's partial sum of ``table_global[ids]``.

    ``table`` is stacked ``[n, c, features]`` (row i = vocab block i, ids ``[i*c, (i+1)*c)``),
    dim 0 sharded over ``axis_name``; ``ids`` are global ids (any integer shape ``[...]``, the
    same on every device). Returns ``[n, ..., features]``, row i = the rows of block i, zeros for
    ids outside it. No communication.
    """
    n, c, d = table.shape
    lead = (n,) + (1,) * ids.dim()
    local = ids.to(torch.int64).unsqueeze(0) - axis_index(axis_name, mesh=mesh).to(
        torch.int64).view(lead) * c
    local = _mesh.mark_activation(local, mesh, axis_name)
    inside = (local >= 0) & (local < c)
    flat = torch.where(inside, local, torch.zeros_like(local)).reshape(n, -1)
    rows = torch.gather(table, 1, flat.unsqueeze(-1).expand(n, flat.shape[1], d))
    rows = rows.reshape(n, *ids.shape, d)
    if padding_idx is not None:
        rows = torch.where((ids == padding_idx).unsqueeze(0).unsqueeze(-1), rows.detach(), rows)
    rows = torch.where(inside.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype,
                                                               device=rows.device))
    return _mesh.mark_activation(rows, mesh, axis_name)


# Deliberate twin of jax_impl.embedding.VocabParallelEmbed, kept line-for-line parallel on purpose:
# same constructor steps, attributes and methods (the shared checks are in ringpar.layer_args).
class VocabParallelEmbed(nn.Module):
    """Embedding whose table is split on the vocabulary over the tensor-parallel axis.

    Args:
        num_embeddings: Vocabulary size V (divisible by the tp axis size when parallel).
        features: Embedding width D.
        dtype: Output dtype (default: the table's).
        param_dtype: Table dtype (default float32).
        embedding_init: ``init(generator, shape, dtype)`` of the table (``nnx.Embed``'s default
            distribution: normal, variance 1/D).
        parallel_config: A :class:`torch_impl.linear.TensorParallelConfig` (mesh, ``axis_name``,
            ``reduce_scatter_output``; ``matmul_method`` None or PLAIN), or None: a plain lookup
            (the table stays on the CPU until moved, as ``nn.Embedding``).
        scatter_dim: Output dim that ``reduce_scatter_output`` shards (-1 features, -2 sequence).
        padding_idx: Torch-only: the row of this id gets no gradient (as ``nn.Embedding``).
        seed: Init seed (None: drawn from torch's global generator).

    Raises:
        ValueError: non-positive sizes, V (or, at call time, the scattered dim) not divisible by
            the tp axis size, a ring matmul method, ids not integer.
    """

    def __init__(self, num_embeddings: int, features: int, *, dtype: torch.dtype | None = None,
                 param_dtype: torch.dtype = torch.float32,
                 embedding_init: tp.Callable = default_embed_init,
                 parallel_config: TensorParallelConfig | None = None, scatter_dim: int = -1,
                 padding_idx: int | None = None, seed: int | None = None):
        super().__init__()
        self.num_embeddings = positive_int("num_embeddings", num_embeddings)
        self.features = positive_int("features", features)
        if parallel_config is not None and not isinstance(parallel_config, TensorParallelConfig):
            raise ValueError(f"parallel_config={parallel_config!r}: expected a "
                             f"TensorParallelConfig or None")
        if isinstance(scatter_dim, bool) or not isinstance(scatter_dim, int):
            raise ValueError(f"scatter_dim={scatter_dim!r}: expected an int")
        if padding_idx is not None:
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or \
                    not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx={padding_idx!r}: expected None or an id in "
                                 f"[-{num_embeddings}, {num_embeddings})")
            padding_idx %= num_embeddings
        self.dtype, self.param_dtype = dtype, param_dtype
        self.parallel_config, self.scatter_dim = parallel_config, scatter_dim
        self.padding_idx = padding_idx
        self.is_parallel = parallel_config is not None and parallel_config.active
        generator = torch.Generator().manual_seed(draw_seed(seed))
        table = embedding_init(generator, (num_embeddings, features), param_dtype)
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (num_embeddings, features):
            raise ValueError(f"embedding_init returned {getattr(table, 'shape', type(table))}: "
                             f"expected a tensor of shape {(num_embeddings, features)}")
        if self.is_parallel:
            cfg = parallel_config
            check_vocab_split(num_embeddings, cfg.method, cfg.axis_name, cfg.axis_size)
            table = table.to(_mesh.xla_device())
        self.embedding = nn.Parameter(table)
        if self.is_parallel:
            self.reshard()
            self.register_load_state_dict_post_hook(VocabParallelEmbed._reshard_after_load)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding,
                       parallel_config: TensorParallelConfig | None = None,
                       scatter_dim: int = -1) -> "VocabParallelEmbed":
        """A layer holding exactly the table of ``embedding`` (``embedding.weight``).

        Raises:
            ValueError: not an ``nn.Embedding``, or one using ``max_norm``, ``sparse`` or
                ``scale_grad_by_freq`` (not supported); the constructor's errors.
        """
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"embedding={type(embedding).__name__}: expected a torch.nn.Embedding")
        for attr, default in (("max_norm", None), ("sparse", False),
                              ("scale_grad_by_freq", False)):
            if getattr(embedding, attr) != default:
                raise ValueError(f"embedding.{attr}={getattr(embedding, attr)!r}: not supported by "
                                 f"VocabParallelEmbed (expected {default!r})")
        weight = embedding.weight.detach()

        def init(generator, shape, dtype):
            return weight.to("cpu", dtype, copy=True)

        return cls(embedding.num_embeddings, embedding.embedding_dim, param_dtype=weight.dtype,
                   embedding_init=init, parallel_config=parallel_config, scatter_dim=scatter_dim,
                   padding_idx=embedding.padding_idx, seed=0)

    def reshard(self) -> None:
        """Annotate the table as sharded on the vocabulary (e.g. after loading it)."""
        if self.is_parallel:
            cfg = self.parallel_config
            _mesh.check_on_device(self.embedding, "embedding")
            _mesh.mark_sharding(self.embedding, cfg.mesh, (cfg.axis_name, None))

    @staticmethod
    def _reshard_after_load(module, incompatible_keys) -> None:
        if not xla.has_sharding(module.embedding):
            module.reshard()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up integer ``ids`` ``[...]`` -> ``[..., features]`` (global tensors)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or \
                ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids: expected an integer tensor, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)}")
        table = self.embedding
        out_dtype = self.dtype or table.dtype
        if not self.is_parallel:
            return nn.functional.embedding(ids, table, self.padding_idx).to(out_dtype)
        cfg = self.parallel_config
        mesh, ax, n = cfg.mesh, cfg.axis_name, cfg.axis_size
        _mesh.check_on_device(ids, "ids")
        out_rank = ids.dim() + 1
        d = self.scatter_dim % out_rank
        if cfg.reduce_scatter_output and (ids.shape + (self.features,))[d] % n:
            raise ValueError(f"scatter_dim={self.scatter_dim}: output dim of size "
                             f"{(ids.shape + (self.features,))[d]} is not divisible by the "
                             f"{ax!r} axis size {n}")
        stacked = _mesh.mark_stacked(table.reshape(n, self.num_embeddings // n, self.features),
                                     mesh, ax)
        rows = vocab_parallel_lookup(ids, stacked, ax, mesh=mesh, padding_idx=self.padding_idx)
        if not cfg.reduce_scatter_output:
            y = reduce_from_axis(rows, ax, mesh=mesh)
            return y.to(out_dtype)
        part = reduce_scatter_features(rows, ax, d, mesh=mesh)  # [n, ..., size/n at d, ...]
        y = part.movedim(0, d).reshape(ids.shape + (self.features,))
        spec = [None] * out_rank
        spec[d] = ax
        return _mesh.mark_sharding(y, mesh, tuple(spec)).to(out_dtype)
