"""Device meshes for the torch_xla SPMD backend, and the stacked-view sharding helpers.

Twin: :mod:`jax_impl.mesh` (the same mesh axes and device order from a ParallelConfig).

Every torch_xla call sits in :mod:`torch_impl.xla` (the one boundary module); this module adds
the library's checks and conventions on top (mesh axes from a ParallelConfig, ValueError on bad
input, the stacked-view spec). See ``docs/design.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from . import vmap_axes, xla
from .configs import ParallelConfig, mesh_axis_names, mesh_axis_sizes

__all__ = ["create_mesh", "check_axis", "require_spmd", "xla_device", "num_devices",
           "mark_sharding", "check_on_device", "axis_groups", "stacked_spec", "mark_stacked",
           "sharded_batch", "activation_spec", "mark_activation", "manual_reduce_scatter",
           "compiled_hlo", "enable_spmd", "sync"]


def require_spmd() -> None:
    """Raise ValueError unless torch_xla SPMD mode is on (``torch_xla.runtime.use_spmd()``)."""
    if not xla.is_spmd():
        raise ValueError("torch_xla SPMD is not enabled: call torch_xla.runtime.use_spmd() before "
                         "creating any XLA tensor (and set PJRT_DEVICE, e.g. PJRT_DEVICE=CPU "
                         "CPU_NUM_DEVICES=8 on a CPU host)")


def xla_device() -> torch.device:
    """The SPMD virtual device that global-view tensors live on."""
    return xla.device()


def num_devices() -> int:
    """Number of devices in the SPMD program (all of them: torch_xla meshes cover every device)."""
    return xla.device_count()


def create_mesh(config: ParallelConfig):
    """Create a torch_xla ``xs.Mesh`` with axes (data, fsdp, pipeline, model) named by ``config``.

    Device ids 0..N-1 are laid out row-major over the mesh shape, the same layout as
    ``jax_impl.mesh.create_mesh`` with the default device list. torch_xla meshes must cover every
    device, so the sizes must multiply to the device count (one may be -1 and is inferred).

    Raises:
        ValueError: on bad sizes (see ``mesh_axis_sizes``) or if SPMD is not enabled.
    """
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"config={config!r}: expected a ParallelConfig")
    require_spmd()
    n = num_devices()
    shape = mesh_axis_sizes(config, n)
    return xla.make_mesh(range(n), shape, mesh_axis_names(config))


def check_axis(mesh, axis_name: str, argument: str = "axis_name") -> int:
    """Return the size of ``axis_name`` in ``mesh``; ValueError if the mesh has no such axis."""
    names = tuple(mesh.axis_names or ())
    if axis_name not in names:
        raise ValueError(f"{argument}={axis_name!r} is not an axis of the mesh {names}")
    return int(mesh.mesh_shape[names.index(axis_name)])


def check_on_device(tensor: torch.Tensor, argument: str = "x") -> None:
    """ValueError unless ``tensor`` lives on the XLA device."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{argument}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "xla":
        raise ValueError(f"{argument} is on device {tensor.device}, expected the XLA device "
                         f"{xla_device()}: move it with .to(torch_impl.mesh.xla_device())")


def mark_sharding(tensor: torch.Tensor, mesh, spec) -> torch.Tensor:
    """Annotate ``tensor`` with a sharding: ``spec`` has one mesh axis name (or None) per dim."""
    spec = tuple(spec)
    if len(spec) != tensor.dim():
        raise ValueError(f"spec={spec!r} has {len(spec)} entries for a tensor of rank {tensor.dim()}")
    if vmap_axes.is_traced(tensor):  # inside the pipeline's vmaps / scan: a traceable constraint
        return vmap_axes.constrain(tensor, mesh, spec)
    return xla.mark_sharding(tensor, mesh, spec)


# --------------------------------------------------------------------- stacked view helpers
def axis_groups(mesh, axis_name: str | Sequence[str]) -> list[list[int]]:
    """Device ids of each ring along ``axis_name``, one list per combination of the other axes.

    E.g. mesh (dp, fsdp, pp, tp) = (2, 1, 1, 4) over devices 0..7 gives ``[[0, 1, 2, 3],
    [4, 5, 6, 7]]`` for ``'tp'``: the replica groups JAX uses for a collective over that axis.
    Several axis names: the groups over all of them at once (row-major in the given order).
    """
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    for a in axes:
        check_axis(mesh, a)
    names = tuple(mesh.axis_names)
    ids = np.asarray(mesh.device_ids).reshape(tuple(mesh.mesh_shape))
    ids = np.moveaxis(ids, [names.index(a) for a in axes], list(range(-len(axes), 0)))
    return ids.reshape(-1, math.prod(ids.shape[ids.ndim - len(axes):])).tolist()


def stacked_spec(rank: int, axis_name: str) -> tuple:
    """Partition spec of a stacked-view tensor of ``rank`` dims: dim 0 over ``axis_name``."""
    return (axis_name,) + (None,) * (rank - 1)


def mark_stacked(tensor: torch.Tensor, mesh, axis_name: str) -> torch.Tensor:
    """Shard dim 0 of ``tensor`` over ``axis_name``; every other mesh axis keeps it replicated."""
    return mark_sharding(tensor, mesh, stacked_spec(tensor.dim(), axis_name))


# The innermost batch context (mesh, batch axes, batch dim of the stacked view), see sharded_batch.
_BATCH: list[tuple] = []


@contextlib.contextmanager
def sharded_batch(mesh, axes, dim: int = 1):
    """Within this context, stacked-view activations keep their batch dim sharded over ``axes``.

    :func:`mark_stacked` (parameters) replicates every dim but 0. An activation of a model whose
    batch is split over data axes (e.g. ``('dp', 'fsdp')``) would then be all-gathered over them
    in every tensor-parallel layer; JAX's ``shard_map`` keeps each device's rows local. Inside
    the context, :func:`mark_activation` (used by the collectives and tp layers for their
    activations) also shards dim ``dim`` of a stacked ``[n, ...]`` tensor (dim ``dim - 1`` of an
    unstacked one) over ``axes``, when that dim exists and its size divides. Only tensors marked
    on this same ``mesh`` object are affected; outside any context nothing changes. Example::

        with sharded_batch(mesh, ("dp", "fsdp")):      # x: [n, B, S, D/n]
            y = tp_layer(x)                               # batch rows stay on their devices
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if not axes:
        raise ValueError("axes=(): expected at least one mesh axis name for the batch")
    for a in axes:
        check_axis(mesh, a, "axes")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim={dim!r}: expected the batch dim of the stacked view, an int >= 1")
    _BATCH.append((mesh, axes, dim))
    try:
        yield
    finally:
        _BATCH.pop()


def activation_spec(shape, mesh, axis_name: str | None) -> tuple:
    """Partition spec of an activation of ``shape``: dim 0 over ``axis_name`` (None: not stacked,
    i.e. already summed over the axis), and the batch dim over the axes of the innermost
    :func:`sharded_batch` context of ``mesh`` (if any, and if that dim's size divides)."""
    rank = len(shape)
    spec = list(stacked_spec(rank, axis_name)) if axis_name is not None else [None] * rank
    if _BATCH and _BATCH[-1][0] is mesh:
        _, axes, dim = _BATCH[-1]
        d = dim if axis_name is not None else dim - 1
        size = math.prod(check_axis(mesh, a, "axes") for a in axes)
        if 0 <= d < rank and spec[d] is None and size > 1 and shape[d] % size == 0:
            spec[d] = axes if len(axes) > 1 else axes[0]
    return tuple(spec)


def mark_activation(tensor: torch.Tensor, mesh, axis_name: str | None) -> torch.Tensor:
    """:func:`mark_stacked` for activations: also keeps the batch dim sharded inside a
    :func:`sharded_batch` context (see :func:`activation_spec`; ``axis_name=None`` for a tensor
    without the stacked dim)."""
    return mark_sharding(tensor, mesh, activation_spec(tuple(tensor.shape), mesh, axis_name))


def manual_reduce_scatter(tensor: torch.Tensor, mesh, axis_name: str, dim: int,
                          spec=None) -> torch.Tensor:
    """Sum the stacked-view ``tensor`` over dim 0 and scatter ``dim`` in blocks over ``axis_name``.

    ``tensor`` is ``[n, ...]`` with dim 0 sharded over ``axis_name`` (size n). Inside a manual
    sharding region each device holds ``[1, ...]`` and one ``reduce-scatter`` over the rings of
    :func:`axis_groups` sums them and keeps block j of ``dim`` on device j; the result is
    ``[n, ...]`` with ``dim`` divided by n, dim 0 sharded again. This is the op that
    ``jax.lax.psum_scatter(tiled=True)`` emits; the automatic partitioner would instead emit an
    all-reduce for the same global computation. ``spec``: the sharding of ``tensor`` (default
    :func:`stacked_spec`; e.g. an :func:`activation_spec` keeping the batch sharded), kept by the
    result; ``dim`` must not be sharded by it.
    """
    n = check_axis(mesh, axis_name)
    dim = dim % tensor.dim()
    if dim == 0:
        raise ValueError("dim=0: the scattered dim must not be the stacked device dim 0")
    if tensor.shape[0] != n or tensor.shape[dim] % n:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)}: expected dim 0 of size {n} and "
                         f"dim {dim} divisible by {n} (size of axis {axis_name!r})")
    spec = stacked_spec(tensor.dim(), axis_name) if spec is None else tuple(spec)
    if len(spec) != tensor.dim() or spec[0] != axis_name or spec[dim] is not None:
        raise ValueError(f"spec={spec!r}: expected {tensor.dim()} entries starting with "
                         f"{axis_name!r} and None at the scattered dim {dim}")
    if vmap_axes.is_traced(tensor):  # inside the pipeline's vmaps / scan
        return vmap_axes.reduce_scatter_region(tensor, mesh, spec, dim, axis_groups(mesh, axis_name))
    local = xla.enable_manual_sharding(tensor, mesh, spec)
    local = xla.spmd_reduce_scatter(local, dim, axis_groups(mesh, axis_name))
    full = list(tensor.shape)
    full[dim] //= n
    return xla.disable_manual_sharding(local, mesh, spec, full)


# ------------------------------------------------------------------------- compiled programs
def compiled_hlo(tensors) -> str:
    """HLO text of the compiled, SPMD-partitioned program that computes ``tensors``.

    torch_xla compiles the pending graph of ``tensors`` (partitioner and optimization passes
    included) and prints the compiled module, whose collectives ``parity.hlo`` reads. Call it
    before the tensors are materialized (``.cpu()``, ``sync()``), e.g. with the forward outputs
    and the ``.grad`` of inputs and parameters after ``backward()`` to see forward plus backward.

    torch_xla reads ``XLA_DUMP_POST_OPTIMIZATIONS`` ONCE per process, at the first HLO request:
    this function sets it if unset, and raises RuntimeError if the process already made that
    first request without it (then set ``XLA_DUMP_POST_OPTIMIZATIONS=1`` at process start).
    ValueError if a tensor is not on the XLA device.
    """
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        check_on_device(t, f"tensors[{i}]")
    return xla.compiled_hlo(tensors)


# ------------------------------------------------------------------------------ runtime control
def enable_spmd() -> None:
    """Turn torch_xla SPMD mode on (idempotent); must run before any XLA tensor is created."""
    xla.enable_spmd()


def sync(wait: bool = False) -> None:
    """Compile and run the pending lazy graph; with ``wait``, block until the devices finish."""
    xla.sync()
    if wait:
        xla.wait_device_ops()
