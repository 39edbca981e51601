"""torch_impl.linear configuration: TensorParallelConfig (the global mesh, strings, defaults),
every ValueError of a bad argument, and the partition-spec helpers (get_sharding,
get_matmul_output_sharding, get_output_partition_spec) on real torch_xla shardings.

Deliberate twin of tests/jax/test_linear_config.py (kept parallel on purpose; the shared
tables are in tests/linear_cases.py).
"""

from __future__ import annotations

import pytest
import torch

from torch_impl import linear
from torch_impl import mesh as M
from torch_impl.linear import (
    ColumnParallelLinear,
    ParallelLinear,
    RowParallelLinear,
    TensorParallelConfig,
    get_matmul_output_sharding,
    get_output_partition_spec,
    get_sharding,
)
from tests.linear_cases import (BAD_CONSTRUCTOR_ARGS, FP32_RTOL, IN, NOT_DIVISIBLE, OUT,
                                WRONG_DIRECTION)
from tests.torch.linear_helpers import MM, assert_close, make_layer, normal_init, run


# ---------------------------------------------------------------------------------------- errors
def test_error_no_mesh_with_method(monkeypatch):
    import torch_xla.distributed.spmd as xs

    monkeypatch.setattr(xs, "get_global_mesh", lambda: None)
    with pytest.raises(ValueError, match=r"mesh=None with matmul_method='all_gather_matmul'"):
        TensorParallelConfig(matmul_method=MM.ALL_GATHER)
    with pytest.raises(ValueError, match=r"mesh=None with reduce_scatter_output=True"):
        TensorParallelConfig(reduce_scatter_output=True)


def test_config_takes_the_global_mesh(make_torch_mesh, monkeypatch):
    import torch_xla.distributed.spmd as xs

    mesh = make_torch_mesh(model_axis_size=4)
    monkeypatch.setattr(xs, "get_global_mesh", lambda: mesh)
    cfg = TensorParallelConfig(matmul_method=MM.REDUCE_SCATTER)
    assert cfg.mesh is mesh and cfg.active and cfg.axis_size == 4
    assert not TensorParallelConfig().active  # nothing asked: inactive even with a global mesh


def test_config_resolves_strings_and_defaults(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=2)
    assert TensorParallelConfig(mesh=mesh, matmul_method="all_gather_matmul").matmul_method \
        is MM.ALL_GATHER
    assert TensorParallelConfig(mesh=mesh, matmul_method="REDUCE_SCATTER").matmul_method \
        is MM.REDUCE_SCATTER
    cfg = TensorParallelConfig(mesh=mesh)
    assert cfg.active and cfg.method is MM.PLAIN and cfg.axis_size == 2
    inactive = TensorParallelConfig()
    assert not inactive.active and inactive.axis_size == 1
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.axis_name = "dp"
    assert {m.value for m in MM} == {
        "plain", "all_gather_matmul", "all_gather_matmul_bidirectional", "reduce_scatter_matmul",
        "reduce_scatter_matmul_bidirectional"}
    assert [m.bidirectional for m in MM] == [False, False, True, False, True]
    assert MM.PLAIN.directions == ("column", "row") and MM.ALL_GATHER.directions == ("column",)


def test_error_axis_not_in_mesh(make_torch_mesh):
    with pytest.raises(ValueError, match=r"axis_name='model' is not an axis of the mesh"):
        TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=2), axis_name="model")


def test_error_not_a_mesh():
    with pytest.raises(ValueError, match=r"mesh='tp': expected a torch_xla.distributed.spmd.Mesh"):
        TensorParallelConfig(mesh="tp")


def test_error_unknown_matmul_method(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=2)
    with pytest.raises(ValueError, match=r"matmul_method='ring'.*all_gather_matmul"):
        TensorParallelConfig(mesh=mesh, matmul_method="ring")
    with pytest.raises(ValueError, match=r"matmul_method=3"):
        TensorParallelConfig(mesh=mesh, matmul_method=3)
    x = M.mark_sharding(torch.ones(4, IN, device=M.xla_device()), mesh, (None, "tp"))
    with pytest.raises(ValueError, match=r"matmul_method='bogus'"):
        get_output_partition_spec(x, x, "bogus", "tp", mesh=mesh)


def test_error_reduce_output_with_reduce_scatter_output(make_torch_mesh):
    with pytest.raises(ValueError, match=r"reduce_output=True with reduce_scatter_output=True"):
        TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=2), reduce_output=True,
                             reduce_scatter_output=True)


@pytest.mark.parametrize("cls,method", WRONG_DIRECTION)
def test_error_method_does_not_apply_to_direction(make_torch_mesh, cls, method):
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=2), matmul_method=method)
    with pytest.raises(ValueError, match=rf"matmul_method='{method.value}' does not apply to a "
                                         rf"(row|column)-parallel layer"):
        getattr(linear, cls)(IN, OUT, parallel_config=cfg)


@pytest.mark.parametrize("cls,method,rs,in_f,out_f,bad", NOT_DIVISIBLE)
def test_error_features_not_divisible(make_torch_mesh, cls, method, rs, in_f, out_f, bad):
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=4), matmul_method=method,
                               reduce_scatter_output=rs)
    with pytest.raises(ValueError, match=bad + r".*multiple of the 'tp' axis size 4"):
        getattr(linear, cls)(in_f, out_f, parallel_config=cfg)


def test_divisibility_only_where_needed(make_torch_mesh):
    """Column PLAIN needs no in-feature split, row PLAIN all-reduce needs no out-feature split."""
    mesh = make_torch_mesh(model_axis_size=4)
    col = ColumnParallelLinear(18, OUT, parallel_config=TensorParallelConfig(mesh=mesh), seed=0)
    row = RowParallelLinear(IN, 30, parallel_config=TensorParallelConfig(mesh=mesh), seed=0,
                            bias_init=normal_init)
    for layer in (col, row):
        errs, _, _, _ = run(layer, mesh, shape=(2,), hlo_of=())
        assert_close(errs, FP32_RTOL)


@pytest.mark.parametrize("parallel", [False, True])
def test_error_wrong_input_feature_size(make_torch_mesh, parallel):
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=4)) if parallel else None
    layer = RowParallelLinear(IN, OUT, parallel_config=cfg)
    dev = M.xla_device() if parallel else "cpu"
    with pytest.raises(ValueError, match=r"inputs.shape=\(2, 12\): expected the last dim to be "
                                         r"in_features=16"):
        layer(torch.ones(2, 12, device=dev))


def test_error_input_not_on_the_xla_device(make_torch_mesh):
    layer = make_layer("column", make_torch_mesh(model_axis_size=4), MM.ALL_GATHER, False)
    with pytest.raises(ValueError, match=r"inputs is on device cpu, expected the XLA device"):
        layer(torch.ones(2, IN))


@pytest.mark.parametrize("kwargs,bad", BAD_CONSTRUCTOR_ARGS + [
    (dict(in_features=4, out_features=4, precision="fast"), "precision='fast'"),
    (dict(in_features=4, out_features=4, param_dtype="float32"), "param_dtype='float32'"),
    (dict(in_features=4, out_features=4, seed=1.5), "seed=1.5"),
    (dict(in_features=4, out_features=4, kernel_init=lambda g, s, d: torch.ones(2)),
     r"kernel_init returned \(2,\): expected a tensor of shape \(4, 4\)"),
])
def test_error_bad_constructor_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        ParallelLinear(**kwargs)


def test_error_spmd_not_enabled_monkeypatched(make_torch_mesh, monkeypatch):
    import torch_xla.runtime as xr

    mesh = make_torch_mesh(model_axis_size=2)
    monkeypatch.setattr(xr, "is_spmd", lambda: False)
    with pytest.raises(ValueError, match=r"torch_xla SPMD is not enabled"):
        TensorParallelConfig(mesh=mesh)


# ---------------------------------------------------------------------- partition-spec helpers
@pytest.mark.parametrize("spec", [(None, "tp"), ("tp", None), (None, None), ("dp", "tp"),
                                  (("dp", "tp"), None), (("tp", "dp"), None), ("tp", "dp")])
def test_get_sharding_round_trip(make_torch_mesh, spec):
    mesh = make_torch_mesh(model_axis_size=4)
    t = M.mark_sharding(torch.zeros(8, 8, device=M.xla_device()), mesh, spec)
    assert get_sharding(t, mesh=mesh) == spec


def test_get_sharding_none_cases(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    dev = M.xla_device()
    assert get_sharding(torch.ones(4, 8), mesh=mesh) is None  # CPU
    assert get_sharding(torch.ones(4, 8, device=dev), mesh=mesh) is None  # not annotated
    assert get_sharding(object(), mesh=mesh) is None
    t = M.mark_sharding(torch.zeros(8, 8, device=dev), mesh, ("fsdp", "tp"))
    assert get_sharding(t, mesh=mesh) == (None, "tp")  # axes of size 1 are not named
    # the same devices seen through a mesh without 'tp' are another layout
    other = make_torch_mesh(model_axis_size=2)
    assert get_sharding(t, mesh=other) is None


@pytest.mark.parametrize("lhs,rhs,expected", [
    (("dp", None), (None, "tp"), ("dp", "tp")),
    (("dp", "tp"), ("tp", None), ("dp", None)),
    (("tp", None), (None, "tp"), ("tp", None)),  # an axis is used once
    (("dp", None, None), (None, "tp"), ("dp", None, "tp")),
    ((("dp", "tp"), None), (None, ("tp", "fsdp")), (("dp", "tp"), ("fsdp",))),
    ((None,), (None, "tp"), ("tp",)),
    (None, (None, "tp"), ()),
    (("dp", None), None, ()),
])
def test_get_matmul_output_sharding(lhs, rhs, expected):
    assert get_matmul_output_sharding(lhs, rhs) == expected


def test_get_output_partition_spec(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4, data_axis_size=2)
    dev = M.xla_device()

    def put(shape, spec):
        return M.mark_sharding(torch.ones(shape, device=dev), mesh, spec)

    x_dp = put((4, IN), ("dp", None))
    x_tp = put((2, 4, IN), (None, "tp", None))
    w_col, w_row = put((IN, OUT), (None, "tp")), put((IN, OUT), ("tp", None))
    gop = lambda a, b, m: get_output_partition_spec(a, b, m, "tp", mesh=mesh)  # noqa: E731
    assert gop(x_dp, w_col, MM.PLAIN) == ("dp", "tp")
    assert gop(x_dp, w_row, None) == ("dp", None)
    assert gop(x_dp, w_row, MM.REDUCE_SCATTER) == ("dp", "tp")
    assert gop(x_dp, w_col, "all_gather_matmul") == ("dp", "tp")
    assert gop(x_tp, w_row, MM.REDUCE_SCATTER_BIDIRECTIONAL) == (None, None, "tp")
    assert gop(torch.ones(4, IN), w_col, MM.PLAIN) is None
    assert gop(x_dp, torch.ones(IN, OUT), MM.PLAIN) is None


def test_output_partition_spec_describes_ring_layer_output(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    for kind, method in (("column", MM.ALL_GATHER), ("row", MM.REDUCE_SCATTER)):
        layer = make_layer(kind, mesh, method, True)
        x = M.mark_sharding(torch.ones(4, IN, device=M.xla_device()), mesh, (None, "tp"))
        y = layer(x)
        spec = get_output_partition_spec(x, layer.kernel, method, "tp", mesh=mesh)
        assert spec == (None, "tp") == get_sharding(y, mesh=mesh)
