"""Tensor-parallel dense layers (API of xlstm-jax ``distributed.tensor_parallel``; twin of
:mod:`torch_impl.tensor_parallel`).

All modules and functions are per-device code: call them inside ``jax.shard_map`` over a mesh with
the axis ``model_axis_name`` (size n). Shapes below are per-device unless marked global.

Modes (``tp_mode``; with n == 1 every mode falls back to ``"none"``):

- ``"none"``: a plain dense layer on the per-device input, parameters replicated.
- ``"gather"``: input feature-sharded ``[..., F/n]``; gather the features of all devices, then
  apply this device's dense ``[F, O]`` -> output ``[..., O]``. Global: ``[..., F] -> [..., n*O]``
  with the output features sharded over the axis (device d computes output block d).
- ``"scatter"``: input feature-sharded ``[..., F/n]``; apply this device's dense -> ``[..., O]``
  partial sums; sum over the devices and keep block d of the features -> ``[..., O/n]``. Global:
  ``[..., F] -> [..., O]``, output sharded over the axis. ``TPDense`` needs O divisible by n.

``TPDense`` uses ``jax.lax.all_gather`` / ``psum_scatter``. ``TPAsyncDense`` replaces them by n-1
ring steps (``ppermute``), one sub-module per step, so that each step's matmul can overlap the next
step's communication (the ring helpers ``async_gather*`` / ``async_scatter*`` live in
:mod:`jax_impl.async_collectives` and are re-exported here):

- gather: ``xs = async_gather(_bidirectional)(x)`` where ``xs[i]`` is the input of device
  ``d - i (mod n)``; ``y = sum_i shard_i(xs[i])``. Each ``shard_i`` kernel is ``[F/n, O]``.
- scatter: ``ys[i] = shard_i(x)`` (each ``[..., O]``), then ``async_scatter(ys)``: ``ys[i]`` of
  device e lands in the output of device ``e - 1 - i (mod n)``. With ``use_bidirectional_scatter``
  (``async_scatter_split``) the first ``O//2`` features travel that way and the other features
  travel down the ring, landing on device ``e + 1 + i (mod n)``. The output is ``[..., O]``.
  Only ``shard_0`` has a bias.

Parameter trees (``Dense`` = ``functools.partial(nn.Dense, features=O)``, global shapes, i.e. as
returned by ``shard_map(model.init, out_specs=nn.get_partition_spec(...))``; ``P(shape, names)``
is ``nn.Partitioned`` with that value shape and those names; ``tp`` = ``model_axis_name``):

- ``TPDense`` gather: ``{dense_name: {'sharded': {'kernel': P([n, F, O], ('tp', None, None)),
  'bias': P([n, O], ('tp', None))}}}``; scatter: the same with kernel ``[n, F/n, O]``.
- ``TPDense`` none or n == 1: ``{'Dense_0': {'kernel': [F, O], 'bias': [O]}}`` (plain arrays; the
  child name is flax's automatic ``<ClassName>_0`` of the module ``dense_fn`` builds).
- ``TPAsyncDense`` gather/scatter: ``{'shard_0': {'sharded': {'kernel': P([n, F/n, O], ('tp', None,
  None)), 'bias': P([n, O], ('tp', None))}}, 'shard_1': {'sharded': {'kernel': P([n, F/n, O],
  ...)}}, ..., 'shard_{n-1}': ...}`` (``dense_name`` is not used: each wrapper is named
  ``shard_i``); none or n == 1: ``{'shard_0': {'kernel': [F, O], 'bias': [O]}}``.
- Without bias (``use_bias=False``) the ``'bias'`` entries are absent.

As ``state_dict`` keys (paths joined by '.'): ``module.sharded.kernel``, ``shard_1.sharded.kernel``,
``Dense_0.bias``, ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.frozen_dict import FrozenDict

from .array_utils import fold_rng_over_axis, stack_params, unstack_params
from .async_collectives import (async_gather, async_gather_bidirectional,  # noqa: F401
                                async_gather_split, async_scatter, async_scatter_split)
from .collectives import all_gather_features, reduce_scatter_features
from .mesh import axis_size

__all__ = ["ModelParallelismWrapper", "scale_init", "TPDense", "TPAsyncDense", "async_gather",
           "async_gather_bidirectional", "async_gather_split", "async_scatter",
           "async_scatter_split"]

PyTree = Any
TP_MODES = ("scatter", "gather", "none")


def _mode_in_effect(tp_mode: str, model_axis_name: str) -> tuple[int, str]:
    """``(n, mode)``: ValueError for an unknown ``tp_mode``; every mode is "none" when n == 1."""
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode={tp_mode!r}: expected one of {TP_MODES}")
    n = axis_size(model_axis_name)
    return n, (tp_mode if n > 1 else "none")


class ModelParallelismWrapper(nn.Module):
    """Wrapper for adding model parallelism to a module.

    The wrapped module (``module_fn(name="sharded", **module_kwargs)``) sees per-device parameters;
    they are stored as ``nn.Partitioned`` with ``model_axis_name`` added as a new first dimension
    (per-device shape ``[1, ...]``, global shape ``[n, ...]``). With ``split_rngs`` each device of
    the model axis initializes its shard from a different key.

    Attributes:
        model_axis_name: Name of the model axis to shard over.
        module_fn: Function that returns the Flax module to wrap (must accept ``name``).
        mask_except_model_idx: If not None, only the ``mask_except_model_idx``-th shard is non-zero
            after init (the others are initialized to zeros).
        split_rngs: If True, fold the model-axis index into the ``params`` rng at init.
        module_kwargs: Additional keyword arguments to pass to ``module_fn``.
    """

    model_axis_name: str
    module_fn: Callable[..., nn.Module]
    mask_except_model_idx: int | None = None
    split_rngs: bool = True
    module_kwargs: FrozenDict[str, Any] = FrozenDict({})

    @nn.compact
    def __call__(self, *args, **kwargs):
        """Apply the wrapped module to ``args``/``kwargs`` (per-device values)."""
        axis_size(self.model_axis_name)
        rngs = self.scope.rngs
        if self.is_initializing() and self.split_rngs and "params" in rngs:
            rngs["params"] = rngs["params"].replace(
                rng=fold_rng_over_axis(rngs["params"].rng, self.model_axis_name))
        module = nn.map_variables(
            target=functools.partial(self.module_fn, name="sharded", **self.module_kwargs),
            trans_in_fn=functools.partial(unstack_params, axis_name=self.model_axis_name),
            trans_out_fn=functools.partial(stack_params, axis_name=self.model_axis_name,
                                           mask_except=self.mask_except_model_idx),
            mapped_collections="params",
            mutable=True,
        )()
        return module(*args, **kwargs)


def scale_init(init_fn: Callable, scale_factor: float = 1.0) -> Callable:
    """Return an initializer that multiplies the output of ``init_fn`` by ``scale_factor``."""

    def _init_fn(rng, *args, **kwargs):
        return scale_factor * init_fn(rng, *args, **kwargs)

    return _init_fn


def _sharded_dense(layer: nn.Module, name: str, use_bias: bool) -> ModelParallelismWrapper:
    """``layer.dense_fn`` wrapped over the model axis with the adjusted kernel init (TPDense's
    ``dense_name`` child, TPAsyncDense's ``shard_i``); must be called inside ``layer``."""
    return ModelParallelismWrapper(
        model_axis_name=layer.model_axis_name,
        module_fn=functools.partial(
            layer.dense_fn, kernel_init=scale_init(layer.kernel_init,
                                                   layer.kernel_init_adjustment)),
        module_kwargs=FrozenDict({"use_bias": use_bias}),
        name=name,
    )


class TPDense(nn.Module):
    """Dense layer with tensor parallelism through ``all_gather`` / ``psum_scatter``.

    Input and output shapes per mode are in the module docstring: gather ``[..., F/n] -> [..., O]``
    (output block d on device d), scatter ``[..., F/n] -> [..., O/n]``, none ``[..., F] -> [..., O]``,
    where O is the dense layer's ``features`` and F/n the per-device input features.

    Attributes:
        dense_fn: Constructor of the dense layer (e.g. ``partial(nn.Dense, features=O)``); must
            accept ``kernel_init`` and ``use_bias``.
        model_axis_name: The name of the model axis.
        tp_mode: "scatter", "gather" or "none" (the latter used whenever the axis size is 1).
        skip_communication: Skip the collective: gather then expects the full input ``[..., F]``
            on each device; scatter returns the per-device partial sums ``[..., O]``.
        kernel_init: Initializer of the kernel.
        kernel_init_adjustment: Factor on the kernel init in the sharded modes.
        use_bias: Whether the dense layer has a bias.
        dense_name: Name of the sharded sub-module.
    """

    dense_fn: Any
    model_axis_name: str
    tp_mode: Literal["scatter", "gather", "none"] = "none"
    skip_communication: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()
    kernel_init_adjustment: float = 1.0
    use_bias: bool = True
    dense_name: str = "module"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to the per-device input ``x``."""
        n, tp_mode = _mode_in_effect(self.tp_mode, self.model_axis_name)
        if tp_mode == "none":
            return self.dense_fn(kernel_init=self.kernel_init, use_bias=self.use_bias)(x)
        dense = _sharded_dense(self, self.dense_name, self.use_bias)
        if tp_mode == "gather":
            if not self.skip_communication:
                x = all_gather_features(x, self.model_axis_name)
            return dense(x)
        y = dense(x)
        if self.skip_communication:
            return y
        if y.shape[-1] % n:
            raise ValueError(f"dense_fn output features={y.shape[-1]}: expected a number divisible "
                             f"by the size {n} of axis {self.model_axis_name!r} for tp_mode='scatter'")
        return reduce_scatter_features(y, self.model_axis_name)


class TPAsyncDense(nn.Module):
    """Tensor-parallel dense layer whose communication is a ring of ``ppermute`` steps.

    Same shapes as :class:`TPDense` except that scatter returns ``[..., O]`` per device (each
    device's ``shard_i`` produces the block destined to one other device). One sub-module
    ``shard_i`` per ring step, bias only on ``shard_0`` (see the module docstring for the exact
    parameter tree and which device's data each shard sees).

    Attributes:
        dense_fn: Constructor of the dense layer (e.g. ``partial(nn.Dense, features=O)``); must
            accept ``kernel_init``, ``use_bias`` and ``name``.
        model_axis_name: The name of the model axis.
        tp_mode: "scatter", "gather" or "none" (the latter used whenever the axis size is 1).
        kernel_init: Initializer of the kernel.
        kernel_init_adjustment: Factor on the kernel init in the sharded modes.
        use_bias: Whether the layer has a bias (on ``shard_0`` only).
        dense_name: Kept for API compatibility; the sub-modules are named ``shard_i``.
        use_bidirectional_gather: Gather with :func:`async_gather_bidirectional` (else
            :func:`async_gather`).
        use_bidirectional_scatter: Scatter with :func:`async_scatter_split` (else
            :func:`async_scatter`).
    """

    dense_fn: Any
    model_axis_name: str
    tp_mode: Literal["scatter", "gather", "none"] = "none"
    kernel_init: Callable = nn.initializers.lecun_normal()
    kernel_init_adjustment: float = 1.0
    use_bias: bool = True
    dense_name: str = "module"
    use_bidirectional_gather: bool = True
    use_bidirectional_scatter: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to the per-device input ``x``."""
        n, tp_mode = _mode_in_effect(self.tp_mode, self.model_axis_name)
        if tp_mode == "none":
            return self.dense_fn(kernel_init=self.kernel_init, use_bias=self.use_bias,
                                 name="shard_0")(x)

        def shard(i: int) -> nn.Module:  # one dense per ring step, the bias on shard_0 only
            return _sharded_dense(self, f"shard_{i}", i == 0 and self.use_bias)

        if tp_mode == "gather":
            gather = async_gather_bidirectional if self.use_bidirectional_gather else async_gather
            xs = gather(x, self.model_axis_name)
            ys = [shard(i)(xi) for i, xi in enumerate(xs)]
            return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), ys)
        ys = [shard(i)(x) for i in range(n)]
        scatter = async_scatter_split if self.use_bidirectional_scatter else async_scatter
        return scatter(ys, self.model_axis_name)
