"""torch_impl.mesh: create_mesh and the thin torch_xla layer on 8 CPU devices."""

import numpy as np
import pytest
import torch

from torch_impl.configs import ParallelConfig
from torch_impl.mesh import check_axis, check_on_device, create_mesh, mark_sharding


def test_mesh_axes_and_inferred_size(xla_device, axis_size):
    mesh = create_mesh(ParallelConfig(model_axis_size=axis_size))
    assert tuple(mesh.axis_names) == ("dp", "fsdp", "pp", "tp")
    assert tuple(mesh.mesh_shape) == (8 // axis_size, 1, 1, axis_size)
    assert check_axis(mesh, "tp") == axis_size
    np.testing.assert_array_equal(np.asarray(mesh.device_ids), np.arange(8))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(data_axis_size=3), "multiply to 3, but there are 8 devices"),
    (dict(data_axis_size=-1, model_axis_size=-1), "at most one axis size may be inferred"),
    (dict(pipeline_axis_size=0), "pipeline_axis_size=0"),
])
def test_mesh_errors(xla_device, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_mesh(ParallelConfig(**kwargs))


def test_missing_axis_and_wrong_device(xla_device):
    mesh = create_mesh(ParallelConfig(model_axis_size=2))
    with pytest.raises(ValueError, match="'model' is not an axis"):
        check_axis(mesh, "model")
    with pytest.raises(ValueError, match="is on device cpu"):
        check_on_device(torch.zeros(2), "x")
    check_on_device(torch.zeros(2, device=xla_device), "x")
    with pytest.raises(ValueError, match="2 entries for a tensor of rank 1"):
        mark_sharding(torch.zeros(4, device=xla_device), mesh, ("tp", None))


def test_sharded_tensor_round_trips(xla_device, axis_size):
    mesh = create_mesh(ParallelConfig(model_axis_size=axis_size))
    x = torch.randn(axis_size * 2, 3)
    t = mark_sharding(x.to(xla_device), mesh, ("tp", None))
    torch.testing.assert_close((t * 2).cpu(), x * 2, rtol=0, atol=0)
