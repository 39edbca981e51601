"""jax_impl.tensor_parallel vs an unsharded dense layer assembled from the layer's own parameters.

Every case runs on the (dp, fsdp, pp, tp) = (8/n, 1, 1, n) mesh with the batch sharded over dp.
The reference is float64 numpy: the per-device kernels/biases are pulled out of the stacked
parameter tree and placed into one global matrix ``W`` and bias ``b`` by the layout the module
docstring documents (which device's input block meets which kernel, which output block it feeds);
then ``y = x W + b``, ``dx = g W^T``, ``dW = x^T g``, ``db = sum(g)`` for the loss ``sum(y * g)``.
Errors are normwise: ``max|got - ref| / max|ref|`` per array.
"""

import functools
from collections import Counter

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_impl.tensor_parallel import (ModelParallelismWrapper, TPAsyncDense, TPDense, scale_init)
from parity import hlo

B, FL, O = 8, 8, 8  # global batch (sharded over dp), per-device input features, dense features
FP32_TOL = 1e-5
BF16_TOL = 1.6e-2  # 2**-6; measured max 5.8e-3 (see test_bf16_matches_reference)

CASES = {  # name: (layer class, tp_mode, extra attributes)
    "dense_none": (TPDense, "none", {}),
    "dense_gather": (TPDense, "gather", {}),
    "dense_scatter": (TPDense, "scatter", {}),
    "dense_gather_skip": (TPDense, "gather", {"skip_communication": True}),
    "dense_scatter_skip": (TPDense, "scatter", {"skip_communication": True}),
    "async_gather_uni": (TPAsyncDense, "gather", {"use_bidirectional_gather": False}),
    "async_gather_bi": (TPAsyncDense, "gather", {"use_bidirectional_gather": True}),
    "async_scatter_uni": (TPAsyncDense, "scatter", {"use_bidirectional_scatter": False}),
    "async_scatter_split": (TPAsyncDense, "scatter", {"use_bidirectional_scatter": True}),
}


def make_model(case, features=O, dtype=jnp.float32, **overrides):
    cls, mode, extra = CASES[case]
    dense = functools.partial(nn.Dense, features=features, dtype=dtype, param_dtype=dtype)
    return cls(dense_fn=dense, model_axis_name="tp", tp_mode=mode, **{**extra, **overrides})


# ------------------------------------------------------------------------------- the reference
def _blk(k, size, n, part=slice(None)):
    """Columns/rows of block k (mod n) of width ``size``, optionally only ``part`` of the block."""
    start = (k % n) * size
    return slice(start + (part.start or 0), start + (size if part.stop is None else part.stop))


def layout(case, n, features=O):
    """(global in features, global out features, in_spec, out_spec, entries).

    An entry ``(path, dev, rows, cols, pcols)`` says: parameter ``path`` of device ``dev`` (None for
    a plain, unstacked parameter), restricted to its last-axis slice ``pcols``, occupies
    ``W[rows, cols]`` (kernel) or ``b[cols]`` (bias, rows None). Biases of several devices landing
    on the same columns add up.
    """
    cls, mode, extra = CASES[case]
    all_, sharded = P("dp", None), P("dp", "tp")
    full = slice(None)
    if mode == "none" or n == 1:
        name = "Dense_0" if cls is TPDense else "shard_0"
        spec = all_ if mode == "none" else sharded
        return FL, features, spec, spec, [((name, "kernel"), None, full, full, full),
                                          ((name, "bias"), None, None, full, full)]
    if cls is TPDense:
        k, b = ("module", "sharded", "kernel"), ("module", "sharded", "bias")
        if extra.get("skip_communication"):  # block diagonal: device d alone
            ents = [e for d in range(n) for e in (
                (k, d, _blk(d, FL, n), _blk(d, features, n), full),
                (b, d, None, _blk(d, features, n), full))]
            return n * FL, n * features, sharded, sharded, ents
        if mode == "gather":
            ents = [e for d in range(n) for e in (
                (k, d, full, _blk(d, features, n), full), (b, d, None, _blk(d, features, n), full))]
            return n * FL, n * features, sharded, sharded, ents
        ents = [e for d in range(n) for e in (
            (k, d, _blk(d, FL, n), full, full), (b, d, None, full, full))]
        return n * FL, features, sharded, sharded, ents
    kern = lambda i: (f"shard_{i}", "sharded", "kernel")  # noqa: E731
    bias = ("shard_0", "sharded", "bias")
    ents = []
    if mode == "gather":  # shard_i of device d sees the input of device d - i
        for d in range(n):
            ents += [(kern(i), d, _blk(d - i, FL, n), _blk(d, features, n), full) for i in range(n)]
            ents.append((bias, d, None, _blk(d, features, n), full))
    elif not extra.get("use_bidirectional_scatter"):  # shard_i of device e feeds device e-1-i
        for e in range(n):
            ents += [(kern(i), e, _blk(e, FL, n), _blk(e - 1 - i, features, n), full)
                     for i in range(n)]
            ents.append((bias, e, None, _blk(e - 1, features, n), full))
    else:  # first features//2 go to e-1-i, the rest to e+1+i
        lo, hi = slice(0, features // 2), slice(features // 2, None)
        for e in range(n):
            for i in range(n):
                ents.append((kern(i), e, _blk(e, FL, n), _blk(e - 1 - i, features, n, lo), lo))
                ents.append((kern(i), e, _blk(e, FL, n), _blk(e + 1 + i, features, n, hi), hi))
            ents.append((bias, e, None, _blk(e - 1, features, n, lo), lo))
            ents.append((bias, e, None, _blk(e + 1, features, n, hi), hi))
    return n * FL, n * features, sharded, sharded, ents


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _value(leaf):
    return np.asarray(leaf.value if isinstance(leaf, nn.Partitioned) else leaf, np.float64)


def reference(params, x, g, fin, fout, entries):
    """float64 y, dx and {path: dparam} of the global dense map described by ``entries``."""
    W, bvec = np.zeros((fin, fout)), np.zeros(fout)
    for path, dev, rows, cols, pcols in entries:
        val = _value(_leaf(params, path))
        val = (val if dev is None else val[dev])[..., pcols]
        if rows is None:
            bvec[cols] += val
        else:
            W[rows, cols] += val
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    y = x @ W + bvec
    dW, db = x.T @ g, g.sum(0)
    grads = {}
    for path, dev, rows, cols, pcols in entries:
        ref = grads.setdefault(path, np.zeros_like(_value(_leaf(params, path))))
        target = ref if dev is None else ref[dev]
        target[..., pcols] = db[cols] if rows is None else dW[rows, cols]
    return y, g @ W.T, grads


# --------------------------------------------------------------------------------- the runner
def init_and_apply(model, mesh, in_spec, out_spec, x, seed=0, abstract=False):
    """Init under shard_map (params as global arrays, or only their shapes) and the global apply."""
    init = lambda key, v: model.init(key, v)  # noqa: E731
    shapes = jax.eval_shape(jax.shard_map(init, mesh=mesh, in_specs=(P(), in_spec),
                                          out_specs=P(), check_vma=False), jax.random.key(seed), x)
    pspec = nn.get_partition_spec(shapes)
    init = jax.shard_map(init, mesh=mesh, in_specs=(P(), in_spec), out_specs=pspec)
    key = jax.random.key(seed)
    params = jax.eval_shape(init, key, x) if abstract else jax.jit(init)(key, x)
    apply = jax.shard_map(model.apply, mesh=mesh, in_specs=(pspec, in_spec), out_specs=out_spec)
    return params, apply


def run_case(case, mesh, n, dtype=jnp.float32, features=O):
    model = make_model(case, features=features, dtype=dtype)
    fin, fout, in_spec, out_spec, entries = layout(case, n, features)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((B, fin)), dtype)
    g = jnp.asarray(rng.standard_normal((B, fout)), dtype)
    params, apply = init_and_apply(model, mesh, in_spec, out_spec, x)

    def loss(p, v):
        y = apply(p, v)
        return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y

    (_, y), (dp, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    y_ref, dx_ref, dp_ref = reference(params["params"], x, g, fin, fout, entries)
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(dx, dx_ref)}
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        dp["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))[0]}
    assert set(flat) == set(dp_ref), "every parameter must be covered by the reference"
    for path, leaf in flat.items():
        errs["d" + ".".join(path)] = rel_err(_value(leaf), dp_ref[path])
    return errs


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(jax_mesh, axis_size, case):
    errs = run_case(case, jax_mesh, axis_size)
    print(case, axis_size, f"max rel err {max(errs.values()):.2e}", errs)
    bad = {k: v for k, v in errs.items() if not v <= FP32_TOL}
    assert not bad, f"fp32 errors above {FP32_TOL}: {bad}"


def test_split_scatter_odd_features(make_jax_mesh):
    """Uneven halves: the first features//2 = 2 of 5 go up the ring, the other 3 down."""
    errs = run_case("async_scatter_split", make_jax_mesh(model_axis_size=4), 4, features=5)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("case", ["dense_gather", "dense_scatter", "async_gather_bi",
                                  "async_scatter_split"])
def test_bf16_matches_reference(make_jax_mesh, case):
    """bfloat16 params, inputs, matmuls and gradients vs float64 on the same bf16 values."""
    errs = run_case(case, make_jax_mesh(model_axis_size=4), 4, dtype=jnp.bfloat16)
    print(case, f"bf16 max rel err {max(errs.values()):.2e}", errs)
    bad = {k: v for k, v in errs.items() if not v <= BF16_TOL}
    assert not bad, f"bf16 errors above {BF16_TOL}: {bad}"


# ---------------------------------------------------------------------------- parameter trees
def init_params(model, mesh, in_spec=P("dp", "tp"), fin=None, seed=0, abstract=False):
    x = jnp.ones((B, fin or FL * mesh.shape["tp"]))
    return init_and_apply(model, mesh, in_spec, in_spec, x, seed, abstract)[0]["params"]


def describe(tree):
    return jax.tree.map(lambda v: (tuple(v.value.shape), tuple(v.names))
                        if isinstance(v, nn.Partitioned) else tuple(v.shape), tree,
                        is_leaf=lambda v: isinstance(v, nn.Partitioned))


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_tree(jax_mesh, axis_size, case):
    n = axis_size
    fin, _, in_spec, _, _ = layout(case, n)
    tree = describe(init_params(make_model(case), jax_mesh, in_spec, fin, abstract=True))
    cls, mode, extra = CASES[case]
    kspec = lambda rows: ((n, rows, O), ("tp", None, None))  # noqa: E731
    bspec = ((n, O), ("tp", None))
    if mode == "none" or n == 1:
        name = "Dense_0" if cls is TPDense else "shard_0"
        expected = {name: {"kernel": (FL, O), "bias": (O,)}}
    elif cls is TPDense:
        rows = n * FL if (mode == "gather" and not extra.get("skip_communication")) else FL
        expected = {"module": {"sharded": {"kernel": kspec(rows), "bias": bspec}}}
    else:
        expected = {f"shard_{i}": {"sharded": {"kernel": kspec(FL)}} for i in range(n)}
        expected["shard_0"]["sharded"]["bias"] = bspec
    assert tree == expected


def test_parameter_tree_options(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=2)
    tree = describe(init_params(make_model("dense_gather", dense_name="proj", use_bias=False), mesh,
                                abstract=True))
    assert tree == {"proj": {"sharded": {"kernel": ((2, 2 * FL, O), ("tp", None, None))}}}
    tree = describe(init_params(make_model("async_scatter_uni", use_bias=False), mesh,
                                abstract=True))
    assert tree == {f"shard_{i}": {"sharded": {"kernel": ((2, FL, O), ("tp", None, None))}}
                    for i in range(2)}


@pytest.mark.parametrize("case", ["dense_gather", "async_gather_bi"])
def test_init_differs_across_model_axis(jax_mesh, axis_size, case):
    n = axis_size
    params = init_params(make_model(case), jax_mesh)
    kernels = [v.value for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(
        v, nn.Partitioned)) if isinstance(v, nn.Partitioned) and v.value.ndim == 3]
    if n == 1:
        assert kernels == []
        return
    blocks = [np.asarray(k[j]) for k in kernels for j in range(n)]
    assert len(blocks) == (n * n if case.startswith("async") else n)
    for a in range(len(blocks)):  # every device and every ring step has its own kernel
        for c in range(a):
            assert not np.allclose(blocks[a], blocks[c])
    std = np.std(np.concatenate([b.ravel() for b in blocks]))
    fan_in = kernels[0].shape[1]
    assert 0.7 < std * np.sqrt(fan_in) < 1.3  # lecun_normal


def test_kernel_init_adjustment_and_scale_init(make_jax_mesh):
    mesh = make_jax_mesh(model_axis_size=2)
    base = init_params(make_model("async_gather_uni"), mesh)
    scaled = init_params(make_model("async_gather_uni", kernel_init_adjustment=0.5), mesh)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(scaled)):
        np.testing.assert_allclose(np.asarray(b), 0.5 * np.asarray(a), rtol=1e-6)
    init = scale_init(nn.initializers.ones, 3.0)
    np.testing.assert_array_equal(init(jax.random.key(0), (2, 2)), np.full((2, 2), 3.0))
    assert scale_init(nn.initializers.ones)(jax.random.key(0), (1,))[0] == 1.0


@pytest.mark.parametrize("split_rngs, mask", [(True, "last"), (False, None), (True, None)])
def test_model_parallelism_wrapper(jax_mesh, axis_size, split_rngs, mask):
    n = axis_size
    keep = n - 1 if mask == "last" else None
    wrapper = ModelParallelismWrapper(
        model_axis_name="tp", module_fn=functools.partial(nn.Dense, features=O),
        mask_except_model_idx=keep, split_rngs=split_rngs,
        module_kwargs={"bias_init": nn.initializers.ones})
    params = init_params(wrapper, jax_mesh, fin=FL * n)
    assert describe(params) == {"sharded": {"kernel": ((n, FL, O), ("tp", None, None)),
                                            "bias": ((n, O), ("tp", None))}}
    kernel, bias = (np.asarray(params["sharded"][k].value) for k in ("kernel", "bias"))
    for j in range(n):
        zero = keep is not None and j != keep
        assert np.all(kernel[j] == 0) == zero and np.all(bias[j] == (0 if zero else 1))
    if not split_rngs:
        assert all(np.array_equal(kernel[j], kernel[0]) for j in range(n))
    elif n > 1 and keep is None:
        assert not np.allclose(kernel[0], kernel[1])


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", [TPDense, TPAsyncDense])
def test_unknown_tp_mode(jax_mesh, axis_size, cls):
    model = cls(dense_fn=functools.partial(nn.Dense, features=O), model_axis_name="tp",
                tp_mode="all")
    with pytest.raises(ValueError, match=r"tp_mode='all': expected one of \('scatter', 'gather', "
                                         r"'none'\)"):
        init_params(model, jax_mesh)


@pytest.mark.parametrize("cls", [TPDense, TPAsyncDense])
def test_unbound_model_axis(make_jax_mesh, cls):
    mesh = make_jax_mesh(model_axis_size=2)
    model = cls(dense_fn=functools.partial(nn.Dense, features=O), model_axis_name="model",
                tp_mode="gather")
    with pytest.raises(ValueError, match="axis_name='model' is not bound"):
        init_params(model, mesh)
    outside = cls(dense_fn=functools.partial(nn.Dense, features=O), model_axis_name="tp")
    with pytest.raises(ValueError, match="axis_name='tp' is not bound"):
        outside.init(jax.random.key(0), jnp.ones((2, 4)))


def test_scatter_features_not_divisible(make_jax_mesh):
    with pytest.raises(ValueError, match=r"dense_fn output features=6: expected a number divisible "
                                         r"by the size 4 of axis 'tp'"):
        init_params(make_model("dense_scatter", features=6), make_jax_mesh(model_axis_size=4))


# ------------------------------------------------------------------------------ communication
def compiled_ops(case, mesh, grad=False):
    model = make_model(case)
    n = mesh.shape["tp"]
    fin, _, in_spec, out_spec, _ = layout(case, n)
    x = jnp.ones((B, fin))
    params, apply = init_and_apply(model, mesh, in_spec, out_spec, x, abstract=True)
    fn = jax.grad(lambda p, v: jnp.sum(apply(p, v)), argnums=(0, 1)) if grad else apply
    return hlo.collectives(jax.jit(fn).lower(params, x).compile().as_text())


def rings(n):
    groups = [[r * n + j for j in range(n)] for r in range(8 // n)]
    return hlo.ring_pairs(groups, shift_up=True), hlo.ring_pairs(groups, shift_up=False)


@pytest.mark.parametrize("case, n_up, n_down", [
    ("async_gather_uni", lambda n: n - 1, lambda n: 0),
    ("async_gather_bi", lambda n: n // 2, lambda n: (n - 1) // 2),
    ("async_scatter_uni", lambda n: n - 1, lambda n: 0),
    ("async_scatter_split", lambda n: n - 1, lambda n: n - 1),
], ids=["gather_uni", "gather_bi", "scatter_uni", "scatter_split"])
def test_async_dense_communication(jax_mesh, axis_size, case, n_up, n_down):
    """Forward: only cyclic collective-permutes within each tp ring, no all-gather/reduce-scatter."""
    n = axis_size
    ops = compiled_ops(case, jax_mesh)
    if n == 1:
        assert ops == []
        return
    up, down = rings(n)
    assert {op.kind for op in ops} == {"collective-permute"}
    got = Counter(op.pairs for op in ops)
    if up == down:  # n == 2: both directions are the same swap
        assert got == Counter({up: n_up(n) + n_down(n)})
    else:
        assert got == Counter({up: n_up(n), **({down: n_down(n)} if n_down(n) else {})})


def test_async_gather_backward_is_the_reverse_ring(make_jax_mesh):
    """grad: the forward's n-1 up permutes plus their transposes, n-1 down permutes."""
    n = 4
    ops = compiled_ops("async_gather_uni", make_jax_mesh(model_axis_size=n), grad=True)
    up, down = rings(n)
    permutes = Counter(op.pairs for op in ops if op.kind == "collective-permute")
    assert permutes == Counter({up: n - 1, down: n - 1})
    assert not any(op.kind in ("all-gather", "reduce-scatter") for op in ops)


@pytest.mark.parametrize("case, kind", [("dense_gather", "all-gather"),
                                        ("dense_scatter", "reduce-scatter")])
def test_dense_communication(jax_mesh, axis_size, case, kind):
    n = axis_size
    ops = compiled_ops(case, jax_mesh)
    if n == 1:
        assert ops == []
        return
    assert [op.kind for op in ops] == [kind]
    ops_skip = compiled_ops(case + "_skip", jax_mesh)
    assert ops_skip == []
