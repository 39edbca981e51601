"""jax_impl.linear vs torch_impl.linear: same weights, same inputs, same numbers, same collectives.

For every direction x matmul method x reduce option and tp axis size n in (1, 2, 4, 8) on the mesh
(dp, fsdp, pp, tp) = (8/n, 1, 1, n) of both backends:

1. the JAX parameter state (``kernel``, ``bias``, global shapes) equals the torch ``state_dict``
   (keys and shapes): weights convert by name, with no transposition;
2. random weights (biases non-zero) are loaded into both layers; both run forward and backward
   (vjp with the same output cotangent) on the same global input ``[B, in]``, placed with the
   spec the layer consumes (replicated for column PLAIN, sharded on the features otherwise);
   outputs, input gradients and kernel / bias gradients agree (fp32: normwise relative error
   <= 1e-5; measured max 1.3e-07, and 0 (bitwise equal) for every ring method at n=8);
3. the collectives of the compiled, partitioned programs, forward alone and forward+backward,
   are equal as multisets of (kind, source_target_pairs, replica_groups)
   (``parity.hlo.signature``). JAX: ``jax.jit(...).lower().compile().as_text()``; torch:
   ``torch_impl.mesh.compiled_hlo``. Every combination matches.
"""

import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # torch_xla reads it once: see mesh.compiled_hlo

import jax  # noqa: E402  (JAX before torch_xla, docs/design.md)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from parity import hlo  # noqa: E402

B, IN, OUT = 4, 16, 32
FP32_TOL = 1e-5
COMBOS = [("column", "plain"), ("column", "all_gather_matmul"),
          ("column", "all_gather_matmul_bidirectional"), ("row", "plain"),
          ("row", "reduce_scatter_matmul"), ("row", "reduce_scatter_matmul_bidirectional")]
CLASSES = {"column": "ColumnParallelLinear", "row": "RowParallelLinear"}


def specs(kind, method, rs):
    """(input spec, output spec) of the global [B, features] tensors (None = replicated)."""
    sharded_in = kind == "row" or method != "plain"
    return (None, "tp" if sharded_in else None), (None, "tp" if rs else None)


def data(seed=0):
    rng = np.random.default_rng(seed)
    weights = {"kernel": (rng.standard_normal((IN, OUT)) / np.sqrt(IN)).astype(np.float32),
               "bias": rng.standard_normal((OUT,)).astype(np.float32)}
    x = rng.standard_normal((B, IN)).astype(np.float32)
    ct = rng.standard_normal((B, OUT)).astype(np.float32)
    return weights, x, ct


# ----------------------------------------------------------------------------------- JAX side
def jax_run(kind, method, rs, mesh, weights, x, ct, fwd_hlo=True):
    """(param shapes, y, grads {'x', 'kernel', 'bias'}, {'fwd'|'fwd+bwd': compiled HLO})."""
    from jax_impl import linear as jl

    cfg = jl.TensorParallelConfig(mesh=mesh, matmul_method=method, reduce_scatter_output=rs)
    layer = getattr(jl, CLASSES[kind])(IN, OUT, parallel_config=cfg, rngs=nnx.Rngs(0))
    shapes = {k: tuple(v[...].shape) for k, v in nnx.state(layer, nnx.Param).items()}
    layer.kernel[...] = jax.device_put(jnp.asarray(weights["kernel"]), layer.kernel[...].sharding)
    layer.bias[...] = jax.device_put(jnp.asarray(weights["bias"]), layer.bias[...].sharding)
    graphdef, state = nnx.split(layer)
    in_spec, out_spec = specs(kind, method, rs)
    xj = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(*in_spec)))
    gj = jax.device_put(jnp.asarray(ct), NamedSharding(mesh, P(*out_spec)))

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    def fwd_bwd(state, x, g):
        y, vjp = jax.vjp(forward, state, x)
        dstate, dx = vjp(g)
        return y, dstate, dx

    compiled = jax.jit(fwd_bwd).lower(state, xj, gj).compile()
    y, dstate, dx = compiled(state, xj, gj)
    grads = {"x": np.asarray(dx), "kernel": np.asarray(dstate["kernel"][...]),
             "bias": np.asarray(dstate["bias"][...])}
    fwd_text = jax.jit(forward).lower(state, xj).compile().as_text() if fwd_hlo else ""
    return shapes, np.asarray(y), grads, {"fwd": fwd_text, "fwd+bwd": compiled.as_text()}


# --------------------------------------------------------------------------------- torch side
def torch_run(kind, method, rs, mesh, weights, x, ct, fwd_hlo=True):
    """(state_dict shapes, y, grads, {'fwd'|'fwd+bwd': compiled HLO}) with ``weights`` loaded."""
    from torch_impl import linear as tl
    from torch_impl import mesh as tmesh

    cfg = tl.TensorParallelConfig(mesh=mesh, matmul_method=method, reduce_scatter_output=rs)
    layer = getattr(tl, CLASSES[kind])(IN, OUT, parallel_config=cfg, seed=0)
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    in_spec, out_spec = specs(kind, method, rs)
    dev = tmesh.xla_device()
    xt = tmesh.mark_sharding(torch.from_numpy(x).to(dev), mesh, in_spec).requires_grad_()
    gt = tmesh.mark_sharding(torch.from_numpy(ct).to(dev), mesh, out_spec)
    y = layer(xt)
    fwd_text = tmesh.compiled_hlo([y]) if fwd_hlo else ""
    y.backward(gt)
    results = [y, xt.grad, layer.kernel.grad, layer.bias.grad]
    text = tmesh.compiled_hlo(results)
    tmesh.sync()
    y, dx, dk, db = (t.detach().cpu().numpy() for t in results)
    return shapes, y, {"x": dx, "kernel": dk, "bias": db}, {"fwd": fwd_text, "fwd+bwd": text}


def rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def twin(kind, method, rs, jax_mesh, torch_mesh, seed=0, fwd_hlo=True):
    """Run both backends on the same weights and data: (errors, jax HLOs, torch HLOs).

    ``fwd_hlo=False`` skips compiling the forward alone (its HLO text is then "").
    """
    weights, x, ct = data(seed)
    jshapes, jy, jgrads, jtext = jax_run(kind, method, rs, jax_mesh, weights, x, ct, fwd_hlo)
    tshapes, ty, tgrads, ttext = torch_run(kind, method, rs, torch_mesh, weights, x, ct, fwd_hlo)
    assert jshapes == tshapes == {"kernel": (IN, OUT), "bias": (OUT,)}
    errs = {"y": rel_err(ty, jy), **{f"d{k}": rel_err(tgrads[k], jgrads[k]) for k in jgrads}}
    return errs, jtext, ttext


def _fmt(sig):
    return sorted((k[0], k[1][:4], k[2], v) for k, v in sig.items())


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("rs", [False, True], ids=["replicated", "scattered"])
@pytest.mark.parametrize("kind,method", COMBOS, ids=[f"{k}-{m}" for k, m in COMBOS])
def test_linear_twins(jax_mesh, torch_mesh, axis_size, kind, method, rs):
    # n == 1: no collective at all; the forward alone (a part of forward+backward) is not compiled
    errs, jtext, ttext = twin(kind, method, rs, jax_mesh, torch_mesh, fwd_hlo=axis_size > 1)
    print(kind, method, rs, axis_size, f"max rel err {max(errs.values()):.2e}")
    bad = {k: v for k, v in errs.items() if not v <= FP32_TOL}
    assert not bad, f"torch vs JAX fp32 errors above {FP32_TOL}: {bad}"
    for part in ("fwd", "fwd+bwd"):
        jsig, tsig = hlo.signature(jtext[part]), hlo.signature(ttext[part])
        assert tsig == jsig, (f"{part} collectives differ:\n jax   {_fmt(jsig)}\n torch "
                              f"{_fmt(tsig)}")
    if axis_size == 1:
        assert hlo.collectives(ttext["fwd+bwd"]) == []
    elif not (kind == "column" and method == "plain" and rs):
        assert sum(hlo.signature(ttext["fwd"]).values()) > 0  # the comparison is not vacuous


def test_twin_comparison_detects_a_reversed_ring(make_jax_mesh, make_torch_mesh, monkeypatch):
    """The comparison can fail: a torch ring shifted the other way changes numbers and pairs."""
    from torch_impl import linear_ring as tl  # the ring matmuls live here

    original = tl.ring_permute

    def reversed_ring(x, axis_name, shift_up=True, *, mesh):
        return original(x, axis_name, shift_up=not shift_up, mesh=mesh)

    monkeypatch.setattr(tl, "ring_permute", reversed_ring)
    errs, jtext, ttext = twin("column", "all_gather_matmul", True,
                              make_jax_mesh(model_axis_size=4), make_torch_mesh(model_axis_size=4))
    assert errs["y"] > 0.1
    assert hlo.signature(ttext["fwd"]) != hlo.signature(jtext["fwd"])


def test_public_api_mirrors_jax():
    """Same public names in the same order; same constructor arguments (rngs -> seed), same
    private helpers in the same order."""
    import inspect

    import jax_impl.linear as jl
    import torch_impl.linear as tl

    assert tl.__all__ == jl.__all__
    assert tl.MatrixMultiplyMethod is jl.MatrixMultiplyMethod  # one neutral enum, shared
    for cls in ("ParallelLinear", "RowParallelLinear", "ColumnParallelLinear"):
        jp = list(inspect.signature(getattr(jl, cls).__init__).parameters)
        tp_ = list(inspect.signature(getattr(tl, cls).__init__).parameters)
        assert tp_ == [("seed" if p == "rngs" else p) for p in jp], cls
    jf = [f.name for f in __import__("dataclasses").fields(jl.TensorParallelConfig)]
    tf = [f.name for f in __import__("dataclasses").fields(tl.TensorParallelConfig)]
    assert jf == tf

    def helpers(mod):
        return [n for n, v in vars(mod).items() if n.startswith("_") and not n.startswith("__")
                and inspect.isfunction(v) and v.__module__ == mod.__name__]

    jh = helpers(jl)
    th = [h for h in helpers(tl) if h in jh]
    assert th == jh  # every JAX helper has its twin, in the same order
