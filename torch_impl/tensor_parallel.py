"""Tensor-parallel dense layers in the global "stacked" view (twin of jax_impl.tensor_parallel).

Same public names, in the same order, as the JAX module, plus two torch-only helpers at the end
(``Dense``, the twin of ``flax.linen.Dense``, and ``lecun_normal``). Every function and layer sees
the stacked view of the JAX per-device values: a value of per-device shape ``S`` is a tensor
``[n, *S]`` on the XLA device whose dim 0 (n = size of the mesh axis ``model_axis_name``) is
sharded over that axis and replicated over all other mesh axes (activations keep their batch
dim sharded inside :func:`torch_impl.mesh.sharded_batch`, which the GPT sets). Row j is device
j's value, so a layer's input ``x[j]`` is exactly what JAX's ``shard_map`` passes to device j.

Constructors are torch-style: ``in_features, out_features`` replace JAX's ``dense_fn`` (which is
``functools.partial(nn.Dense, features=out_features)`` there), and the mesh is the keyword-only
argument ``mesh``. Sizes:

- ``in_features``: the last dim of the per-device input, i.e. ``x.shape[-1]`` of the stacked view
  (F/n in the sharded modes when the global input has F features; F in mode "none").
- ``out_features``: the per-device dense layer's output features O (JAX's ``features``).

Modes (with n == 1 every mode falls back to "none"), per device and in the stacked view:

- "none": a plain :class:`Dense` ``[in, O]`` (replicated, child ``Dense_0``): ``[n, ..., in] ->
  [n, ..., O]``.
- ``TPDense`` "gather": all-gather the features (``[n, ..., in] -> [n, ..., n*in]``, every row the
  same), then device d's dense ``[n*in, O]`` -> ``[n, ..., O]`` (row d = output block d).
  With ``skip_communication`` the input is already gathered: kernel ``[in, O]``.
- ``TPDense`` "scatter": device d's dense ``[in, O]`` gives partial sums ``[n, ..., O]``; a
  reduce-scatter sums them over the devices, row j keeps block j: ``[n, ..., O/n]``. With
  ``skip_communication`` the partial sums are returned.
- ``TPAsyncDense``: the same with n-1 ring steps (one collective-permute each, no all-gather /
  reduce-scatter / all-reduce) and one dense ``[in, O]`` per step ``shard_i``; gather returns
  ``sum_i shard_i(x of device d-i)``, scatter returns ``[n, ..., O]`` (see
  :func:`async_scatter` for which block lands where). Only ``shard_0`` has a bias.

Parameters (``state_dict`` keys = the JAX parameter paths joined by '.', same shapes and layouts):

- ``TPDense`` gather: ``{dense_name}.sharded.kernel`` ``[n, n*in, O]`` (``[n, in, O]`` with
  ``skip_communication``), ``{dense_name}.sharded.bias`` ``[n, O]``; scatter: kernel ``[n, in, O]``.
- ``TPDense`` none or n == 1: ``Dense_0.kernel`` ``[in, O]``, ``Dense_0.bias`` ``[O]``.
- ``TPAsyncDense`` gather/scatter: ``shard_{i}.sharded.kernel`` ``[n, in, O]`` for i < n,
  ``shard_0.sharded.bias`` ``[n, O]``; none or n == 1: ``shard_0.kernel`` / ``shard_0.bias``.
- Stacked parameters live on the XLA device sharded on dim 0 over ``model_axis_name``; loading a
  ``state_dict`` keeps that sharding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import mesh as _mesh
from . import xla
from .array_utils import draw_seed, fold_in, fold_rng_over_axis, stack_params
from .collectives import (all_gather_features, axis_size, copy_to_axis, reduce_scatter_features,
                          ring_permute, split_features)

__all__ = ["ModelParallelismWrapper", "scale_init", "TPDense", "TPAsyncDense", "async_gather",
           "async_gather_bidirectional", "async_gather_split", "async_scatter",
           "async_scatter_split", "Dense", "lecun_normal"]

PyTree = Any
TP_MODES = ("scatter", "gather", "none")


def _check_tp_mode(tp_mode: str) -> None:
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode={tp_mode!r}: expected one of {TP_MODES}")


# ---------------------------------------------------------------------------- initializers, Dense
def lecun_normal() -> Callable:
    """Twin of ``flax.linen.initializers.lecun_normal()``: truncated normal, variance 1/fan_in.

    The returned ``init(generator, shape, dtype=torch.float32)`` treats the second-to-last dim as
    fan-in (a kernel ``[in, out]``), draws from a normal truncated to 2 standard deviations and
    rescales so the variance is ``1 / fan_in``, as JAX's ``variance_scaling(1, 'fan_in',
    'truncated_normal')`` does. ``generator=None`` uses torch's global generator.
    """

    def init(generator: torch.Generator | None, shape: Sequence[int], dtype=torch.float32):
        shape = tuple(shape)
        fan_in = shape[-2] if len(shape) >= 2 else (shape[0] if shape else 1)
        std = math.sqrt(1.0 / max(fan_in, 1)) / 0.87962566103423978
        out = torch.empty(shape, dtype=torch.float32)
        nn.init.trunc_normal_(out, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)
        return out.to(dtype)

    return init


def _zeros(generator, shape, dtype=torch.float32):
    return torch.zeros(tuple(shape), dtype=dtype)


class Dense(nn.Module):
    """Twin of ``flax.linen.Dense``: ``y = x @ kernel + bias`` with ``kernel`` ``[in, out]``.

    Parameters are named and laid out as in Flax (``kernel`` ``[in_features, features]``,
    ``bias`` ``[features]``), unlike ``torch.nn.Linear`` (``weight`` ``[out, in]``). They are
    created on CPU with ``kernel_init(generator, shape, dtype)`` (torch's global generator when
    ``generator`` is None).
    """

    def __init__(self, in_features: int, features: int, use_bias: bool = True,
                 kernel_init: Callable | None = None, bias_init: Callable = _zeros,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("features", features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        self.in_features, self.features, self.use_bias = in_features, features, bool(use_bias)
        kernel_init = lecun_normal() if kernel_init is None else kernel_init
        self.kernel = nn.Parameter(kernel_init(generator, (in_features, features), dtype))
        if self.use_bias:
            self.bias = nn.Parameter(bias_init(generator, (features,), dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.kernel)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, features={self.features}, use_bias={self.use_bias}"


def scale_init(init_fn: Callable, scale_factor: float = 1.0) -> Callable:
    """Return an initializer that multiplies the output of ``init_fn`` by ``scale_factor``."""

    def _init_fn(*args, **kwargs):
        return scale_factor * init_fn(*args, **kwargs)

    return _init_fn


# ------------------------------------------------------------------------- ModelParallelismWrapper
def _set_param(module: nn.Module, path: str, value: nn.Parameter) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        module = getattr(module, p)
    setattr(module, leaf, value)


class ModelParallelismWrapper(nn.Module):
    """Wrapper for adding model parallelism to a module (stacked parameters, one shard per device).

    Builds ``module_fn(**module_kwargs)`` n times on CPU (n = size of ``model_axis_name``), the
    j-th time under torch's global generator seeded with ``fold_in(seed, j)`` when ``split_rngs``
    (else all n from ``seed``: identical shards), stacks their parameters into ``[n, ...]``
    tensors on the XLA device sharded on dim 0 over ``model_axis_name``, and keeps the first
    instance as the child ``sharded`` holding those stacked parameters: ``state_dict`` keys are
    ``sharded.<param>``, as the JAX paths. Buffers are not stacked (JAX maps only ``params``).

    ``forward(*args, **kwargs)`` applies the wrapped module to each device's shard with
    ``torch.func.vmap(functional_call)`` over dim 0: ``args`` are stacked-view tensors (or pytrees
    of them) ``[n, ...]``; ``kwargs`` are passed unchanged to every device. Outputs are stacked,
    dim 0 sharded over the axis. No communication.

    Args:
        model_axis_name: Name of the model axis to shard over.
        module_fn: Function returning the ``nn.Module`` to wrap (called with ``**module_kwargs``).
        mask_except_model_idx: If not None, only the ``mask_except_model_idx``-th shard is
            non-zero after init (the others are initialized to zeros).
        split_rngs: If True, each device's shard is initialized from a different seed.
        module_kwargs: Additional keyword arguments to pass to ``module_fn``.
        mesh: The torch_xla mesh holding ``model_axis_name`` (keyword-only).
        seed: Seed of the initialization; None draws one from torch's global generator.

    Raises:
        ValueError: if the mesh has no ``model_axis_name``, SPMD is not enabled, or
            ``mask_except_model_idx`` is not None or an index in ``[0, n)``.
    """

    def __init__(self, model_axis_name: str, module_fn: Callable[..., nn.Module],
                 mask_except_model_idx: int | None = None, split_rngs: bool = True,
                 module_kwargs: Mapping[str, Any] | None = None, *, mesh, seed: int | None = None):
        super().__init__()
        _mesh.require_spmd()
        n = axis_size(model_axis_name, mesh=mesh)
        self.model_axis_name, self.mask_except_model_idx = model_axis_name, mask_except_model_idx
        self.split_rngs, self.module_kwargs = bool(split_rngs), dict(module_kwargs or {})
        self.mesh, self.axis_size = mesh, n
        seed = draw_seed(seed)
        if self.split_rngs:
            seeds = [g.initial_seed() for g in fold_rng_over_axis(seed, model_axis_name, mesh=mesh)]
        else:
            seeds = [seed] * n
        replicas = []
        for s in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                replicas.append(module_fn(**self.module_kwargs))
        names = [name for name, _ in replicas[0].named_parameters()]
        stacked = stack_params([dict(m.named_parameters()) for m in replicas], model_axis_name,
                               mask_except=mask_except_model_idx, mesh=mesh)
        template = replicas[0]
        for name in names:
            param = nn.Parameter(stacked[name])
            _mesh.mark_stacked(param, mesh, model_axis_name)
            _set_param(template, name, param)
        self.sharded = template
        self._param_names = names
        self.register_load_state_dict_post_hook(ModelParallelismWrapper._reshard_after_load)

    @staticmethod
    def _reshard_after_load(module, incompatible_keys) -> None:
        module.reshard()

    def reshard(self) -> None:
        """Re-annotate the stacked parameters as sharded on dim 0 (e.g. after replacing them)."""
        for p in self.sharded.parameters():
            if not xla.has_sharding(p):
                _mesh.mark_stacked(p, self.mesh, self.model_axis_name)

    def forward(self, *args, **kwargs):
        n = self.axis_size
        for i, leaf in enumerate(pytree.tree_leaves(args)):
            _mesh.check_on_device(leaf, f"args (leaf {i})")
            if leaf.dim() < 1 or leaf.shape[0] != n:
                raise ValueError(f"args (leaf {i}).shape={tuple(leaf.shape)}: expected the stacked "
                                 f"view [n, ...] with n={n}, the size of axis "
                                 f"{self.model_axis_name!r}")
        params = dict(self.sharded.named_parameters())
        module = self.sharded

        def per_device(p, *a):
            return torch.func.functional_call(module, p, a, kwargs)

        out = torch.func.vmap(per_device, in_dims=(0,) + (0,) * len(args))(params, *args)
        return pytree.tree_map(
            lambda t: _mesh.mark_activation(t, self.mesh, self.model_axis_name), out)


# ------------------------------------------------------------------------ replicated parameters
def _apply_replicated(module: nn.Module, x: torch.Tensor, mesh, axis_name: str) -> torch.Tensor:
    """Apply ``module`` (replicated parameters) to each row of the stacked ``x`` ``[n, ...]``."""
    names = [name for name, _ in module.named_parameters()]
    stacked = copy_to_axis([p for _, p in module.named_parameters()], axis_name, mesh=mesh)

    def per_device(p, a):
        return torch.func.functional_call(module, p, (a,))

    y = torch.func.vmap(per_device)(dict(zip(names, stacked)), x)
    return _mesh.mark_activation(y, mesh, axis_name)


# ----------------------------------------------------------------------------------- TPDense
def _seeded_dense(in_features: int, out_features: int, use_bias: bool, kernel_init: Callable,
                  dtype: torch.dtype, seed: int) -> "Dense":
    """A replicated :class:`Dense` drawn from ``seed`` (torch's global RNG untouched), on XLA."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dense = Dense(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                      dtype=dtype)
    return dense.to(_mesh.xla_device())


def _check_features(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive int")


def _check_input(x: torch.Tensor, n: int, in_features: int, axis_name: str) -> None:
    _mesh.check_on_device(x, "x")
    if x.dim() < 2 or x.shape[0] != n or x.shape[-1] != in_features:
        raise ValueError(f"x.shape={tuple(x.shape)}: expected the stacked view [n={n}, ..., "
                         f"in_features={in_features}] (dim 0 = devices of axis {axis_name!r})")


class TPDense(nn.Module):
    """Dense layer with tensor parallelism through all-gather / reduce-scatter.

    Input ``[n, ..., in_features]`` (stacked view); output ``[n, ..., out_features]`` in modes
    gather and none, ``[n, ..., out_features/n]`` in mode scatter (see the module docstring).

    Args:
        in_features: Last dim of the per-device input (F/n of a global F in gather/scatter).
        out_features: The per-device dense layer's output features O (JAX ``features``).
        model_axis_name: The name of the model axis.
        tp_mode: "scatter", "gather" or "none" (the latter used whenever the axis size is 1).
        skip_communication: Skip the collective: gather then expects the full input (kernel
            ``[in_features, O]``); scatter returns the per-device partial sums ``[n, ..., O]``.
        kernel_init: Initializer ``init(generator, shape, dtype)`` of the kernel.
        kernel_init_adjustment: Factor on the kernel init in the sharded modes.
        use_bias: Whether the dense layer has a bias.
        dense_name: Name of the sharded sub-module.
        mesh: The torch_xla mesh (keyword-only).
        seed: Init seed (None: drawn from torch's global generator).
        dtype: Parameter dtype.

    Raises:
        ValueError: unknown ``tp_mode``, features not positive, ``out_features`` not divisible by
            n in scatter mode, a mesh without ``model_axis_name``, SPMD not enabled; at call time an
            input on the wrong device or of the wrong shape.
    """

    def __init__(self, in_features: int, out_features: int, model_axis_name: str,
                 tp_mode: Literal["scatter", "gather", "none"] = "none",
                 skip_communication: bool = False, kernel_init: Callable | None = None,
                 kernel_init_adjustment: float = 1.0, use_bias: bool = True,
                 dense_name: str = "module", *, mesh, seed: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_tp_mode(tp_mode)
        _check_features(in_features=in_features, out_features=out_features)
        _mesh.require_spmd()
        n = axis_size(model_axis_name, mesh=mesh)
        kernel_init = lecun_normal() if kernel_init is None else kernel_init
        self.in_features, self.out_features = in_features, out_features
        self.model_axis_name, self.tp_mode = model_axis_name, tp_mode
        self.skip_communication, self.use_bias = bool(skip_communication), bool(use_bias)
        self.dense_name, self.mesh, self.axis_size = dense_name, mesh, n
        self.mode = tp_mode if n > 1 else "none"
        seed = draw_seed(seed)
        if self.mode == "none":
            self.Dense_0 = _seeded_dense(in_features, out_features, use_bias, kernel_init, dtype, seed)
            return
        if self.mode == "scatter" and not self.skip_communication and out_features % n:
            raise ValueError(f"out_features={out_features}: expected a number divisible by the "
                             f"size {n} of axis {model_axis_name!r} for tp_mode='scatter'")
        kernel_in = in_features * n if (self.mode == "gather" and not self.skip_communication) \
            else in_features
        wrapper = ModelParallelismWrapper(
            model_axis_name=model_axis_name,
            module_fn=functools.partial(
                Dense, kernel_in, out_features,
                kernel_init=scale_init(kernel_init, kernel_init_adjustment), use_bias=use_bias,
                dtype=dtype),
            mesh=mesh, seed=seed)
        self.add_module(dense_name, wrapper)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to the stacked-view input ``x`` ``[n, ..., in_features]``."""
        _check_input(x, self.axis_size, self.in_features, self.model_axis_name)
        if self.mode == "none":
            return _apply_replicated(self.Dense_0, x, self.mesh, self.model_axis_name)
        dense = getattr(self, self.dense_name)
        if self.mode == "gather":
            if not self.skip_communication:
                x = all_gather_features(x, self.model_axis_name, mesh=self.mesh)
            return dense(x)
        y = dense(x)
        if self.skip_communication:
            return y
        return reduce_scatter_features(y, self.model_axis_name, mesh=self.mesh)


# ------------------------------------------------------------------------------ ring collectives
def async_gather(x: PyTree, axis_name: str, shift_up: bool = True, *, mesh) -> list[PyTree]:
    """All-gather by n-1 ring permutations.

    Args:
        x: Stacked-view tensor ``[n, ...]`` (or pytree of them).
        axis_name: The axis to gather over (size n).
        shift_up: Send from device j to j+1 (else to j-1).
        mesh: The torch_xla mesh (keyword-only).

    Returns:
        List of n stacked tensors: element i has row d = ``x[d - i]`` (shift up) or ``x[d + i]``
        (shift down), mod n. Element 0 is ``x`` itself.
    """
    n = axis_size(axis_name, mesh=mesh)
    ps = [x]
    for _ in range(1, n):
        ps.append(ring_permute(ps[-1], axis_name, shift_up=shift_up, mesh=mesh))
    return ps


def async_gather_bidirectional(x: torch.Tensor, axis_name: str, shift_up: bool = True, *,
                               mesh) -> list[torch.Tensor]:
    """All-gather by ring permutations in both directions (ceil((n-1)/2) up, floor((n-1)/2) down).

    Steps alternate: odd steps shift the "up" chain, even steps the "down" chain, so each value
    travels at most n/2 hops. Returns the same list, in the same order, as :func:`async_gather`
    with the same ``shift_up``.
    """
    n = axis_size(axis_name, mesh=mesh)
    ups, downs = [], []
    p_up = p_down = x
    for step in range(1, n):
        if step % 2:
            p_up = ring_permute(p_up, axis_name, shift_up=True, mesh=mesh)
            ups.append(p_up)
        else:
            p_down = ring_permute(p_down, axis_name, shift_up=False, mesh=mesh)
            downs.append(p_down)
    if shift_up:
        return [x] + ups + downs[::-1]
    return [x] + downs + ups[::-1]


def async_gather_split(x: torch.Tensor, axis_name: str, *, mesh) -> list[torch.Tensor]:
    """All-gather with the features split in halves, one half travelling each way round the ring.

    Returns a list of length ``2n - 1`` with rows d: ``[x, lo(d-1), ..., lo(d-n+1), hi(d+1), ...,
    hi(d+n-1)]`` (indices mod n), where ``lo(e)`` / ``hi(e)`` are the first / second half of the
    features of ``x[e]``. For n == 1: ``[x]``. ValueError if the features are odd (n > 1).
    """
    n = axis_size(axis_name, mesh=mesh)
    if n == 1:
        return [x]
    lo, hi = split_features(x, 2, argument="x")
    return [x] + async_gather(lo, axis_name, shift_up=True, mesh=mesh)[1:] + async_gather(
        hi, axis_name, shift_up=False, mesh=mesh)[1:]


def _check_scatter_inputs(xs: Sequence[PyTree], axis_name: str, mesh) -> int:
    n = axis_size(axis_name, mesh=mesh)
    if len(xs) != n:
        raise ValueError(f"len(xs)={len(xs)}: expected one input per device, the size {n} of axis "
                         f"{axis_name!r}")
    return n


def async_scatter(xs: Sequence[PyTree], axis_name: str, shift_up: bool = True, *,
                  mesh) -> PyTree:
    """Scatter-sum by n-1 ring permutations (the ring form of ``psum_scatter``).

    Args:
        xs: n stacked-view tensors (or pytrees) of equal shapes. With ``shift_up``, row e of
            ``xs[i]`` is added into row ``e - 1 - i (mod n)`` of the result (shift down:
            ``e + 1 + i``).
        axis_name: The axis to scatter over (size n).
        shift_up: Send partial sums from device j to j+1 (else to j-1).
        mesh: The torch_xla mesh (keyword-only).

    Returns:
        The stacked sum, shaped like ``xs[0]``.

    Raises:
        ValueError: if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name, mesh)
    y = xs[0]
    for x in xs[1:]:
        y = pytree.tree_map(torch.add, ring_permute(y, axis_name, shift_up=shift_up, mesh=mesh), x)
    return y


def async_scatter_split(xs: Sequence[PyTree], axis_name: str, *, mesh) -> PyTree:
    """Scatter-sum with the features split: the first ``F//2`` go up the ring, the rest down.

    Row e of ``xs[i]``: its first ``F//2`` features go to row ``e - 1 - i``, the other
    ``F - F//2`` to row ``e + 1 + i`` (mod n). Returns the stacked sum ``[n, ..., F]``.
    ValueError if ``len(xs)`` is not the axis size.
    """
    _check_scatter_inputs(xs, axis_name, mesh)

    def halves(x):
        lo = pytree.tree_map(lambda a: a[..., : a.shape[-1] // 2], x)
        hi = pytree.tree_map(lambda a: a[..., a.shape[-1] // 2:], x)
        return lo, hi

    y_up, y_down = halves(xs[0])
    for x in xs[1:]:
        x_up, x_down = halves(x)
        y_up = pytree.tree_map(torch.add, ring_permute(y_up, axis_name, shift_up=True, mesh=mesh),
                               x_up)
        y_down = pytree.tree_map(torch.add,
                                 ring_permute(y_down, axis_name, shift_up=False, mesh=mesh), x_down)
    return pytree.tree_map(
        lambda a, b: _mesh.mark_activation(torch.cat([a, b], -1), mesh, axis_name), y_up, y_down)


# ------------------------------------------------------------------------------- TPAsyncDense
class TPAsyncDense(nn.Module):
    """Tensor-parallel dense layer whose communication is a ring of collective-permutes.

    Same shapes as :class:`TPDense` except that scatter returns ``[n, ..., out_features]``. One
    sub-module ``shard_i`` (a :class:`ModelParallelismWrapper` of a :class:`Dense`
    ``[in_features, out_features]``) per ring step, bias only on ``shard_0``. Gather: ``y[d] =
    sum_i shard_i[d](x[d - i])``; scatter: ``shard_i[e](x[e])`` lands in row ``e - 1 - i`` (see
    :func:`async_scatter` / :func:`async_scatter_split`).

    Args:
        in_features: Last dim of the per-device input (F/n of a global F in gather/scatter).
        out_features: The per-step dense layer's output features O.
        model_axis_name: The name of the model axis.
        tp_mode: "scatter", "gather" or "none" (the latter used whenever the axis size is 1).
        kernel_init: Initializer ``init(generator, shape, dtype)`` of the kernel.
        kernel_init_adjustment: Factor on the kernel init in the sharded modes.
        use_bias: Whether the layer has a bias (on ``shard_0`` only).
        dense_name: Kept for API compatibility; the sub-modules are named ``shard_i``.
        use_bidirectional_gather: Gather with :func:`async_gather_bidirectional` (else
            :func:`async_gather`).
        use_bidirectional_scatter: Scatter with :func:`async_scatter_split` (else
            :func:`async_scatter`).
        mesh: The torch_xla mesh (keyword-only).
        seed: Init seed (None: drawn from torch's global generator).
        dtype: Parameter dtype.
    """

    def __init__(self, in_features: int, out_features: int, model_axis_name: str,
                 tp_mode: Literal["scatter", "gather", "none"] = "none",
                 kernel_init: Callable | None = None, kernel_init_adjustment: float = 1.0,
                 use_bias: bool = True, dense_name: str = "module",
                 use_bidirectional_gather: bool = True, use_bidirectional_scatter: bool = False,
                 *, mesh, seed: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_tp_mode(tp_mode)
        _check_features(in_features=in_features, out_features=out_features)
        _mesh.require_spmd()
        n = axis_size(model_axis_name, mesh=mesh)
        kernel_init = lecun_normal() if kernel_init is None else kernel_init
        self.in_features, self.out_features = in_features, out_features
        self.model_axis_name, self.tp_mode, self.use_bias = model_axis_name, tp_mode, bool(use_bias)
        self.dense_name, self.mesh, self.axis_size = dense_name, mesh, n
        self.use_bidirectional_gather = bool(use_bidirectional_gather)
        self.use_bidirectional_scatter = bool(use_bidirectional_scatter)
        self.mode = tp_mode if n > 1 else "none"
        seed = draw_seed(seed)
        if self.mode == "none":
            self.shard_0 = _seeded_dense(in_features, out_features, use_bias, kernel_init, dtype, seed)
            return
        for i in range(n):
            self.add_module(f"shard_{i}", ModelParallelismWrapper(
                model_axis_name=model_axis_name,
                module_fn=functools.partial(
                    Dense, in_features, out_features,
                    kernel_init=scale_init(kernel_init, kernel_init_adjustment), dtype=dtype),
                module_kwargs={"use_bias": i == 0 and self.use_bias},
                mesh=mesh, seed=fold_in(seed, i)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to the stacked-view input ``x`` ``[n, ..., in_features]``."""
        _check_input(x, self.axis_size, self.in_features, self.model_axis_name)
        if self.mode == "none":
            return _apply_replicated(self.shard_0, x, self.mesh, self.model_axis_name)
        n = self.axis_size
        shards = [getattr(self, f"shard_{i}") for i in range(n)]
        if self.mode == "gather":
            gather = async_gather_bidirectional if self.use_bidirectional_gather else async_gather
            xs = gather(x, self.model_axis_name, mesh=self.mesh)
            ys = [shard(xi) for shard, xi in zip(shards, xs)]
            return functools.reduce(torch.add, ys)
        ys = [shard(x) for shard in shards]
        scatter = async_scatter_split if self.use_bidirectional_scatter else async_scatter
        return scatter(ys, self.model_axis_name, mesh=self.mesh)
