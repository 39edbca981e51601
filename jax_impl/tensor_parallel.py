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
step's communication:

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
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.frozen_dict import FrozenDict

from .array_utils import fold_rng_over_axis, stack_params, unstack_params
from .collectives import (all_gather_features, reduce_scatter_features, ring_permute,
                          split_features)
from .mesh import axis_size

__all__ = ["ModelParallelismWrapper", "scale_init", "TPDense", "TPAsyncDense", "async_gather",
           "async_gather_bidirectional", "async_gather_split", "async_scatter",
           "async_scatter_split"]

PyTree = Any
TP_MODES = ("scatter", "gather", "none")


def _check_tp_mode(tp_mode: str) -> None:
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode={tp_mode!r}: expected one of {TP_MODES}")


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
        _check_tp_mode(self.tp_mode)
        n = axis_size(self.model_axis_name)
        tp_mode = self.tp_mode if n > 1 else "none"
        if tp_mode == "none":
            return self.dense_fn(kernel_init=self.kernel_init, use_bias=self.use_bias)(x)
        dense = ModelParallelismWrapper(
            model_axis_name=self.model_axis_name,
            module_fn=functools.partial(
                self.dense_fn, kernel_init=scale_init(self.kernel_init, self.kernel_init_adjustment),
                use_bias=self.use_bias),
            name=self.dense_name,
        )
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


def async_gather(x: PyTree, axis_name: str, shift_up: bool = True) -> list[PyTree]:
    """All-gather by n-1 ring permutations.

    Args:
        x: Per-device pytree.
        axis_name: The axis to gather over (size n).
        shift_up: Send from device j to j+1 (else to j-1).

    Returns:
        List of n per-device pytrees: element i is ``x`` of device ``d - i`` (shift up) or ``d + i``
        (shift down), mod n, on device d. Element 0 is ``x`` itself.
    """
    n = axis_size(axis_name)
    ps = [x]
    for _ in range(1, n):
        ps.append(ring_permute(ps[-1], axis_name, shift_up=shift_up))
    return ps


def async_gather_bidirectional(x: jax.Array, axis_name: str, shift_up: bool = True) -> list[jax.Array]:
    """All-gather by ring permutations in both directions (ceil((n-1)/2) up, floor((n-1)/2) down).

    Steps alternate: odd steps shift the "up" chain, even steps the "down" chain, so each value
    travels at most n/2 hops.

    Args:
        x: Per-device array (or pytree).
        axis_name: The axis to gather over (size n).
        shift_up: Order the result like ``async_gather(x, axis_name, shift_up)``.

    Returns:
        The same list, in the same order, as :func:`async_gather` with the same ``shift_up``.
    """
    n = axis_size(axis_name)
    ups, downs = [], []
    p_up = p_down = x
    for step in range(1, n):
        if step % 2:
            p_up = ring_permute(p_up, axis_name, shift_up=True)
            ups.append(p_up)
        else:
            p_down = ring_permute(p_down, axis_name, shift_up=False)
            downs.append(p_down)
    # ups[k-1] comes from d-k and downs[k-1] from d+k = d-(n-k).
    if shift_up:
        return [x] + ups + downs[::-1]
    return [x] + downs + ups[::-1]


def async_gather_split(x: jax.Array, axis_name: str) -> list[jax.Array]:
    """All-gather with the features split in halves, one half travelling each way round the ring.

    Args:
        x: Per-device array ``[..., F]`` (or pytree); F must be even when n > 1.
        axis_name: The axis to gather over (size n).

    Returns:
        List of length ``2n - 1`` on device d: ``[x, lo(d-1), ..., lo(d-n+1), hi(d+1), ...,
        hi(d+n-1)]`` (indices mod n), where ``lo(e)`` / ``hi(e)`` are the first / second half of the
        features ``[..., F/2]`` of device e's ``x``. Element 0 is the full local ``x``; each other
        device's input appears once, split across the two halves. For n == 1: ``[x]``.
    """
    n = axis_size(axis_name)
    if n == 1:
        return [x]
    lo, hi = split_features(x, 2, argument="x")
    return [x] + async_gather(lo, axis_name, shift_up=True)[1:] + async_gather(
        hi, axis_name, shift_up=False)[1:]


def _check_scatter_inputs(xs: Sequence[PyTree], axis_name: str) -> int:
    n = axis_size(axis_name)
    if len(xs) != n:
        raise ValueError(f"len(xs)={len(xs)}: expected one input per device, the size {n} of axis "
                         f"{axis_name!r}")
    return n


def async_scatter(xs: Sequence[PyTree], axis_name: str, shift_up: bool = True) -> PyTree:
    """Scatter-sum by n-1 ring permutations (the ring form of ``psum_scatter``).

    Args:
        xs: n per-device pytrees of equal structure and shapes. With ``shift_up``, ``xs[i]`` of
            device e is added into the result of device ``e - 1 - i (mod n)`` (shift down: ``e + 1
            + i``). So ``xs[i] = z[block (d-1-i) mod n]`` on each device d reproduces
            ``psum_scatter(z, tiled=True)``.
        axis_name: The axis to scatter over (size n).
        shift_up: Send partial sums from device j to j+1 (else to j-1).

    Returns:
        The per-device sum, shaped like ``xs[0]``.

    Raises:
        ValueError: if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name)
    y = xs[0]
    for x in xs[1:]:
        y = jax.tree.map(jnp.add, ring_permute(y, axis_name, shift_up=shift_up), x)
    return y


def async_scatter_split(xs: Sequence[PyTree], axis_name: str) -> PyTree:
    """Scatter-sum with the features split: the first ``F//2`` go up the ring, the rest down.

    Args:
        xs: n per-device pytrees ``[..., F]``. The first ``F//2`` features of ``xs[i]`` of device e
            go to device ``e - 1 - i``, the other ``F - F//2`` to device ``e + 1 + i`` (mod n).
        axis_name: The axis to scatter over (size n).

    Returns:
        The per-device sum ``[..., F]``.

    Raises:
        ValueError: if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name)

    def halves(x):
        lo = jax.tree.map(lambda a: a[..., : a.shape[-1] // 2], x)
        hi = jax.tree.map(lambda a: a[..., a.shape[-1] // 2:], x)
        return lo, hi

    y_up, y_down = halves(xs[0])
    for x in xs[1:]:
        x_up, x_down = halves(x)
        y_up = jax.tree.map(jnp.add, ring_permute(y_up, axis_name, shift_up=True), x_up)
        y_down = jax.tree.map(jnp.add, ring_permute(y_down, axis_name, shift_up=False), x_down)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=-1), y_up, y_down)


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
        _check_tp_mode(self.tp_mode)
        n = axis_size(self.model_axis_name)
        tp_mode = self.tp_mode if n > 1 else "none"
        if tp_mode == "none":
            return self.dense_fn(kernel_init=self.kernel_init, use_bias=self.use_bias,
                                 name="shard_0")(x)

        def shard(i: int) -> nn.Module:
            return ModelParallelismWrapper(
                model_axis_name=self.model_axis_name,
                module_fn=functools.partial(
                    self.dense_fn,
                    kernel_init=scale_init(self.kernel_init, self.kernel_init_adjustment)),
                module_kwargs=FrozenDict({"use_bias": i == 0 and self.use_bias}),
                name=f"shard_{i}",
            )

        if tp_mode == "gather":
            gather = async_gather_bidirectional if self.use_bidirectional_gather else async_gather
            xs = gather(x, self.model_axis_name)
            ys = [shard(i)(xi) for i, xi in enumerate(xs)]
            return functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), ys)
        ys = [shard(i)(x) for i in range(n)]
        scatter = async_scatter_split if self.use_bidirectional_scatter else async_scatter
        return scatter(ys, self.model_axis_name)
