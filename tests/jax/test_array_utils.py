"""jax_impl.array_utils on the (dp, fsdp, pp, tp) = (8/n, 1, 1, n) mesh for n = 1, 2, 4, 8."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_impl.array_utils import (fold_rng_over_axis, split_array_over_mesh, stack_params,
                                  unstack_params)

ALL = ("dp", "tp")  # all 8 devices, in device order r*n + j


def smap(mesh, fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs))


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_fold_rng_over_axis(jax_mesh, axis_size, make_key):
    n = axis_size
    key = make_key(42)
    out = smap(jax_mesh, lambda k: jax.random.uniform(fold_rng_over_axis(k, "tp"), (1, 3)),
               P(), P(ALL))(key)
    out = np.asarray(out).reshape(8 // n, n, 3)
    for j in range(n):
        expected = jax.random.uniform(jax.random.fold_in(key, j), (3,))
        for r in range(8 // n):  # equal along dp, the value of model index j
            np.testing.assert_array_equal(out[r, j], expected)
    if n > 1:
        assert len({tuple(v) for v in out[0]}) == n  # different along the model axis


@pytest.mark.parametrize("split_axis", [0, 1, -1])
def test_split_array_over_mesh(jax_mesh, axis_size, split_axis):
    n = axis_size
    x = np.arange(2 * n * 3 * n, dtype=np.float32).reshape(2 * n, 3 * n)
    out = smap(jax_mesh, lambda a: split_array_over_mesh(a, "tp", split_axis)[None], P(),
               P(ALL))(x)
    out = np.asarray(out).reshape((8 // n, n) + out.shape[1:])
    blocks = np.split(x, n, axis=split_axis)
    for r in range(8 // n):
        for j in range(n):
            np.testing.assert_array_equal(out[r, j], blocks[j])


def test_split_array_over_mesh_size_one_returns_input(make_jax_mesh):
    seen = []

    def fn(a):
        seen.append(split_array_over_mesh(a, "tp", 0) is a)
        return a

    smap(make_jax_mesh(model_axis_size=1), fn, P(), P())(np.ones((3, 2), np.float32))
    assert seen == [True]


def test_split_array_over_mesh_errors(jax_mesh, axis_size):
    n = axis_size
    call = lambda a, ax: smap(jax_mesh, lambda v: split_array_over_mesh(v, "tp", ax), P(),  # noqa
                              P())(a)
    if n > 1:
        with pytest.raises(ValueError, match=rf"x.shape\[1\]={n + 1}: expected a size divisible "
                                             rf"by the size {n} of axis 'tp'"):
            call(np.ones((n, n + 1), np.float32), 1)
    with pytest.raises(ValueError, match=r"split_axis=2: expected an axis of an array with 2"):
        call(np.ones((n, n), np.float32), 2)
    with pytest.raises(ValueError, match="axis_name='model' is not bound"):
        smap(jax_mesh, lambda v: split_array_over_mesh(v, "model", 0), P(), P())(np.ones(8))


def _params():
    rng = np.random.default_rng(0)
    return {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
            "b": {"c": nn.Partitioned(jnp.asarray(rng.standard_normal(5), jnp.float32),
                                      names=("fsdp",))}}


def _is_p(x):
    return isinstance(x, nn.Partitioned)


@pytest.mark.parametrize("axis, names_a, names_c", [
    (0, ("tp", None, None), ("tp", "fsdp")),
    (1, (None, "tp", None), ("fsdp", "tp")),
    (-1, (None, None, "tp"), ("fsdp", "tp")),
])
def test_stack_params_names_shapes_values(jax_mesh, axis_size, axis, names_a, names_c):
    n = axis_size
    params = _params()
    seen = {}

    def fn():
        stacked = stack_params(params, "tp", axis=axis)
        seen["stacked"] = jax.tree.map(lambda p: (type(p).__name__, p.names, p.value.shape), stacked,
                                       is_leaf=_is_p)
        back = unstack_params(stacked, "tp")
        seen["back"] = jax.tree.map(lambda p: (type(p).__name__, getattr(p, "names", None),
                                               p.value.shape if _is_p(p) else p.shape), back,
                                    is_leaf=_is_p)
        return stacked, back

    shapes = jax.eval_shape(jax.shard_map(fn, mesh=jax_mesh, in_specs=(), out_specs=P(),
                                          check_vma=False))
    specs = nn.get_partition_spec(shapes)
    stacked, back = jax.jit(jax.shard_map(fn, mesh=jax_mesh, in_specs=(), out_specs=specs))()
    pos_a, pos_c = axis % 3, axis % 2
    shape_a = (3, 4)[:pos_a] + (1,) + (3, 4)[pos_a:]
    assert seen["stacked"] == {"a": ("Partitioned", names_a, shape_a),
                               "b": {"c": ("Partitioned", names_c, (1, 5) if pos_c == 0 else (5, 1))}}
    assert seen["back"]["b"] == {"c": ("Partitioned", ("fsdp",), (5,))}
    assert seen["back"]["a"][0] != "Partitioned" and seen["back"]["a"][1:] == (None, (3, 4))
    # Global values: the device value repeated n times along the new axis.
    np.testing.assert_array_equal(stacked["a"].value,
                                  np.repeat(np.expand_dims(params["a"], pos_a), n, axis=pos_a))
    np.testing.assert_array_equal(stacked["b"]["c"].value,
                                  np.repeat(np.expand_dims(params["b"]["c"].value, pos_c), n,
                                            axis=pos_c))
    np.testing.assert_array_equal(back["a"], params["a"])
    np.testing.assert_array_equal(back["b"]["c"].value, params["b"]["c"].value)


@pytest.mark.parametrize("as_array", [False, True], ids=["int", "array"])
def test_stack_params_mask_except(jax_mesh, axis_size, as_array):
    n = axis_size
    keep = n - 1
    params = _params()
    mask = jnp.asarray(keep) if as_array else keep

    def fn():
        return stack_params(params, "tp", mask_except=mask)

    specs = nn.get_partition_spec(jax.eval_shape(jax.shard_map(
        fn, mesh=jax_mesh, in_specs=(), out_specs=P(), check_vma=False)))
    out = jax.jit(jax.shard_map(fn, mesh=jax_mesh, in_specs=(), out_specs=specs))()
    for got, ref in ((out["a"].value, params["a"]), (out["b"]["c"].value, params["b"]["c"].value)):
        assert got.shape == (n,) + ref.shape
        for j in range(n):
            np.testing.assert_array_equal(got[j], ref if j == keep else np.zeros_like(ref))


def test_unstack_params_leaves_other_leaves_alone(jax_mesh):
    params = {"w": nn.Partitioned(jnp.ones((1, 2)), names=("model", None)), "v": jnp.ones(3)}
    seen = []

    def fn():
        out = unstack_params(params, "tp")
        seen.append(out)
        return ()

    jax.shard_map(fn, mesh=jax_mesh, in_specs=(), out_specs=())()
    assert seen[0]["w"] is params["w"] and seen[0]["v"] is params["v"]


def test_stack_params_errors(jax_mesh):
    params = _params()
    with pytest.raises(ValueError, match=r"axis=3: expected a position in a parameter with 2 "):
        jax.shard_map(lambda: stack_params(params, "tp", axis=3), mesh=jax_mesh, in_specs=(),
                      out_specs=P(), check_vma=False)()
    with pytest.raises(ValueError, match="axis_name='model' is not bound"):
        stack_params(params, "model")
    with pytest.raises(ValueError, match="axis_name='model' is not bound"):
        fold_rng_over_axis(jax.random.key(0), "model")
