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


def _block_of(device_id: int, axis_size: int, rows: int) -> slice:
    """Rows that device ``device_id`` must hold for a dim of ``rows`` sharded over 'tp'.

    Mesh (dp, fsdp, pp, tp) = (8/n, 1, 1, n) row-major over ids 0..7: tp coordinate = id % n.
    """
    size = rows // axis_size
    j = device_id % axis_size
    return slice(j * size, (j + 1) * size)


@pytest.mark.parametrize("sharded_dim", [0, 1])
def test_mark_sharding_places_each_block_on_its_devices(xla_device, axis_size, sharded_dim):
    """The placed shards (read back per device), not only the annotation: device d holds block
    ``d % n`` of the sharded dim and the full other dim; dp replicas hold equal blocks."""
    from torch_impl import xla

    mesh = create_mesh(ParallelConfig(model_axis_size=axis_size))
    x = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)
    x = x if sharded_dim == 0 else x.T.contiguous()
    spec = ("tp", None) if sharded_dim == 0 else (None, "tp")
    t = mark_sharding(x.to(xla_device), mesh, spec)
    shards = xla.local_shards(t)
    assert [d for d, _, _ in shards] == list(range(8))
    for device_id, index, data in shards:
        want = [slice(None), slice(None)]
        want[sharded_dim] = _block_of(device_id, axis_size, 8)
        torch.testing.assert_close(data, x[tuple(want)], rtol=0, atol=0)
        assert data.shape[sharded_dim] == 8 // axis_size


def test_mark_stacked_places_row_j_on_tp_coordinate_j(xla_device):
    from torch_impl import xla
    from torch_impl.mesh import mark_stacked

    mesh = create_mesh(ParallelConfig(data_axis_size=2, model_axis_size=4))
    x = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)
    t = mark_stacked(x.to(xla_device), mesh, "tp")
    for device_id, _, data in xla.local_shards(t):
        torch.testing.assert_close(data, x[device_id % 4:device_id % 4 + 1], rtol=0, atol=0)
