"""The copy / reduce conjugate pairs of ``collectives``, JAX vs torch: values, gradients, HLO.

``copy_to_axis`` (forward: none; backward: all-reduce), ``reduce_from_axis`` (forward: all-reduce;
backward: none), ``max_from_axis`` (forward: all-reduce(max); no gradient) and
``reduce_scatter_features`` on a dim other than the last. For each, on the (dp, tp) = (8/n, n)
mesh: the torch output and input gradient equal the JAX ones (same input, same cotangent), and the
compiled forward+backward programs have the same collectives (``parity.hlo.signature``).
The cotangent enters sharded like the output on both sides, so the programs hold the pair's
collectives only (a scalar loss would add its own all-reduce). Values are asserted within 1e-5
relative (float32 sums in a possibly different order); all 8 cases passed on 2026-12-03.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (JAX before torch_xla, docs/design.md)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from parity import hlo  # noqa: E402

S = (3, 8)
TOL = 1e-5


def _jax(op, mesh, n, x, cot):
    """(y, dx, hlo text) of the JAX op under shard_map; x is global (stacked or replicated)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_impl import collectives as C

    if op == "copy":
        def local(v):
            return C.copy_to_axis(v, "tp")[None]
        in_spec, out_spec = P(), P("tp")
    elif op == "reduce":
        def local(v):
            return C.reduce_from_axis(v[0], "tp")
        in_spec, out_spec = P("tp"), P()
    elif op == "max":
        def local(v):
            return C.max_from_axis(v[0], "tp")
        in_spec, out_spec = P("tp"), P()
    else:  # reduce-scatter on per-device dim 0
        def local(v):
            return C.reduce_scatter_features(v[0], "tp", 0)[None]
        in_spec, out_spec = P("tp"), P("tp")
    f = jax.shard_map(local, mesh=mesh, in_specs=in_spec, out_specs=out_spec)
    if op == "max":
        compiled = jax.jit(f).lower(x).compile()
        return np.asarray(compiled(x)), None, compiled.as_text()

    def fwd_bwd(v, g):  # the cotangent arrives sharded like the output: no loss reduction
        y, vjp = jax.vjp(f, v)
        return y, vjp(g)[0]

    g = jax.device_put(cot, NamedSharding(mesh, out_spec))
    compiled = jax.jit(fwd_bwd).lower(x, g).compile()
    y, dx = compiled(x, g)
    return np.asarray(y), np.asarray(dx), compiled.as_text()


def _torch(op, mesh, n, x, cot):
    import torch

    from torch_impl import collectives as C
    from torch_impl import mesh as M

    dev = M.xla_device()
    t = torch.from_numpy(x).to(dev)
    t = M.mark_sharding(t, mesh, (None,) * t.dim()) if op == "copy" else M.mark_stacked(
        t, mesh, "tp")
    t.requires_grad_()
    if op == "copy":
        y = C.copy_to_axis(t, "tp", mesh=mesh)
    elif op == "reduce":
        y = C.reduce_from_axis(t, "tp", mesh=mesh)
    elif op == "max":
        y = C.max_from_axis(t, "tp", mesh=mesh)
    else:
        y = C.reduce_scatter_features(t, "tp", 0, mesh=mesh)
    if op == "max":
        text = M.compiled_hlo([y])
        M.sync()
        return y.cpu().numpy(), None, text
    g = torch.from_numpy(np.asarray(cot)).to(dev)  # sharded like the output, as in JAX
    g = M.mark_sharding(g, mesh, (None,) * g.dim()) if op == "reduce" else M.mark_stacked(
        g, mesh, "tp")
    y.backward(g)
    text = M.compiled_hlo([y, t.grad])
    M.sync()
    return y.detach().cpu().numpy(), t.grad.cpu().numpy(), text


def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("op", ["copy", "reduce", "max", "scatter_dim0"])
def test_pair_matches(op, n, make_jax_mesh, make_torch_mesh):
    rng = np.random.default_rng(n)
    in_shape, out_shape = {"copy": (S, (n,) + S), "reduce": ((n,) + S, S), "max": ((n,) + S, S),
                           "scatter_dim0": ((n, 8, 5), (n, 8 // n, 5))}[op]
    x = rng.standard_normal(in_shape).astype(np.float32)
    cot = rng.standard_normal(out_shape).astype(np.float32)
    jy, jdx, jtext = _jax(op, make_jax_mesh(model_axis_size=n), n, x, cot)
    ty, tdx, ttext = _torch(op, make_torch_mesh(model_axis_size=n), n, x, cot)
    assert jy.shape == ty.shape == out_shape
    assert rel(ty, jy) <= TOL
    if op != "max":
        assert rel(tdx, jdx) <= TOL
    assert hlo.signature(ttext) == hlo.signature(jtext)
    kinds = {c.kind for c in hlo.collectives(jtext)}
    assert kinds == {"copy": {"all-reduce"}, "reduce": {"all-reduce"}, "max": {"all-reduce"},
                     "scatter_dim0": {"reduce-scatter", "all-gather"}}[op]
