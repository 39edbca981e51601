"""Sharding annotations that work inside ``torch.func.vmap`` and inside ``scan`` tracing.

The torch pipeline (:mod:`torch_impl.pipeline_parallel`) applies a stage to its stacked state
with ``vmap`` over the data shards and over the pipeline stages, the torch twin of JAX running
the stage per device inside ``shard_map``. Stacked-view layers annotate their tensors with
``mark_sharding`` on the LOGICAL shape they see; inside a vmap the tensor is a batched wrapper
whose physical value has extra leading dims, and inside ``torch_xla``'s ``scan`` the body is traced
with fake tensors, where the in-place ``mark_sharding`` cannot run.

Here a vmap that stands for a mesh axis is declared with :func:`vmapped_axis` (the spec entry of
its batch dim, e.g. ``"pp"`` or ``("dp", "fsdp")``), and :func:`constrain` annotates a tensor
on its physical value: the batch dims of the active vmaps are moved to the front, the declared
entries of those vmaps are prepended to the logical spec, the traceable constraint is applied,
and the batch dims are wrapped again. A collective with a custom ``autograd.Function`` saves
:func:`current` in its forward and re-enters it with :func:`restored` in its backward, which
runs after the pipeline's vmaps have returned.

Example::

    def per_stage(h):                       # runs under vmap over the stages
        return constrain(h * 2, mesh, ("tp", None))   # physical spec ("pp", "tp", None)

    with vmapped_axis("pp"):
        y = torch.func.vmap(per_stage)(x)   # x [pp, tp, F]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch._functorch import pyfunctorch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import xla

__all__ = ["vmapped_axis", "current", "restored", "is_traced", "on_physical", "constrain",
           "reduce_scatter_region", "aot_constrain", "constrain_with_gradients"]

_F = torch._C._functorch
_AXES: list = []  # spec entries of the declared vmaps, outermost first


@contextlib.contextmanager
def vmapped_axis(entry):
    """Declare that the next (inner) vmap maps a dim sharded over ``entry`` (a spec entry)."""
    _AXES.append(entry)
    try:
        yield
    finally:
        _AXES.pop()


def current() -> tuple:
    """The declared entries, outermost first (save in a Function's forward)."""
    return tuple(_AXES)


@contextlib.contextmanager
def restored(entries: Sequence):
    """Re-declare ``entries`` (e.g. in a backward, which runs outside the pipeline's vmaps)."""
    saved = list(_AXES)
    _AXES[:] = list(entries)
    try:
        yield
    finally:
        _AXES[:] = saved


def _vmap_levels() -> list[int]:
    return [i.level() for i in pyfunctorch.retrieve_all_functorch_interpreters()
            if i.key() == pyfunctorch.TransformType.Vmap]


def is_traced(t: torch.Tensor) -> bool:
    """True if ``t`` is a vmap-batched, fake or functional (scan-traced) tensor."""
    # not _F.is_functionaltensor(t): it is True for EVERY XLA tensor (torch_xla functionalizes
    # them), which sent plain mark_sharding calls (parameters, FSDP) to the non-in-place path.
    return _F.is_batchedtensor(t) or isinstance(t, (FakeTensor, FunctionalTensor))


def _unwrap(t: torch.Tensor):
    """Physical value (batch dims first, outermost first), their levels and spec entries."""
    levels = _vmap_levels()
    if levels and len(levels) != len(_AXES):
        raise RuntimeError(f"a sharding annotation inside {len(levels)} vmaps, but {len(_AXES)} "
                           f"are declared with torch_impl.vmap_axes.vmapped_axis: {_AXES}")
    unwrapped = []
    while _F.is_batchedtensor(t):
        level = _F.maybe_get_level(t)
        t, bdim = _F._unwrap_batched(t, level)
        t = t.movedim(bdim, 0)
        unwrapped.append(level)
    unwrapped.reverse()  # outermost first, as the physical dims now are
    prefix = tuple(_AXES[levels.index(lv)] for lv in unwrapped)
    return t, unwrapped, prefix


def _axes_of(entry) -> set:
    if entry is None:
        return set()
    return {entry} if isinstance(entry, str) else set(entry)


def _full_spec(prefix: tuple, spec: Sequence) -> tuple:
    """``prefix + spec``; a logical entry over an axis a vmap already maps is dropped (the
    vmapped dim carries it, e.g. the data axes of a batch split by the pipeline)."""
    used = set().union(*(_axes_of(e) for e in prefix)) if prefix else set()
    out = []
    for e in spec:
        keep = tuple(a for a in ((e,) if isinstance(e, str) else (e or ())) if a not in used)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return tuple(prefix) + tuple(out)


_KEEP = object()  # a dim that must stay its own dim (the scattered one)


def _merged(shape: Sequence[int], spec: Sequence) -> tuple[list[int], list]:
    """Shape and spec with every unsharded dim merged into the dim before it.

    torch_xla builds shardings of rank <= 5 only (its tile assignment; measured: rank 7 gives
    'tile_assignment ranks > 5' and a broken sharding). Merging an unsharded dim into the dim
    before it keeps every device's block the same, so the reshape moves no data."""
    sizes, entries = [], []
    for size, e in zip(shape, spec):
        if e is None and entries and entries[-1] is not _KEEP:
            sizes[-1] *= size
        else:
            sizes.append(size)
            entries.append(e)
    return sizes, entries


def _low_rank(fn, t: torch.Tensor, spec: tuple) -> torch.Tensor:
    """``fn(t', spec')`` on ``t`` reshaped to :func:`_merged` dims, reshaped back."""
    sizes, entries = _merged(t.shape, spec)
    if len(sizes) == t.dim():
        return fn(t, spec)
    return fn(t.reshape(sizes), tuple(entries)).reshape(t.shape)


def on_physical(t: torch.Tensor, fn):
    """``fn(physical, prefix)`` on ``t``'s physical value, outside every vmap; the result (same
    number of leading batch dims) is wrapped back into ``t``'s vmap levels."""
    phys, levels, prefix = _unwrap(t)
    with pyfunctorch.temporarily_clear_interpreter_stack():
        out = fn(phys, prefix)
    for lv in levels:
        out = _F._add_batch_dim(out, 0, lv)
    return out


class _Constrain(torch.autograd.Function):
    """Traceable sharding constraint on the forward value only (backward: identity), like the
    in-place ``mark_sharding`` it stands in for."""

    @staticmethod
    def forward(ctx, x, mesh, spec):
        return _low_rank(lambda v, sp: xla.aot_mark_sharding(v, mesh, sp), x, spec)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def constrain(t: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """Sharding constraint ``spec`` (of ``t``'s logical shape) that works under the declared vmaps
    and in ``scan`` tracing; returns the constrained tensor (no in-place annotation)."""
    spec = tuple(spec)
    return on_physical(t, lambda p, prefix: _Constrain.apply(p, mesh, _full_spec(prefix, spec)))


def reduce_scatter_region(t: torch.Tensor, mesh, spec: Sequence, dim: int,
                          groups: list[list[int]]) -> torch.Tensor:
    """``torch_impl.mesh.manual_reduce_scatter`` on ``t``'s physical value (see there)."""
    spec = tuple(spec)

    def run(p, prefix):
        full = list(_full_spec(prefix, spec))
        d = dim % len(spec) + len(prefix)
        full[d] = _KEEP
        sizes, entries = _merged(p.shape, full)
        md = entries.index(_KEEP)
        entries[md] = None
        out = xla.manual_reduce_scatter_op(p.reshape(sizes), mesh, tuple(entries), md, groups)
        shape = list(p.shape)
        shape[d] //= len(groups[0])
        return out.reshape(shape)

    return on_physical(t, run)


def aot_constrain(t: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """``xla.aot_mark_sharding`` (no autograd: for custom Functions) under the declared vmaps."""
    spec = tuple(spec)

    def run(p, prefix):
        return _low_rank(lambda v, sp: xla.aot_mark_sharding(v, mesh, sp), p,
                         _full_spec(prefix, spec))

    return run(t, ()) if not _F.is_batchedtensor(t) else on_physical(t, run)


def constrain_with_gradients(t: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """``xla.mark_sharding_with_gradients`` (value and gradient) at any rank, under the
    declared vmaps too."""
    spec = tuple(spec)

    def run(p, prefix):
        return _low_rank(lambda v, sp: xla.mark_sharding_with_gradients(v, mesh, sp), p,
                         _full_spec(prefix, spec))

    return run(t, ()) if not _F.is_batchedtensor(t) else on_physical(t, run)
