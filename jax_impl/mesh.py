"""Device meshes for the JAX backend, built from a :class:`ParallelConfig` (twin of
:mod:`torch_impl.mesh`)."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from .configs import ParallelConfig, mesh_axis_names, mesh_axis_sizes

__all__ = ["create_mesh", "axis_size", "check_axis"]


def create_mesh(config: ParallelConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Create a ``jax.sharding.Mesh`` with axes (data, fsdp, pipeline, model) named by ``config``.

    Devices are laid out in the order given (default ``jax.devices()``) in row-major order over
    the mesh shape, the same layout as ``torch_impl.mesh.create_mesh``. One axis size may be -1
    and is inferred from the number of devices.

    Raises:
        ValueError: if the axis sizes do not multiply to the device count, more than one is -1, or
            one is < 1.
    """
    if not isinstance(config, ParallelConfig):
        raise ValueError(f"config={config!r}: expected a ParallelConfig")
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_axis_sizes(config, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), mesh_axis_names(config))


def check_axis(mesh: Mesh, axis_name: str, argument: str = "axis_name") -> int:
    """Return the size of ``axis_name`` in ``mesh``; ValueError if the mesh has no such axis."""
    if axis_name not in mesh.axis_names:
        raise ValueError(f"{argument}={axis_name!r} is not an axis of the mesh {tuple(mesh.axis_names)}")
    return int(mesh.shape[axis_name])


def axis_size(axis_name: str) -> int:
    """Size of a mapped axis inside ``shard_map`` (ValueError if the axis is not bound)."""
    return bound_axis_size(axis_name, "axis_name")


# Not in __all__: a JAX-only helper (torch meshes have no bound axes), used by the pipelines.
def bound_axis_size(axis_name: str, argument: str) -> int:
    """:func:`axis_size`, with the ValueError naming the caller's argument ``argument``."""
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as exc:
        raise ValueError(f"{argument}={axis_name!r} is not bound: call inside shard_map over a mesh "
                         f"with that axis") from exc
