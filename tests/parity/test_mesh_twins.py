"""Both backends build the same mesh from the same ParallelConfig: same names, same device ids."""

import numpy as np
import pytest

from jax_impl.configs import ParallelConfig
from jax_impl.mesh import create_mesh as jax_create_mesh
from torch_impl.mesh import create_mesh as torch_create_mesh


@pytest.mark.parametrize("sizes", [
    dict(model_axis_size=1), dict(model_axis_size=2), dict(model_axis_size=4),
    dict(model_axis_size=8), dict(data_axis_size=2, pipeline_axis_size=2, model_axis_size=-1),
    dict(data_axis_size=1, fsdp_axis_size=2, pipeline_axis_size=4, model_axis_size=1),
])
def test_device_id_at_every_coordinate_is_equal(jax_devices, xla_device, sizes):
    cfg = ParallelConfig(**sizes)
    jm, tm = jax_create_mesh(cfg), torch_create_mesh(cfg)
    assert tuple(jm.axis_names) == tuple(tm.axis_names)
    jax_ids = np.vectorize(lambda d: d.id)(jm.devices)
    torch_ids = np.asarray(tm.device_ids).reshape(tm.mesh_shape)
    assert jax_ids.shape == torch_ids.shape
    for coord in np.ndindex(jax_ids.shape):
        assert jax_ids[coord] == torch_ids[coord], coord
