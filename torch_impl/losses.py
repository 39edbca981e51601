"""Vocab-parallel cross-entropy on torch_xla SPMD (twin of :mod:`jax_impl.losses`).

The same computation as the JAX module, in the stacked view (docs/design.md): the logits
``[..., V]``, sharded on V over the tp axis (n devices), are viewed as ``[n, ..., V/n]`` with dim
0 sharded (row i = device i's vocab block ``[i*V/n, (i+1)*V/n)``; ``array_utils.to_stacked``, a
reshape: no data moves). Per device:

1. ``m = max over devices of (max_v logits_i)`` (detached): one all-reduce(max);
2. ``[sum_v exp(logits_i - m), logits_i[target] if target in block i else 0, sum_v logits_i]``
   stacked and summed over dim 0: ONE all-reduce;
3. ``loss = m + log(sumexp) - (1 - eps) * logit_target - eps / V * sum_logits``, 0 for tokens
   whose target is ``ignore_index``.

The reduction is global (``mean`` = sum over all tokens / number of non-ignored tokens; 0 when
every token is ignored, where ``torch.nn.functional.cross_entropy`` returns nan). The backward pass
is shard-local (the transpose of a sum over dim 0 is a broadcast): no collective.

Public API (same names, same order as the JAX twin): ``cross_entropy``,
``vocab_parallel_token_losses``, ``vocab_parallel_cross_entropy``, ``VocabParallelCrossEntropy``
(an ``nn.Module`` here, with the options of ``nn.CrossEntropyLoss`` that apply).
"""

from __future__ import annotations

import torch
from torch import nn

from ringpar.layer_args import check_loss_options

from . import mesh as _mesh
from .array_utils import to_stacked
from .collectives import axis_index, max_from_axis, reduce_from_axis

__all__ = ["cross_entropy", "vocab_parallel_token_losses", "vocab_parallel_cross_entropy",
           "VocabParallelCrossEntropy"]

def _check_shapes(logits, targets) -> None:
    for name, t in (("logits", logits), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if logits.dim() < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets.shape={tuple(targets.shape)}: expected the leading dims of "
                         f"logits.shape={tuple(logits.shape)}, i.e. {tuple(logits.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets.dtype={targets.dtype}: expected an integer dtype")


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _reduce(losses, valid, reduction: str):
    """Global reduction of per-token ``losses`` (0 where not ``valid``)."""
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    count = valid.to(losses.dtype).sum()
    return total / torch.clamp(count, min=1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Unsharded cross-entropy of ``logits`` ``[..., V]`` against integer ``targets`` ``[...]``.

    The definition of ``torch.nn.functional.cross_entropy`` with class-index targets (``mean``
    over non-ignored tokens; 0 rather than nan when every token is ignored), in float32 (or the
    logits dtype if wider). The reference for :func:`vocab_parallel_cross_entropy`.
    """
    check_loss_options(label_smoothing, ignore_index, reduction)
    _check_shapes(logits, targets)
    x = logits.to(_stats_dtype(logits.dtype))
    v = x.shape[-1]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).to(torch.int64)
    m = x.detach().amax(-1)
    lse = m + torch.log(torch.exp(x - m.unsqueeze(-1)).sum(-1))
    tgt = torch.gather(x, -1, safe.unsqueeze(-1)).squeeze(-1)
    eps = float(label_smoothing)
    losses = lse - (1.0 - eps) * tgt - (eps / v) * x.sum(-1)
    losses = torch.where(valid, losses, torch.zeros_like(losses))
    return _reduce(losses, valid, reduction)


def vocab_parallel_token_losses(logits: torch.Tensor, targets: torch.Tensor, axis_name: str, *,
                                vocab_size: int, label_smoothing: float = 0.0,
                                ignore_index: int = -100, mesh) -> torch.Tensor:
    """Stacked view: per-token losses from the vocab blocks of all devices.

    Args:
        logits: Stacked ``[n, ..., V/n]`` (row i = device i's vocab block), dim 0 sharded over
            ``axis_name`` (n = its size).
        targets: Integer targets ``[...]`` (global, replicated over the axis).
        axis_name: The tensor-parallel mesh axis.
        vocab_size: The global V (used for label smoothing).
        label_smoothing, ignore_index: as in :func:`cross_entropy`.
        mesh: The torch_xla mesh.

    Returns:
        Global per-token losses ``[...]`` (0 where the target is ``ignore_index``), replicated.
        Communication: one all-reduce(max) and one all-reduce(sum) forward, none backward.
    """
    n, c = logits.shape[0], logits.shape[-1]
    x = _mesh.mark_activation(logits.to(_stats_dtype(logits.dtype)), mesh, axis_name)
    lead = (n,) + (1,) * targets.dim()
    start = axis_index(axis_name, mesh=mesh).to(torch.int64).view(lead) * c
    valid = targets != ignore_index
    local = _mesh.mark_activation(targets.to(torch.int64).unsqueeze(0) - start, mesh, axis_name)
    in_block = valid.unsqueeze(0) & (local >= 0) & (local < c)
    safe = torch.where(in_block, local, torch.zeros_like(local))
    m = max_from_axis(x.detach().amax(-1), axis_name, mesh=mesh)
    sumexp = torch.exp(x - m.unsqueeze(0).unsqueeze(-1)).sum(-1)
    picked = torch.gather(x, -1, safe.unsqueeze(-1)).squeeze(-1)
    tgt = torch.where(in_block, picked, torch.zeros_like(picked))
    # stacked last, so that dim 1 stays the batch (kept sharded inside mesh.sharded_batch)
    stats = reduce_from_axis(torch.stack([sumexp, tgt, x.sum(-1)], -1), axis_name, mesh=mesh)
    eps = float(label_smoothing)
    losses = (m + torch.log(stats[..., 0]) - (1.0 - eps) * stats[..., 1]
              - (eps / vocab_size) * stats[..., 2])
    return torch.where(valid, losses, torch.zeros_like(losses))


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, mesh,
                                 axis_name: str = "tp", label_smoothing: float = 0.0,
                                 ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of global ``logits`` ``[..., V]`` sharded on V over ``axis_name``.

    Equal to :func:`cross_entropy` of the gathered logits, computed from the vocab shards (never
    gathered). ``logits`` should arrive sharded on their last dim (e.g. from a
    ``ColumnParallelLinear`` with ``reduce_scatter_output=True``); a replicated tensor is sliced
    locally. ``targets`` ``[...]`` (on the XLA device) is replicated. The reduction is global.

    Raises:
        ValueError: bad options or shapes, tensors not on the XLA device, a mesh without
            ``axis_name`` or V not divisible by its size.
    """
    check_loss_options(label_smoothing, ignore_index, reduction)
    _check_shapes(logits, targets)
    n = _mesh.check_axis(mesh, axis_name)
    _mesh.check_on_device(logits, "logits")
    _mesh.check_on_device(targets, "targets")
    if logits.shape[-1] % n:
        raise ValueError(f"logits.shape[-1]={logits.shape[-1]}: expected the vocabulary size to "
                         f"be divisible by the size {n} of axis {axis_name!r}")
    stacked = to_stacked(logits, axis_name, mesh=mesh)  # [n, ..., V/n]
    losses = vocab_parallel_token_losses(stacked, targets, axis_name, vocab_size=logits.shape[-1],
                                         label_smoothing=float(label_smoothing),
                                         ignore_index=ignore_index, mesh=mesh)
    return _reduce(losses, targets != ignore_index, reduction)


# Deliberate twin of jax_impl.losses.VocabParallelCrossEntropy, kept line-for-line parallel on
# purpose: same options and dispatch (the shared checks are in ringpar.layer_args).
class VocabParallelCrossEntropy(nn.Module):
    """Cross-entropy module with fixed options: ``loss_fn(logits, targets)``.

    With ``mesh=None`` it is the unsharded :func:`cross_entropy` (on any device); with a mesh it
    is :func:`vocab_parallel_cross_entropy` over ``axis_name``.
    """

    def __init__(self, mesh=None, axis_name: str = "tp", label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        check_loss_options(label_smoothing, ignore_index, reduction)
        if mesh is not None:
            _mesh.check_axis(mesh, axis_name)
        self.mesh, self.axis_name = mesh, axis_name
        self.label_smoothing, self.ignore_index = float(label_smoothing), ignore_index
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` ``[..., V]`` against ``targets`` ``[...]``."""
        if self.mesh is None:
            return cross_entropy(logits, targets, self.label_smoothing, self.ignore_index,
                                 self.reduction)
        return vocab_parallel_cross_entropy(
            logits, targets, mesh=self.mesh, axis_name=self.axis_name,
            label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"axis_name={self.axis_name!r}, label_smoothing={self.label_smoothing}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"parallel={self.mesh is not None}")
