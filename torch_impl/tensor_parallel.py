"""Tensor-parallel dense layers in the global "stacked" view (twin of jax_impl.tensor_parallel).

Same public names, in the same order, as the JAX module, plus two torch-only helpers at the end
(``Dense``, the twin of ``flax.linen.Dense``, and ``lecun_normal``, both from
:mod:`torch_impl.dense`). The ring helpers ``async_gather*`` / ``async_scatter*`` live in
:mod:`torch_impl.async_collectives` (twin of :mod:`jax_impl.async_collectives`) and are
re-exported here. Every function and layer sees
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

A pipeline stage is a :class:`ModelParallelismWrapper` over the pipeline axis too (as in JAX):
:meth:`ModelParallelismWrapper.from_modules` stacks p stages that already exist.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import mesh as _mesh
from . import vmap_axes, xla
from .array_utils import draw_seed, fold_in, fold_rng_over_axis, stack_params
from .async_collectives import (async_gather, async_gather_bidirectional,  # noqa: F401
                                async_gather_split, async_scatter, async_scatter_split)
from .collectives import all_gather_features, axis_size, copy_to_axis, reduce_scatter_features
from .dense import Dense, lecun_normal

__all__ = ["ModelParallelismWrapper", "scale_init", "TPDense", "TPAsyncDense", "async_gather",
           "async_gather_bidirectional", "async_gather_split", "async_scatter",
           "async_scatter_split", "Dense", "lecun_normal"]

PyTree = Any
TP_MODES = ("scatter", "gather", "none")


def _check_tp_mode(tp_mode: str) -> None:
    if tp_mode not in TP_MODES:
        raise ValueError(f"tp_mode={tp_mode!r}: expected one of {TP_MODES}")


def scale_init(init_fn: Callable, scale_factor: float = 1.0) -> Callable:
    """Return an initializer that multiplies the output of ``init_fn`` by ``scale_factor``."""

    def _init_fn(*args, **kwargs):
        return scale_factor * init_fn(*args, **kwargs)

    return _init_fn


# ------------------------------------------------------------------------- ModelParallelismWrapper
def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = path.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


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
    dim 0 sharded over the axis. No communication. Inside the vmap the axis is declared
    (:func:`torch_impl.vmap_axes.vmapped_axis`), so the wrapped module's own annotations see it,
    and random ops draw different numbers per device.

    :meth:`from_modules` wraps n modules that already exist instead (a pipeline stage: JAX wraps
    the stage in this class over the pipeline axis).

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

    Example::

        wrapper = ModelParallelismWrapper("tp", functools.partial(Dense, 4, 8), mesh=mesh)
        y = wrapper(x)    # x [n, ..., 4] -> [n, ..., 8], row j through device j's Dense
    """

    def __init__(self, model_axis_name: str, module_fn: Callable[..., nn.Module],
                 mask_except_model_idx: int | None = None, split_rngs: bool = True,
                 module_kwargs: Mapping[str, Any] | None = None, *, mesh, seed: int | None = None):
        super().__init__()
        _mesh.require_spmd()
        n = axis_size(model_axis_name, mesh=mesh)
        self._configure(model_axis_name, mesh, n, stage=False)
        self.mask_except_model_idx = mask_except_model_idx
        self.split_rngs, self.module_kwargs = bool(split_rngs), dict(module_kwargs or {})
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
        stacked = stack_params([dict(m.named_parameters()) for m in replicas], model_axis_name,
                               mask_except=mask_except_model_idx, mesh=mesh)
        params = {name: nn.Parameter(value) for name, value in stacked.items()}
        for param in params.values():
            _mesh.mark_stacked(param, mesh, model_axis_name)
        self._hold(replicas[0], params, {})

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], model_axis_name: str, *,
                     mesh) -> "ModelParallelismWrapper":
        """Wrap n existing modules of identical structure (module j's weights are device j's).

        The pipeline's stacked stage (``torch_impl.pipeline_parallel.PipelineModule``): the
        parameters AND buffers of ``modules`` are stacked ``[n, ...]`` where the modules live
        (CPU until :meth:`shard_`); ``forward(h, *args, **kwargs)`` maps only ``h`` over dim 0
        (the other arguments go to every row unchanged, the same for every stage), and leaves the
        output's sharding to the caller (the pipeline constrains it each step).

        Raises:
            ValueError: if the mesh has no ``model_axis_name`` or ``len(modules)`` is not n.

        Example::

            stage = ModelParallelismWrapper.from_modules([Stage() for _ in range(4)], "pp",
                                                         mesh=mesh).shard_()
            y = stage(h)      # h [4, b, ...]: row s through stage s
        """
        n = _mesh.check_axis(mesh, model_axis_name, "model_axis_name")
        modules = list(modules)
        if len(modules) != n:
            raise ValueError(f"modules has {len(modules)} modules: expected n={n}, the size of "
                             f"axis {model_axis_name!r}")
        params, buffers = torch.func.stack_module_state(modules)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._configure(model_axis_name, mesh, n, stage=True)
        self.mask_except_model_idx, self.split_rngs, self.module_kwargs = None, False, {}
        self._hold(modules[0], {k: nn.Parameter(v.detach().clone()) for k, v in params.items()},
                   {k: v.clone() for k, v in buffers.items()})
        return self

    def _configure(self, model_axis_name: str, mesh, n: int, stage: bool) -> None:
        self.model_axis_name, self.mesh, self.axis_size = model_axis_name, mesh, n
        self._stage = stage  # built by from_modules: forward maps only its first argument
        self.register_load_state_dict_post_hook(ModelParallelismWrapper._reshard_after_load)

    def _hold(self, template: nn.Module, params: dict, buffers: dict) -> None:
        """Keep ``template`` as the child ``sharded``, its tensors replaced by the stacked ones."""
        for name, value in {**params, **buffers}.items():
            owner, leaf = _owner(template, name)
            setattr(owner, leaf, value)  # keeps the registration order of the tensors
        self.sharded = template
        self._param_names = list(params)
        self._stacked_buffers = list(buffers)

    @staticmethod
    def _reshard_after_load(module, incompatible_keys) -> None:
        module.reshard()

    def reshard(self) -> None:
        """Re-annotate the stacked tensors on the XLA device as sharded on dim 0 (e.g. after
        replacing them); tensors still on the CPU (:meth:`from_modules`) are left to
        :meth:`shard_`."""
        for t in self._stacked_tensors().values():
            if t.device.type == "xla" and not xla.has_sharding(t):
                _mesh.mark_stacked(t, self.mesh, self.model_axis_name)

    def shard_(self) -> "ModelParallelismWrapper":
        """Move to the XLA device (if needed) and shard dim 0 of every stacked tensor."""
        self.to(_mesh.xla_device())
        for t in self._stacked_tensors().values():
            _mesh.mark_stacked(t.data if isinstance(t, nn.Parameter) else t, self.mesh,
                               self.model_axis_name)
        return self

    def partition_specs(self) -> dict[str, tuple]:
        """Partition spec of every stacked tensor, by its name in this module."""
        return {f"sharded.{name}": _mesh.stacked_spec(t.dim(), self.model_axis_name)
                for name, t in self._stacked_tensors().items()}

    def _stacked_tensors(self) -> dict[str, torch.Tensor]:
        """{path below ``sharded``: tensor} of the stacked parameters and buffers (current ones:
        ``functional_call`` may have substituted them)."""
        own = dict(self.sharded.named_parameters())
        own.update(self.sharded.named_buffers())
        return {name: own[name] for name in self._param_names + self._stacked_buffers}

    def _check_stacked(self, args) -> None:
        n = self.axis_size
        for i, leaf in enumerate(pytree.tree_leaves(args)):
            if not self._stage:
                _mesh.check_on_device(leaf, f"args (leaf {i})")
            if leaf.dim() < 1 or leaf.shape[0] != n:
                raise ValueError(f"args (leaf {i}).shape={tuple(leaf.shape)}: expected the stacked "
                                 f"view [n, ...] with n={n}, the size of axis "
                                 f"{self.model_axis_name!r}")

    def forward(self, *args, **kwargs):
        """Row j of every mapped argument through device j's shard (see the class docstring)."""
        mapped, shared = (args[:1], args[1:]) if self._stage else (args, ())
        self._check_stacked(mapped)
        module = self.sharded

        def per_device(tensors, *a):
            return torch.func.functional_call(module, tensors, (*a, *shared), kwargs)

        with vmap_axes.vmapped_axis(self.model_axis_name):  # annotations inside see dim 0
            out = torch.func.vmap(per_device, in_dims=(0,) * (1 + len(mapped)),
                                  randomness="different")(self._stacked_tensors(), *mapped)
        if self._stage:  # the pipeline constrains its state itself (traceably, inside its loop)
            return out
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


def _init_layer(layer: nn.Module, in_features: int, out_features: int, model_axis_name: str,
                tp_mode: str, kernel_init: Callable | None, use_bias: bool, dense_name: str, mesh,
                seed: int | None) -> tuple[int, Callable, int]:
    """The checks and attributes TPDense and TPAsyncDense share; returns (n, kernel_init, seed)."""
    _check_tp_mode(tp_mode)
    _check_features(in_features=in_features, out_features=out_features)
    _mesh.require_spmd()
    n = axis_size(model_axis_name, mesh=mesh)
    layer.in_features, layer.out_features = in_features, out_features
    layer.model_axis_name, layer.tp_mode, layer.use_bias = model_axis_name, tp_mode, bool(use_bias)
    layer.dense_name, layer.mesh, layer.axis_size = dense_name, mesh, n
    layer.mode = tp_mode if n > 1 else "none"  # every mode is "none" on an axis of size 1
    return n, lecun_normal() if kernel_init is None else kernel_init, draw_seed(seed)


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
        n, kernel_init, seed = _init_layer(self, in_features, out_features, model_axis_name,
                                           tp_mode, kernel_init, use_bias, dense_name, mesh, seed)
        self.skip_communication = bool(skip_communication)
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
        n, kernel_init, seed = _init_layer(self, in_features, out_features, model_axis_name,
                                           tp_mode, kernel_init, use_bias, dense_name, mesh, seed)
        self.use_bidirectional_gather = bool(use_bidirectional_gather)
        self.use_bidirectional_scatter = bool(use_bidirectional_scatter)
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
