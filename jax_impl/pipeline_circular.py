"""Circular (interleaved) pipeline parallelism, written as the schedule's named steps.

Per-device code: call inside ``jax.shard_map`` over a mesh with the pipeline axis
``model_axis_name`` (size p). Twin of :mod:`torch_impl.pipeline_circular`; the schedule itself
(which micro-batch and repeat each device runs at each step) is data from
:mod:`ringpar.pipeline_schedule`, read by both backends.

With ``num_pipeline_repeats`` r the model has ``r*p`` layers and device d holds layers
``d, d+p, ..., d+(r-1)p`` (round-robin); a micro-batch goes round the ring r times. The loop has
``r*m + p - 1`` steps (GPipe, r = 1: ``m + p - 1``), so the idle fraction falls from
``(p-1)/(m+p-1)`` to ``(p-1)/(r*m+p-1)``. Each step is, in order (docs/design.md has the
diagram)::

    fresh  = read_buffer(...)         # slot t % m of device 0's buffer (zeros in the bubble)
    h      = inject_microbatch(...)   # device 0 starts on fresh, the others on their state
    h      = run_resident_stage(...)  # the layer of this device's current repeat
    out    = collect_output(...)      # the last device's result, zeros elsewhere
    state  = rotate(...)              # ONE ppermute up the ring, pairs (d, d+1 mod p)
    buffer = write_back(...)          # device 0 parks the returning micro-batch

With r = 1 (GPipe) no micro-batch returns: the micro-batches are loop inputs and there is no
buffer. After the loop, ``assemble_output`` turns the last stage's results into ``[B, ...]``.

The loop is an ``nn.scan`` (parameters broadcast, ``dropout`` rngs split per step), so the
program does not grow with m or r: one forward permute in the loop body, one backward permute
(pairs ``(d+1 mod p, d)``) in the transposed loop.

Example (inside ``shard_map`` over a mesh with axis ``'pp'`` of size p, r = 2)::

    model = CircularPipelineModule(model_axis_name="pp", num_microbatches=4,
                                   num_pipeline_repeats=2, module_fn=make_wrapped_stage)
    y = model.apply(variables, x)   # [B, ...]; the last stage's device holds it, zeros elsewhere
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from ringpar import pipeline_schedule as schedule

from .collectives import axis_index, ring_permute
from .mesh import bound_axis_size

__all__ = ["RepeatedStage", "read_buffer", "inject_microbatch", "run_resident_stage",
           "collect_output", "rotate", "write_back", "assemble_output",
           "execute_circular_pipeline", "CircularPipelineModule"]


class RepeatedStage(nn.Module):
    """The r layers one device holds: child ``repeats_k`` is repeat k (layer ``k*p + d``).

    ``module_fn()`` builds one layer (e.g. a stage wrapped in ``ModelParallelismWrapper`` over the
    pipeline axis, so the global parameters are ``repeats_k/sharded/...`` of shape ``[p, ...]``).
    ``__call__(h, *args, pipeline_repeat, **kwargs)`` runs only repeat ``pipeline_repeat`` (a
    ``lax.switch``; at init every repeat runs once so that each gets its parameters).

    Attributes:
        module_fn: Function that returns one layer module.
        num_pipeline_repeats: r (>= 1).
    """

    module_fn: Callable[..., nn.Module]
    num_pipeline_repeats: int

    def setup(self):
        schedule.check_schedule(1, 1, self.num_pipeline_repeats)
        self.repeats = [self.module_fn() for _ in range(self.num_pipeline_repeats)]

    def __call__(self, h, *args, pipeline_repeat=0, **kwargs):
        """Run repeat ``pipeline_repeat`` (an int32 scalar, may be traced) on ``h``."""
        def branch(k, mdl, h, *a):
            return mdl.repeats[k](h, *a, **kwargs)

        branches = [functools.partial(branch, k) for k in range(self.num_pipeline_repeats)]
        if self.num_pipeline_repeats == 1:
            return branches[0](self, h, *args)
        if self.is_initializing():
            # Every repeat gets parameters; no switch here, because parameters created inside a
            # switch would depend on the (traced) index, which nn.scan's broadcast forbids.
            outs = [b(self, h, *args) for b in branches]
            return jnp.stack(outs)[pipeline_repeat]
        return nn.switch(pipeline_repeat, branches, self, h, *args)


# ------------------------------------------------------------------------- the named steps
def read_buffer(buffer, read_slot, read_active):
    """The micro-batch in buffer slot ``read_slot`` (zeros when not ``read_active``: the bubble)."""
    fresh = jax.lax.dynamic_index_in_dim(buffer, read_slot, axis=0, keepdims=False)
    return jnp.where(read_active > 0, fresh, jnp.zeros_like(fresh))


def inject_microbatch(state, fresh, stage_index):
    """Device 0 starts on ``fresh``; every other device on what its predecessor sent."""
    return jnp.where(stage_index == 0, fresh, state)


def run_resident_stage(module, h, repeat, num_pipeline_repeats: int, *args, **kwargs):
    """Apply this device's layer of repeat ``repeat`` to ``h`` (same shape and dtype out)."""
    if num_pipeline_repeats == 1:
        out = module(h, *args, **kwargs)
    else:
        out = module(h, *args, pipeline_repeat=repeat, **kwargs)
    if not hasattr(out, "shape") or out.shape != h.shape or out.dtype != h.dtype:
        raise ValueError(
            f"module output has shape {getattr(out, 'shape', type(out).__name__)} and dtype "
            f"{getattr(out, 'dtype', None)}: expected the shape {h.shape} and dtype {h.dtype} of "
            f"its input (pipeline stages must preserve the shape)")
    return out


def collect_output(h, stage_index, num_stages: int):
    """The last device's result; zeros on the other devices."""
    return jnp.where(stage_index == num_stages - 1, h, jnp.zeros_like(h))


def rotate(h, model_axis_name: str):
    """Send every device's result one device up the ring (one ppermute, pairs (d, d+1 mod p))."""
    return ring_permute(h, model_axis_name, shift_up=True)


def write_back(buffer, state, write_slot, write_active, stage_index):
    """Device 0 stores the micro-batch that came back round the ring in slot ``write_slot``."""
    old = jax.lax.dynamic_index_in_dim(buffer, write_slot, axis=0, keepdims=False)
    new = jnp.where((stage_index == 0) & (write_active > 0), state, old)
    return jax.lax.dynamic_update_index_in_dim(buffer, new, write_slot, axis=0)


def assemble_output(outs, output_start: int, num_microbatches: int, shape):
    """The batch ``[B, ...]`` from the steps' ``collect_output`` results ``outs`` (first dim: step).

    Steps ``output_start .. output_start + m - 1`` hold micro-batches ``0 .. m-1`` (on both
    backends). Here each is this device's ``[B/m, ...]``: the last device's result, zeros on the
    others (a caller that wants it everywhere psums over the pipeline axis; the torch twin's
    stacked view sums its stage dim instead).
    """
    return jnp.reshape(outs[output_start:output_start + num_microbatches], shape)


# ---------------------------------------------------------------------------------- the loop
def _varying(x: jax.Array, axis_name: str) -> jax.Array:
    """``x`` typed as varying over ``axis_name`` (scan carries differ per stage)."""
    if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
        return x
    return jax.lax.pcast(x, (axis_name,), to="varying")


def _microbatches(x, m: int):
    if not hasattr(x, "ndim") or x.ndim < 1:
        raise ValueError(f"x has shape {getattr(x, 'shape', None)}: expected a batch dimension")
    if x.shape[0] % m:
        raise ValueError(f"x.shape[0]={x.shape[0]}: expected the batch size to be divisible by "
                         f"num_microbatches={m}")
    return jnp.reshape(x, (m, x.shape[0] // m, *x.shape[1:]))


@jax.named_scope("circular_pipeline")
def execute_circular_pipeline(module: nn.Module, x: jax.Array, *args, num_microbatches: int,
                              model_axis_name: str, num_pipeline_repeats: int = 1,
                              **kwargs) -> jax.Array:
    """Run the circular schedule (module docstring) on the per-device batch ``x`` ``[B, ...]``.

    Args:
        module: This device's layers: a :class:`RepeatedStage` when ``num_pipeline_repeats`` > 1
            (called with ``pipeline_repeat=``), any stage module when it is 1 (GPipe).
        x: Batch ``[B, ...]``, split into ``num_microbatches`` micro-batches of ``B/m`` rows.
        *args: Extra arguments to every layer call.
        num_microbatches: m (>= 1; >= p when r > 1).
        model_axis_name: The pipeline axis (size p).
        num_pipeline_repeats: r (>= 1).
        **kwargs: Extra keyword arguments to every layer call.

    Returns:
        ``[B, ...]``: the last layer's output on the last device of the axis, zeros elsewhere.

    Raises:
        ValueError: bad m / r (r > 1 with m < p names both), B not divisible by m, the axis not
            bound, or a layer that changes the shape.
    """
    p = bound_axis_size(model_axis_name, "model_axis_name")
    r, m = num_pipeline_repeats, num_microbatches
    tables = schedule.step_tables(p, m, r)  # validates (p, m, r) before anything is traced
    micro = _microbatches(x, m)
    stage_index = axis_index(model_axis_name)
    xs = tuple(jnp.asarray(a) for a in (tables.repeat, tables.read_slot, tables.read_active,
                                        tables.write_slot, tables.write_active))
    state = _varying(jnp.zeros_like(micro[0]), model_axis_name)
    if r == 1:  # GPipe: the micro-batches (then p-1 zero blocks) are loop inputs, no buffer
        xs += (jnp.concatenate([micro, jnp.zeros((p - 1, *micro.shape[1:]), micro.dtype)]),)
        carry = (state, ())
    else:
        carry = (state, _varying(micro, model_axis_name))

    def step(mdl, carry, row):  # one step of the schedule (docs/design.md)
        state, buffer = carry
        repeat, read_slot, read_active, write_slot, write_active = row[:5]
        fresh = row[5] if r == 1 else read_buffer(buffer, read_slot, read_active)
        h = inject_microbatch(state, fresh, stage_index)
        h = run_resident_stage(mdl, h, repeat[stage_index], r, *args, **kwargs)
        out = collect_output(h, stage_index, p)
        state = rotate(h, model_axis_name)
        if r > 1:
            buffer = write_back(buffer, state, write_slot, write_active, stage_index)
        return (state, buffer), out

    _, outs = nn.scan(step, variable_broadcast={"params": True},
                      split_rngs={"params": False, "dropout": True}, length=len(xs[0]),
                      in_axes=0, out_axes=0)(module, carry, xs)
    return assemble_output(outs, tables.output_start, m, x.shape)


class CircularPipelineModule(nn.Module):
    """``PipelineModule`` with ``num_pipeline_repeats``: r layers per device, round-robin.

    The child ``RepeatedStage_0`` holds the layers (``repeats_k`` is repeat k; with
    ``module_fn = partial(ModelParallelismWrapper, model_axis_name=..., module_fn=Stage)`` the
    global parameters are ``RepeatedStage_0/repeats_k/sharded/...`` of shape ``[p, ...]``, and
    ``[d]`` of repeat k is model layer ``k*p + d``).

    Attributes:
        model_axis_name: The pipeline axis.
        num_microbatches: m.
        module_fn: Function that returns one layer module.
        num_pipeline_repeats: r (default 1: GPipe).
    """

    model_axis_name: str
    num_microbatches: int
    module_fn: Callable[..., nn.Module]
    num_pipeline_repeats: int = 1

    @nn.compact
    def __call__(self, x, *args, **kwargs):
        """Run the circular pipeline on the batch ``x``; other arguments go to every layer."""
        schedule.check_schedule(1, self.num_microbatches, self.num_pipeline_repeats)
        stage = RepeatedStage(self.module_fn, self.num_pipeline_repeats)
        return execute_circular_pipeline(
            stage, x, *args, num_microbatches=self.num_microbatches,
            model_axis_name=self.model_axis_name,
            num_pipeline_repeats=self.num_pipeline_repeats, **kwargs)
