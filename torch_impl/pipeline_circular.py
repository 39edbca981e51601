"""Circular (interleaved) pipeline parallelism on torch_xla SPMD, written as named steps.

Twin of :mod:`jax_impl.pipeline_circular` (same schedule from :mod:`ringpar.pipeline_schedule`,
same steps, same communication) in the stacked global view of
:mod:`torch_impl.pipeline_parallel`: a per-device value of the JAX code is row d of a tensor
``[p, ...]`` whose dim 0 is sharded over the pipeline axis.

With ``num_pipeline_repeats`` r device d holds layers ``d, d+p, ..., d+(r-1)p`` (round-robin):
:class:`RepeatedStage` keeps r stacked stages ``repeats_k`` (each ``[p, ...]``; row d of repeat k
is layer ``k*p + d``). The loop has ``r*m + p - 1`` steps, each::

    fresh  = read_buffer(...)         # slot t % m of row 0's buffer (zeros in the bubble)
    h      = inject_microbatch(...)   # row 0 starts on fresh, the others on their state
    h      = run_resident_stage(...)  # row d: the layer of its current repeat
    out    = collect_output(...)      # row p-1's result, zeros elsewhere
    state  = rotate(...)              # ONE collective-permute, pairs (d, d+1 mod p)
    buffer = write_back(...)          # row 0 parks the returning micro-batch

With r = 1 (GPipe) no micro-batch returns: the micro-batches are loop inputs, no buffer.

The buffer is ``[p, m, D, b, ...]`` (a per-device buffer, as in JAX; only row 0 is used); its
slot is chosen with a one-hot mask (elementwise, so no communication). Dropout: in the scan loop
each step runs under :class:`torch_impl.scan_random.StepRandomness` with its own seed, so masks
differ per step, micro-batch, stage and data shard (torch_xla's scan alone would repeat them; other
random ops raise ValueError there); the unrolled loop draws fresh numbers natively.

Example::

    model = CircularPipelineModule("pp", 4, Stage, mesh=mesh, num_pipeline_repeats=2)
    model.shard_()
    y = model(x)          # [B, ...], x's rows sharded over the data axes
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ringpar import pipeline_schedule as schedule

from . import mesh as _mesh
from . import vmap_axes, xla
from .collectives import ring_permute
from .pipeline_parallel import LOOPS, StackedStage, _batch_axes, _batch_spec, _constrain
from .scan_random import StepRandomness, step_seeds

__all__ = ["RepeatedStage", "read_buffer", "inject_microbatch", "run_resident_stage",
           "collect_output", "rotate",
           "write_back", "execute_circular_pipeline", "CircularPipelineModule"]


def _rows(idx_shape_like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[p]`` shaped ``[p, 1, ...]`` to broadcast over ``idx_shape_like``."""
    return values.view(values.shape[0], *([1] * (idx_shape_like.dim() - 1)))


class RepeatedStage(nn.Module):
    """The r layers of every device: child ``repeats_k`` (a :class:`StackedStage`) is repeat k.

    ``forward(h, *args, pipeline_repeat=None, **kwargs)``: row d of ``h`` ``[p, ...]`` goes
    through layer ``pipeline_repeat[d]*p + d``; the weights of that repeat are selected per row
    (elementwise, no communication) and applied once with ``vmap``.

    Args:
        stages: the ``r*p`` layer modules in model order (layer ``k*p + d`` is row d of repeat k).
        mesh: The torch_xla mesh.
        model_axis_name: The pipeline axis (size p).
    """

    def __init__(self, stages: Sequence[nn.Module], *, mesh, model_axis_name: str):
        super().__init__()
        p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
        stages = list(stages)
        if not stages or len(stages) % p:
            raise ValueError(f"stages has {len(stages)} modules: expected a positive multiple of "
                             f"p={p}, the size of axis {model_axis_name!r}")
        self.num_pipeline_repeats = len(stages) // p
        self.mesh, self.model_axis_name = mesh, model_axis_name
        for k in range(self.num_pipeline_repeats):
            self.add_module(f"repeats_{k}", StackedStage(stages[k * p:(k + 1) * p], mesh=mesh,
                                                         model_axis_name=model_axis_name))

    def repeat(self, k: int) -> StackedStage:
        """The stacked stage of repeat ``k``."""
        return getattr(self, f"repeats_{k}")

    def partition_specs(self) -> dict[str, tuple]:
        """Partition spec of every parameter and buffer (by ``named_parameters`` name)."""
        return {f"repeats_{k}.{n}": s for k in range(self.num_pipeline_repeats)
                for n, s in self.repeat(k).partition_specs().items()}

    def shard_(self) -> "RepeatedStage":
        """Move to the XLA device and shard dim 0 of every tensor over the pipeline axis."""
        for k in range(self.num_pipeline_repeats):
            self.repeat(k).shard_()
        return self

    def forward(self, h: torch.Tensor, *args, pipeline_repeat: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """Row d of ``h`` through repeat ``pipeline_repeat[d]`` (default all 0)."""
        first = self.repeat(0)
        if pipeline_repeat is None or self.num_pipeline_repeats == 1:
            return first(h, *args, **kwargs)
        tables = [dict(list(self.repeat(k).named_parameters())
                       + list(self.repeat(k).named_buffers()))
                  for k in range(self.num_pipeline_repeats)]
        chosen = {}
        for name, w in tables[0].items():
            for k in range(1, self.num_pipeline_repeats):
                w = torch.where(_rows(w, pipeline_repeat) == k, tables[k][name], w)
            chosen[name] = w
        return torch.func.functional_call(first, chosen, (h, *args), kwargs)


# ------------------------------------------------------------------------- the named steps
def read_buffer(buffer, read_hot, read_active):
    """Each row's buffer slot (one-hot ``read_hot`` [m]); zeros when not ``read_active``."""
    hot = read_hot.view(1, -1, *([1] * (buffer.dim() - 2))) > 0
    fresh = torch.where(hot, buffer, torch.zeros_like(buffer)).sum(dim=1)
    return torch.where(read_active > 0, fresh, torch.zeros_like(fresh))


def inject_microbatch(state, fresh, idx):
    """Row 0 starts on ``fresh``; every other row on what its predecessor sent."""
    return torch.where(idx == 0, fresh, state)


def run_resident_stage(apply_fn: Callable, h, repeat, num_pipeline_repeats: int):
    """Row d through its layer of repeat ``repeat[d]``; same shape and dtype out."""
    out = apply_fn(h, repeat if num_pipeline_repeats > 1 else None)
    if not isinstance(out, torch.Tensor) or out.shape != h.shape or out.dtype != h.dtype:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"module output has shape {shape} and dtype {getattr(out, 'dtype', None)}: expected "
            f"the shape {tuple(h.shape)} and dtype {h.dtype} of its input (pipeline stages must "
            f"preserve the shape)")
    return out


def collect_output(h, idx, num_stages: int):
    """Row p-1's result; zeros on the other rows."""
    return torch.where(idx == num_stages - 1, h, torch.zeros_like(h))


def rotate(h, mesh, spec: tuple):
    """Every row moves one row up the ring: one collective-permute, pairs (d, d+1 mod p)."""
    return ring_permute(h, spec[0], True, mesh=mesh, spec=spec)


def write_back(buffer, state, write_hot, write_active, idx):
    """Row 0 stores the micro-batch that came back round the ring in slot ``write_hot``."""
    hot = write_hot.view(1, -1, *([1] * (buffer.dim() - 2))) > 0
    take = hot & (idx.unsqueeze(1) == 0) & (write_active > 0)
    return torch.where(take, state.unsqueeze(1), buffer)


# ---------------------------------------------------------------------------------- the loop
def _check_batch(x, m: int, dsize: int, axes) -> None:
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


def _schedule_inputs(p: int, m: int, r: int, device) -> list[torch.Tensor]:
    """The per-step tables of ``ringpar.pipeline_schedule`` as loop inputs (first dim: step)."""
    t = schedule.step_tables(p, m, r)
    eye = torch.eye(m, dtype=torch.int32)
    cols = [torch.as_tensor(t.repeat), eye[torch.as_tensor(t.read_slot).long()],
            torch.as_tensor(t.read_active), eye[torch.as_tensor(t.write_slot).long()],
            torch.as_tensor(t.write_active)]
    return [c.to(torch.int32).to(device) for c in cols]


def execute_circular_pipeline(module: nn.Module, x: torch.Tensor, *args, num_microbatches: int,
                              model_axis_name: str, mesh, num_pipeline_repeats: int = 1,
                              batch_axis_names: Sequence[str] | None = None, loop: str = "scan",
                              feature_spec: Sequence | None = None, **kwargs) -> torch.Tensor:
    """Run the circular schedule (module docstring) on the batch ``x`` ``[B, ...]``.

    Args:
        module: The stacked layers: a :class:`RepeatedStage` (any r) or a ``StackedStage`` /
            other ``nn.Module`` mapping ``[p, b, ...]`` to ``[p, b, ...]`` (r = 1 only).
        x: Batch ``[B, ...]`` (global view), rows sharded over ``batch_axis_names`` or replicated.
        *args: Extra arguments to every layer call.
        num_microbatches: m (>= 1; >= p when r > 1).
        model_axis_name: The pipeline axis (size p) of ``mesh``.
        mesh: The torch_xla mesh.
        num_pipeline_repeats: r (>= 1).
        batch_axis_names: Mesh axes the batch rows are sharded over (default ``('dp', 'fsdp')``).
        loop: ``"scan"`` (one while loop) or ``"unrolled"`` (every step in the graph).
        feature_spec: Sharding of ``x``'s dims after the batch (default all replicated), kept
            through the loop, e.g. ``("tp", None, None)`` for the GPT's [B, n, S, D/n] stream.
        **kwargs: Extra keyword arguments to every layer call.

    Returns:
        The last layer's output ``[B, ...]`` in the row order of ``x``, rows sharded like ``x``.

    Raises:
        ValueError: bad m / r (r > 1 with m < p names both), a module whose repeats differ from r,
            B not divisible by m times the data size, a missing axis, or a shape-changing layer.
    """
    p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
    r, m = num_pipeline_repeats, num_microbatches
    schedule.check_schedule(p, m, r)
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r}: expected one of {LOOPS}")
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, "num_pipeline_repeats", 1) != r:
        raise ValueError(f"num_pipeline_repeats={r}: the module holds "
                         f"{getattr(module, 'num_pipeline_repeats', 1)} repeats")
    axes, dsize = _batch_axes(mesh, model_axis_name, batch_axis_names)
    _check_batch(x, m, dsize, axes)
    feat, b, bspec = tuple(x.shape[1:]), x.shape[0] // (m * dsize), _batch_spec(axes)
    nf = len(feat)
    fspec = (None,) * nf if feature_spec is None else tuple(feature_spec)
    if len(fspec) != nf:
        raise ValueError(f"feature_spec={feature_spec!r}: expected {nf} entries, one per dim of "
                         f"x after the batch")
    spec = (model_axis_name, bspec, None) + fspec  # state [p, D, b, ...]
    def stage_index():  # [p, 1, ...]; built inside the loop body (scan traces it with fakes)
        return torch.arange(p, device=x.device).view(p, *([1] * (nf + 2)))

    # Micro-batch i of data shard d is rows i*b..(i+1)*b of that shard (the rows JAX's
    # per-device reshape picks); only row 0 (device 0) holds them, so each device builds its own
    # block locally and the input gradient is reduced over the pipeline axis once, after the loop.
    micro = x.reshape(dsize, m, b, *feat).transpose(0, 1).unsqueeze(0)  # [1, m, D, b, ...]
    if r == 1:  # GPipe: the micro-batches, then p-1 zero blocks, are loop inputs [steps, p, ...]
        micro = torch.cat([micro, micro.new_zeros((1, p - 1, dsize, b, *feat))], 1)
    blocks = torch.where(stage_index().unsqueeze(1) == 0, micro, torch.zeros_like(micro))
    blocks = _constrain(blocks, mesh, (model_axis_name, None) + spec[1:])
    state = _constrain(x.new_zeros((p, dsize, b, *feat)), mesh, spec)
    # One seed per step for dropout in the scan (its own rng repeats per step); the unrolled loop
    # draws fresh numbers natively.
    steps = r * m + p - 1
    seeds = (step_seeds(steps, x.device) if loop == "scan"
             else torch.zeros(steps, dtype=torch.int64, device=x.device))
    xs = _schedule_inputs(p, m, r, x.device) + [seeds]
    if r == 1:
        xs.append(_constrain(blocks.transpose(0, 1), mesh, (None,) + spec))
        buffer = []
    else:
        buffer = blocks  # [p, m, D, b, ...]

    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    names = list(named)
    own = getattr(module, "partition_specs", lambda: {})()
    pspecs = {n: (bspec,) + tuple(own.get(n, (None,) * named[n].dim())) for n in names}
    flat_args, args_spec = pytree.tree_flatten((args, kwargs))
    tensor_pos = [i for i, a in enumerate(flat_args) if isinstance(a, torch.Tensor)]

    def body(carry, row):
        st, buf, params, targs = carry
        repeat, read_hot, read_active, write_hot, write_active, seed = row[:6]
        params = [_constrain(t, mesh, pspecs[n]) for n, t in zip(names, params)]
        leaves = list(flat_args)
        for i, t in zip(tensor_pos, targs):
            leaves[i] = t
        a, kw = pytree.tree_unflatten(leaves, args_spec)

        def apply_fn(h, rep):
            extra = {} if rep is None else {"pipeline_repeat": rep}

            def one_shard(pdict, hs):  # hs [p, b, ...]: one data shard of the stacked state
                return torch.func.functional_call(module, pdict, (hs, *a), {**kw, **extra})

            vm = torch.func.vmap(one_shard, in_dims=(0, 1), out_dims=1, randomness="different")
            # the vmapped dim is the data shard: annotations inside see it (torch_impl.vmap_axes)
            with StepRandomness(seed) if loop == "scan" else contextlib.nullcontext(), \
                    vmap_axes.vmapped_axis(bspec):
                return vm(dict(zip(names, params)), h)

        idx = stage_index()
        fresh = row[6] if r == 1 else read_buffer(buf, read_hot, read_active)
        h = inject_microbatch(st, fresh, idx)
        h = _constrain(run_resident_stage(apply_fn, h, repeat, r), mesh, spec)
        out = collect_output(h, idx, p)
        st = rotate(h, mesh, spec)
        if r > 1:  # GPipe never reads a returning micro-batch
            buf = write_back(buf, st, write_hot, write_active, idx)
        return (st, buf, params, targs), out

    init_params = [_constrain(named[n].unsqueeze(0).expand(dsize, *named[n].shape), mesh,
                              pspecs[n]) for n in names]
    init = (state, buffer, init_params, [flat_args[i] for i in tensor_pos])
    if loop == "scan":
        _, outs = xla.scan(body, init, xs)
    else:
        carry, outs = init, []
        for t in range(len(xs[0])):
            carry, out = body(carry, [c[t] for c in xs])
            outs.append(out)
        outs = torch.stack(outs)
    start = schedule.step_tables(p, m, r).output_start
    # outs [steps, p, D, b, ...] is zero except on row p-1: one sum over the stage dim.
    y = outs[start:start + m].sum(dim=1).transpose(0, 1).reshape(x.shape)
    return _constrain(y, mesh, (bspec,) + fspec)


class CircularPipelineModule(nn.Module):
    """``PipelineModule`` with ``num_pipeline_repeats`` (twin of the JAX module).

    ``module_fn()`` builds one layer; it is called ``r*p`` times (layer order), and the layers are
    stacked into a :class:`RepeatedStage` registered as ``RepeatedStage_0``: ``state_dict`` keys
    ``RepeatedStage_0.repeats_k.sharded.<layer path>`` of shape ``[p, ...]``, the JAX paths.

    Args:
        model_axis_name: The pipeline axis of ``mesh``.
        num_microbatches: m.
        module_fn: Function that returns one layer module.
        mesh: The torch_xla mesh.
        num_pipeline_repeats: r (default 1: GPipe).
        batch_axis_names: Mesh axes the batch rows are sharded over.
        loop: ``"scan"`` or ``"unrolled"``.
    """

    def __init__(self, model_axis_name: str, num_microbatches: int,
                 module_fn: Callable[[], nn.Module], *, mesh, num_pipeline_repeats: int = 1,
                 batch_axis_names: Sequence[str] | None = None, loop: str = "scan"):
        super().__init__()
        p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
        schedule.check_schedule(p, num_microbatches, num_pipeline_repeats)
        if loop not in LOOPS:
            raise ValueError(f"loop={loop!r}: expected one of {LOOPS}")
        _batch_axes(mesh, model_axis_name, batch_axis_names)
        self.model_axis_name, self.num_microbatches = model_axis_name, num_microbatches
        self.num_pipeline_repeats, self.mesh = num_pipeline_repeats, mesh
        self.batch_axis_names, self.loop = batch_axis_names, loop
        self.RepeatedStage_0 = RepeatedStage(
            [module_fn() for _ in range(num_pipeline_repeats * p)], mesh=mesh,
            model_axis_name=model_axis_name)

    @property
    def stage(self) -> RepeatedStage:
        """The stacked layers."""
        return self.RepeatedStage_0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Run the pipeline on the batch ``x``; other arguments go to every layer call."""
        return execute_circular_pipeline(
            self.stage, x, *args, num_microbatches=self.num_microbatches,
            model_axis_name=self.model_axis_name, mesh=self.mesh,
            num_pipeline_repeats=self.num_pipeline_repeats,
            batch_axis_names=self.batch_axis_names, loop=self.loop, **kwargs)
