"""GPipe pipeline parallelism on torch_xla SPMD, in the global "stacked" view.

Twin of :mod:`jax_impl.pipeline_parallel` (same names, same schedule, same communication). Where
the JAX code sees one device's value of shape ``S`` inside ``shard_map`` over the pipeline axis
(size p), the torch code sees the global tensor ``[p, *S]`` whose dim 0 is sharded over that axis:
row s is stage s's value. Stage parameters are stacked ``[p, ...]`` on dim 0 (sharded the same
way), and a stage is applied to all rows at once with ``torch.func.vmap(functional_call)`` over
dim 0 (:class:`StackedStage`). Because torch has no bound axis names, every function takes the
mesh as the keyword-only argument ``mesh`` (the convention of :mod:`torch_impl.collectives`).

Schedule (identical to JAX): the batch ``x`` ``[B, ...]`` is split into ``m = num_microbatches``
micro-batches; the loop has ``m + p - 1`` steps; at step t stage s runs micro-batch ``t - s`` (zeros
in the bubble). Stage 0 reads micro-batch t, every other stage reads what its predecessor
produced at step t-1: after each step the stacked state moves one row up the ring with ONE
``collective-permute`` with pairs ``(s, s+1 mod p)`` (backward: one permute with the inverse
pairs). The last stage's results are kept stacked over the loop and selected once at the end.

Batch sharding: the batch may be sharded over the data axes (``batch_axis_names``, default the
mesh axes ``'dp'`` and ``'fsdp'``), as a JAX caller would shard it with ``shard_map``. Micro-batch
i is then the union over data shards of rows ``i*b .. (i+1)*b`` of each shard (``b = B/(D*m)``, D
the product of the data-axis sizes), exactly the rows JAX's per-device split gives, so no
all-gather or all-to-all of the micro-batches is needed. Inside the loop the state is
``[p, D, b, ...]`` (dims 0 and 1 sharded over the pipeline and data axes) and the stacked stage is
applied to each data shard separately (a second ``vmap``, over dim 1), so a stage sees exactly the
``[b, ...]`` rows the JAX stage sees on one device (also for stages that mix rows).

Loop: :func:`execute_pipeline` runs the steps with ``torch_xla.experimental.scan`` (an XLA while
loop), so the compiled program does not grow with the number of micro-batches; it is
:func:`torch_impl.pipeline_circular.execute_circular_pipeline` with one repeat (the schedule as
named steps). torch_xla 2.9's scan alone replays the same random numbers on every step (measured);
the loop gives each step its own seed, so dropout masks are fresh per step, as in JAX
(:mod:`torch_impl.scan_random`). ``loop="unrolled"`` puts every step in the graph. The stage
parameters (and any tensor ``*args``/``**kwargs``) travel in the scan carry, because scan only
differentiates with respect to its carry and inputs; their gradients accumulate over the steps.

Inside ``scan`` the body is traced by AOTAutograd with fake tensors and the in-place
``mark_sharding`` cannot run there: ``_constrain`` uses the traceable
:func:`torch_impl.xla.mark_sharding_with_gradients` (through
:func:`torch_impl.vmap_axes.constrain_with_gradients`, which also lifts torch_xla's rank-5 limit
on shardings), a stage's own annotations see the vmapped data and stage dims
(:mod:`torch_impl.vmap_axes`, declared by the loop), and the ring shift between steps is
:func:`torch_impl.collectives.ring_shift_traceable` (the same cyclic shift as ``ring_permute``,
with traceable constraints that keep the data-parallel dims sharded).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
import torch
from torch import nn

from . import mesh as _mesh
from . import vmap_axes
from .collectives import ring_permute

__all__ = ["execute_pipeline_step", "execute_pipeline", "PipelineModule", "StackedStage"]

DEFAULT_BATCH_AXES = ("dp", "fsdp")


# ------------------------------------------------------------------ traceable sharding / ring
def _constrain(t: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """Sharding constraint on ``t`` and on its gradient; traceable inside ``scan``."""
    spec = tuple(spec)
    if len(spec) != t.dim():
        raise ValueError(f"spec={spec!r} has {len(spec)} entries for a tensor of rank {t.dim()}")
    return vmap_axes.constrain_with_gradients(t, mesh, spec)  # any rank (torch_xla: <= 5)


def _ring_shift_up(t: torch.Tensor, mesh, spec: tuple) -> torch.Tensor:
    """The stage ring: ``collectives.ring_permute`` up, keeping the sharding ``spec``."""
    return ring_permute(t, spec[0], True, mesh=mesh, spec=spec)


# ------------------------------------------------------------------------------ helpers
def _check_num_microbatches(num_microbatches) -> None:
    if (not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool)
            or num_microbatches < 1):
        raise ValueError(f"num_microbatches={num_microbatches!r}: expected an int >= 1")


LOOPS = ("scan", "unrolled")


def _check_loop(loop) -> None:
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r}: expected one of {LOOPS}")


def _batch_axes(mesh, model_axis_name: str, batch_axis_names) -> tuple[tuple[str, ...], int]:
    """The data axes the batch is sharded over (those of ``batch_axis_names`` in the mesh)."""
    names = tuple(mesh.axis_names or ())
    if batch_axis_names is None:
        batch_axis_names = DEFAULT_BATCH_AXES
    if isinstance(batch_axis_names, str):
        batch_axis_names = (batch_axis_names,)
    axes = tuple(a for a in batch_axis_names if a in names)
    if model_axis_name in axes:
        raise ValueError(f"batch_axis_names={tuple(batch_axis_names)!r} contains the pipeline axis "
                         f"{model_axis_name!r}: expected only data axes")
    size = math.prod(_mesh.check_axis(mesh, a, "batch_axis_names") for a in axes)
    return axes, size


def _batch_spec(axes: tuple[str, ...]):
    if not axes:
        return None
    return axes if len(axes) > 1 else axes[0]


def _stage_index(p: int, like: torch.Tensor) -> torch.Tensor:
    """``arange(p)`` shaped ``[p, 1, ...]`` to broadcast over a stacked tensor like ``like``."""
    return torch.arange(p, device=like.device).view(p, *([1] * (like.dim() - 1)))


def _check_stage_output(h, state: torch.Tensor) -> None:
    if not isinstance(h, torch.Tensor) or h.shape != state.shape or h.dtype != state.dtype:
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(
            f"module output has shape {shape} and dtype {getattr(h, 'dtype', None)}: expected the "
            f"shape {tuple(state.shape)} and dtype {state.dtype} of its input (pipeline stages "
            f"must preserve the shape)")


def _step(apply_fn: Callable, state, input, p: int, mesh, spec):  # noqa: A002
    """One schedule step on stacked tensors; ``input`` broadcasts against ``state``."""
    idx = _stage_index(p, state)
    h = torch.where(idx == 0, input, state)
    h = apply_fn(h)
    _check_stage_output(h, state)
    h = _constrain(h, mesh, spec)
    output = torch.where(idx == p - 1, h, torch.zeros_like(h))
    return _ring_shift_up(h, mesh, spec), output


# ------------------------------------------------------------------------------ public API
def execute_pipeline_step(
    module: Callable,
    state: torch.Tensor,
    input: torch.Tensor,  # noqa: A002  (name of the xlstm-jax API)
    *args,
    model_axis_name: str,
    mesh,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single micro-batch pipeline step (stacked view).

    Args:
        module: The stacked stage: maps ``[p, b, ...]`` to ``[p, b, ...]``, row s through stage s
            (e.g. a :class:`StackedStage`).
        state: ``[p, b, ...]``: last communicated features between stages (row s is stage s's
            input for all stages except the first).
        input: The micro-batch for the first stage: ``[b, ...]`` (the same for every row, as
            the replicated per-device input in JAX) or stacked ``[p, b, ...]`` (row 0 is read).
        *args: Additional arguments to the module.
        model_axis_name: Name of the pipeline axis in ``mesh``.
        mesh: The torch_xla mesh.
        **kwargs: Additional keyword arguments to the module.

    Returns:
        ``(new_state, output)``, both ``[p, b, ...]``: the new state after the ring permute (row s
        holds stage s-1's result) and the module's result on the last row, zeros on the others.

    Raises:
        ValueError: if the mesh has no ``model_axis_name``, ``state`` is not ``[p, ...]``,
            ``input`` does not match it, or the module changes the shape.
    """
    p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
    if not isinstance(state, torch.Tensor) or state.dim() < 2 or state.shape[0] != p:
        raise ValueError(f"state.shape={tuple(getattr(state, 'shape', ()))}: expected the stacked "
                         f"view [p, b, ...] with p={p}, the size of axis {model_axis_name!r}")
    if tuple(input.shape) not in (tuple(state.shape), tuple(state.shape[1:])):
        raise ValueError(f"input.shape={tuple(input.shape)}: expected {tuple(state.shape[1:])} or "
                         f"the stacked {tuple(state.shape)} of state")
    spec = (model_axis_name,) + (None,) * (state.dim() - 1)
    return _step(lambda h: module(h, *args, **kwargs), state, input, p, mesh, spec)


def execute_pipeline(
    module: nn.Module,
    x: torch.Tensor,
    *args,
    num_microbatches: int,
    model_axis_name: str,
    mesh,
    batch_axis_names: Sequence[str] | None = None,
    loop: str = "scan",
    feature_spec: Sequence | None = None,
    **kwargs,
) -> torch.Tensor:
    """Execute a pipeline of stages on a batch of data (GPipe, see the module docstring).

    Args:
        module: The stacked stage, an ``nn.Module`` mapping ``[p, b, ...]`` to ``[p, b, ...]``
            (e.g. :class:`StackedStage`). Its parameters and buffers are passed through the loop
            with ``torch.func.functional_call``.
        x: Batch ``[B, ...]`` (global view), rows sharded over ``batch_axis_names`` or replicated.
        *args: Additional arguments to the module (the same on every step).
        num_microbatches: Number of micro-batches m (>= 1).
        model_axis_name: Name of the pipeline axis in ``mesh``.
        mesh: The torch_xla mesh.
        batch_axis_names: Mesh axes the batch rows are sharded over (names absent from the mesh
            are ignored); default ``('dp', 'fsdp')``. ``()`` keeps the batch replicated.
        loop: ``"scan"`` (default): the steps run in one ``torch_xla.experimental.scan`` while
            loop, the program size does not depend on m. Dropout draws a fresh mask per step,
            micro-batch, stage and data shard (a per-step seed, :mod:`torch_impl.scan_random`;
            torch_xla 2.9's scan alone would repeat it); other random ops raise ValueError.
            ``"unrolled"``: a Python loop, every step in the graph (the program grows with m),
            random ops draw fresh numbers per step natively.
        feature_spec: Sharding of ``x``'s dims after the batch, kept through the loop (default
            all replicated; e.g. ``("tp", None, None)`` for a tensor-parallel stream).
        **kwargs: Additional keyword arguments to the module.

    Returns:
        The last stage's output ``[B, ...]`` in the row order of ``x``, rows sharded like ``x``.

    Raises:
        ValueError: if ``num_microbatches`` < 1, ``B`` is not divisible by ``num_microbatches``
            times the data-parallel size, the mesh has no ``model_axis_name``, ``x`` is not on the
            XLA device, or the stage changes the shape of its input.
    """
    _check_num_microbatches(num_microbatches)
    _check_loop(loop)
    _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
    axes, dsize = _batch_axes(mesh, model_axis_name, batch_axis_names)
    _mesh.check_on_device(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected a batch dimension first")
    m = num_microbatches
    batch = x.shape[0]
    if batch % m:
        raise ValueError(f"x.shape[0]={batch}: expected the batch size to be divisible by "
                         f"num_microbatches={m}")
    if batch % (m * dsize):
        raise ValueError(f"x.shape[0]={batch}: expected the batch size to be divisible by "
                         f"num_microbatches={m} times the size {dsize} of the data axes {axes} "
                         f"the batch is sharded over (batch_axis_names)")
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module (the stacked stage), got "
                         f"{type(module).__name__}")
    # The GPipe schedule is the circular one with one repeat: one implementation, written as the
    # schedule's named steps (imported here: torch_impl.pipeline_circular imports this module).
    from .pipeline_circular import execute_circular_pipeline

    return execute_circular_pipeline(module, x, *args, num_microbatches=m,
                                     model_axis_name=model_axis_name, mesh=mesh,
                                     num_pipeline_repeats=1, batch_axis_names=batch_axis_names,
                                     loop=loop, feature_spec=feature_spec, **kwargs)


class StackedStage(nn.Module):
    """p stages with their parameters stacked ``[p, ...]`` on dim 0, applied with ``vmap``.

    The twin of a stage wrapped in ``jax_impl.tensor_parallel.ModelParallelismWrapper`` over the
    pipeline axis: the stage module is the child ``sharded`` and every parameter/buffer has the
    stage's shape with a leading dim p (sharded over the pipeline axis), so ``state_dict`` keys
    are ``sharded.<stage path>``, the JAX paths below the wrapper. ``forward(h)`` maps ``[p, b,
    ...]`` to ``[p, b', ...]`` with row s computed by stage s (``vmap(functional_call)``).

    Args:
        stages: p modules of identical structure (stage s's weights are ``stages[s]``'s).
        mesh: The torch_xla mesh.
        model_axis_name: Name of the pipeline axis (size p) in ``mesh``.
    """

    def __init__(self, stages: Sequence[nn.Module], *, mesh, model_axis_name: str):
        super().__init__()
        p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
        stages = list(stages)
        if len(stages) != p:
            raise ValueError(f"stages has {len(stages)} modules: expected p={p}, the size of axis "
                             f"{model_axis_name!r}")
        self.mesh = mesh
        self.model_axis_name = model_axis_name
        params, buffers = torch.func.stack_module_state(stages)
        self.sharded = stages[0]
        for name, value in params.items():
            owner, leaf = self._owner(name)
            delattr(owner, leaf)
            owner.register_parameter(leaf, nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            owner, leaf = self._owner(name)
            delattr(owner, leaf)
            owner.register_buffer(leaf, value.clone())

    def _owner(self, name: str):
        prefix, _, leaf = name.rpartition(".")
        return (self.sharded.get_submodule(prefix) if prefix else self.sharded), leaf

    def partition_specs(self) -> dict[str, tuple]:
        """Partition spec of every parameter and buffer (by ``named_parameters`` name)."""
        out = {}
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            out[name] = _mesh.stacked_spec(t.dim(), self.model_axis_name)
        return out

    def shard_(self) -> "StackedStage":
        """Move to the XLA device (if needed) and shard dim 0 of every tensor over the axis."""
        self.to(_mesh.xla_device())
        for t in list(self.parameters()) + list(self.buffers()):
            _mesh.mark_stacked(t.data if isinstance(t, nn.Parameter) else t, self.mesh,
                               self.model_axis_name)
        return self

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Apply stage s to row s of ``h`` (``[p, ...]``); extra arguments go to every row."""
        p = _mesh.check_axis(self.mesh, self.model_axis_name, "model_axis_name")
        if h.dim() < 1 or h.shape[0] != p:
            raise ValueError(f"h.shape={tuple(h.shape)}: expected the stacked view [p, ...] with "
                             f"p={p}, the size of axis {self.model_axis_name!r}")
        params = {n: t for n, t in self.sharded.named_parameters()}
        buffers = {n: t for n, t in self.sharded.named_buffers()}
        stage = self.sharded

        def one(pr, bu, hs):
            return torch.func.functional_call(stage, {**pr, **bu}, (hs, *args), kwargs)

        with vmap_axes.vmapped_axis(self.model_axis_name):  # annotations in a stage see dim 0
            return torch.func.vmap(one, in_dims=(0, 0, 0), randomness="different")(params,
                                                                                   buffers, h)


class PipelineModule(nn.Module):
    """Module wrapper for executing a pipeline of stages (twin of the JAX ``PipelineModule``).

    ``module_fn()`` builds one stage (an ordinary per-stage ``nn.Module``); it is called p times
    (p = size of the pipeline axis), so each stage gets its own initialization, and the stages
    are stacked into a :class:`StackedStage` registered as the child ``stage_name``. With the
    default name the ``state_dict`` keys are the JAX parameter paths of a ``PipelineModule`` whose
    ``module_fn`` is ``partial(ModelParallelismWrapper, model_axis_name=..., module_fn=Stage)``:
    ``ModelParallelismWrapper_0.sharded.<stage path>``, each of shape ``[p, ...]``.

    Args:
        model_axis_name: Name of the pipeline axis in ``mesh``.
        num_microbatches: Number of micro-batches to split the batch into.
        module_fn: Function that returns one stage module.
        mesh: The torch_xla mesh.
        batch_axis_names: Mesh axes the batch rows are sharded over (see :func:`execute_pipeline`).
        stage_name: Attribute name of the stacked stage.
        loop: ``"scan"`` or ``"unrolled"`` (see :func:`execute_pipeline`).
    """

    def __init__(self, model_axis_name: str, num_microbatches: int,
                 module_fn: Callable[[], nn.Module], *, mesh,
                 batch_axis_names: Sequence[str] | None = None,
                 stage_name: str = "ModelParallelismWrapper_0", loop: str = "scan"):
        super().__init__()
        _check_num_microbatches(num_microbatches)
        _check_loop(loop)
        p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
        _batch_axes(mesh, model_axis_name, batch_axis_names)
        self.loop = loop
        self.model_axis_name = model_axis_name
        self.num_microbatches = num_microbatches
        self.module_fn = module_fn
        self.mesh = mesh
        self.batch_axis_names = batch_axis_names
        self.stage_name = stage_name
        self.add_module(stage_name, StackedStage([module_fn() for _ in range(p)], mesh=mesh,
                                                 model_axis_name=model_axis_name))

    @property
    def stage(self) -> StackedStage:
        """The stacked stage."""
        return getattr(self, self.stage_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Run the pipeline on the batch ``x``; other arguments go to every stage call."""
        return execute_pipeline(self.stage, x, *args, num_microbatches=self.num_microbatches,
                                model_axis_name=self.model_axis_name, mesh=self.mesh,
                                batch_axis_names=self.batch_axis_names, loop=self.loop, **kwargs)

