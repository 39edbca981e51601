"""Vocab-parallel cross-entropy (JAX; twin of :mod:`torch_impl.losses`).

The logits of a language-model head are the largest activation of a decoder ([batch, seq, V]
with V in the tens of thousands). A column-parallel head leaves them sharded on the vocabulary
over the tensor-parallel axis; this module computes the cross-entropy from those shards without
ever gathering them. Per device i (n = size of the tp axis, block c = V/n, vocab ids
``[i*c, (i+1)*c)``):

1. ``m = pmax(max_v logits_i)``: the global max (a constant for autodiff, as any stabilizing shift
   of logsumexp may be): one all-reduce(max) of [...] values;
2. ``[sum_v exp(logits_i - m), logits_i[target] if target in block i else 0, sum_v logits_i]``
   stacked and ``psum``'d: ONE all-reduce of 3 x [...] values;
3. per token: ``lse = m + log(sumexp)``, ``loss = lse - (1 - eps) * logit_target - eps / V *
   sum_logits`` (label smoothing ``eps`` spreads ``eps`` of the target mass uniformly over the V
   classes, the definition of ``torch.nn.functional.cross_entropy(label_smoothing=eps)``);
4. tokens whose target is ``ignore_index`` get loss 0 and do not count.

The reduction is global: ``mean`` is the sum of the per-token losses over ALL tokens divided by the
number of non-ignored tokens over ALL tokens (not a mean of per-shard or per-row means), computed
on the global token losses after the shard_map, so it stays global whatever the batch sharding.
With no non-ignored token, ``mean`` is 0 (``torch`` returns nan there; we prefer a finite loss,
and the gradient is 0 either way).

Backward: the transpose of ``psum`` is a broadcast, so the gradient of the logits is computed
shard-locally (``softmax - (1-eps) onehot - eps/V`` per block): no communication.

Public API (same names, same order in the torch twin):

- ``cross_entropy(logits, targets, label_smoothing=0.0, ignore_index=-100, reduction="mean")``:
  unsharded reference on a global ``[..., V]`` array.
- ``vocab_parallel_token_losses(logits, targets, axis_name, *, vocab_size, label_smoothing,
  ignore_index)``: per-device body (call inside ``shard_map``), returns per-token losses.
- ``vocab_parallel_cross_entropy(logits, targets, *, mesh, axis_name="tp", ...)``: global view.
- ``VocabParallelCrossEntropy``: the same as a callable object holding the options.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ringpar.layer_args import check_loss_options

from .collectives import max_from_axis, reduce_from_axis
from .mesh import check_axis

__all__ = ["cross_entropy", "vocab_parallel_token_losses", "vocab_parallel_cross_entropy",
           "VocabParallelCrossEntropy"]

def _check_shapes(logits, targets) -> None:
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets.shape={tuple(targets.shape)}: expected the leading dims of "
                         f"logits.shape={tuple(logits.shape)}, i.e. {tuple(logits.shape[:-1])}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets.dtype={targets.dtype}: expected an integer dtype")


def _reduce(losses, valid, reduction: str):
    """Global reduction of per-token ``losses`` (0 where not ``valid``)."""
    if reduction == "none":
        return losses
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    count = jnp.sum(valid.astype(losses.dtype))
    return total / jnp.maximum(count, 1)


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0,
                  ignore_index: int = -100, reduction: str = "mean") -> jax.Array:
    """Unsharded cross-entropy of ``logits`` ``[..., V]`` against integer ``targets`` ``[...]``.

    Same definition as ``torch.nn.functional.cross_entropy`` with class-index targets (``mean``
    over non-ignored tokens; 0 rather than nan when every token is ignored). Computed in float32
    (or the logits dtype if wider). The reference for :func:`vocab_parallel_cross_entropy`.
    """
    check_loss_options(label_smoothing, ignore_index, reduction)
    _check_shapes(logits, targets)
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    v = x.shape[-1]
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    m = lax.stop_gradient(jnp.max(x, axis=-1))
    lse = m + jnp.log(jnp.sum(jnp.exp(x - m[..., None]), axis=-1))
    tgt = jnp.take_along_axis(x, safe[..., None].astype(jnp.int32), axis=-1)[..., 0]
    eps = float(label_smoothing)
    losses = lse - (1.0 - eps) * tgt - (eps / v) * jnp.sum(x, axis=-1)
    losses = jnp.where(valid, losses, 0.0)
    return _reduce(losses, valid, reduction)


def vocab_parallel_token_losses(logits: jax.Array, targets: jax.Array, axis_name: str, *,
                                vocab_size: int, label_smoothing: float = 0.0,
                                ignore_index: int = -100) -> jax.Array:
    """Per device (inside ``shard_map``): per-token losses from this device's vocab block.

    Args:
        logits: This device's block ``[..., V/n]`` of the logits (vocab ids ``[i*V/n,
            (i+1)*V/n)`` on device i of ``axis_name``).
        targets: Integer targets ``[...]``, the same on every device of the axis.
        axis_name: The tensor-parallel mesh axis the vocabulary is split over.
        vocab_size: The global V (used for label smoothing).
        label_smoothing, ignore_index: as in :func:`cross_entropy`.

    Returns:
        Per-token losses ``[...]`` (0 where the target is ``ignore_index``), float32, the same on
        every device. Communication: one all-reduce(max) and one all-reduce(sum) forward.
    """
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    c = x.shape[-1]
    start = lax.axis_index(axis_name) * c
    valid = targets != ignore_index
    local = targets.astype(jnp.int32) - start
    in_block = valid & (local >= 0) & (local < c)
    safe = jnp.where(in_block, local, 0)
    m = max_from_axis(jnp.max(x, axis=-1), axis_name)
    sumexp = jnp.sum(jnp.exp(x - m[..., None]), axis=-1)
    tgt = jnp.where(in_block, jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0], 0.0)
    stats = reduce_from_axis(jnp.stack([sumexp, tgt, jnp.sum(x, axis=-1)]), axis_name)
    eps = float(label_smoothing)
    losses = m + jnp.log(stats[0]) - (1.0 - eps) * stats[1] - (eps / vocab_size) * stats[2]
    return jnp.where(valid, losses, 0.0)


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "label_smoothing",
                                             "ignore_index", "reduction"))
def _vocab_parallel_ce(logits, targets, *, mesh, axis_name, label_smoothing, ignore_index,
                       reduction):
    lead = (None,) * (logits.ndim - 1)
    body = functools.partial(vocab_parallel_token_losses, axis_name=axis_name,
                             vocab_size=logits.shape[-1], label_smoothing=label_smoothing,
                             ignore_index=ignore_index)
    losses = jax.shard_map(body, mesh=mesh, in_specs=(P(*lead, axis_name), P(*lead)),
                           out_specs=P(*lead))(logits, targets)
    return _reduce(losses, targets != ignore_index, reduction)


def vocab_parallel_cross_entropy(logits: jax.Array, targets: jax.Array, *, mesh: Mesh,
                                 axis_name: str = "tp", label_smoothing: float = 0.0,
                                 ignore_index: int = -100, reduction: str = "mean") -> jax.Array:
    """Cross-entropy of global ``logits`` ``[..., V]`` sharded on V over ``axis_name``.

    Equal to :func:`cross_entropy` of the gathered logits, computed from the vocab shards
    (never gathered). ``logits`` should arrive sharded on their last dim (e.g. from a
    ``ColumnParallelLinear`` with ``reduce_scatter_output=True``); a replicated array is sliced
    locally. ``targets`` ``[...]`` is replicated over ``axis_name``. The reduction (``mean``:
    sum over all tokens / number of non-ignored tokens) is global.

    Raises:
        ValueError: bad options, shapes, a mesh without ``axis_name`` or V not divisible by its
            size.
    """
    check_loss_options(label_smoothing, ignore_index, reduction)
    _check_shapes(logits, targets)
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r}: expected a jax.sharding.Mesh")
    n = check_axis(mesh, axis_name)
    if logits.shape[-1] % n:
        raise ValueError(f"logits.shape[-1]={logits.shape[-1]}: expected the vocabulary size to "
                         f"be divisible by the size {n} of axis {axis_name!r}")
    return _vocab_parallel_ce(logits, targets, mesh=mesh, axis_name=axis_name,
                              label_smoothing=float(label_smoothing), ignore_index=ignore_index,
                              reduction=reduction)


# Deliberate twin of torch_impl.losses.VocabParallelCrossEntropy, kept line-for-line parallel on
# purpose: same options and dispatch (the shared checks are in ringpar.layer_args).
@dataclasses.dataclass(frozen=True)
class VocabParallelCrossEntropy:
    """Callable cross-entropy with fixed options: ``loss_fn(logits, targets)``.

    With ``mesh=None`` it is the unsharded :func:`cross_entropy`; with a mesh it is
    :func:`vocab_parallel_cross_entropy` over ``axis_name``.
    """

    mesh: Mesh | None = None
    axis_name: str = "tp"
    label_smoothing: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"

    def __post_init__(self) -> None:
        check_loss_options(self.label_smoothing, self.ignore_index, self.reduction)
        if self.mesh is not None:
            if not isinstance(self.mesh, Mesh):
                raise ValueError(f"mesh={self.mesh!r}: expected a jax.sharding.Mesh or None")
            check_axis(self.mesh, self.axis_name)

    def __call__(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        """The loss of ``logits`` ``[..., V]`` against ``targets`` ``[...]``."""
        if self.mesh is None:
            return cross_entropy(logits, targets, self.label_smoothing, self.ignore_index,
                                 self.reduction)
        return vocab_parallel_cross_entropy(
            logits, targets, mesh=self.mesh, axis_name=self.axis_name,
            label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
            reduction=self.reduction)
