"""Data parallelism and FSDP on torch_xla SPMD, in the global view (twin of jax_impl.data_parallel).

Same public names, in the same order, as the JAX module (plus ``Partitioned``, the twin of
``flax.linen.Partitioned``, and the two wrapper modules at the end). Functions that need the mesh
take it as the keyword-only argument ``mesh``.

Global view. The JAX code runs per device under ``shard_map``: the batch is split over the data
and FSDP axes, each device's loss is the mean over its rows and the gradients are averaged
explicitly. Here tensors are global: the batch ``[B, ...]`` is annotated as sharded over
``('dp', 'fsdp')`` and the loss is the mean over all B rows, so a parameter's ``.grad`` already
IS the mean over the data shards (the same numbers as JAX after ``sync_gradients``); the SPMD
partitioner inserts the cross-device sums. A parameter keeps its global shape; FSDP only changes
its sharding annotation, so ``state_dict`` keys, shapes and values equal the JAX global arrays.

- :func:`shard_params`: re-annotate each large-enough parameter as sharded over the FSDP axis on
  the dim chosen by :func:`ringpar.fsdp_layout.fsdp_shard_dim` (the JAX rule, one place), keeping
  the axes it is already sharded over (e.g. a tensor-parallel ``'tp'`` dim 0). Each device then
  stores 1/n of it.
- :func:`gather_array_with_mean_grads` / :func:`gather_params`: forward, a replicated copy over
  the FSDP axis (optionally cast to ``gather_dtype`` before the all-gather); backward, the
  gradient (cast to ``grad_scatter_dtype``) re-annotated as sharded, then cast back.
- :func:`shard_module_params`: a module whose parameters are stored sharded and gathered on each
  call (:class:`FSDPModule`; same ``state_dict`` keys as the wrapped module).
- :func:`sync_gradients`: the identity on the values (see above), kept so training code reads
  the same on both backends; it checks the axis names.
- :func:`prepare_module`: FSDP for ``config.fsdp_modules``, then remat (:class:`RematModule`,
  torch_xla's checkpoint with optimization barriers) for ``config.remat``.

Compiled collectives (measured on 8 CPU devices, ``tests/torch/test_data_parallel.py``), the same
as JAX's (``tests/parity/test_data_parallel_twins.py``): forward one ``all-gather`` over the FSDP
axis per sharded parameter; backward one ``reduce-scatter`` over it, then an ``all-reduce`` of the
slice over the other data axes. For that :class:`FSDPModule` runs its module per data shard
when the batch is sharded over the FSDP axis (:mod:`torch_impl.fsdp_rows`: in the global view a
gradient is already the sum over the batch, and the partitioner alone all-reduces it whole and
slices it). Otherwise (batch not sharded over the FSDP axis, or its layout unknown) the module
runs in the global view (:func:`gather_params`: same numbers, that all-reduce + slice).

Known torch_xla behaviours handled here: re-annotating a sharded tensor needs its annotation
cleared first (:func:`shard_params` does); loading fresh XLA tensors with ``load_state_dict``
leaves parameters replicated (the wrappers' post-load hook re-shards);
``torch.utils.checkpoint`` raises on XLA tensors (remat uses torch_xla's checkpoint).

Example::

    cfg = ParallelConfig(data_axis_size=2, fsdp_axis_size=4, fsdp_modules=["MLP"],
                         fsdp_min_weight_size=0)
    mesh = create_mesh(cfg)
    mlp = prepare_module(MLP().to(xla.device()), "MLP", cfg, mesh=mesh)  # params sharded
    loss = mlp(x_global).pow(2).mean(); loss.backward()       # grads: mean over the batch
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ringpar.fsdp_layout import check_module_name, fsdp_shard_dim, sharded_names

from . import fsdp_rows
from . import mesh as _mesh
from . import xla
from .configs import ParallelConfig

__all__ = ["Partitioned", "shard_params", "gather_array_with_mean_grads", "gather_params",
           "shard_module_params", "sync_gradients", "prepare_module", "FSDPModule",
           "RematModule"]

PyTree = Any
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Partitioned(NamedTuple):
    """Twin of ``flax.linen.Partitioned``: a tensor and its partition names (one per dim)."""

    value: torch.Tensor
    names: tuple


def _is_partitioned(x: Any) -> bool:
    return isinstance(x, Partitioned)


def _dtype(value: Any, argument: str) -> torch.dtype | None:
    """None or a torch dtype from a torch dtype or one of the ParallelConfig dtype strings."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"{argument}={value!r}: expected None, a torch.dtype or one of "
                     f"{tuple(_DTYPES)}")


def _current_names(x: torch.Tensor, mesh) -> tuple:
    """Partition names of ``x`` read back from its sharding annotation (all None if none)."""
    from .linear import get_sharding  # the reader of annotations lives with the linear layers

    spec = get_sharding(x, mesh=mesh)
    if spec is not None:
        return tuple(spec)
    text = xla.sharding_text(x) if x.device.type == "xla" else ""
    if text not in ("", "{replicated}"):
        raise ValueError(f"a parameter of shape {tuple(x.shape)} has the sharding {text}, which "
                         f"is not a layout over the mesh {tuple(mesh.axis_names)}: pass it as "
                         f"Partitioned(tensor, names) with its partition names")
    return (None,) * x.dim()


def _local_shape(shape: Sequence[int], names: Sequence, mesh) -> tuple[int, ...]:
    """The per-device shape JAX's ``shard_params`` sees: dims named by other axes divided.

    The FSDP rule's size threshold counts per-device elements, so a ``[n_tp, F, O]`` stacked
    kernel is judged by ``F * O``, as its JAX twin ``Partitioned`` of per-device shape [1, F, O].
    """
    out = []
    for size, entry in zip(shape, names):
        axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        div = 1
        for a in axes:
            div *= _mesh.check_axis(mesh, a, "names")
        out.append(size // div)
    return tuple(out)


def shard_params(params: PyTree, axis_name: str, min_weight_size: int = 2**18, *,
                 mesh) -> PyTree:
    """Shard each large-enough parameter of ``params`` over ``axis_name`` (in place, by annotation).

    Args:
        params: Pytree (dict/list/tuple) of XLA tensors or :class:`Partitioned`; a plain tensor's
            names are read from its current sharding annotation (e.g. ``('tp', None, None)``).
        axis_name: The FSDP mesh axis (size n).
        min_weight_size: Parameters with at most this many elements stay replicated.
        mesh: The torch_xla mesh.

    Returns:
        The same pytree; each sharded leaf becomes ``Partitioned(tensor, names)`` with
        ``axis_name`` at the dim :func:`ringpar.fsdp_layout.fsdp_shard_dim` picks. The tensor is
        the same object, now annotated (device data is re-laid out: 1/n per device). Others are
        returned unchanged.

    Example:
        >>> # shard_params({"kernel": k}, "fsdp", 0, mesh=mesh)   # k [32, 128], fsdp = 4
        >>> # {'kernel': Partitioned(value=k, names=(None, 'fsdp'))}; each device holds [32, 32]
    """
    n = _mesh.check_axis(mesh, axis_name)

    def split(x):
        value, names = (x.value, x.names) if _is_partitioned(x) else (x, _current_names(x, mesh))
        _mesh.check_on_device(value, "params (leaf)")
        dim = fsdp_shard_dim(_local_shape(value.shape, names, mesh), n, min_weight_size, names,
                             axis_name)
        if dim is None:
            return x
        names = sharded_names(names, value.dim(), dim, axis_name)
        if xla.has_sharding(value):  # re-annotation needs the old one cleared (values kept)
            xla.clear_sharding(value)
        _mesh.mark_sharding(value, mesh, names)
        return Partitioned(value, names)

    return pytree.tree_map(split, params, is_leaf=_is_partitioned)


_copy = fsdp_rows.copy_cast


class _GatherMeanGrads(torch.autograd.Function):
    """Forward: replicated over the FSDP axis (all-gather); backward: sharded again (the grad)."""

    @staticmethod
    def forward(ctx, x, mesh, full_names, shard_names, gather_dt, scatter_dt):
        ctx.mesh, ctx.full_names, ctx.shard_names = mesh, full_names, shard_names
        ctx.scatter_dt, ctx.param_dt = scatter_dt, x.dtype
        return _mesh.mark_sharding(_copy(x, gather_dt), mesh, full_names)

    @staticmethod
    def backward(ctx, grad):
        # First the whole gradient (the sum over the data shards), then this device's slice:
        # marking the incoming gradient sharded right away lets the partitioner split its
        # producer on the FSDP dim instead (for an embedding's scatter-add: the batch rows are
        # all-gathered and the indices re-laid out by all-to-alls).
        g = _mesh.mark_sharding(_copy(grad, ctx.scatter_dt or ctx.param_dt), ctx.mesh,
                                ctx.full_names)
        g = _mesh.mark_sharding(g * 1, ctx.mesh, ctx.shard_names)
        return g.to(ctx.param_dt), None, None, None, None, None


def gather_array_with_mean_grads(x: torch.Tensor, axis: int, axis_name: str,
                                 gather_dtype: Any = None, grad_scatter_dtype: Any = None, *,
                                 mesh, names: Sequence | None = None) -> torch.Tensor:
    """All-gather the FSDP-sharded ``x`` (global view: replicate it over ``axis_name``).

    Args:
        x: A global tensor sharded over ``axis_name`` on dim ``axis``.
        axis: The sharded dim.
        axis_name: The FSDP axis.
        gather_dtype: None, a torch dtype or "float32" / "bfloat16" / "float16": cast before the
            all-gather (the output has this dtype).
        grad_scatter_dtype: The same choices; the gradient's dtype on the way back to the shards
            (default ``x.dtype``); the returned gradient has ``x.dtype``.
        mesh: The torch_xla mesh.
        names: ``x``'s partition names (default: read from its annotation; ``axis`` is forced
            to ``axis_name``). The output keeps the other names (e.g. ``'tp'``).

    Returns:
        ``x``'s values (cast), replicated over ``axis_name``. Its gradient reaching ``x`` is the
        incoming gradient, i.e. already the mean over the data shards in the global view (JAX
        divides its per-device sums by n to get the same numbers).
    """
    _mesh.check_axis(mesh, axis_name)
    _mesh.check_on_device(x)
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis={axis}: expected a dim of a tensor of shape {tuple(x.shape)}")
    axis %= x.dim()
    names = tuple(names) if names is not None else _current_names(x, mesh)
    shard = sharded_names(names, x.dim(), axis, axis_name)
    full = shard[:axis] + (None,) + shard[axis + 1:]
    return _GatherMeanGrads.apply(x, mesh, full, shard, _dtype(gather_dtype, "gather_dtype"),
                                  _dtype(grad_scatter_dtype, "grad_scatter_dtype"))


def gather_params(params: PyTree, axis_name: str, gather_dtype: Any = None,
                  grad_scatter_dtype: Any = None, *, mesh) -> PyTree:
    """Gather every :class:`Partitioned` leaf sharded over ``axis_name``.

    A leaf still partitioned over other axes stays ``Partitioned`` (``axis_name`` removed);
    otherwise it becomes the gathered tensor. Other leaves are unchanged.
    """

    def gather(p):
        if not (_is_partitioned(p) and axis_name in p.names):
            return p
        dim = p.names.index(axis_name)
        value = gather_array_with_mean_grads(p.value, dim, axis_name, gather_dtype,
                                             grad_scatter_dtype, mesh=mesh, names=p.names)
        names = p.names[:dim] + (None,) + p.names[dim + 1:]
        return Partitioned(value, names) if any(a is not None for a in names) else value

    return pytree.tree_map(gather, params, is_leaf=_is_partitioned)


def _wrap(target: Any, wrapper: Callable[[nn.Module], nn.Module]) -> Any:
    """Apply ``wrapper`` to a module, or to what a module factory (class, partial) builds."""
    if isinstance(target, nn.Module):
        return wrapper(target)
    if not callable(target):
        raise ValueError(f"target={target!r}: expected an nn.Module or a callable returning one")

    def build(*args, **kwargs):
        return wrapper(target(*args, **kwargs))

    return build


def shard_module_params(target: nn.Module | Callable, axis_name: str,
                        min_weight_size: int = 2**18, gather_dtype: Any = None,
                        grad_scatter_dtype: Any = None, *, mesh) -> Any:
    """Store the parameters of ``target`` sharded over ``axis_name``; gather them on every call.

    ``target`` is an ``nn.Module`` on the XLA device (returns an :class:`FSDPModule`) or a
    callable building one (returns a callable building the wrapped module), the twin of passing
    a linen class to ``nn.map_variables``.
    """
    return _wrap(target, lambda m: FSDPModule(m, axis_name, min_weight_size, gather_dtype,
                                              grad_scatter_dtype, mesh=mesh))


def sync_gradients(grads: PyTree, axis_names: Sequence[str], *, mesh) -> PyTree:
    """Gradients averaged over ``axis_names``: in the global view they already are.

    With the loss the mean over the global batch (sharded over the data axes), autograd's
    ``.grad`` equals JAX's ``sync_gradients(grads, axis_names)`` result; the partitioner inserts
    the cross-device sums (all-reduce over the data axis). Returns ``grads`` unchanged after
    checking that every axis name is a mesh axis.
    """
    axis_names = (axis_names,) if isinstance(axis_names, str) else tuple(axis_names)
    for name in axis_names:
        _mesh.check_axis(mesh, name, "axis_names")
    return grads


def prepare_module(module: Any, name: str, config: ParallelConfig | None, *, mesh=None) -> Any:
    """Apply FSDP (``name in config.fsdp_modules``), then remat (``name in config.remat``).

    Args:
        module: An ``nn.Module`` (on the XLA device) or a callable building one.
        name: The module's kind as listed in the config (e.g. ``"Block"``).
        config: The ParallelConfig, or None (module returned unchanged).
        mesh: The torch_xla mesh; needed when FSDP applies.

    Returns:
        The module (or factory) wrapped in :class:`FSDPModule` and/or :class:`RematModule`; the
        wrappers keep the ``state_dict`` keys of ``module``.

    Raises:
        ValueError: if ``name`` is not a non-empty string, ``config`` not a ParallelConfig, or
            FSDP applies and ``mesh`` is None. Unknown names in the config's lists are checked by
            the model with :func:`ringpar.fsdp_layout.check_module_names`.

    Example:
        >>> cfg = ParallelConfig(fsdp_modules=["MLP"], remat=["MLP"])
        >>> # mlp = prepare_module(MLP().to(dev), "MLP", cfg, mesh=mesh)
    """
    check_module_name(name)
    if config is None:
        return module
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"config={config!r}: expected a ParallelConfig or None")
    if name in (config.fsdp_modules or ()):
        if mesh is None:
            raise ValueError(f"mesh=None: FSDP of module {name!r} (in config.fsdp_modules) needs "
                             f"the torch_xla mesh")
        module = shard_module_params(module, config.fsdp_axis_name, config.fsdp_min_weight_size,
                                     config.fsdp_gather_dtype, config.fsdp_grad_scatter_dtype,
                                     mesh=mesh)
    if name in (config.remat or ()):
        module = _wrap(module, RematModule)
    return module


# ------------------------------------------------------------------------------ the wrappers
class _Transparent(nn.Module):
    """A wrapper sharing the wrapped module's parameter, buffer and child dicts, so that its
    ``state_dict`` / ``named_parameters`` keys are exactly the wrapped module's (as
    ``nn.map_variables`` / ``nn.remat`` keep the JAX parameter paths)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"module={module!r}: expected an nn.Module")
        object.__setattr__(self, "wrapped", module)
        for attr in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            self.__dict__[attr] = module.__dict__[attr]
        self.register_load_state_dict_post_hook(_Transparent._after_load)

    @staticmethod
    def _after_load(module: "_Transparent", incompatible_keys) -> None:
        # load_state_dict walks the shared child dict and never visits the wrapped module
        # itself: run its post-load hooks (e.g. ModelParallelismWrapper's re-sharding) here.
        inner = module.__dict__["wrapped"]
        for hook in inner._load_state_dict_post_hooks.values():
            hook(inner, incompatible_keys)
        module.reshard()

    def reshard(self) -> None:
        """Restore this wrapper's sharding annotations (loading XLA tensors drops them)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["wrapped"], name)


class FSDPModule(_Transparent):
    """``module`` with its large parameters sharded over ``axis_name`` (see :func:`shard_params`).

    ``forward(*args, **kwargs)`` gathers them and runs ``module`` with the gathered values
    (``torch.func.functional_call``). When every tensor argument is positional and its batch
    dim is sharded over ``axis_name`` (read from its annotation, or the output of another
    FSDPModule), the module runs per data shard under ``vmap`` and the gradients are
    reduce-scattered (module docstring); outputs are joined again on the batch dim (that of an
    argument of the same rank, else the one dim of the per-shard batch size). ``fsdp_names``
    maps each sharded parameter's name to its partition names.
    """

    def __init__(self, module: nn.Module, axis_name: str, min_weight_size: int = 2**18,
                 gather_dtype: Any = None, grad_scatter_dtype: Any = None, *, mesh):
        super().__init__(module)
        self.axis_name, self.mesh = axis_name, mesh
        self.gather_dtype = _dtype(gather_dtype, "gather_dtype")
        self.grad_scatter_dtype = _dtype(grad_scatter_dtype, "grad_scatter_dtype")
        sharded = shard_params(dict(module.named_parameters()), axis_name, min_weight_size,
                               mesh=mesh)
        self.fsdp_names = {k: v.names for k, v in sharded.items() if _is_partitioned(v)}

    def reshard(self) -> None:
        """Re-annotate the sharded parameters with their ``fsdp_names`` (values unchanged).

        Runs after ``load_state_dict``: copying XLA tensors into the parameters (or
        ``assign=True``) leaves them replicated, i.e. every device would hold all of them.
        """
        params = dict(self.wrapped.named_parameters())
        for name, names in self.fsdp_names.items():
            p = params[name]
            if xla.has_sharding(p):
                xla.clear_sharding(p)
            _mesh.mark_sharding(p, self.mesh, names)

    def forward(self, *args, **kwargs):
        layout = (fsdp_rows.batch_layout(args, kwargs, self.axis_name, mesh=self.mesh)
                  if self.fsdp_names else None)
        if layout is None:
            return self._gathered_call(args, kwargs)
        return fsdp_rows.per_shard_call(self.wrapped, self.fsdp_names, self.axis_name,
                                        self.gather_dtype, self.grad_scatter_dtype, args, kwargs,
                                        layout, mesh=self.mesh)

    def _gathered_call(self, args, kwargs):
        """The global view: gathered parameters, gradients summed by the partitioner."""
        params = {k: Partitioned(p, self.fsdp_names[k]) if k in self.fsdp_names else p
                  for k, p in self.wrapped.named_parameters()}
        gathered = gather_params(params, self.axis_name, self.gather_dtype,
                                 self.grad_scatter_dtype, mesh=self.mesh)
        gathered = {k: v.value if _is_partitioned(v) else v for k, v in gathered.items()}
        return torch.func.functional_call(self.wrapped, gathered, args, kwargs)


class RematModule(_Transparent):
    """``module`` with activation rematerialisation: its forward is recomputed in the backward.

    Uses torch_xla's (reentrant) checkpoint, whose optimization barriers keep the recomputation
    in the compiled program. Tensors must be positional: keyword arguments are passed through
    unchanged, and a tensor among them raises ValueError (the reentrant checkpoint would drop its
    gradient). A zero-size anchor that requires grad is passed along, so the parameters get
    gradients even when no input requires grad (e.g. token ids).
    """

    def forward(self, *args, **kwargs):
        tensors = [k for k, v in kwargs.items() if pytree.tree_any(torch.is_tensor, v)]
        if tensors:
            raise ValueError(f"keyword arguments {tensors} hold tensors: pass tensors to a "
                             f"RematModule positionally (their gradients need the checkpoint)")
        anchor = torch.zeros((0,), device=xla.device(), requires_grad=True)

        def run(_anchor, *a):
            return self.wrapped(*fsdp_rows.keep_batch_layout(args, a), **kwargs)

        return xla.checkpoint(run, anchor, *args)
