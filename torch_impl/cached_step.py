"""Cached steps on torch_xla: trace and compile a step once, then replay it without tracing.

torch_xla's lazy tensors re-trace the Python code of every step: each call of a layer rebuilds
its IR graph on the host, hashes it and only then finds the compiled program in the cache. For
the TP layers that host tracing is most of a steady step (issue 14, measured by ``python -m
bench``: ~0.2 s traced vs ~0.03 s run for ColumnParallelLinear at [32, 256, 256], tp=8, on a
loaded 2-core machine). :class:`CachedStep` traces ``fn`` once, compiles the graph of its outputs
and from then on runs that compiled program directly on the current values of its arguments:
the very program the lazy step compiles, so its collectives are those of the lazy step (the
parity signature does not change; ``tests/torch/test_cached_step.py`` checks both).

``torch_xla.compile`` was tried first: it only brackets the step with syncs and still traces
every call. ``torch.compile(backend="openxla")`` would skip tracing too, but dynamo fails on
``mark_sharding`` (``XLAShardedTensor`` has no ``_local_tensor``, torch 2.9 / torch_xla 2.9).

Example::

    step = cached_forward_backward(layer, x, cot)   # traces + compiles once
    for _ in range(100):
        y = step()          # y, and x.grad / p.grad of every parameter, without re-tracing
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import mesh as _mesh
from . import xla

__all__ = ["CachedStep", "cached_forward_backward"]


class CachedStep:
    """``fn(*args)`` traced and compiled once, then run from the compiled program.

    Args:
        fn: Takes the XLA tensors ``args`` and returns a sequence of XLA tensors (e.g. outputs and
            gradients). Traced ONCE, at construction, on ``args``.
        args: Every tensor whose value may change between calls (parameters, inputs). Anything
            else ``fn`` reads (constants, buffers not in ``args``) is frozen at its value at
            construction.
        keep_hlo: Keep the compiled program's HLO text as ``hlo_text`` (else None).

    Calling ``step(*new_args)`` (same count, shapes, dtypes and shardings as ``args``; default:
    the construction ``args`` themselves, read at their current values) returns fresh output
    tensors. A step that must change (another shape, another layer) needs a new CachedStep.

    Raises:
        ValueError: ``args`` not XLA tensors, ``fn`` returning something other than a non-empty
            sequence of XLA tensors, an arg that is not an input of the traced graph (``fn`` read
            a copy made elsewhere: its updates would be missed); at call time a wrong number of
            arguments or a shape/dtype that differs from the traced one.
    """

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], args: Sequence[torch.Tensor],
                 *, keep_hlo: bool = False):
        args = list(args)
        for i, a in enumerate(args):
            if not isinstance(a, torch.Tensor):
                raise ValueError(f"args[{i}]: expected a torch.Tensor, got {type(a).__name__}")
            _mesh.check_on_device(a, f"args[{i}]")
        self.args = args
        self._signature = [(tuple(a.shape), a.dtype) for a in args]
        _mesh.sync(wait=True)  # capture clears every pending graph: run them first
        before = [xla.data_handle(a) for a in args]  # every arg is device data now
        outputs = fn(*args)
        if not isinstance(outputs, (list, tuple)) or not outputs or not all(
                isinstance(t, torch.Tensor) for t in outputs):
            raise ValueError(f"fn returned {type(outputs).__name__}: expected a non-empty list or "
                             f"tuple of XLA tensors")
        self.num_outputs = len(outputs)
        # the compiled, partitioned program (for checking its collectives), before capture drops it
        self.hlo_text = _mesh.compiled_hlo(outputs) if keep_hlo else None
        after = [xla.data_handle(a) for a in args]  # an arg fn re-placed (resharded) has a new one
        self.graph_hash, _, self._values = xla.capture_graph(outputs)
        # Inputs are matched to args by device buffer, not tensor id: in a model whose
        # parameters were built from other tensors the graph's input nodes carry those ids.
        position = {h: i for handles in (after, before) for i, h in enumerate(handles)
                    if h is not None}
        # graph input k comes from args[plan[k]], or (None) is a constant captured at trace time
        self._plan = [position.get(xla.data_handle(v)) for v in self._values]
        unread = sorted(set(range(len(args))) - {k for k in self._plan if k is not None})
        if unread:  # fn read a copy of these (or nothing): replaying would freeze their values
            raise ValueError(f"args {unread[:8]}: not inputs of the traced graph (fn reads another "
                             f"tensor holding their values, or none), so the cached step would "
                             f"not see their updates; pass the tensors fn itself reads")

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        """Run the compiled step on ``args`` (default: the construction args, current values)."""
        if args:
            if len(args) != len(self._signature):
                raise ValueError(f"got {len(args)} args: expected {len(self._signature)}")
            for i, (a, (shape, dtype)) in enumerate(zip(args, self._signature)):
                if not isinstance(a, torch.Tensor) or tuple(a.shape) != shape or a.dtype != dtype:
                    got = (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else type(a)
                    raise ValueError(f"args[{i}]={got}: expected shape {shape}, dtype {dtype}")
        current = list(args) if args else self.args
        _mesh.sync()  # pending updates of the inputs (e.g. an optimizer step) run first
        inputs = [current[p] if p is not None else v for p, v in zip(self._plan, self._values)]
        return xla.run_graph(self.graph_hash, inputs)


def cached_forward_backward(module: torch.nn.Module, x: torch.Tensor, cotangent: torch.Tensor,
                            *, keep_hlo: bool = False) -> Callable[[], torch.Tensor]:
    """A cached step of ``module(x)`` and the backward of ``sum(module(x) * cotangent)``.

    Each call returns the output and sets ``x.grad`` (if ``x`` requires grad) and ``p.grad`` of
    every parameter that requires grad, reading the current values of ``x``, ``cotangent`` and the
    parameters (update them in place, e.g. with an optimizer, between calls).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    grad_of = ([x] if x.requires_grad else []) + params

    def fn(*args):
        for t in grad_of:
            t.grad = None
        y = module(x)
        (y * cotangent).sum().backward()
        return [y] + [t.grad for t in grad_of]

    cached = CachedStep(fn, params + [x, cotangent], keep_hlo=keep_hlo)
    for t in grad_of:  # their traced grads were dropped with the pending graph
        t.grad = None

    def step() -> torch.Tensor:
        y, *grads = cached()
        for t, g in zip(grad_of, grads):
            t.grad = g
        return y

    step.cached = cached  # type: ignore[attr-defined]
    return step
