"""Circular (interleaved) pipeline parallelism on torch_xla SPMD, written as named steps.

Twin of :mod:`jax_impl.pipeline_circular` (same schedule from :mod:`ringpar.pipeline_schedule`,
same steps, same communication) in the stacked global view of
:mod:`torch_impl.pipeline_parallel`: a per-device value of the JAX code is row d of a tensor
``[p, ...]`` whose dim 0 is sharded over the pipeline axis.

With ``num_pipeline_repeats`` r device d holds layers ``d, d+p, ..., d+(r-1)p`` (round-robin):
:class:`RepeatedStage` keeps r stacked stages ``repeats_k`` (each a
:class:`torch_impl.tensor_parallel.ModelParallelismWrapper` over the pipeline axis, ``[p, ...]``;
row d of repeat k is layer ``k*p + d``). The loop has ``r*m + p - 1`` steps, each::

    fresh  = read_buffer(...)         # slot t % m of row 0's buffer (zeros in the bubble)
    h      = inject_microbatch(...)   # row 0 starts on fresh, the others on their state
    h      = run_resident_stage(...)  # row d: the layer of its current repeat
    out    = collect_output(...)      # row p-1's result, zeros elsewhere
    state  = rotate(...)              # ONE collective-permute, pairs (d, d+1 mod p)
    buffer = write_back(...)          # row 0 parks the returning micro-batch

With r = 1 (GPipe) no micro-batch returns: the micro-batches are loop inputs, no buffer. After
the loop, ``assemble_output`` turns the last stage's results into the batch ``[B, ...]``.

The buffer is ``[p, m, D, b, ...]`` (a per-device buffer, as in JAX; only row 0 is used); its
slot is picked with a mask ``arange(m) == slot`` (elementwise, so no communication). The stacked
view, the batch axes and the loop carry are :mod:`torch_impl.pipeline_loop`'s. Dropout: in the
scan loop each step runs under :class:`torch_impl.scan_random.StepRandomness` with its own seed,
so masks differ per step, micro-batch, stage and data shard (torch_xla's scan alone would repeat
them; other random ops raise ValueError there); the unrolled loop draws fresh numbers natively.

Example::

    model = CircularPipelineModule("pp", 4, Stage, mesh=mesh, num_pipeline_repeats=2)
    model.stage.shard_()  # after loading weights, if any
    y = model(x)          # [B, ...], x's rows sharded over the data axes
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ringpar import pipeline_schedule as schedule

from . import mesh as _mesh
from . import pipeline_loop as _loop
from .collectives import ring_permute
from .tensor_parallel import ModelParallelismWrapper

__all__ = ["RepeatedStage", "read_buffer", "inject_microbatch", "run_resident_stage",
           "collect_output", "rotate", "write_back", "assemble_output",
           "execute_circular_pipeline", "CircularPipelineModule"]


def _rows(like: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[p]`` shaped ``[p, 1, ...]`` to broadcast over ``like``."""
    return values.view(values.shape[0], *([1] * (like.dim() - 1)))


class RepeatedStage(nn.Module):
    """The r layers of every device: child ``repeats_k`` (built by ``module_fn()``) is repeat k.

    ``module_fn()`` returns one layer over all devices of the pipeline axis, e.g. a
    :class:`ModelParallelismWrapper` of p layers (``[p, ...]`` parameters, row d = device d), as
    JAX's ``module_fn`` returns a wrapped stage. ``forward(h, *args, pipeline_repeat=None,
    **kwargs)``: row d of ``h`` ``[p, ...]`` goes through row d of repeat ``pipeline_repeat[d]``;
    the weights of that repeat are selected per row (elementwise, no communication) and applied
    once.

    Args:
        module_fn: Function that returns one layer module (called r times, in layer order).
        num_pipeline_repeats: r (>= 1).

    Example::

        stage = RepeatedStage(lambda: ModelParallelismWrapper.from_modules(
            [Layer() for _ in range(p)], "pp", mesh=mesh), num_pipeline_repeats=2)
    """

    def __init__(self, module_fn: Callable[[], nn.Module], num_pipeline_repeats: int):
        super().__init__()
        schedule.check_schedule(1, 1, num_pipeline_repeats)
        self.num_pipeline_repeats = num_pipeline_repeats
        for k in range(num_pipeline_repeats):
            self.add_module(f"repeats_{k}", module_fn())

    def repeat(self, k: int) -> nn.Module:
        """The layer of repeat ``k``."""
        return getattr(self, f"repeats_{k}")

    def partition_specs(self) -> dict[str, tuple]:
        """Partition spec of every stacked tensor (by ``named_parameters`` name)."""
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
def _slot_mask(buffer: torch.Tensor, slot) -> torch.Tensor:
    """``[1, m, 1, ...]``: True at buffer slot ``slot`` (picked elementwise: no gather)."""
    m = buffer.shape[1]
    hot = torch.arange(m, device=buffer.device) == slot
    return hot.view(1, m, *([1] * (buffer.dim() - 2)))


def read_buffer(buffer, read_slot, read_active):
    """Each row's micro-batch in buffer slot ``read_slot`` (zeros when not ``read_active``)."""
    hot = _slot_mask(buffer, read_slot)
    fresh = torch.where(hot, buffer, torch.zeros_like(buffer)).sum(dim=1)
    return torch.where(read_active > 0, fresh, torch.zeros_like(fresh))


def inject_microbatch(state, fresh, stage_index):
    """Row 0 starts on ``fresh``; every other row on what its predecessor sent."""
    return torch.where(stage_index == 0, fresh, state)


def run_resident_stage(module: Callable, h, repeat, num_pipeline_repeats: int, *args, **kwargs):
    """Row d through its layer of repeat ``repeat[d]``; same shape and dtype out."""
    if num_pipeline_repeats == 1:
        out = module(h, *args, **kwargs)
    else:
        out = module(h, *args, pipeline_repeat=repeat, **kwargs)
    if not isinstance(out, torch.Tensor) or out.shape != h.shape or out.dtype != h.dtype:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"module output has shape {shape} and dtype {getattr(out, 'dtype', None)}: expected "
            f"the shape {tuple(h.shape)} and dtype {h.dtype} of its input (pipeline stages must "
            f"preserve the shape)")
    return out


def collect_output(h, stage_index, num_stages: int):
    """Row p-1's result; zeros on the other rows."""
    return torch.where(stage_index == num_stages - 1, h, torch.zeros_like(h))


def rotate(h, model_axis_name: str, *, mesh, spec: Sequence | None = None):
    """Every row moves one row up the ring: one collective-permute, pairs (d, d+1 mod p).

    ``spec``: the sharding of ``h`` kept by the result (default: dim 0 over ``model_axis_name``,
    the rest replicated; the loop keeps its data dims sharded).
    """
    spec = (model_axis_name,) + (None,) * (h.dim() - 1) if spec is None else tuple(spec)
    return ring_permute(h, model_axis_name, True, mesh=mesh, spec=spec)


def write_back(buffer, state, write_slot, write_active, stage_index):
    """Row 0 stores the micro-batch that came back round the ring in slot ``write_slot``."""
    take = _slot_mask(buffer, write_slot) & (stage_index.unsqueeze(1) == 0) & (write_active > 0)
    return torch.where(take, state.unsqueeze(1), buffer)


def assemble_output(outs, output_start: int, num_microbatches: int, shape):
    """The batch ``[B, ...]`` from the steps' ``collect_output`` results ``outs`` (first dim: step).

    Steps ``output_start .. output_start + m - 1`` hold micro-batches ``0 .. m-1`` (on both
    backends). Here each is ``[p, D, b, ...]``, zero except row p-1: the sum over the stage dim
    reads the last stage (one all-reduce over the pipeline axis, where a JAX caller psums the last
    device's value), and the data shards go back to the row order of ``x``.
    """
    y = outs[output_start:output_start + num_microbatches].sum(dim=1)
    return y.transpose(0, 1).reshape(shape)


# ---------------------------------------------------------------------------------- the loop
def execute_circular_pipeline(module: nn.Module, x: torch.Tensor, *args, num_microbatches: int,
                              model_axis_name: str, mesh, num_pipeline_repeats: int = 1,
                              batch_axis_names=None, loop: str = "scan",
                              feature_spec: Sequence | None = None, **kwargs) -> torch.Tensor:
    """Run the circular schedule (module docstring) on the batch ``x`` ``[B, ...]``.

    Args:
        module: The stacked layers: a :class:`RepeatedStage` (any r) or a
            ``ModelParallelismWrapper`` / other ``nn.Module`` mapping ``[p, b, ...]`` to
            ``[p, b, ...]`` (r = 1 only).
        x: Batch ``[B, ...]`` (global view), rows sharded over ``batch_axis_names`` or replicated.
        *args: Extra arguments to every layer call.
        num_microbatches: m (>= 1; >= p when r > 1).
        model_axis_name: The pipeline axis (size p) of ``mesh``.
        mesh: The torch_xla mesh.
        num_pipeline_repeats: r (>= 1).
        batch_axis_names: Mesh axes the batch rows are sharded over, or a ``ParallelConfig``
            (its data and FSDP axes); default those of a default ``ParallelConfig``.
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
    lay = _loop.plan(module, x, num_microbatches, model_axis_name, mesh, num_pipeline_repeats,
                     batch_axis_names, loop, feature_spec)
    calls = _loop.StageCall(module, lay, args, kwargs)
    xs, buffer = lay.loop_inputs(x)
    init = (lay.zero_state(x), buffer, *calls.initial())
    key = (_loop.layout_key(lay, module), calls.key(), str(x.device), _loop.grad_key(init, xs))
    step = _loop.cached_body(module, key, lambda: _schedule_step(lay, calls, x.device))
    outs = _loop.run_loop(step, init, xs, loop)
    y = assemble_output(outs, schedule.step_tables(lay.p, lay.m, lay.r).output_start, lay.m,
                        x.shape)
    return _loop.constrain(y, mesh, (lay.bspec,) + lay.fspec)


def _schedule_step(lay, calls, device) -> Callable:
    """One step of the schedule (docs/design.md, "The pipeline schedule") as the loop body
    ``step(carry, row) -> (carry, out)``; it closes over no tensor (``pipeline_loop.cached_body``)."""
    p, r, spec, mesh = lay.p, lay.r, lay.spec, lay.mesh

    def step(carry, row):
        state, buffer, tensors, targs = carry
        repeat, read_slot, read_active, write_slot, write_active, seed = row[:6]
        stage, tensors, a, kw = calls.bind(tensors, targs, seed)
        stage_index = lay.stage_index(device)
        fresh = row[6] if r == 1 else read_buffer(buffer, read_slot, read_active)
        h = inject_microbatch(state, fresh, stage_index)
        h = _loop.constrain(run_resident_stage(stage, h, repeat, r, *a, **kw), mesh, spec)
        out = collect_output(h, stage_index, p)
        state = rotate(h, lay.axis, mesh=mesh, spec=spec)
        if r > 1:  # GPipe never reads a returning micro-batch
            buffer = write_back(buffer, state, write_slot, write_active, stage_index)
        return (state, buffer, tensors, targs), out

    return step


class CircularPipelineModule(nn.Module):
    """``PipelineModule`` with ``num_pipeline_repeats`` (twin of the JAX module).

    ``module_fn()`` builds one layer; it is called ``r*p`` times (layer order), and the layers are
    stacked into a :class:`RepeatedStage` registered as ``RepeatedStage_0`` whose repeats are
    :class:`ModelParallelismWrapper` s of p layers: ``state_dict`` keys
    ``RepeatedStage_0.repeats_k.sharded.<layer path>`` of shape ``[p, ...]``, the JAX paths.

    Args:
        model_axis_name: The pipeline axis of ``mesh``.
        num_microbatches: m.
        module_fn: Function that returns one layer module.
        mesh: The torch_xla mesh.
        num_pipeline_repeats: r (default 1: GPipe).
        batch_axis_names: Mesh axes the batch rows are sharded over (or a ``ParallelConfig``).
        loop: ``"scan"`` or ``"unrolled"``.
    """

    def __init__(self, model_axis_name: str, num_microbatches: int,
                 module_fn: Callable[[], nn.Module], *, mesh, num_pipeline_repeats: int = 1,
                 batch_axis_names=None, loop: str = "scan"):
        super().__init__()
        p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
        schedule.check_schedule(p, num_microbatches, num_pipeline_repeats)
        _loop.check_loop(loop)
        _loop.batch_axes(mesh, model_axis_name, batch_axis_names)
        self.model_axis_name, self.num_microbatches = model_axis_name, num_microbatches
        self.num_pipeline_repeats, self.mesh = num_pipeline_repeats, mesh
        self.batch_axis_names, self.loop = batch_axis_names, loop
        self.RepeatedStage_0 = RepeatedStage(
            lambda: ModelParallelismWrapper.from_modules([module_fn() for _ in range(p)],
                                                         model_axis_name, mesh=mesh),
            num_pipeline_repeats)

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
