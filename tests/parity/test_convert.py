"""ringpar.convert: JAX <-> torch weights, and re-sharding TP weights between axis sizes."""

from __future__ import annotations

import numpy as np
import pytest

from parity import cases as C
from ringpar import convert

RESHARDABLE = [("tpdense", "gather"), ("tpdense", "scatter"), ("tpasync", "gather-uni"),
               ("tpasync", "gather-bi"), ("tpasync", "scatter-uni"), ("tpasync", "scatter-split"),
               ("linear", "column-plain")]


def _params(module, variant, n, extra=()):
    case = C.Case(module, variant, n, extra=extra)
    return case, C.make_data(case)


@pytest.mark.parametrize("module, variant", RESHARDABLE)
def test_dense_round_trip_is_exact(module, variant, axis_size):
    rng = np.random.default_rng(0)
    dense = {"kernel": rng.standard_normal((32, 32)).astype(np.float32),
             "bias": rng.standard_normal(32).astype(np.float32)}
    flat = convert.from_dense(module, variant, axis_size, dense)
    extra = (("rso", 0),) if module == "linear" else ()
    assert set(flat) == set(C.MODULES[module].param_shapes(C.Case(module, variant, axis_size, extra=extra)))
    back = convert.to_dense(module, variant, axis_size, flat)
    np.testing.assert_array_equal(back["kernel"], dense["kernel"])
    np.testing.assert_array_equal(back["bias"], dense["bias"])
    if not (module == "tpdense" and variant == "scatter"):  # that bias is a sum: not unique
        case, data = _params(module, variant, axis_size, extra)
        again = convert.from_dense(module, variant, axis_size,
                                   convert.to_dense(module, variant, axis_size, data["params"]))
        for k, v in data["params"].items():
            np.testing.assert_array_equal(again[k], v)


@pytest.fixture(scope="module")
def jax_backend(jax_devices):
    from parity.runner import load_backend

    return load_backend("jax")


@pytest.mark.parametrize("module, variant", RESHARDABLE[:-1])
@pytest.mark.parametrize("n", [2, 8])
def test_to_dense_is_the_function_the_jax_layer_computes(jax_backend, module, variant, n):
    case, data = _params(module, variant, n)
    y = jax_backend.run(case, data).outputs["y"]
    dense = convert.to_dense(module, variant, n, data["params"])
    ref = data["inputs"]["x"].astype(np.float64) @ dense["kernel"] + dense["bias"]
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-5


@pytest.mark.parametrize("module, variant", RESHARDABLE)
@pytest.mark.parametrize("n_from, n_to", [(2, 4), (8, 2)])
def test_resharded_weights_give_the_same_function(jax_backend, module, variant, n_from, n_to):
    extra = (("rso", 0),) if module == "linear" else ()
    case_from, data = _params(module, variant, n_from, extra)
    y_from = jax_backend.run(case_from, data).outputs["y"]
    case_to = C.Case(module, variant, n_to, extra=extra)
    moved = dict(data, params=convert.reshard(module, variant, data["params"], n_from, n_to))
    y_to = jax_backend.run(case_to, moved).outputs["y"]
    assert np.abs(y_to - y_from).max() / np.abs(y_from).max() < 1e-5


def test_reshard_errors():
    with pytest.raises(ValueError, match="block-diagonal"):
        convert.to_dense("tpdense", "none", 2, {})
    with pytest.raises(ValueError, match="module='mlp'"):
        convert.to_dense("mlp", "gather", 2, {})
    with pytest.raises(ValueError, match="not divisible by n=3"):
        convert.from_dense("tpdense", "gather", 3, {"kernel": np.zeros((4, 4)), "bias": np.zeros(4)})


def test_flatten_unflatten_round_trip_and_errors():
    flat = {"a.b.kernel": np.ones((2, 3)), "a.c": np.zeros(1), "d": np.arange(3)}
    tree = convert.unflatten_params(flat)
    assert tree["a"]["b"]["kernel"].shape == (2, 3)
    back = convert.flatten_params(tree)
    assert back.keys() == flat.keys()
    with pytest.raises(ValueError, match="passes through the leaf"):
        convert.unflatten_params({"a": np.ones(1), "a.b": np.ones(1)})


def test_jax_tree_to_torch_module_and_back_is_exact(jax_devices, xla_device):
    """A real TPAsyncDense JAX init tree loads into the torch twin by rename, and comes back."""
    import functools

    import flax.linen as nn
    import jax
    import torch
    from jax.sharding import PartitionSpec as P

    from jax_impl.configs import ParallelConfig
    from jax_impl.mesh import create_mesh
    from jax_impl.tensor_parallel import TPAsyncDense
    from torch_impl import mesh as tmesh
    from torch_impl.tensor_parallel import TPAsyncDense as TorchTPAsyncDense

    n = 4
    mesh = create_mesh(ParallelConfig(model_axis_size=n))
    layer = TPAsyncDense(dense_fn=functools.partial(nn.Dense, features=8), model_axis_name="tp",
                         tp_mode="gather")
    x = np.ones((2, 32), np.float32)
    init = jax.shard_map(lambda r, xl: layer.init(r, xl)["params"], mesh=mesh,
                         in_specs=(P(), P(None, "tp")), out_specs=P(), check_vma=False)
    abstract = jax.eval_shape(init, jax.random.key(0), x)
    specs = nn.get_partition_spec(abstract)
    params = jax.jit(jax.shard_map(lambda r, xl: layer.init(r, xl)["params"], mesh=mesh,
                                   in_specs=(P(), P(None, "tp")), out_specs=specs,
                                   check_vma=False))(jax.random.key(1), x)
    state = convert.jax_to_torch(params)
    tm = tmesh.create_mesh(ParallelConfig(model_axis_size=n))
    module = TorchTPAsyncDense(8, 8, "tp", tp_mode="gather", mesh=tm, seed=5)
    module.load_state_dict(state, strict=True)
    back = convert.flatten_params(convert.torch_to_jax(module.state_dict()))
    ref = convert.flatten_params(params)
    assert back.keys() == ref.keys() and len(ref) == n + 1
    for k in ref:
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(ref[k]))
    # and the kernels really differ per device (a rename, not a broadcast)
    k0 = np.asarray(ref["shard_0.sharded.kernel"])
    assert not np.allclose(k0[0], k0[1])
    assert isinstance(state["shard_0.sharded.bias"], torch.Tensor)


def test_linear_weight_transpose():
    w = np.arange(6.0).reshape(2, 3)  # torch nn.Linear: [out=2, in=3]
    k = convert.linear_weight_to_kernel(w)
    assert k.shape == (3, 2) and k[2, 1] == w[1, 2]
    np.testing.assert_array_equal(convert.kernel_to_linear_weight(k), w)
