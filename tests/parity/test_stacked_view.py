"""``to_stacked`` / ``from_stacked``: the stacked view on both backends (twins, same values).

Global ``[..., F, ...]`` sharded on ``dim`` over ``tp`` (size n) <-> stacked ``[n, ..., F/n, ...]``
with dim 0 over ``tp``: row j is the block device j holds. Checked here: the values against a
numpy reference, the round trip, the placement (which device really holds which row), that the
conversion of an already-sharded tensor compiles to no collective, and the errors.
"""

from __future__ import annotations

import numpy as np
import pytest

SHAPE = (4, 6, 8)
# (axis size, dim) pairs whose dim divides by the axis size (6 is not a multiple of 4 or 8).
DIVISIBLE = [(n, d) for n in (1, 2, 4, 8) for d in (-1, 0, 1) if SHAPE[d] % n == 0]


def _reference(x: np.ndarray, n: int, dim: int) -> np.ndarray:
    return np.stack(np.split(x, n, axis=dim))


@pytest.mark.parametrize("axis_size,dim", DIVISIBLE)
def test_jax_to_from_stacked(make_jax_mesh, axis_size, dim):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_impl.array_utils import from_stacked, to_stacked

    mesh = make_jax_mesh(model_axis_size=axis_size)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    s = to_stacked(jax.numpy.asarray(x), "tp", dim, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(s), _reference(x, axis_size, dim))
    ref = _reference(x, axis_size, dim)
    for shard in s.addressable_shards:  # row j on the devices with tp coordinate j
        j = shard.device.id % axis_size
        np.testing.assert_array_equal(np.asarray(shard.data), ref[j:j + 1])
    back = from_stacked(s, "tp", dim, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(back), x)
    spec = [None] * len(SHAPE)
    spec[dim] = "tp"
    assert back.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), len(SHAPE))


def test_jax_to_stacked_of_a_sharded_array_moves_no_data(make_jax_mesh):
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_impl.array_utils import from_stacked, to_stacked
    from parity.hlo import collectives

    mesh = make_jax_mesh(model_axis_size=4)
    x = jax.device_put(np.ones(SHAPE, np.float32), NamedSharding(mesh, P(None, None, "tp")))
    f = jax.jit(lambda a: from_stacked(to_stacked(a, "tp", mesh=mesh) * 2, "tp", mesh=mesh))
    assert collectives(f.lower(x).compile().as_text()) == []


@pytest.mark.parametrize("axis_size,dim", DIVISIBLE)
def test_torch_to_from_stacked(make_torch_mesh, axis_size, dim):
    import torch

    from torch_impl import xla
    from torch_impl.array_utils import from_stacked, to_stacked

    mesh = make_torch_mesh(model_axis_size=axis_size)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    s = to_stacked(torch.from_numpy(x), "tp", dim, mesh=mesh)
    ref = _reference(x, axis_size, dim)
    for device_id, _, data in xla.local_shards(s):
        j = device_id % axis_size
        np.testing.assert_array_equal(data.numpy(), ref[j:j + 1])
    back = from_stacked(s * 1, "tp", dim, mesh=mesh)
    np.testing.assert_array_equal(back.cpu().numpy(), x)
    size = SHAPE[dim] // axis_size
    for device_id, _, data in xla.local_shards(back):
        j = device_id % axis_size
        np.testing.assert_array_equal(data.numpy(), np.take(x, range(j * size, (j + 1) * size),
                                                            axis=dim))


def test_torch_to_stacked_of_a_sharded_tensor_moves_no_data(make_torch_mesh):
    import torch

    from parity.hlo import collectives
    from torch_impl.array_utils import from_stacked, to_stacked
    from torch_impl.mesh import compiled_hlo, mark_sharding, sync

    mesh = make_torch_mesh(model_axis_size=4)
    x = mark_sharding(torch.ones(SHAPE).to("xla"), mesh, (None, None, "tp"))
    y = from_stacked(to_stacked(x, "tp", mesh=mesh) * 2, "tp", mesh=mesh)
    assert collectives(compiled_hlo([y])) == []
    sync()


def test_twins_agree(make_jax_mesh, make_torch_mesh):
    import jax
    import torch

    from jax_impl.array_utils import to_stacked as jax_to_stacked
    from torch_impl.array_utils import to_stacked as torch_to_stacked

    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    a = jax_to_stacked(jax.numpy.asarray(x), "tp", 1, mesh=make_jax_mesh(model_axis_size=2))
    b = torch_to_stacked(torch.from_numpy(x), "tp", 1, mesh=make_torch_mesh(model_axis_size=2))
    np.testing.assert_array_equal(np.asarray(a), b.cpu().numpy())


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_errors(make_jax_mesh, make_torch_mesh, backend):
    if backend == "jax":
        import jax.numpy as jnp

        from jax_impl.array_utils import from_stacked, to_stacked
        mesh, x = make_jax_mesh(model_axis_size=4), jnp.zeros((4, 6))
    else:
        import torch

        from torch_impl.array_utils import from_stacked, to_stacked
        mesh, x = make_torch_mesh(model_axis_size=4), torch.zeros((4, 6)).to("xla")
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=6: expected a size divisible by the "):
        to_stacked(x, "tp", mesh=mesh)
    with pytest.raises(ValueError, match="dim=2: expected an axis"):
        to_stacked(x, "tp", 2, mesh=mesh)
    with pytest.raises(ValueError, match="'model' is not an axis"):
        to_stacked(x, "model", 0, mesh=mesh)
    with pytest.raises(ValueError, match="expected the stacked view"):
        from_stacked(x[:3], "tp", mesh=mesh)
    with pytest.raises(ValueError, match="dim=1: expected an axis of the per-device shape"):
        from_stacked(x, "tp", 1, mesh=mesh)
