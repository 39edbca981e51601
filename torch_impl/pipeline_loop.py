"""The torch-only machinery under the pipeline schedule: the stacked view of one pipeline run.

:mod:`torch_impl.pipeline_circular` runs the schedule's named steps (the twin of
:mod:`jax_impl.pipeline_circular`); what JAX gets from ``shard_map`` and ``nn.scan`` is built here
for the global view, so the schedule code stays the same on both backends:

- which mesh axes the batch rows are sharded over (:func:`batch_axes`; by default the data and
  FSDP axis names of ``ringpar.configs.ParallelConfig``, or those of a given config);
- the layout of a run (:class:`LoopLayout`): the state ``[p, D, b, ...]`` (dims 0 and 1 sharded
  over the pipeline and data axes; D = product of the data-axis sizes, b = rows per micro-batch
  and data shard), micro-batch i of data shard d being rows ``i*b .. (i+1)*b`` of that shard (the
  rows JAX's per-device split gives), and the per-step loop inputs;
- the stage applied to each data shard (:class:`StageCall`): a second ``vmap`` over dim 1, with
  the module's parameters and tensor arguments carried through the loop (``torch_xla``'s scan
  differentiates only its carry and inputs) and one seed per step for dropout
  (:mod:`torch_impl.scan_random`);
- the loop itself (:func:`run_loop`): ``torch_xla.experimental.scan`` or a Python loop.

Inside ``scan`` the body is traced with fake tensors, so every sharding annotation here is the
traceable :func:`constrain`.

Example (what ``execute_circular_pipeline`` does with them)::

    layout = plan(module, x, 4, "pp", mesh, 2, None, "scan", None)
    xs, buffer = layout.loop_inputs(x)
    outs = run_loop(step, (layout.zero_state(x), buffer, *StageCall(module, layout, (), {})
                           .initial()), xs, "scan")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ringpar import pipeline_schedule as schedule

from . import mesh as _mesh
from . import vmap_axes, xla
from .configs import ParallelConfig, mesh_axis_names
from .scan_random import StepRandomness, step_seeds

__all__ = ["LOOPS", "check_loop", "constrain", "default_batch_axes", "batch_axes", "batch_spec",
           "check_batch", "LoopLayout", "plan", "StageCall", "cached_body", "layout_key",
           "grad_key", "run_loop"]

LOOPS = ("scan", "unrolled")


def check_loop(loop) -> None:
    """ValueError unless ``loop`` is one of :data:`LOOPS`."""
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r}: expected one of {LOOPS}")


def constrain(t: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """Sharding constraint on ``t`` and on its gradient; traceable inside ``scan``."""
    spec = tuple(spec)
    if len(spec) != t.dim():
        raise ValueError(f"spec={spec!r} has {len(spec)} entries for a tensor of rank {t.dim()}")
    return vmap_axes.constrain_with_gradients(t, mesh, spec)  # any rank (torch_xla: <= 5)


# ------------------------------------------------------------------------------- batch axes
def default_batch_axes() -> tuple[str, str]:
    """The data and FSDP axis names of a default ``ParallelConfig``: ``('dp', 'fsdp')``."""
    data, fsdp, _, _ = mesh_axis_names(ParallelConfig())
    return data, fsdp


def batch_axes(mesh, model_axis_name: str, batch_axis_names) -> tuple[tuple[str, ...], int]:
    """The data axes the batch is sharded over and the product of their sizes.

    ``batch_axis_names``: axis names (those absent from the mesh are ignored), a
    ``ParallelConfig`` (its data and FSDP axis names) or None (:func:`default_batch_axes`).
    ValueError if the pipeline axis is among them.
    """
    names = tuple(mesh.axis_names or ())
    if batch_axis_names is None:
        batch_axis_names = default_batch_axes()
    elif isinstance(batch_axis_names, ParallelConfig):
        batch_axis_names = mesh_axis_names(batch_axis_names)[:2]
    elif isinstance(batch_axis_names, str):
        batch_axis_names = (batch_axis_names,)
    axes = tuple(a for a in batch_axis_names if a in names)
    if model_axis_name in axes:
        raise ValueError(f"batch_axis_names={tuple(batch_axis_names)!r} contains the pipeline axis "
                         f"{model_axis_name!r}: expected only data axes")
    size = math.prod(_mesh.check_axis(mesh, a, "batch_axis_names") for a in axes)
    return axes, size


def batch_spec(axes: tuple[str, ...]):
    """The spec entry of a dim sharded over ``axes`` (None, one name, or the tuple)."""
    if not axes:
        return None
    return axes if len(axes) > 1 else axes[0]


def check_batch(x, m: int, dsize: int, axes) -> None:
    """ValueError unless ``x`` is an XLA tensor ``[B, ...]`` with B divisible by m * dsize."""
    _mesh.check_on_device(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected a batch dimension first")
    if x.shape[0] % m:
        raise ValueError(f"x.shape[0]={x.shape[0]}: expected the batch size to be divisible by "
                         f"num_microbatches={m}")
    if x.shape[0] % (m * dsize):
        raise ValueError(f"x.shape[0]={x.shape[0]}: expected the batch size to be divisible by "
                         f"num_microbatches={m} times the size {dsize} of the data axes {axes} "
                         f"the batch is sharded over (batch_axis_names)")


# ------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class LoopLayout:
    """Sizes and shardings of one pipeline run (stacked view, see the module docstring)."""

    mesh: object
    axis: str  # the pipeline axis (size p)
    p: int
    m: int
    r: int
    dsize: int  # D: product of the data-axis sizes
    b: int  # rows per micro-batch and data shard
    feat: tuple  # x.shape[1:]
    bspec: object  # spec entry of the data dim
    fspec: tuple  # sharding of the feature dims
    loop: str

    @property
    def spec(self) -> tuple:
        """Sharding of the state ``[p, D, b, ...]``."""
        return (self.axis, self.bspec, None) + self.fspec

    def stage_index(self, device) -> torch.Tensor:
        """``arange(p)`` shaped ``[p, 1, ...]`` like the state (built inside the loop body too:
        scan traces it with fakes)."""
        return torch.arange(self.p, device=device).view(self.p, *([1] * (len(self.feat) + 2)))

    def zero_state(self, x: torch.Tensor) -> torch.Tensor:
        """The state before step 0: zeros ``[p, D, b, ...]``."""
        return constrain(x.new_zeros((self.p, self.dsize, self.b, *self.feat)), self.mesh,
                         self.spec)

    def microbatch_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """``[p, m', D, b, ...]``: the micro-batches on row 0 (device 0), zeros on the others.

        Each device builds its block locally (no communication); the input gradient is reduced
        over the pipeline axis once, after the loop. r = 1: m' = m + p - 1 (zero blocks for the
        bubble), else m' = m (device 0's buffer).
        """
        micro = x.reshape(self.dsize, self.m, self.b, *self.feat).transpose(0, 1).unsqueeze(0)
        if self.r == 1:
            micro = torch.cat([micro, micro.new_zeros((1, self.p - 1, self.dsize, self.b,
                                                       *self.feat))], 1)
        blocks = torch.where(self.stage_index(x.device).unsqueeze(1) == 0, micro,
                             torch.zeros_like(micro))
        return constrain(blocks, self.mesh, (self.axis, None) + self.spec[1:])

    def loop_inputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], object]:
        """``(xs, buffer)``: the per-step inputs (first dim: step) and device 0's buffer.

        ``xs``: the columns of ``ringpar.pipeline_schedule.step_tables`` (repeat, read_slot,
        read_active, write_slot, write_active; int32), one dropout seed per step, and for r = 1
        the micro-batch block of each step (GPipe has no buffer: ``[]``).
        """
        p, m, r = self.p, self.m, self.r
        blocks = self.microbatch_blocks(x)
        t = schedule.step_tables(p, m, r)
        xs = [torch.as_tensor(c).to(torch.int32).to(x.device) for c in
              (t.repeat, t.read_slot, t.read_active, t.write_slot, t.write_active)]
        steps = r * m + p - 1
        # One seed per step for dropout in the scan (its own rng repeats per step); the unrolled
        # loop draws fresh numbers natively.
        xs.append(step_seeds(steps, x.device) if self.loop == "scan"
                  else torch.zeros(steps, dtype=torch.int64, device=x.device))
        if r == 1:
            return xs + [constrain(blocks.transpose(0, 1), self.mesh, (None,) + self.spec)], []
        return xs, blocks


def plan(module, x, num_microbatches, model_axis_name: str, mesh, num_pipeline_repeats,
         batch_axis_names, loop: str, feature_spec) -> LoopLayout:
    """Validate the arguments of a pipeline run and return its layout (ValueError first)."""
    p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
    r, m = num_pipeline_repeats, num_microbatches
    schedule.check_schedule(p, m, r)
    check_loop(loop)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, "num_pipeline_repeats", 1) != r:
        raise ValueError(f"num_pipeline_repeats={r}: the module holds "
                         f"{getattr(module, 'num_pipeline_repeats', 1)} repeats")
    axes, dsize = batch_axes(mesh, model_axis_name, batch_axis_names)
    check_batch(x, m, dsize, axes)
    feat = tuple(x.shape[1:])
    fspec = (None,) * len(feat) if feature_spec is None else tuple(feature_spec)
    if len(fspec) != len(feat):
        raise ValueError(f"feature_spec={feature_spec!r}: expected {len(feat)} entries, one per "
                         f"dim of x after the batch")
    return LoopLayout(mesh, model_axis_name, p, m, r, dsize, x.shape[0] // (m * dsize), feat,
                      batch_spec(axes), fspec, loop)


# ---------------------------------------------------------------------------- the stage call
class StageCall:
    """The module's tensors and tensor arguments as loop carry, and the stage on each data shard.

    Parameters and buffers enter the loop expanded over the data shards ``[D, ...]`` (each shard
    holds whole stage parameters, so gradients accumulate per shard and are summed when the loop
    returns); :meth:`bind` turns one step's carry back into a callable ``stage(h, *args,
    **kwargs)`` for ``run_resident_stage``.
    """

    def __init__(self, module: nn.Module, layout: LoopLayout, args: tuple, kwargs: dict):
        self.module, self.layout = module, layout
        named = dict(module.named_parameters())
        named.update(dict(module.named_buffers()))
        self.named, self.names = named, list(named)
        own = getattr(module, "partition_specs", lambda: {})()
        self.pspecs = {n: (layout.bspec,) + tuple(own.get(n, (None,) * named[n].dim()))
                       for n in self.names}
        flat, self.args_spec = pytree.tree_flatten((args, kwargs))
        self.tensor_pos = [i for i, a in enumerate(flat) if isinstance(a, torch.Tensor)]
        # the loop body reads only this template (None where a tensor goes): a cached body
        # (:func:`cached_body`) must hold no tensor of the call that built it
        self.flat_args = [None if i in self.tensor_pos else a for i, a in enumerate(flat)]
        self.arg_tensors = [flat[i] for i in self.tensor_pos]

    def key(self) -> tuple:
        """What :meth:`bind` depends on besides the module and the layout (a cache key)."""
        return (tuple(self.names), tuple(sorted((n, repr(s)) for n, s in self.pspecs.items())),
                str(self.args_spec), repr(self.flat_args))

    def initial(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The carry before step 0: (tensors expanded ``[D, ...]``, tensor arguments).

        Call it once: it hands its tensors to the loop and keeps none, so that a loop body
        cached with this StageCall (:func:`cached_body`) holds no tensor of this call.
        """
        from .fsdp_rows import data_shard_rows  # FSDP-sharded: reduce-scatter in the backward

        lay = self.layout
        tensors = [data_shard_rows(self.named[n], lay.dsize, self.pspecs[n], mesh=lay.mesh)
                   for n in self.names]
        targs, self.named, self.arg_tensors = self.arg_tensors, {}, []
        return tensors, targs

    def bind(self, tensors, targs, seed) -> tuple[Callable, list, tuple, dict]:
        """``(stage, tensors, args, kwargs)`` of one step: ``stage(h, *args, **kwargs)`` maps the
        state ``[p, D, b, ...]`` through the module on each data shard (a ``vmap`` over dim 1)."""
        lay, module = self.layout, self.module
        tensors = [constrain(t, lay.mesh, self.pspecs[n]) for n, t in zip(self.names, tensors)]
        leaves = list(self.flat_args)
        for i, t in zip(self.tensor_pos, targs):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.args_spec)
        by_name = dict(zip(self.names, tensors))

        def stage(h, *a, **kw):
            def one_shard(pdict, hs):  # hs [p, b, ...]: one data shard of the stacked state
                return torch.func.functional_call(module, pdict, (hs, *a), kw)

            vm = torch.func.vmap(one_shard, in_dims=(0, 1), out_dims=1, randomness="different")
            # the vmapped dim is the data shard: annotations inside see it (torch_impl.vmap_axes)
            with StepRandomness(seed) if lay.loop == "scan" else contextlib.nullcontext(), \
                    vmap_axes.vmapped_axis(lay.bspec):
                return vm(by_name, h)

        return stage, tensors, args, kwargs


def cached_body(module: nn.Module, key: tuple, build: Callable[[], Callable]) -> Callable:
    """The loop body for ``key``, built once per module: ``build()`` on the first call.

    torch_xla's scan re-traces its body with AOTAutograd on every call unless it is handed the
    same (pure) function again: seconds per step for a GPT stage (measured 4-8 s at 1,1,2,4,
    4 layers, against ~0.05 s for the rest of the step). With the body reused, steps after the
    first skip that trace. ``key`` must hold everything the body reads besides its carry and
    inputs (the layout, the stage call's names and specs, the module's training flags), and the
    body must hold no tensor: a tensor it keeps alive would be an extra output of the first
    step's graph, and the second step would compile again. The body stays in torch_xla's scan
    cache (and keeps ``module`` alive) for the life of the process.
    """
    bodies = module.__dict__.setdefault("_ringpar_loop_bodies", {})
    if key not in bodies:
        bodies[key] = build()
    return bodies[key]


def layout_key(layout: LoopLayout, module: nn.Module) -> tuple:
    """A cache key of ``layout`` (the mesh by identity) and ``module``'s training flags."""
    fields = tuple(getattr(layout, f) for f in LoopLayout.__dataclass_fields__ if f != "mesh")
    return (id(layout.mesh), repr(fields), tuple(m.training for m in module.modules()))


def grad_key(init, xs) -> tuple:
    """Grad mode and which loop tensors require grad: part of a cached body's key, because
    torch_xla's scan cache keys on shapes only, and a body first traced without grad (e.g. a
    forward under ``no_grad``) would give no gradient for the inputs of a later call."""
    leaves = pytree.tree_leaves((init, xs))
    return (torch.is_grad_enabled(),
            tuple(t.requires_grad for t in leaves if isinstance(t, torch.Tensor)))


def run_loop(step: Callable, init, xs: list[torch.Tensor], loop: str) -> torch.Tensor:
    """Run ``step(carry, row) -> (carry, out)`` over the steps; the outputs stacked ``[steps, ...]``.

    With ``loop="scan"``, ``step`` is handed to torch_xla's scan as a pure function (traced once
    per ``step`` object and shapes: build it with :func:`cached_body`)."""
    if loop == "scan":
        _, outs = xla.scan(step, init, xs, cache=True)
        return outs
    carry, outs = init, []
    for t in range(len(xs[0])):
        carry, out = step(carry, [c[t] for c in xs])
        outs.append(out)
    return torch.stack(outs)
