"""jax_impl vs torch_impl tensor_parallel: same weights, same numbers, same collectives.

For every layer/mode and model-axis size n in (1, 2, 4, 8) on the mesh (dp, fsdp, pp, tp) =
(8/n, 1, 1, n) of both backends:

1. the JAX parameter tree (global shapes, paths joined by '.') equals the torch ``state_dict``
   (keys and shapes): converting weights is a plain rename;
2. JAX weights (random, biases non-zero) are loaded into the torch module; both run forward and
   backward on the same stacked input ``x`` ``[n, B, in]`` (dim 0 over tp, replicated over dp; the
   JAX side runs ``model.apply`` under ``shard_map`` with ``in_specs=P('tp')``) with the same
   output cotangent; outputs, input gradients and parameter gradients agree (fp32: normwise
   relative error <= 1e-5; bf16: see BF16_TOL);
3. the collectives of the compiled, partitioned forward+backward programs are equal as multisets
   of (kind, source_target_pairs, replica_groups) (``parity.hlo.signature``). JAX: ``jax.jit(...)
   .lower().compile().as_text()``; torch: ``torch_impl.mesh.compiled_hlo`` (post-optimization HLO).
"""

import functools
import os

# torch_xla reads this once per process: see torch_impl.mesh.compiled_hlo
os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (JAX before torch_xla, docs/design.md)
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from parity import hlo  # noqa: E402

B, FL, O = 2, 4, 8  # batch, per-device input features, dense features
FP32_TOL = 1e-5
BF16_TOL = 2**-7  # two bf16 ulps (7.8e-3); measured max 3.0e-3 (test_bf16_twins, n=4)

CASES = {  # name: (class name, tp_mode, options shared by both backends)
    "dense_none": ("TPDense", "none", {}),
    "dense_gather": ("TPDense", "gather", {}),
    "dense_scatter": ("TPDense", "scatter", {}),
    "dense_gather_skip": ("TPDense", "gather", {"skip_communication": True}),
    "dense_scatter_skip": ("TPDense", "scatter", {"skip_communication": True}),
    "async_gather_uni": ("TPAsyncDense", "gather", {"use_bidirectional_gather": False}),
    "async_gather_bi": ("TPAsyncDense", "gather", {"use_bidirectional_gather": True}),
    "async_scatter_uni": ("TPAsyncDense", "scatter", {"use_bidirectional_scatter": False}),
    "async_scatter_split": ("TPAsyncDense", "scatter", {"use_bidirectional_scatter": True}),
}
DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}


def in_features(case, n):
    _, mode, opts = CASES[case]
    return n * FL if (opts.get("skip_communication") and mode == "gather") else FL


def out_features(case, n, features=O):
    cls, mode, opts = CASES[case]
    scattered = cls == "TPDense" and mode == "scatter" and not opts.get("skip_communication")
    return features // n if (scattered and n > 1) else features


def _is_box(v):
    return isinstance(v, nn.Partitioned)


def _flat(tree):
    """{'a.b.c': leaf} of a params tree (boxes kept as leaves)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
    return {".".join(k.key for k in path): leaf for path, leaf in leaves}


def _val(leaf):
    return leaf.value if _is_box(leaf) else leaf


# ----------------------------------------------------------------------------------- JAX side
def jax_run(case, mesh, x, ct, weights=None, dtype="float32", features=O):
    """(param shapes, y, grads {'x': .., path: ..}, {'fwd'|'fwd+bwd': compiled HLO}) of JAX."""
    from jax_impl import tensor_parallel as jtp

    cls, mode, opts = CASES[case]
    jdt = DTYPES[dtype][0]
    dense = functools.partial(nn.Dense, features=features, dtype=jdt, param_dtype=jdt)
    model = getattr(jtp, cls)(dense_fn=dense, model_axis_name="tp", tp_mode=mode, **opts)
    x = jnp.asarray(x, jdt)
    init = lambda key, v: model.init(key, v[0])  # noqa: E731  (per device: row 0 of [1, ...])
    abstract = jax.eval_shape(jax.shard_map(init, mesh=mesh, in_specs=(P(), P("tp")),
                                            out_specs=P(), check_vma=False), jax.random.key(0), x)
    pspec = nn.get_partition_spec(abstract)
    params = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=(P(), P("tp")), out_specs=pspec))(
        jax.random.key(0), x)
    shapes = {k: tuple(_val(v).shape) for k, v in _flat(params["params"]).items()}
    if weights is not None:  # replace every value by the given (global) weights
        if set(weights) != set(shapes):
            raise AssertionError(f"JAX params {sorted(shapes)} != torch keys {sorted(weights)}")
        def put(path, leaf):
            key = ".".join(k.key for k in path[1:])
            value = jnp.asarray(weights[key], jdt)
            return leaf.replace_boxed(value) if _is_box(leaf) else value
        params = jax.tree_util.tree_map_with_path(put, params, is_leaf=_is_box)
    apply = jax.shard_map(lambda p, v: model.apply(p, v[0])[None], mesh=mesh,
                          in_specs=(pspec, P("tp")), out_specs=P("tp"))

    def fwd_bwd(p, v, g):
        y, vjp = jax.vjp(apply, p, v)
        dp, dx = vjp(g)
        return y, dp, dx

    put_sharded = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    params = jax.tree.map(put_sharded, params, pspec, is_leaf=_is_box)
    x = put_sharded(x, P("tp"))
    ct = put_sharded(jnp.asarray(ct, jdt), P("tp"))
    compiled = jax.jit(fwd_bwd).lower(params, x, ct).compile()
    y, dp, dx = compiled(params, x, ct)
    grads = {k: np.asarray(_val(v), np.float32) for k, v in _flat(dp["params"]).items()}
    grads["x"] = np.asarray(dx, np.float32)
    fwd_text = jax.jit(apply).lower(params, x).compile().as_text()
    texts = {"fwd": fwd_text, "fwd+bwd": compiled.as_text()}
    return shapes, np.asarray(y, np.float32), grads, texts


# --------------------------------------------------------------------------------- torch side
def torch_module(case, mesh, dtype="float32", features=O):
    from torch_impl import tensor_parallel as ttp

    cls, mode, opts = CASES[case]
    n = mesh.mesh_shape[-1]
    return getattr(ttp, cls)(in_features(case, n), features, "tp", mode, mesh=mesh, seed=0,
                             dtype=DTYPES[dtype][1], **opts)


def torch_run(module, mesh, x, ct, weights, dtype="float32"):
    """(y, grads {'x': .., key: ..}, {'fwd'|'fwd+bwd': compiled HLO}) with ``weights`` loaded."""
    from torch_impl import mesh as tmesh

    tdt = DTYPES[dtype][1]
    module.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)).to(tdt)
                            for k, v in weights.items()})
    dev = tmesh.xla_device()
    xt = tmesh.mark_stacked(torch.from_numpy(x).to(tdt).to(dev), mesh, "tp").requires_grad_()
    gt = tmesh.mark_stacked(torch.from_numpy(ct).to(tdt).to(dev), mesh, "tp")
    y = module(xt)
    fwd_text = tmesh.compiled_hlo([y])
    y.backward(gt)
    names = [k for k, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    text = tmesh.compiled_hlo([y, xt.grad] + [p.grad for p in params])
    grads = {k: p.grad.float().cpu().numpy() for k, p in zip(names, params)}
    grads["x"] = xt.grad.float().cpu().numpy()
    return y.detach().float().cpu().numpy(), grads, {"fwd": fwd_text, "fwd+bwd": text}


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def twin(case, jax_mesh, torch_mesh, n, dtype="float32", features=O, seed=0):
    """Run both backends on the same weights and data: (errors, jax HLOs, torch HLOs)."""
    rng = np.random.default_rng(seed)
    module = torch_module(case, torch_mesh, dtype, features)
    torch_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    x = rng.standard_normal((n, B, in_features(case, n))).astype(np.float32)
    weights = {k: (rng.standard_normal(s) / np.sqrt(s[-2] if len(s) > 1 else 4)).astype(np.float32)
               for k, s in sorted(torch_shapes.items())}
    ct = rng.standard_normal((n, B, out_features(case, n, features))).astype(np.float32)
    jshapes, jy, jgrads, jtext = jax_run(case, jax_mesh, x, ct, weights, dtype, features)
    assert jshapes == torch_shapes, "JAX param tree != torch state_dict (keys or shapes)"
    ty, tgrads, ttext = torch_run(module, torch_mesh, x, ct, weights, dtype)
    assert set(jgrads) == set(tgrads)
    errs = {"y": rel_err(ty, jy), **{f"d{k}": rel_err(tgrads[k], jgrads[k]) for k in jgrads}}
    return errs, jtext, ttext


def signatures(texts):
    """{'fwd': sig, 'fwd+bwd': sig}: the forward alone pins the ring directions (a ring reversed
    in both passes has the same forward+backward multiset)."""
    return {k: signature(v) for k, v in texts.items()}


def signature(text):
    """``hlo.signature``: collectives over one-device groups (JAX keeps the psum of replicated
    gradients over a tp axis of size 1 as an all-reduce with groups {{0},{1},...}; torch_xla emits
    nothing) move no data and are left out by ``hlo.collectives``."""
    return hlo.signature(text)


def _fmt(sig):
    return sorted((k[0], k[1][:3], k[2], v) for k, v in sig.items())


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_twins(jax_mesh, torch_mesh, axis_size, case):
    errs, jtext, ttext = twin(case, jax_mesh, torch_mesh, axis_size)
    print(case, axis_size, f"max rel err {max(errs.values()):.2e}")
    bad = {k: v for k, v in errs.items() if not v <= FP32_TOL}
    assert not bad, f"torch vs JAX fp32 errors above {FP32_TOL}: {bad}"
    jsig, tsig = signatures(jtext), signatures(ttext)
    for part in ("fwd", "fwd+bwd"):
        assert tsig[part] == jsig[part], (f"{part} collectives differ:\n jax   {_fmt(jsig[part])}"
                                          f"\n torch {_fmt(tsig[part])}")
    if axis_size > 1 and CASES[case][1] != "none" and not CASES[case][2].get("skip_communication"):
        assert sum(tsig["fwd"].values()) > 0  # the comparison is not vacuous


@pytest.mark.parametrize("case", ["dense_gather", "dense_scatter", "async_gather_bi",
                                  "async_scatter_split"])
def test_bf16_twins(make_jax_mesh, make_torch_mesh, case):
    n = 4
    errs, jtext, ttext = twin(case, make_jax_mesh(model_axis_size=n),
                              make_torch_mesh(model_axis_size=n), n, dtype="bfloat16")
    print(case, f"bf16 max rel err {max(errs.values()):.2e}", errs)
    bad = {k: v for k, v in errs.items() if not v <= BF16_TOL}
    assert not bad, f"torch vs JAX bf16 errors above {BF16_TOL}: {bad}"
    assert signatures(ttext) == signatures(jtext)


def test_split_scatter_odd_features(make_jax_mesh, make_torch_mesh):
    """5 features: the first 2 travel up the ring, the other 3 down, on both backends."""
    errs, jtext, ttext = twin("async_scatter_split", make_jax_mesh(model_axis_size=4),
                              make_torch_mesh(model_axis_size=4), 4, features=5)
    assert max(errs.values()) <= FP32_TOL, errs
    assert signatures(ttext) == signatures(jtext)


def test_twin_comparison_detects_a_reversed_ring(make_jax_mesh, make_torch_mesh, monkeypatch):
    """The comparison can fail: a torch ring shifted the other way changes numbers and pairs."""
    from torch_impl import async_collectives as tac  # TPAsyncDense's rings

    original = tac.ring_permute

    def reversed_ring(x, axis_name, shift_up=True, *, mesh):
        return original(x, axis_name, shift_up=not shift_up, mesh=mesh)

    monkeypatch.setattr(tac, "ring_permute", reversed_ring)
    errs, jtext, ttext = twin("async_gather_uni", make_jax_mesh(model_axis_size=4),
                              make_torch_mesh(model_axis_size=4), 4)
    assert errs["y"] > 0.1
    jsig, tsig = signatures(jtext), signatures(ttext)
    assert tsig["fwd"] != jsig["fwd"]
    # Reversed in both passes, the forward+backward multiset is the same: hence the "fwd" check.
    assert tsig["fwd+bwd"] == jsig["fwd+bwd"]


def test_public_api_mirrors_jax():
    """Same public names in the same order (torch adds Dense and lecun_normal at the end)."""
    import inspect

    import jax_impl.array_utils as ja
    import jax_impl.collectives as jc
    import jax_impl.tensor_parallel as jt
    import torch_impl.array_utils as ta
    import torch_impl.collectives as tc
    import torch_impl.tensor_parallel as tt

    assert tc.__all__ == jc.__all__
    assert ta.__all__ == ja.__all__
    assert tt.__all__[:len(jt.__all__)] == jt.__all__
    assert tt.__all__[len(jt.__all__):] == ["Dense", "lecun_normal"]
    for jmod, tmod in ((jc, tc), (ja, ta), (jt, tt)):
        for name in jmod.__all__:
            jf, tf = getattr(jmod, name), getattr(tmod, name)
            if inspect.isfunction(jf):  # same positional args and defaults, then keyword-only mesh
                jp = list(inspect.signature(jf).parameters.values())
                tp_ = [p for p in inspect.signature(tf).parameters.values()
                       if p.kind is not p.KEYWORD_ONLY]
                jp = [p for p in jp if p.kind is not p.KEYWORD_ONLY]
                if name in ("unstack_params",):  # torch adds axis=0 (tensors carry no axis names)
                    tp_ = [p for p in tp_ if p.name != "axis"]
                assert [(p.name, p.default) for p in tp_] == [(p.name, p.default) for p in jp], name
