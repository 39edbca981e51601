"""Initialization parity (issue 18): init scales as their formulas state, and global weights that
do not depend on the tensor-parallel size.

The parity matrix loads the same weights into both backends, so it never sees the initializers.
These tests do:

1. Every layer's initial kernel has the standard deviation its formula states, within 2% on at
   least 1e5 samples (the sampling error of a std estimate over N normal samples is about
   1/sqrt(2N) = 0.2% at N = 131072, so 2% leaves a 10x margin and still catches a dropped or
   doubled scale: lecun_normal is std = 1/sqrt(fan_in) (flax truncates at 2 sigma and rescales,
   the torch twin does the same), TPDense / TPAsyncDense multiply it by
   ``kernel_init_adjustment`` in the sharded modes, and the embedding table is normal with
   variance 1 / features (``nnx.Embed``'s default).
2. ParallelLinear and VocabParallelEmbed draw their GLOBAL weight from one generator before
   sharding it, so the gathered weights for one seed are identical at tp = 1, 2, 4 and 8 (on each
   backend; the two backends' generators differ, so across backends only the statistics agree).
"""

import functools

import jax  # noqa: I001  (JAX before torch_xla, docs/design.md)
import jax.numpy as jnp
import numpy as np
import pytest
import torch

N_MIN = 100_000
REL_STD_TOL = 0.02
TP_SIZES = (1, 2, 4, 8)


def check_std(values, expected, what):
    values = np.asarray(values, dtype=np.float64).ravel()
    assert values.size >= N_MIN, f"{what}: only {values.size} samples"
    got = values.std()
    assert abs(got / expected - 1) <= REL_STD_TOL, f"{what}: std {got:.5f}, formula {expected:.5f}"
    assert abs(values.mean()) <= 5 * expected / np.sqrt(values.size), f"{what}: mean {values.mean()}"


# ---------------------------------------------------------------------------------------- JAX
def jax_linear_kernel(kind, n, make_jax_mesh, in_f, out_f, seed=0):
    from flax import nnx

    from jax_impl import linear as jl

    cfg = jl.TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=n), axis_name="tp")
    cls = jl.ColumnParallelLinear if kind == "column" else jl.RowParallelLinear
    layer = cls(in_f, out_f, parallel_config=cfg, rngs=nnx.Rngs(seed))
    return np.asarray(layer.kernel.get_value())


def jax_embed_table(n, make_jax_mesh, vocab, feats, seed=0):
    from flax import nnx

    from jax_impl import embedding as je
    from jax_impl import linear as jl

    cfg = jl.TensorParallelConfig(mesh=make_jax_mesh(model_axis_size=n), axis_name="tp")
    layer = je.VocabParallelEmbed(vocab, feats, parallel_config=cfg, rngs=nnx.Rngs(seed))
    return np.asarray(layer.embedding.get_value())


def jax_tp_kernels(cls_name, mode, n, make_jax_mesh, fin, out_f, adjustment):
    """All per-device kernels of a TPDense / TPAsyncDense (stacked on the model axis)."""
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    from jax_impl import tensor_parallel as jtp

    mesh = make_jax_mesh(model_axis_size=n)
    dense = functools.partial(nn.Dense, features=out_f)
    model = getattr(jtp, cls_name)(dense_fn=dense, model_axis_name="tp", tp_mode=mode,
                                   kernel_init_adjustment=adjustment)
    x = jnp.ones((8, fin * n))
    init = lambda key, v: model.init(key, v)  # noqa: E731
    shapes = jax.eval_shape(jax.shard_map(init, mesh=mesh, in_specs=(P(), P("dp", "tp")),
                                          out_specs=P(), check_vma=False), jax.random.key(0), x)
    init = jax.shard_map(init, mesh=mesh, in_specs=(P(), P("dp", "tp")),
                         out_specs=nn.get_partition_spec(shapes))
    params = jax.jit(init)(jax.random.key(0), x)["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return np.concatenate([np.asarray(v).ravel() for path, v in leaves
                           if "kernel" in jax.tree_util.keystr(path)])


# -------------------------------------------------------------------------------------- torch
def torch_linear_kernel(kind, n, make_torch_mesh, in_f, out_f, seed=0):
    from torch_impl import linear as tl

    cfg = tl.TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=n), axis_name="tp")
    cls = tl.ColumnParallelLinear if kind == "column" else tl.RowParallelLinear
    return cls(in_f, out_f, parallel_config=cfg, seed=seed).kernel.detach().cpu().numpy()


def torch_embed_table(n, make_torch_mesh, vocab, feats, seed=0):
    from torch_impl import embedding as te
    from torch_impl import linear as tl

    cfg = tl.TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=n), axis_name="tp")
    layer = te.VocabParallelEmbed(vocab, feats, parallel_config=cfg, seed=seed)
    return layer.embedding.detach().cpu().numpy()


def torch_tp_kernels(cls_name, mode, n, make_torch_mesh, fin, out_f, adjustment):
    from torch_impl import tensor_parallel as ttp

    layer = getattr(ttp, cls_name)(fin, out_f, "tp", mode, mesh=make_torch_mesh(model_axis_size=n),
                                   seed=0, kernel_init_adjustment=adjustment)
    return np.concatenate([p.detach().cpu().numpy().ravel()
                           for name, p in layer.named_parameters() if name.endswith("kernel")])


# -------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_parallel_linear_lecun_std(backend, kind, request):
    in_f, out_f = 256, 512  # 131072 samples, fan_in 256
    if backend == "jax":
        k = jax_linear_kernel(kind, 4, request.getfixturevalue("make_jax_mesh"), in_f, out_f)
    else:
        k = torch_linear_kernel(kind, 4, request.getfixturevalue("make_torch_mesh"), in_f, out_f)
    assert k.shape == (in_f, out_f)
    check_std(k, 1 / np.sqrt(in_f), f"{backend} {kind} kernel")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_embedding_std(backend, request):
    vocab, feats = 1024, 128
    if backend == "jax":
        t = jax_embed_table(4, request.getfixturevalue("make_jax_mesh"), vocab, feats)
    else:
        t = torch_embed_table(4, request.getfixturevalue("make_torch_mesh"), vocab, feats)
    check_std(t, 1 / np.sqrt(feats), f"{backend} embedding")


TP_LAYERS = [("TPDense", "gather"), ("TPDense", "scatter"), ("TPAsyncDense", "gather"),
             ("TPAsyncDense", "scatter")]


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("cls_name,mode", TP_LAYERS)
def test_tp_dense_std_includes_the_adjustment(backend, cls_name, mode, request):
    n, fin, out_f, adjustment = 4, 256, 128, 0.5
    # per-device fan_in: gather sees all n*fin features (TPDense) or fin per ring step
    # (TPAsyncDense); scatter sees its fin features.
    fan_in = n * fin if (cls_name, mode) == ("TPDense", "gather") else fin
    if backend == "jax":
        k = jax_tp_kernels(cls_name, mode, n, request.getfixturevalue("make_jax_mesh"),
                           fin, out_f, adjustment)
    else:
        k = torch_tp_kernels(cls_name, mode, n, request.getfixturevalue("make_torch_mesh"),
                             fin, out_f, adjustment)
    check_std(k, adjustment / np.sqrt(fan_in), f"{backend} {cls_name} {mode}")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_global_weights_do_not_depend_on_tp(backend, request):
    mesh_fixture = request.getfixturevalue(f"make_{backend}_mesh")
    lin = jax_linear_kernel if backend == "jax" else torch_linear_kernel
    emb = jax_embed_table if backend == "jax" else torch_embed_table
    for kind in ("column", "row"):
        ref = lin(kind, 1, mesh_fixture, 32, 64, seed=3)
        for n in TP_SIZES[1:]:
            np.testing.assert_array_equal(lin(kind, n, mesh_fixture, 32, 64, seed=3), ref,
                                          err_msg=f"{backend} {kind} tp={n}")
    ref = emb(1, mesh_fixture, 64, 16, seed=3)
    for n in TP_SIZES[1:]:
        np.testing.assert_array_equal(emb(n, mesh_fixture, 64, 16, seed=3), ref,
                                      err_msg=f"{backend} embedding tp={n}")
    assert not np.array_equal(lin("column", 2, mesh_fixture, 32, 64, seed=4),
                              lin("column", 2, mesh_fixture, 32, 64, seed=3))


def test_a_dropped_init_scale_is_caught(make_torch_mesh, monkeypatch):
    """The std check can fail: with ``scale_init`` planted as the identity (the adjustment
    dropped), the kernel std is 2x the formula and the check reports it."""
    from torch_impl import tensor_parallel as ttp

    monkeypatch.setattr(ttp, "scale_init", lambda init_fn, scale_factor=1.0: init_fn)
    k = torch_tp_kernels("TPAsyncDense", "gather", 4, make_torch_mesh, 256, 128, 0.5)
    with pytest.raises(AssertionError, match="formula"):
        check_std(k, 0.5 / np.sqrt(256), "planted")
