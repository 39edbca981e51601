"""jax_impl.linear configuration: the matmul-method enum, TensorParallelConfig (strings,
defaults, the context mesh), every ValueError of a bad argument, and the partition-spec helpers
(get_sharding, get_matmul_output_sharding, get_output_partition_spec).

Deliberate twin of tests/torch/test_linear_config.py (kept parallel on purpose; the shared
tables are in tests/linear_cases.py).
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

from jax_impl import linear
from jax_impl.linear import (
    ColumnParallelLinear,
    ParallelLinear,
    RowParallelLinear,
    TensorParallelConfig,
    get_matmul_output_sharding,
    get_output_partition_spec,
    get_sharding,
)
from tests.jax.linear_helpers import M, check_against_reference, inputs, make_layer
from tests.linear_cases import (BAD_CONSTRUCTOR_ARGS, FP32_RTOL, IN, NOT_DIVISIBLE, OUT,
                                WRONG_DIRECTION)


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


@pytest.mark.parametrize("cls,method", WRONG_DIRECTION)
def test_error_method_does_not_apply_to_direction(make_jax_mesh, cls, method):
    cfg = TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=2), matmul_method=method)
    with pytest.raises(ValueError, match=rf"matmul_method='{method.value}' does not apply to a "
                                         rf"(row|column)-parallel layer"):
        getattr(linear, cls)(IN, OUT, parallel_config=cfg)


@pytest.mark.parametrize("cls,method,rs,in_f,out_f,bad", NOT_DIVISIBLE)
def test_error_features_not_divisible(make_jax_mesh, cls, method, rs, in_f, out_f, bad):
    cfg = TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=4), matmul_method=method,
                               reduce_scatter_output=rs)
    with pytest.raises(ValueError, match=bad + r".*multiple of the 'tp' axis size 4"):
        getattr(linear, cls)(in_f, out_f, parallel_config=cfg)


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


@pytest.mark.parametrize("kwargs,bad", BAD_CONSTRUCTOR_ARGS)
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
