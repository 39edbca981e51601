"""jax_impl.linear layers against an unsharded float64 reference: every layer x matmul method x
reduce option x tp size, bf16, merged out features, scales, no bias, the kernel override, and
the no-parallel-config path against nnx.Linear. Tolerances (measured): tests/jax/linear_helpers.py.

Deliberate twin of tests/torch/test_linear_layers.py (kept parallel on purpose; the shared
tables are in tests/linear_cases.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_impl.linear import ParallelLinear, RowParallelLinear, TensorParallelConfig
from tests.jax.linear_helpers import (COMBO_IDS, COMBOS, M, check_against_reference,
                                      dense_reference, f64, inputs, make_layer, rel_err)
from tests.linear_cases import BF16_CASES, BF16_RTOL, FP32_RTOL, IN, OUT


# ------------------------------------------------------------------------ layers vs dense reference
@pytest.mark.parametrize("rs", [False, True], ids=["replicated", "scattered"])
@pytest.mark.parametrize("kind,method", COMBOS, ids=COMBO_IDS)
def test_layer_matches_dense_reference(jax_mesh, axis_size, kind, method, rs):
    n = axis_size
    layer = make_layer(kind, jax_mesh, method, rs, scale="fan_in")
    x, g = inputs((2, 3, IN), OUT)
    y, _ = check_against_reference(layer, x, g, FP32_RTOL)
    # output layout: sharded on the out features over tp iff reduce_scatter_output
    expected_shard = (2, 3, OUT // n) if rs else (2, 3, OUT)
    assert y.sharding.shard_shape(y.shape) == expected_shard
    # parameters are global arrays sharded over tp, not stacked
    direction = "row" if kind == "row" else "column"
    kernel = layer.kernel[...]
    assert kernel.shape == (IN, OUT)
    expected_kernel_shard = (IN // n, OUT) if direction == "row" else (IN, OUT // n)
    assert kernel.sharding.shard_shape(kernel.shape) == expected_kernel_shard
    assert layer.bias[...].shape == (OUT,)


def test_parallel_linear_defaults_to_column(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=4)
    layer = ParallelLinear(IN, OUT, parallel_config=TensorParallelConfig(mesh=mesh),
                           rngs=nnx.Rngs(0))
    assert layer.direction == "column"
    assert layer.kernel[...].sharding.spec == P(None, "tp")
    assert layer.bias[...].sharding.spec == P("tp")
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert specs["kernel"].get_value() == P(None, "tp")
    row = RowParallelLinear(IN, OUT, parallel_config=TensorParallelConfig(mesh=mesh),
                            rngs=nnx.Rngs(0))
    assert row.kernel[...].sharding.spec == P("tp", None)
    assert row.bias[...].sharding.spec == P()
    # same rng stream, same global values whatever the sharding
    np.testing.assert_array_equal(np.asarray(layer.kernel[...]), np.asarray(row.kernel[...]))


@pytest.mark.parametrize("kind,method,rs,n", BF16_CASES)
def test_bfloat16(make_jax_mesh, kind, method, rs, n):
    layer = make_layer(kind, make_jax_mesh(model_axis_size=n), method, rs,
                       param_dtype=jnp.bfloat16, in_features=64, out_features=OUT)
    x, g = inputs((4, 64), OUT, dtype=jnp.bfloat16)
    y, _ = check_against_reference(layer, x, g, BF16_RTOL)
    assert y.dtype == jnp.bfloat16


def test_dtype_promotion_and_compute_dtype(make_jax_mesh):
    """fp32 params with dtype=bf16 compute in bf16; fp32 input with bf16 params promotes to fp32."""
    mesh = make_jax_mesh(model_axis_size=4)
    layer = make_layer("row", mesh, M.REDUCE_SCATTER, False, dtype=jnp.bfloat16)
    x, g = inputs((4, IN), OUT)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    y_ref, _ = dense_reference(layer, x, g)
    assert rel_err(y, y_ref) <= BF16_RTOL
    layer16 = make_layer("column", mesh, M.ALL_GATHER, False, param_dtype=jnp.bfloat16)
    assert layer16(x).dtype == jnp.float32


@pytest.mark.parametrize("kind,method,rs", [
    ("column", M.ALL_GATHER_BIDIRECTIONAL, True),
    ("column", M.PLAIN, False),
    ("row", M.REDUCE_SCATTER, False),
    ("row", M.PLAIN, True),
])
def test_merged_out_features(make_jax_mesh, kind, method, rs):
    parts = (8, 16, 8)
    mesh = make_jax_mesh(model_axis_size=8)
    layer = make_layer(kind, mesh, method, rs, out_features=parts, scale="fan_out")
    assert layer.kernel[...].shape == (IN, sum(parts))
    assert layer.bias[...].shape == (sum(parts),)
    assert layer.tp_merged == 3 and layer.scale_value == pytest.approx(sum(parts) ** -0.5)
    x, g = inputs((3, IN), sum(parts))
    y, _ = check_against_reference(layer, x, g, FP32_RTOL)
    # the output is the concatenation of the projections
    q, k, v = jnp.split(y, np.cumsum(parts)[:-1], axis=-1)
    kernel = f64(layer.kernel[...])
    bias = f64(layer.bias[...])
    s = layer.scale_value
    assert rel_err(k, s * f64(x) @ kernel[:, 8:24] + bias[8:24]) <= FP32_RTOL
    assert q.shape == (3, 8) and v.shape == (3, 8)


@pytest.mark.parametrize("scale,expected", [(1.0, 1.0), (0.5, 0.5), ("fan_in", IN ** -0.5),
                                            ("fan_out", 24 ** -0.5)])
def test_scale_variants(make_jax_mesh, scale, expected):
    mesh = make_jax_mesh(model_axis_size=2)
    x, g = inputs((3, IN), 24)
    for kind, method in (("row", M.REDUCE_SCATTER_BIDIRECTIONAL), ("column", M.PLAIN)):
        layer = make_layer(kind, mesh, method, False, out_features=24, scale=scale)
        assert layer.scale_value == pytest.approx(expected)
        check_against_reference(layer, x, g, FP32_RTOL)
    plain = ParallelLinear(IN, 24, scale=scale, rngs=nnx.Rngs(7),
                           bias_init=nnx.initializers.normal(1.0))
    check_against_reference(plain, x, g, FP32_RTOL)


@pytest.mark.parametrize("kind,method", [("column", M.ALL_GATHER), ("row", M.PLAIN)])
def test_without_bias(make_jax_mesh, kind, method):
    layer = make_layer(kind, make_jax_mesh(model_axis_size=4), method, False, use_bias=False)
    assert layer.bias is None
    assert set(nnx.state(layer, nnx.Param).keys()) == {"kernel"}
    x, g = inputs((3, IN), OUT)
    check_against_reference(layer, x, g, FP32_RTOL)


def test_kernel_override_w(make_jax_mesh):
    layer = make_layer("row", make_jax_mesh(model_axis_size=4), M.REDUCE_SCATTER, False)
    x, _ = inputs((3, IN), OUT)
    w = 2.0 * layer.kernel[...]
    expected = f64(x) @ f64(w) + f64(layer.bias[...])
    assert rel_err(layer(x, w=w), expected) <= FP32_RTOL
    with pytest.raises(ValueError, match=r"w.shape=\(16, 16\)"):
        layer(x, w=jnp.ones((IN, IN)))


def test_one_dimensional_input(make_jax_mesh):
    x, _ = inputs((IN,), OUT)
    for kind, method in (("column", M.ALL_GATHER_BIDIRECTIONAL), ("row", M.REDUCE_SCATTER)):
        layer = make_layer(kind, make_jax_mesh(model_axis_size=4), method, False)
        y_ref, _ = dense_reference(layer, x, jnp.zeros((OUT,)))
        assert rel_err(layer(x), y_ref) <= FP32_RTOL


# ------------------------------------------------------------------ no parallel config: nnx.Linear
@pytest.mark.parametrize("config", [None, TensorParallelConfig()], ids=["none", "inactive"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_no_parallel_config_equals_nnx_linear(config, dtype):
    ours = ParallelLinear(IN, 24, dtype=dtype, parallel_config=config, rngs=nnx.Rngs(3))
    ref = nnx.Linear(IN, 24, dtype=dtype, rngs=nnx.Rngs(3),
                     bias_init=nnx.initializers.zeros)
    assert not ours.is_parallel
    # same initialisation stream (kernel key then bias key), same names and shapes
    ours_state, ref_state = nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param)
    assert set(ours_state.keys()) == set(ref_state.keys()) == {"kernel", "bias"}
    np.testing.assert_array_equal(np.asarray(ours.kernel[...]), np.asarray(ref.kernel[...]))
    # with a non-zero bias loaded from nnx.Linear's state by name
    ref.bias[...] = jax.random.normal(jax.random.key(5), (24,))
    nnx.update(ours, nnx.state(ref, nnx.Param))
    for shape in ((IN,), (5, IN), (2, 3, IN)):
        x = jax.random.normal(jax.random.key(1), shape)
        y, y_ref = ours(x), ref(x)
        assert y.dtype == y_ref.dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))


def test_no_parallel_config_gradients_equal_nnx_linear():
    ours = ParallelLinear(IN, 24, rngs=nnx.Rngs(3))
    ref = nnx.Linear(IN, 24, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (4, IN))

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    g_ours = nnx.grad(loss)(ours, x)
    g_ref = nnx.grad(loss)(ref, x)
    np.testing.assert_allclose(np.asarray(g_ours["kernel"][...]), np.asarray(g_ref["kernel"][...]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_ours["bias"][...]), np.asarray(g_ref["bias"][...]),
                               rtol=1e-6, atol=1e-7)


def test_parallel_layer_loads_nnx_linear_weights(make_jax_mesh):
    """A plain nnx.Linear state loads into a parallel layer by name; outputs agree."""
    ref = nnx.Linear(IN, OUT, rngs=nnx.Rngs(11), bias_init=nnx.initializers.normal(1.0))
    layer = make_layer("row", make_jax_mesh(model_axis_size=4), M.REDUCE_SCATTER_BIDIRECTIONAL,
                       False)
    spec = layer.kernel[...].sharding
    state = nnx.state(ref, nnx.Param)
    layer.kernel[...] = jax.device_put(state["kernel"][...], spec)
    layer.bias[...] = jax.device_put(state["bias"][...], layer.bias[...].sharding)
    x = jax.random.normal(jax.random.key(2), (3, IN))
    assert rel_err(layer(x), f64(ref(x))) <= FP32_RTOL
