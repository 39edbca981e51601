"""GPipe pipeline parallelism (API of xlstm-jax ``distributed.pipeline_parallel``; twin of
:mod:`torch_impl.pipeline_parallel`).

All functions are per-device code: call them inside ``jax.shard_map`` over a mesh that has the
axis ``model_axis_name`` (the pipeline axis, size p). Device s of that axis holds stage s: the
stage module's parameters differ per device (e.g. wrap the stage in
:class:`jax_impl.tensor_parallel.ModelParallelismWrapper` over the pipeline axis).

Schedule (the same in ``torch_impl.pipeline_parallel``): the per-device batch ``x`` of shape
``[B, ...]`` is split into ``m = num_microbatches`` micro-batches of ``B/m`` rows (rows
``i*B/m .. (i+1)*B/m`` form micro-batch i). The loop has ``m + p - 1`` steps; at step t stage s
runs micro-batch ``t - s`` (a zero micro-batch when ``t - s`` is outside ``[0, m)``: the bubble).
Stage 0 reads micro-batch t from the input, every other stage reads the state its predecessor
sent at step t-1. After each step the state moves one stage up the ring with one cyclic
``ppermute`` (pairs ``(s, s+1 mod p)``), so a program has exactly one forward permute per step
(one in the body of the scan loop) and one backward permute (its transpose, pairs
``(s+1 mod p, s)``). The output is the last stage's result, ``[B, ...]`` in input row order, on
the last device of the axis, and zeros on the other devices.

The loop is an ``nn.scan``: parameters are broadcast (the same on every step), ``dropout`` rngs
are split per step, extra ``*args`` / ``**kwargs`` are passed unchanged to the stage on every
step. The compiled program therefore does not grow with the number of micro-batches.
``execute_pipeline`` runs :func:`jax_impl.pipeline_circular.execute_circular_pipeline` with one
repeat (the schedule written as named steps; its ``num_pipeline_repeats`` gives the circular one).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax

from .collectives import axis_index
from .mesh import bound_axis_size
from .pipeline_circular import (collect_output, execute_circular_pipeline, inject_microbatch,
                                rotate, run_resident_stage)

__all__ = ["execute_pipeline_step", "execute_pipeline", "PipelineModule"]


def _check_num_microbatches(num_microbatches) -> None:
    if (not isinstance(num_microbatches, int) or isinstance(num_microbatches, bool)
            or num_microbatches < 1):
        raise ValueError(f"num_microbatches={num_microbatches!r}: expected an int >= 1")


def execute_pipeline_step(
    module: nn.Module,
    state: jax.Array,
    input: jax.Array,  # noqa: A002  (name of the xlstm-jax API)
    *args,
    model_axis_name: str,
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
    """Single micro-batch pipeline step.

    Args:
        module: Flax module representing the stage to execute (this device's stage).
        state: Last communicated features between stages. Used as input to the module for all
            stages except the first.
        input: Original micro-batch input to the pipeline stage. Used as input to the module for
            the first stage. Same shape and dtype as ``state``.
        *args: Additional arguments to the module.
        model_axis_name: Name of the model (pipeline) axis in the mesh/shard_map.
        **kwargs: Additional keyword arguments to the module.

    Returns:
        Tuple of the new state (after communication: this device now holds its predecessor's
        result) and the output of the module (the module's result on the last stage, zeros on
        the other stages).

    Raises:
        ValueError: if ``model_axis_name`` is not bound, or the module's output shape or dtype
            differs from its input's (a stage must map ``[b, ...]`` to the same shape).
    """
    num_stages = bound_axis_size(model_axis_name, "model_axis_name")
    stage_index = axis_index(model_axis_name)
    if state.shape != input.shape or state.dtype != input.dtype:
        raise ValueError(f"input has shape {input.shape} and dtype {input.dtype}: expected the "
                         f"shape {state.shape} and dtype {state.dtype} of state")
    # The named steps of the schedule (jax_impl.pipeline_circular), one step, one repeat.
    h = inject_microbatch(state, input, stage_index)
    h = run_resident_stage(module, h, 0, 1, *args, **kwargs)
    return rotate(h, model_axis_name), collect_output(h, stage_index, num_stages)


@jax.named_scope("pipeline")
def execute_pipeline(
    module: nn.Module,
    x: jax.Array,
    *args,
    num_microbatches: int,
    model_axis_name: str,
    **kwargs,
) -> jax.Array:
    """Execute a pipeline of stages on a batch of data (GPipe schedule, see module docstring).

    Args:
        module: Flax module representing the pipeline stage to execute.
        x: Batch of input data ``[B, ...]``, only needed on the device of the first stage. It is
            split into ``num_microbatches`` micro-batches along the first dimension.
        *args: Additional arguments to the module (the same on every step).
        num_microbatches: Number of micro-batches to split the batch into (>= 1).
        model_axis_name: Name of the model (pipeline) axis in the mesh/shard_map.
        **kwargs: Additional keyword arguments to the module.

    Returns:
        Output of the last stage of the pipeline, ``[B, ...]``. For devices that are not the last
        stage, the output is zeros.

    Raises:
        ValueError: if ``num_microbatches`` < 1, ``B`` is not divisible by it, the axis is not
            bound, or the stage changes the shape of its input.
    """
    _check_num_microbatches(num_microbatches)
    bound_axis_size(model_axis_name, "model_axis_name")  # ValueError if the axis is not bound
    if x.ndim < 1:
        raise ValueError(f"x has shape {x.shape}: expected a batch dimension first")
    batch_size = x.shape[0]
    if batch_size % num_microbatches:
        raise ValueError(f"x.shape[0]={batch_size}: expected the batch size to be divisible by "
                         f"num_microbatches={num_microbatches}")
    # The GPipe schedule is the circular one with one repeat: one implementation, written as the
    # schedule's named steps (jax_impl.pipeline_circular).
    return execute_circular_pipeline(module, x, *args, num_microbatches=num_microbatches,
                                     model_axis_name=model_axis_name, num_pipeline_repeats=1,
                                     **kwargs)


class PipelineModule(nn.Module):
    """Module wrapper for executing a pipeline of stages.

    This module is used to wrap a stage of a pipeline to execute in pipeline parallelism:
    ``PipelineModule(...)(x, *args, **kwargs)`` is ``execute_pipeline(module_fn(), x, *args,
    num_microbatches=..., model_axis_name=..., **kwargs)``.

    Attributes:
        model_axis_name: Name of the model (pipeline) axis in the mesh/shard_map.
        num_microbatches: Number of micro-batches to split the batch into.
        module_fn: Function that returns the module to execute in the pipeline.
    """

    model_axis_name: str
    num_microbatches: int
    module_fn: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, *args, **kwargs):
        """Run the pipeline on ``args[0]`` (the batch); other arguments go to every stage call."""
        _check_num_microbatches(self.num_microbatches)
        if not args:
            raise ValueError("PipelineModule: expected the batch x as first positional argument")
        module = self.module_fn()
        return execute_pipeline(module, *args, num_microbatches=self.num_microbatches,
                                model_axis_name=self.model_axis_name, **kwargs)

