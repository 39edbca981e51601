"""Device meshes for the torch_xla SPMD backend, and the thin layer over torch_xla.

Every torch_xla call the library makes about meshes, devices and shardings goes through this
module, so the stacked-view code elsewhere could move to another SPMD backend by rewriting this
file alone.
"""

from __future__ import annotations

import numpy as np
import torch

from .configs import ParallelConfig, mesh_axis_names, mesh_axis_sizes

__all__ = ["create_mesh", "check_axis", "require_spmd", "xla_device", "num_devices",
           "mark_sharding", "check_on_device"]


def _xla():
    import torch_xla
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    return torch_xla, xs, xr


def require_spmd() -> None:
    """Raise ValueError unless torch_xla SPMD mode is on (``torch_xla.runtime.use_spmd()``)."""
    _, _, xr = _xla()
    if not xr.is_spmd():
        raise ValueError("torch_xla SPMD is not enabled: call torch_xla.runtime.use_spmd() before "
                         "creating any XLA tensor (and set PJRT_DEVICE, e.g. PJRT_DEVICE=CPU "
                         "CPU_NUM_DEVICES=8 on a CPU host)")


def xla_device() -> torch.device:
    """The SPMD virtual device that global-view tensors live on."""
    torch_xla, _, _ = _xla()
    return torch_xla.device()


def num_devices() -> int:
    """Number of devices in the SPMD program (all of them: torch_xla meshes cover every device)."""
    _, _, xr = _xla()
    return int(xr.global_runtime_device_count())


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
    _, xs, _ = _xla()
    n = num_devices()
    shape = mesh_axis_sizes(config, n)
    return xs.Mesh(np.arange(n), shape, mesh_axis_names(config))


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
    _, xs, _ = _xla()
    spec = tuple(spec)
    if len(spec) != tensor.dim():
        raise ValueError(f"spec={spec!r} has {len(spec)} entries for a tensor of rank {tensor.dim()}")
    xs.mark_sharding(tensor, mesh, spec)
    return tensor
