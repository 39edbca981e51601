"""jax_impl.mesh.create_mesh on 8 CPU devices."""

import numpy as np
import pytest

from jax_impl.configs import ParallelConfig
from jax_impl.mesh import check_axis, create_mesh


def test_mesh_axes_and_inferred_size(jax_devices, axis_size):
    mesh = create_mesh(ParallelConfig(model_axis_size=axis_size))
    assert mesh.axis_names == ("dp", "fsdp", "pp", "tp")
    assert dict(mesh.shape) == {"dp": 8 // axis_size, "fsdp": 1, "pp": 1, "tp": axis_size}
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    np.testing.assert_array_equal(ids.ravel(), [d.id for d in jax_devices])
    assert check_axis(mesh, "tp") == axis_size


def test_mesh_names_from_config(jax_devices):
    cfg = ParallelConfig(data_axis_size=2, pipeline_axis_size=-1, model_axis_size=2,
                         data_axis_name="data", model_axis_name="model")
    mesh = create_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "pp", "model")
    assert mesh.devices.shape == (2, 1, 2, 2)


def test_mesh_on_a_subset_of_devices(jax_devices):
    mesh = create_mesh(ParallelConfig(model_axis_size=2), devices=jax_devices[:4])
    assert mesh.devices.shape == (2, 1, 1, 2)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(data_axis_size=3), "multiply to 3, but there are 8 devices"),
    (dict(data_axis_size=-1, fsdp_axis_size=-1), "at most one axis size may be inferred"),
    (dict(model_axis_size=0), "model_axis_size=0"),
])
def test_mesh_errors(jax_devices, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_mesh(ParallelConfig(**kwargs))


def test_mesh_rejects_non_config_and_missing_axis(jax_devices):
    with pytest.raises(ValueError, match="expected a ParallelConfig"):
        create_mesh({"model_axis_size": 2})
    with pytest.raises(ValueError, match="'model' is not an axis"):
        check_axis(create_mesh(ParallelConfig()), "model")


@pytest.mark.parametrize("sharded_dim", [0, 1])
def test_sharding_places_each_block_on_its_devices(jax_devices, axis_size, sharded_dim):
    """The placed shards, per device: device d holds block ``d % n`` of the sharded dim (the
    torch twin test checks the same mapping, tests/torch/test_mesh.py)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = create_mesh(ParallelConfig(model_axis_size=axis_size))
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    x = x if sharded_dim == 0 else np.ascontiguousarray(x.T)
    spec = P("tp", None) if sharded_dim == 0 else P(None, "tp")
    arr = jax.device_put(x, NamedSharding(mesh, spec))
    shards = sorted(arr.addressable_shards, key=lambda s: s.device.id)
    assert [s.device.id for s in shards] == list(range(8))
    size = 8 // axis_size
    for s in shards:
        j = s.device.id % axis_size
        want = [slice(None), slice(None)]
        want[sharded_dim] = slice(j * size, (j + 1) * size)
        np.testing.assert_array_equal(np.asarray(s.data), x[tuple(want)])
        assert s.data.shape[sharded_dim] == size
