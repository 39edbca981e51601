"""Tests of jax_impl.linear: tensor-parallel linear layers vs an unsharded float64 reference.

Every layer x matmul method x reduce option runs on the 8-device CPU mesh (dp, fsdp, pp, tp) =
(8/n, 1, 1, n) for n in 1, 2, 4, 8. Outputs, the input gradient and the kernel / bias gradients
are compared with a numpy float64 reference built from the layer's own (gathered) parameters.

Measured here (max over all cases, relative error = max|a - ref| / max|ref|):
    float32: 1.1e-07 (outputs and gradients, every layer x method x reduce option x n);
    asserted <= 1e-5.
    bfloat16 (bf16 params and inputs; partial sums are added in bf16, as psum does): outputs
    <= 4.2e-03, gradients <= 4.2e-03 except the input gradient of the bidirectional
    reduce-scatter matmul at n=8 (8 bf16 partial products summed round the ring): 9.6e-03.
    Asserted <= 2e-2 (about 5 x eps(bf16) = 5 x 2**-8).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_impl.linear import (
    ColumnParallelLinear,
    MatrixMultiplyMethod,
    ParallelLinear,
    RowParallelLinear,
    TensorParallelConfig,
    get_matmul_output_sharding,
    get_output_partition_spec,
    get_sharding,
)
from jax_impl.linear_ring import all_gather_matmul, reduce_scatter_matmul, ring_split
from parity import hlo

M = MatrixMultiplyMethod
IN, OUT = 16, 32  # divisible by every axis size under test
FP32_RTOL = 1e-5
BF16_RTOL = 2e-2
LAYERS = {"column": ColumnParallelLinear, "row": RowParallelLinear, "parallel": ParallelLinear}

# (layer, method) pairs that make sense; ParallelLinear is column-parallel by default.
COMBOS = [
    ("column", M.PLAIN), ("column", M.ALL_GATHER), ("column", M.ALL_GATHER_BIDIRECTIONAL),
    ("row", M.PLAIN), ("row", M.REDUCE_SCATTER), ("row", M.REDUCE_SCATTER_BIDIRECTIONAL),
    ("parallel", M.PLAIN), ("parallel", M.ALL_GATHER_BIDIRECTIONAL),
]
COMBO_IDS = [f"{layer}-{m.value}" for layer, m in COMBOS]


# ------------------------------------------------------------------------------------- helpers
def rel_err(actual, ref) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    return float(np.max(np.abs(actual - ref)) / max(np.max(np.abs(ref)), 1e-30))


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def dense_reference(layer, x, g):
    """float64 y = s * x @ K + b and the gradients of sum(y * g) wrt x, K, b."""
    kernel = f64(layer.kernel[...])
    s = layer.scale_value
    x64, g64 = f64(x), f64(g)
    y = s * x64 @ kernel
    if layer.use_bias:
        y = y + f64(layer.bias[...])
    x2, g2 = x64.reshape(-1, x64.shape[-1]), g64.reshape(-1, g64.shape[-1])
    grads = {"x": s * g64 @ kernel.T, "kernel": s * x2.T @ g2}
    if layer.use_bias:
        grads["bias"] = g2.sum(0)
    return y, grads


def value_and_grads(layer, x, g):
    """Compiled value_and_grad of sum(layer(x) * g) wrt (params, x): (y, grads dict, hlo text)."""
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x)
        return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    compiled = fn.lower(state, x).compile()
    (_, y), (gstate, gx) = compiled(state, x)
    grads = {"x": gx, "kernel": gstate["kernel"][...]}
    if layer.use_bias:
        grads["bias"] = gstate["bias"][...]
    return y, grads, compiled.as_text()


def forward_hlo(layer, x) -> str:
    graphdef, state = nnx.split(layer)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return fn.lower(state, x).compile().as_text()


def make_layer(kind, mesh, method, rs, *, in_features=IN, out_features=OUT, **kwargs):
    cfg = TensorParallelConfig(mesh=mesh, axis_name="tp", matmul_method=method,
                               reduce_scatter_output=rs)
    kwargs.setdefault("bias_init", nnx.initializers.normal(1.0))
    return LAYERS[kind](in_features, out_features, parallel_config=cfg, rngs=nnx.Rngs(7), **kwargs)


def inputs(shape, out, dtype=jnp.float32, seed=0):
    kx, kg = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    g = jax.random.normal(kg, shape[:-1] + (out,), jnp.float32).astype(dtype)
    return x, g


def tp_groups(n):
    return [[r * n + j for j in range(n)] for r in range(8 // n)]


def check_against_reference(layer, x, g, rtol):
    y, grads, _ = value_and_grads(layer, x, g)
    y_ref, grads_ref = dense_reference(layer, x, g)
    errs = {"y": rel_err(y, y_ref)}
    errs.update({k: rel_err(grads[k], grads_ref[k]) for k in grads_ref})
    bad = {k: e for k, e in errs.items() if not e <= rtol}
    assert not bad, f"relative errors above {rtol}: {bad} (all: {errs})"
    return y, errs


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


@pytest.mark.parametrize("kind,method,rs,n", [
    ("column", M.ALL_GATHER_BIDIRECTIONAL, False, 4),
    ("column", M.PLAIN, True, 8),
    ("row", M.REDUCE_SCATTER_BIDIRECTIONAL, True, 8),
    ("row", M.PLAIN, False, 2),
])
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


# ------------------------------------------------------------------------- communication (HLO)
def _permute_directions(ops, n):
    """Split collective-permutes into (#up, #down); fail on any non-ring pair set."""
    groups = tp_groups(n)
    up_pairs, down_pairs = hlo.ring_pairs(groups, True), hlo.ring_pairs(groups, False)
    up = down = 0
    for op in ops:
        if op.kind != "collective-permute":
            continue
        assert op.pairs in (up_pairs, down_pairs), f"non-ring permute pairs {op.pairs}"
        if op.pairs == up_pairs:
            up += 1
        else:
            down += 1
    return up, down


@pytest.mark.parametrize("rs", [False, True], ids=["replicated", "scattered"])
@pytest.mark.parametrize("kind,method", COMBOS[:6], ids=COMBO_IDS[:6])
def test_forward_communication(jax_mesh, axis_size, kind, method, rs):
    n = axis_size
    layer = make_layer(kind, jax_mesh, method, rs)
    x, _ = inputs((4, IN), OUT)
    text = forward_hlo(layer, x)
    ops = hlo.collectives(text)
    kinds = [op.kind for op in ops]
    out_bytes = 4 * OUT * 4  # f32[4, OUT] on each device
    if n == 1:  # XLA keeps some collectives over one-device groups; hlo.collectives drops them
        assert ops == []
        return
    if method.is_ring:
        up, down = _permute_directions(ops, n)
        exp_up, exp_down = ring_split(n, method.bidirectional)
        assert (up, down) == (exp_up, exp_down)
        assert up + down == n - 1
        assert kinds.count("reduce-scatter") == 0 and kinds.count("all-reduce") == 0
        gathers = [op for op in ops if op.kind == "all-gather"]
        if rs:
            assert gathers == []
        else:  # one all-gather, of the [4, OUT] output (never of the input)
            assert len(gathers) == 1 and gathers[0].result_bytes == out_bytes
        # each ring step moves one block: the input block (column) or an output block (row)
        block_bytes = 4 * (IN if kind == "column" else OUT) // n * 4
        assert all(op.result_bytes == block_bytes for op in ops if op.kind == "collective-permute")
        return
    assert "collective-permute" not in kinds
    if kind == "column":
        assert kinds == ([] if rs else ["all-gather"])
        if not rs:
            assert ops[0].result_bytes == out_bytes
    else:
        assert kinds == (["reduce-scatter"] if rs else ["all-reduce"])


@pytest.mark.parametrize("kind,method", [("column", M.ALL_GATHER),
                                         ("column", M.ALL_GATHER_BIDIRECTIONAL),
                                         ("row", M.REDUCE_SCATTER),
                                         ("row", M.REDUCE_SCATTER_BIDIRECTIONAL)],
                         ids=lambda v: getattr(v, "value", v))
@pytest.mark.parametrize("n", [4, 8])
def test_training_step_communication_of_ring_methods(make_jax_mesh, kind, method, n):
    """value_and_grad of a ring layer: forward ring plus its transpose, nothing else."""
    layer = make_layer(kind, make_jax_mesh(model_axis_size=n), method, True)
    x, g = inputs((4, IN), OUT)
    _, _, text = value_and_grads(layer, x, g)
    ops = hlo.collectives(text)
    up, down = _permute_directions(ops, n)
    assert (up, down) == (n - 1, n - 1)  # backward reverses every forward step
    # nothing else but the all-reduce of the scalar loss (sum over the sharded output)
    others = [(op.kind, op.result_bytes) for op in ops if op.kind != "collective-permute"]
    assert others == [("all-reduce", 4)]


def test_plain_column_backward_all_reduces_input_gradient(make_jax_mesh):
    layer = make_layer("column", make_jax_mesh(model_axis_size=4), M.PLAIN, False)
    x, g = inputs((4, IN), OUT)
    _, _, text = value_and_grads(layer, x, g)
    assert hlo.count(text, "all-reduce") == 1
    assert hlo.count(text, "collective-permute") == 0


# ------------------------------------------------------------------------- ring helpers directly
@pytest.mark.parametrize("bidirectional", [False, True])
def test_ring_helpers_match_collectives(make_jax_mesh, bidirectional):
    """all_gather_matmul == all_gather(x) @ w and reduce_scatter_matmul == psum_scatter(x @ w)."""
    n = 8
    mesh = make_jax_mesh(model_axis_size=n)
    x = jax.random.normal(jax.random.key(0), (3, 16))
    w = jax.random.normal(jax.random.key(1), (16, 32))

    def per_device(x, w):
        ring_ag = all_gather_matmul(x, w, "tp", bidirectional)
        plain_ag = jax.lax.all_gather(x, "tp", axis=1, tiled=True) @ w
        ring_rs = reduce_scatter_matmul(x, w[: x.shape[-1]], "tp", bidirectional)
        plain_rs = jax.lax.psum_scatter(x @ w[: x.shape[-1]], "tp", scatter_dimension=1,
                                        tiled=True)
        return ring_ag - plain_ag, ring_rs - plain_rs, plain_ag, plain_rs

    out = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(None, "tp"), P()),
                                out_specs=P(None, "tp"), check_vma=False))(x, w)
    d_ag, d_rs, ag, rs = (np.asarray(a) for a in out)
    assert np.abs(d_ag).max() <= FP32_RTOL * np.abs(ag).max()
    assert np.abs(d_rs).max() <= FP32_RTOL * np.abs(rs).max()


@pytest.mark.parametrize("n,bidirectional,expected", [
    (1, False, (0, 0)), (1, True, (0, 0)), (2, False, (1, 0)), (2, True, (1, 0)),
    (4, False, (3, 0)), (4, True, (2, 1)), (8, True, (4, 3)), (7, True, (3, 3)),
])
def test_ring_split(n, bidirectional, expected):
    assert ring_split(n, bidirectional) == expected


# -------------------------------------------------------------------------- config and methods
def test_method_enum_values_and_directions():
    assert {m.value for m in M} == {
        "plain", "all_gather_matmul", "all_gather_matmul_bidirectional", "reduce_scatter_matmul",
        "reduce_scatter_matmul_bidirectional"}
    assert M.PLAIN.directions == ("column", "row")
    assert M.ALL_GATHER.directions == M.ALL_GATHER_BIDIRECTIONAL.directions == ("column",)
    assert M.REDUCE_SCATTER.directions == M.REDUCE_SCATTER_BIDIRECTIONAL.directions == ("row",)
    assert [m.bidirectional for m in M] == [False, False, True, False, True]


def test_config_resolves_strings_and_defaults(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=2)
    by_value = TensorParallelConfig(mesh=mesh, matmul_method="all_gather_matmul")
    assert by_value.matmul_method is M.ALL_GATHER
    by_name = TensorParallelConfig(mesh=mesh, matmul_method="REDUCE_SCATTER")
    assert by_name.matmul_method is M.REDUCE_SCATTER
    cfg = TensorParallelConfig(mesh=mesh)
    assert cfg.active and cfg.method is M.PLAIN and cfg.axis_size == 2
    inactive = TensorParallelConfig()
    assert not inactive.active and inactive.axis_size == 1
    hash(cfg)  # static module attribute: must be hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.axis_name = "dp"


def test_config_takes_the_context_mesh(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=4)
    with jax.set_mesh(mesh):
        cfg = TensorParallelConfig(matmul_method=M.REDUCE_SCATTER)
    assert cfg.mesh is mesh
    layer = RowParallelLinear(IN, OUT, parallel_config=cfg, rngs=nnx.Rngs(0))
    x, g = inputs((2, IN), OUT)
    check_against_reference(layer, x, g, FP32_RTOL)


# ---------------------------------------------------------------------------------------- errors
def test_error_no_mesh_with_method():
    with pytest.raises(ValueError, match=r"mesh=None with matmul_method='all_gather_matmul'"):
        TensorParallelConfig(matmul_method=M.ALL_GATHER)
    with pytest.raises(ValueError, match=r"mesh=None with reduce_scatter_output=True"):
        TensorParallelConfig(reduce_scatter_output=True)


def test_error_axis_not_in_mesh(make_jax_mesh):
    with pytest.raises(ValueError, match=r"axis_name='model' is not an axis of the mesh"):
        TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=2), axis_name="model")


def test_error_unknown_matmul_method(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=2)
    with pytest.raises(ValueError, match=r"matmul_method='ring'.*all_gather_matmul"):
        TensorParallelConfig(mesh=mesh, matmul_method="ring")
    with pytest.raises(ValueError, match=r"matmul_method=3"):
        TensorParallelConfig(mesh=mesh, matmul_method=3)
    x = jax.device_put(jnp.ones((4, IN)), NamedSharding(mesh, P(None, "tp")))
    with pytest.raises(ValueError, match=r"matmul_method='bogus'"):
        get_output_partition_spec(x, x, "bogus", "tp")


def test_error_not_a_mesh(make_jax_mesh):
    abstract = make_jax_mesh(model_axis_size=2).abstract_mesh
    with pytest.raises(ValueError, match=r"mesh=.*expected a concrete jax.sharding.Mesh"):
        TensorParallelConfig(mesh=abstract)


def test_error_reduce_output_with_reduce_scatter_output(make_jax_mesh):
    with pytest.raises(ValueError, match=r"reduce_output=True with reduce_scatter_output=True"):
        TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=2), reduce_output=True,
                             reduce_scatter_output=True)
    # reduce_output alone is the default replicated output
    cfg = TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=2), reduce_output=True)
    y = ColumnParallelLinear(IN, OUT, parallel_config=cfg)(jnp.ones((2, IN)))
    assert y.sharding.is_fully_replicated


@pytest.mark.parametrize("cls,method", [(ColumnParallelLinear, M.REDUCE_SCATTER),
                                        (ColumnParallelLinear, M.REDUCE_SCATTER_BIDIRECTIONAL),
                                        (ParallelLinear, M.REDUCE_SCATTER),
                                        (RowParallelLinear, M.ALL_GATHER),
                                        (RowParallelLinear, M.ALL_GATHER_BIDIRECTIONAL)])
def test_error_method_does_not_apply_to_direction(make_jax_mesh, cls, method):
    cfg = TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=2), matmul_method=method)
    with pytest.raises(ValueError, match=rf"matmul_method='{method.value}' does not apply to a "
                                         rf"(row|column)-parallel layer"):
        cls(IN, OUT, parallel_config=cfg)


@pytest.mark.parametrize("cls,method,rs,in_f,out_f,bad", [
    (ColumnParallelLinear, M.PLAIN, False, 16, 30, "out_features=30"),
    (ColumnParallelLinear, M.ALL_GATHER, True, 18, 32, "in_features=18"),
    (ParallelLinear, M.PLAIN, True, 16, (8, 6), r"out_features=\(8, 6\) \(total 14\)"),
    (RowParallelLinear, M.PLAIN, False, 18, 32, "in_features=18"),
    (RowParallelLinear, M.PLAIN, True, 16, 30, "out_features=30"),
    (RowParallelLinear, M.REDUCE_SCATTER, False, 16, 30, "out_features=30"),
])
def test_error_features_not_divisible(make_jax_mesh, cls, method, rs, in_f, out_f, bad):
    cfg = TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=4), matmul_method=method,
                               reduce_scatter_output=rs)
    with pytest.raises(ValueError, match=bad + r".*multiple of the 'tp' axis size 4"):
        cls(in_f, out_f, parallel_config=cfg)


def test_divisibility_only_where_needed(make_jax_mesh):
    """Column PLAIN needs no in-feature split, row PLAIN psum needs no out-feature split."""
    mesh = make_jax_mesh(model_axis_size=4)
    col = ColumnParallelLinear(18, OUT, parallel_config=TensorParallelConfig(mesh=mesh))
    row = RowParallelLinear(IN, 30, parallel_config=TensorParallelConfig(mesh=mesh),
                            bias_init=nnx.initializers.normal(1.0))
    for layer, shape in ((col, (2, 18)), (row, (2, IN))):
        x, g = inputs(shape, layer.out_features_total)
        check_against_reference(layer, x, g, FP32_RTOL)


@pytest.mark.parametrize("parallel", [False, True])
def test_error_wrong_input_feature_size(make_jax_mesh, parallel):
    cfg = TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=4)) if parallel else None
    layer = RowParallelLinear(IN, OUT, parallel_config=cfg)
    with pytest.raises(ValueError, match=r"inputs.shape=\(2, 12\): expected the last dim to be "
                                         r"in_features=16"):
        layer(jnp.ones((2, 12)))


@pytest.mark.parametrize("kwargs,bad", [
    (dict(in_features=0, out_features=4), "in_features=0"),
    (dict(in_features=4, out_features=-1), "out_features=-1"),
    (dict(in_features=4, out_features=()), r"out_features=\(\)"),
    (dict(in_features=4, out_features=(4, 0)), "out_features=0"),
    (dict(in_features=4, out_features=4, scale="fan_mid"), "scale='fan_mid'"),
    (dict(in_features=4, out_features=4, parallel_config="tp"), "parallel_config='tp'"),
])
def test_error_bad_constructor_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        ParallelLinear(**kwargs)


# ---------------------------------------------------------------------- partition-spec helpers
def test_get_sharding(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=4)
    placed = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P("dp", "tp")))
    assert get_sharding(placed) == P("dp", "tp")
    assert get_sharding(np.ones((4, 8))) is None
    assert get_sharding(jax.device_put(jnp.ones(3), jax.devices()[0])) is None
    assert get_sharding(object()) is None
    seen = []
    jax.jit(lambda a: seen.append(get_sharding(a)) or a)(placed)
    assert seen == [None]


@pytest.mark.parametrize("lhs,rhs,expected", [
    (P("dp", None), P(None, "tp"), P("dp", "tp")),
    (P("dp", "tp"), P("tp", None), P("dp", None)),
    (P("tp", None), P(None, "tp"), P("tp", None)),  # an axis is used once
    (P("dp", None, None), P(None, "tp"), P("dp", None, "tp")),
    (P(("dp", "tp"), None), P(None, ("tp", "fsdp")), P(("dp", "tp"), ("fsdp",))),
    (P(("dp", "tp"), None), P(None, "tp"), P(("dp", "tp"), None)),
    (P(None), P(None, "tp"), P("tp")),
    (None, P(None, "tp"), P()),
    (P("dp", None), None, P()),
])
def test_get_matmul_output_sharding(lhs, rhs, expected):
    assert get_matmul_output_sharding(lhs, rhs) == expected


def test_get_output_partition_spec(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=4, data_axis_size=2)
    put = lambda shape, spec: jax.device_put(jnp.ones(shape), NamedSharding(mesh, spec))  # noqa
    x_dp = put((4, IN), P("dp", None))
    x_tp = put((2, 4, IN), P(None, "tp", None))
    w_col, w_row = put((IN, OUT), P(None, "tp")), put((IN, OUT), P("tp", None))
    assert get_output_partition_spec(x_dp, w_col, M.PLAIN, "tp") == P("dp", "tp")
    assert get_output_partition_spec(x_dp, w_row, None, "tp") == P("dp", None)
    assert get_output_partition_spec(x_dp, w_row, M.REDUCE_SCATTER, "tp") == P("dp", "tp")
    assert get_output_partition_spec(x_dp, w_col, "all_gather_matmul", "tp") == P("dp", "tp")
    assert get_output_partition_spec(x_tp, w_row, M.REDUCE_SCATTER_BIDIRECTIONAL, "tp") == P(
        None, None, "tp")
    assert get_output_partition_spec(np.ones((4, IN)), w_col, M.PLAIN, "tp") is None
    assert get_output_partition_spec(x_dp, np.ones((IN, OUT)), M.PLAIN, "tp") is None


@pytest.mark.parametrize("kind,method", [("column", M.ALL_GATHER), ("row", M.REDUCE_SCATTER)])
def test_output_partition_spec_describes_ring_layer_output(make_jax_mesh, kind, method):
    mesh = make_jax_mesh(model_axis_size=4)
    layer = make_layer(kind, mesh, method, True)
    x = jax.device_put(jnp.ones((4, IN)), NamedSharding(mesh, P(None, "tp")))
    y = layer(x)
    spec = get_output_partition_spec(x, layer.kernel[...], method, "tp")
    assert spec == P(None, "tp")
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, spec), y.ndim)
