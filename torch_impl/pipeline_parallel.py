"""GPipe pipeline parallelism on torch_xla SPMD, in the global "stacked" view.

Twin of :mod:`jax_impl.pipeline_parallel` (same names, same schedule, same communication). Where
the JAX code sees one device's value of shape ``S`` inside ``shard_map`` over the pipeline axis
(size p), the torch code sees the global tensor ``[p, *S]`` whose dim 0 is sharded over that axis:
row s is stage s's value. Stage parameters are stacked ``[p, ...]`` on dim 0 (sharded the same
way), and a stage is applied to all rows at once with ``torch.func.vmap(functional_call)`` over
dim 0: the stage is a :class:`torch_impl.tensor_parallel.ModelParallelismWrapper` over the
pipeline axis (:meth:`~torch_impl.tensor_parallel.ModelParallelismWrapper.from_modules`), as JAX
wraps its stage. Because torch has no bound axis names, every function takes the
mesh as the keyword-only argument ``mesh`` (the convention of :mod:`torch_impl.collectives`).

Schedule (identical to JAX): the batch ``x`` ``[B, ...]`` is split into ``m = num_microbatches``
micro-batches; the loop has ``m + p - 1`` steps; at step t stage s runs micro-batch ``t - s`` (zeros
in the bubble). Stage 0 reads micro-batch t, every other stage reads what its predecessor
produced at step t-1: after each step the stacked state moves one row up the ring with ONE
``collective-permute`` with pairs ``(s, s+1 mod p)`` (backward: one permute with the inverse
pairs). The last stage's results are kept stacked over the loop and selected once at the end.

Batch sharding: the batch may be sharded over the data axes (``batch_axis_names``, default the
data and FSDP axis names of ``ParallelConfig``, ``'dp'`` and ``'fsdp'``; a ``ParallelConfig``
gives its own), as a JAX caller would shard it with ``shard_map``. Micro-batch
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
``mark_sharding`` cannot run there: :func:`torch_impl.pipeline_loop.constrain` uses the traceable
:func:`torch_impl.xla.mark_sharding_with_gradients` (through
:func:`torch_impl.vmap_axes.constrain_with_gradients`, which also lifts torch_xla's rank-5 limit
on shardings), a stage's own annotations see the vmapped data and stage dims
(:mod:`torch_impl.vmap_axes`, declared by the loop), and the ring shift between steps is
:func:`torch_impl.collectives.ring_permute` with a ``spec`` that keeps the data-parallel dims
sharded.

Example::

    model = PipelineModule("pp", 4, Stage, mesh=mesh)   # Stage(): one stage, [b, F] -> [b, F]
    model.stage.shard_()                                # after loading weights, if any
    y = model(x)                                        # x [B, F], rows sharded over dp/fsdp

"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import mesh as _mesh
from . import pipeline_loop as _loop
from .pipeline_circular import (collect_output, execute_circular_pipeline, inject_microbatch,
                                rotate, run_resident_stage)
from .tensor_parallel import ModelParallelismWrapper

__all__ = ["execute_pipeline_step", "execute_pipeline", "PipelineModule"]


def _check_num_microbatches(num_microbatches) -> None:
    if (not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool)
            or num_microbatches < 1):
        raise ValueError(f"num_microbatches={num_microbatches!r}: expected an int >= 1")


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
            (e.g. a ``ModelParallelismWrapper`` over the pipeline axis).
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
    stage_index = torch.arange(p, device=state.device).view(p, *([1] * (state.dim() - 1)))
    # The named steps of the schedule (torch_impl.pipeline_circular), one step, one repeat.
    h = inject_microbatch(state, input, stage_index)
    h = _loop.constrain(run_resident_stage(module, h, 0, 1, *args, **kwargs), mesh, spec)
    return rotate(h, model_axis_name, mesh=mesh, spec=spec), collect_output(h, stage_index, p)


def execute_pipeline(
    module: nn.Module,
    x: torch.Tensor,
    *args,
    num_microbatches: int,
    model_axis_name: str,
    mesh,
    batch_axis_names=None,
    loop: str = "scan",
    feature_spec: Sequence | None = None,
    **kwargs,
) -> torch.Tensor:
    """Execute a pipeline of stages on a batch of data (GPipe, see the module docstring).

    Args:
        module: The stacked stage, an ``nn.Module`` mapping ``[p, b, ...]`` to ``[p, b, ...]``
            (e.g. a ``ModelParallelismWrapper`` over the pipeline axis). Its parameters and
            buffers are passed through the loop with ``torch.func.functional_call``.
        x: Batch ``[B, ...]`` (global view), rows sharded over ``batch_axis_names`` or replicated.
        *args: Additional arguments to the module (the same on every step).
        num_microbatches: Number of micro-batches m (>= 1).
        model_axis_name: Name of the pipeline axis in ``mesh``.
        mesh: The torch_xla mesh.
        batch_axis_names: Mesh axes the batch rows are sharded over (names absent from the mesh
            are ignored), or a ``ParallelConfig`` (its data and FSDP axes); default the data and
            FSDP axes of a default ``ParallelConfig``, ``('dp', 'fsdp')``. ``()`` keeps the batch
            replicated.
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
    _loop.check_loop(loop)
    _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
    axes, dsize = _loop.batch_axes(mesh, model_axis_name, batch_axis_names)
    _loop.check_batch(x, num_microbatches, dsize, axes)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected a torch.nn.Module (the stacked stage), got "
                         f"{type(module).__name__}")
    # The GPipe schedule is the circular one with one repeat: one implementation, written as the
    # schedule's named steps.
    return execute_circular_pipeline(module, x, *args, num_microbatches=num_microbatches,
                                     model_axis_name=model_axis_name, mesh=mesh,
                                     num_pipeline_repeats=1, batch_axis_names=batch_axis_names,
                                     loop=loop, feature_spec=feature_spec, **kwargs)


class PipelineModule(nn.Module):
    """Module wrapper for executing a pipeline of stages (twin of the JAX ``PipelineModule``).

    ``module_fn()`` builds one stage (an ordinary per-stage ``nn.Module``); it is called p times
    (p = size of the pipeline axis), so each stage gets its own initialization, and the stages
    are stacked into a :class:`~torch_impl.tensor_parallel.ModelParallelismWrapper` over the
    pipeline axis registered as the child ``stage_name``. With the default name the
    ``state_dict`` keys are the JAX parameter paths of a ``PipelineModule`` whose ``module_fn`` is
    ``partial(ModelParallelismWrapper, model_axis_name=..., module_fn=Stage)``:
    ``ModelParallelismWrapper_0.sharded.<stage path>``, each of shape ``[p, ...]``.

    Args:
        model_axis_name: Name of the pipeline axis in ``mesh``.
        num_microbatches: Number of micro-batches to split the batch into.
        module_fn: Function that returns one stage module.
        mesh: The torch_xla mesh.
        batch_axis_names: Mesh axes the batch rows are sharded over, or a ``ParallelConfig`` (see
            :func:`execute_pipeline`).
        stage_name: Attribute name of the stacked stage.
        loop: ``"scan"`` or ``"unrolled"`` (see :func:`execute_pipeline`).
    """

    def __init__(self, model_axis_name: str, num_microbatches: int,
                 module_fn: Callable[[], nn.Module], *, mesh, batch_axis_names=None,
                 stage_name: str = "ModelParallelismWrapper_0", loop: str = "scan"):
        super().__init__()
        _check_num_microbatches(num_microbatches)
        _loop.check_loop(loop)
        p = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
        _loop.batch_axes(mesh, model_axis_name, batch_axis_names)
        self.loop = loop
        self.model_axis_name = model_axis_name
        self.num_microbatches = num_microbatches
        self.module_fn = module_fn
        self.mesh = mesh
        self.batch_axis_names = batch_axis_names
        self.stage_name = stage_name
        self.add_module(stage_name, ModelParallelismWrapper.from_modules(
            [module_fn() for _ in range(p)], model_axis_name, mesh=mesh))

    @property
    def stage(self) -> ModelParallelismWrapper:
        """The stacked stage."""
        return getattr(self, self.stage_name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Run the pipeline on the batch ``x``; other arguments go to every stage call."""
        return execute_pipeline(self.stage, x, *args, num_microbatches=self.num_microbatches,
                                model_axis_name=self.model_axis_name, mesh=self.mesh,
                                batch_axis_names=self.batch_axis_names, loop=self.loop, **kwargs)
