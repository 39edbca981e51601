"""jax_impl.pipeline_circular on 8 CPU devices: the circular pipeline equals running its r*p
layers sequentially (round-robin: device d holds layers d, d+p, ...), r = 1 equals GPipe, one
permute per direction, errors.

Meshes are (dp, fsdp, pp, tp) = (8/p, 1, p, 1). Measured (fp32, this machine): outputs and
gradients match the sequential layers to <= 2.4e-6 relative (max abs difference / max abs value);
the tests allow 1e-5.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_impl.pipeline_circular import CircularPipelineModule
from jax_impl.pipeline_parallel import PipelineModule
from jax_impl.tensor_parallel import ModelParallelismWrapper
from parity import hlo

F = 4
B_LOCAL = 2
RTOL = 1e-5
BATCH = ("dp", "fsdp")
CASES = [(p, r, p) for p in (2, 4, 8) for r in (2, 4)] + [(4, 2, 6)]  # m > p: slots wait


class Stage(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(F, bias_init=nn.initializers.normal(0.5))(x))


def _wrapped():
    return functools.partial(ModelParallelismWrapper, model_axis_name="pp", module_fn=Stage)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _setup(make_jax_mesh, p, m, r):
    mesh = make_jax_mesh(pipeline_axis_size=p)
    model = CircularPipelineModule(model_axis_name="pp", num_microbatches=m,
                                   num_pipeline_repeats=r, module_fn=_wrapped())
    x = jax.random.normal(jax.random.key(0), (8 // p * m * B_LOCAL, F))
    init = jax.shard_map(model.init, mesh=mesh, in_specs=(P(), P(BATCH)), out_specs=P(),
                         check_vma=False)
    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(1), x))
    init = jax.jit(jax.shard_map(model.init, mesh=mesh, in_specs=(P(), P(BATCH)),
                                 out_specs=specs, check_vma=False))
    return mesh, model, specs, init(jax.random.key(1), x), x


def _layers(variables, r):
    """Kernels and biases of the r*p layers in model order: layer k*p + d is repeats_k[d]."""
    tree = variables["params"]["RepeatedStage_0"]
    ks, bs = [], []
    for k in range(r):
        dense = tree[f"repeats_{k}"]["sharded"]["Dense_0"]
        ks.append(dense["kernel"].value)
        bs.append(dense["bias"].value)
    return jnp.concatenate(ks), jnp.concatenate(bs)


def _apply_fn(mesh, model, specs):
    def f(v, x):
        return model.apply(v, x)[None]

    return jax.shard_map(f, mesh=mesh, in_specs=(specs, P(BATCH)), out_specs=P("pp", BATCH))


@pytest.mark.parametrize("p,r,m", CASES, ids=[f"p{p}-r{r}-m{m}" for p, r, m in CASES])
def test_circular_equals_sequential_layers(make_jax_mesh, p, r, m):
    mesh, model, specs, variables, x = _setup(make_jax_mesh, p, m, r)
    f = _apply_fn(mesh, model, specs)
    w_out = jax.random.normal(jax.random.key(7), x.shape)

    def loss(v, x):
        y = f(v, x)
        return jnp.sum(y[-1] * w_out), y

    (grads, gx), ys = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables, x)

    def ref_loss(kernel, bias, x):
        h = x
        for layer in range(kernel.shape[0]):
            h = jnp.tanh(h @ kernel[layer] + bias[layer])
        return jnp.sum(h * w_out), h

    kernel, bias = _layers(variables, r)
    assert kernel.shape == (r * p, F, F)
    (rk, rb, rx), ry = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2), has_aux=True))(kernel, bias, x)
    assert _rel(ys[-1], ry) < RTOL
    np.testing.assert_array_equal(np.asarray(ys[:-1]), 0.0)
    gk, gb = _layers(grads, r)
    for name, got, want in (("x", gx, rx), ("kernel", gk, rk), ("bias", gb, rb)):
        assert _rel(got, want) < RTOL, name


def test_one_repeat_equals_gpipe(make_jax_mesh):
    """r = 1 gives the GPipe pipeline's output bit for bit (same weights, same schedule)."""
    p, m = 4, 5
    mesh, model, specs, variables, x = _setup(make_jax_mesh, p, m, 1)
    y = jax.jit(_apply_fn(mesh, model, specs))(variables, x)
    gpipe = PipelineModule(model_axis_name="pp", num_microbatches=m, module_fn=_wrapped())
    moved = {"params": {"ModelParallelismWrapper_0":
                        variables["params"]["RepeatedStage_0"]["repeats_0"]}}
    y0 = jax.jit(_apply_fn(mesh, gpipe, nn.get_partition_spec(moved)))(moved, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))


def test_one_permute_each_way_with_ring_pairs(make_jax_mesh):
    p, r, m = 4, 2, 4
    mesh, model, specs, variables, x = _setup(make_jax_mesh, p, m, r)
    f = _apply_fn(mesh, model, specs)
    groups = np.arange(8).reshape(8 // p, p).tolist()
    up, down = hlo.ring_pairs(groups, True), hlo.ring_pairs(groups, False)
    fwd = jax.jit(f).lower(variables, x).compile().as_text()
    assert [(op.kind, op.pairs) for op in hlo.collectives(fwd)] == [("collective-permute", up)]
    text = jax.jit(jax.grad(lambda v, x: jnp.sum(f(v, x) ** 2), argnums=(0, 1))).lower(
        variables, x).compile().as_text()
    permutes = sorted(op.pairs for op in hlo.collectives(text) if op.kind == "collective-permute")
    assert permutes == sorted([up, down])


def test_repeats_need_enough_microbatches(make_jax_mesh):
    mesh, *_ = _setup(make_jax_mesh, 4, 4, 2)
    model = CircularPipelineModule(model_axis_name="pp", num_microbatches=2,
                                   num_pipeline_repeats=2, module_fn=_wrapped())
    init = jax.shard_map(model.init, mesh=mesh, in_specs=(P(), P(BATCH)), out_specs=P(),
                         check_vma=False)
    with pytest.raises(ValueError, match=r"num_microbatches=2 < num_stages=4"):
        jax.eval_shape(init, jax.random.key(1), jnp.ones((8, F)))


@pytest.mark.parametrize("p,m,r", [(4, 4, 2), (2, 4, 1)])
def test_bench_measured_fraction_equals_formula(jax_devices, p, m, r):
    """``python -m bench --pipeline``'s measurement (probe counts / compiled loop trips)."""
    from bench.pipeline_schedule import measure

    row = measure(p, m, r, 8)
    assert row["compiled_steps"] == r * m + p - 1
    assert row["useful_slots"] == r * m * p
    assert row["equal"] and row["measured"] == f"{r * m}/{r * m + p - 1}"
