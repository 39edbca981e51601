"""jax_impl.pipeline_parallel on 8 CPU devices: GPipe equals sequential stages; HLO; errors.

Meshes are (dp, fsdp, pp, tp) = (8/p, 1, p, 1): the batch is sharded over dp, the stages over pp.
Measured (fp32, this machine): outputs and gradients match the sequential stages to <= 5.7e-7
relative (max abs difference / max abs value); the tests allow 1e-5.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_impl.pipeline_parallel import PipelineModule, execute_pipeline, execute_pipeline_step
from jax_impl.tensor_parallel import ModelParallelismWrapper
from parity import hlo

F = 4  # features
B_LOCAL = 2  # rows per micro-batch per data shard
RTOL = 1e-5
CASES = sorted({(p, m) for p in (1, 2, 4, 8) for m in (1, p, 2 * p + 1)})
BATCH = ("dp", "fsdp")


class Stage(nn.Module):
    """Dense + tanh, with an optional extra positional and keyword argument."""

    @nn.compact
    def __call__(self, x, scale=None, *, shift=None):
        h = jnp.tanh(nn.Dense(F, bias_init=nn.initializers.normal(0.5))(x))
        if scale is not None:
            h = h * scale
        if shift is not None:
            h = h + shift
        return h


class DropStage(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dropout(0.5, deterministic=False)(x)


def _wrapped(stage=Stage):
    return functools.partial(ModelParallelismWrapper, model_axis_name="pp", module_fn=stage)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _setup(make_jax_mesh, p, m, stage=Stage, seed=0):
    mesh = make_jax_mesh(pipeline_axis_size=p)
    d = 8 // p
    model = PipelineModule(model_axis_name="pp", num_microbatches=m, module_fn=_wrapped(stage))
    x = jax.random.normal(jax.random.key(seed), (d * m * B_LOCAL, F))
    init = jax.shard_map(model.init, mesh=mesh, in_specs=(P(), P(BATCH)), out_specs=P(),
                         check_vma=False)
    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(1), x))
    init = jax.jit(jax.shard_map(model.init, mesh=mesh, in_specs=(P(), P(BATCH)),
                                 out_specs=specs, check_vma=False))
    return mesh, model, specs, init(jax.random.key(1), x), x


def _weights(variables):
    d = variables["params"]["ModelParallelismWrapper_0"]["sharded"]["Dense_0"]
    return d["kernel"].value, d["bias"].value


def _stacked_apply(mesh, model, specs, **kw):
    """Global function (variables, x) -> per-device outputs stacked [p, B, F] (row s = stage s)."""

    def f(v, x):
        return model.apply(v, x, **kw)[None]

    return jax.shard_map(f, mesh=mesh, in_specs=(specs, P(BATCH)), out_specs=P("pp", BATCH))


def _sequential(kernel, bias, x):
    h = x
    for s in range(kernel.shape[0]):
        h = jnp.tanh(h @ kernel[s] + bias[s])
    return h


@pytest.mark.parametrize("p,m", CASES, ids=[f"p{p}-m{m}" for p, m in CASES])
def test_pipeline_equals_sequential_stages(make_jax_mesh, p, m):
    mesh, model, specs, variables, x = _setup(make_jax_mesh, p, m)
    f = _stacked_apply(mesh, model, specs)
    w_out = jax.random.normal(jax.random.key(7), x.shape)

    def loss(v, x):
        y = f(v, x)
        return jnp.sum(y[-1] * w_out), y

    (grads, gx), ys = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables, x)
    kernel, bias = _weights(variables)

    def ref_loss(kernel, bias, x):
        y = _sequential(kernel, bias, x)
        return jnp.sum(y * w_out), y

    (rk, rb, rx), ry = jax.jit(jax.grad(ref_loss, argnums=(0, 1, 2), has_aux=True))(kernel, bias, x)
    assert ys.shape == (p, *x.shape)
    assert _rel(ys[-1], ry) < RTOL
    np.testing.assert_array_equal(np.asarray(ys[:-1]), 0.0)  # zeros except on the last stage
    gk, gb = _weights(grads)
    for name, got, want in (("x", gx, rx), ("kernel", gk, rk), ("bias", gb, rb)):
        assert _rel(got, want) < RTOL, name


def test_extra_args_and_kwargs_reach_every_stage(make_jax_mesh):
    p, m = 4, 3
    mesh, model, specs, variables, x = _setup(make_jax_mesh, p, m)
    scale, shift = 0.5, jnp.arange(F, dtype=jnp.float32) / 10

    def f(v, x):
        return model.apply(v, x, scale, shift=shift)[None]

    ys = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(specs, P(BATCH)),
                               out_specs=P("pp", BATCH)))(variables, x)
    kernel, bias = _weights(variables)
    h = x
    for s in range(p):
        h = jnp.tanh(h @ kernel[s] + bias[s]) * scale + shift
    assert _rel(ys[-1], h) < RTOL


def test_dropout_rng_differs_per_step(make_jax_mesh):
    """Identical micro-batches through a dropout stage get different masks (rng split per step)."""
    p, m = 2, 4
    mesh = make_jax_mesh(pipeline_axis_size=p)
    model = PipelineModule(model_axis_name="pp", num_microbatches=m, module_fn=DropStage)
    x = jnp.ones((8 // p * m * 8, F))

    def f(x, rng):
        return model.apply({}, x, rngs={"dropout": rng})[None]

    ys = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(BATCH), P()),
                               out_specs=P("pp", BATCH), check_vma=False))(x, jax.random.key(3))
    y = np.asarray(ys[-1]).reshape(8 // p, m, 8, F)[0]  # first data shard: m micro-batches
    assert not np.array_equal(y[0], y[1])
    assert set(np.unique(y)) <= {0.0, 4.0}  # two stages of p=0.5 dropout: 0 or 1/(0.5*0.5)


def test_execute_pipeline_step_moves_state_one_stage_up(make_jax_mesh):
    p = 4
    mesh = make_jax_mesh(pipeline_axis_size=p)

    class AddStage(nn.Module):  # stage s adds 10**s: the result tells which stages ran
        @nn.compact
        def __call__(self, h):
            return h + 10.0 ** jax.lax.axis_index("pp")

    def f(state, inp):
        new_state, out = nn.apply(
            lambda mdl, s, i: execute_pipeline_step(mdl, s, i, model_axis_name="pp"),
            AddStage())({}, state[0], inp)
        return new_state[None], out[None]

    state = jnp.arange(p, dtype=jnp.float32).reshape(p, 1, 1) * jnp.ones((p, 2, 1))
    inp = jnp.full((2, 1), 100.0)
    new_state, out = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("pp"), P()),
                                           out_specs=(P("pp"), P("pp")), check_vma=False))(state,
                                                                                           inp)
    h = np.array([100.0 + 1, 1 + 10, 2 + 100, 3 + 1000])  # stage 0 reads the input
    np.testing.assert_allclose(np.asarray(new_state)[:, 0, 0], np.roll(h, 1))
    np.testing.assert_allclose(np.asarray(out)[:, 0, 0], [0, 0, 0, h[-1]])


# ------------------------------------------------------------------------------------------ HLO
def _grad_program(mesh, model, specs, variables, x) -> str:
    def f(v, x):
        return jax.lax.psum(model.apply(v, x), "pp")

    g = jax.shard_map(f, mesh=mesh, in_specs=(specs, P(BATCH)), out_specs=P(BATCH))
    loss = lambda v, x: jnp.sum(g(v, x) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x).compile().as_text()


def _ring_groups(p):
    ids = np.arange(8).reshape(8 // p, p)
    return ids.tolist()


@pytest.mark.parametrize("p", [2, 4, 8])
def test_hlo_one_ring_permute_per_direction_and_no_gather(make_jax_mesh, p):
    mesh, model, specs, variables, x = _setup(make_jax_mesh, p, 2 * p + 1)
    fwd = jax.jit(_stacked_apply(mesh, model, specs)).lower(variables, x).compile().as_text()
    up, down = hlo.ring_pairs(_ring_groups(p), True), hlo.ring_pairs(_ring_groups(p), False)
    ops = hlo.collectives(fwd)
    assert [(op.kind, op.pairs) for op in ops] == [("collective-permute", up)]
    ops = hlo.collectives(_grad_program(mesh, model, specs, variables, x))
    permutes = sorted(op.pairs for op in ops if op.kind == "collective-permute")
    assert permutes == sorted([up, down])
    assert not [op for op in ops if op.kind in ("all-gather", "all-to-all")]


def test_hlo_no_permute_with_one_stage(make_jax_mesh):
    mesh, model, specs, variables, x = _setup(make_jax_mesh, 1, 3)
    assert hlo.count(_grad_program(mesh, model, specs, variables, x), "collective-permute") == 0


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_hlo_size_does_not_grow_with_microbatches(make_jax_mesh, p):
    counts = {}
    for m in (2 * p + 1, 4 * p + 3):
        mesh, model, specs, variables, x = _setup(make_jax_mesh, p, m)
        counts[m] = hlo.instruction_count(_grad_program(mesh, model, specs, variables, x))
    assert len(set(counts.values())) == 1, counts


# --------------------------------------------------------------------------------------- errors
def _run(mesh, model, x):
    def f(x):
        return model.init(jax.random.key(0), x)

    return jax.eval_shape(jax.shard_map(f, mesh=mesh, in_specs=P(BATCH), out_specs=P(),
                                        check_vma=False), x)


def test_error_batch_not_divisible(make_jax_mesh):
    mesh = make_jax_mesh(pipeline_axis_size=2)
    model = PipelineModule(model_axis_name="pp", num_microbatches=3, module_fn=_wrapped())
    with pytest.raises(ValueError,
                       match=r"x.shape\[0\]=4: expected .* divisible by num_microbatches=3"):
        _run(mesh, model, jnp.zeros((16, F)))


@pytest.mark.parametrize("m", [0, -2, 1.5])
def test_error_num_microbatches(make_jax_mesh, m):
    mesh = make_jax_mesh(pipeline_axis_size=2)
    model = PipelineModule(model_axis_name="pp", num_microbatches=m, module_fn=_wrapped())
    with pytest.raises(ValueError, match=rf"num_microbatches={m!r}: expected an int >= 1"):
        _run(mesh, model, jnp.zeros((16, F)))
    with pytest.raises(ValueError, match="num_microbatches"):
        jax.eval_shape(jax.shard_map(
            lambda x: execute_pipeline(Stage(), x, num_microbatches=m, model_axis_name="pp"),
            mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False), jnp.zeros((4, F)))


def test_error_stage_changes_shape(make_jax_mesh):
    mesh = make_jax_mesh(pipeline_axis_size=2)
    wide = functools.partial(ModelParallelismWrapper, model_axis_name="pp",
                             module_fn=functools.partial(nn.Dense, features=F + 1))
    model = PipelineModule(model_axis_name="pp", num_microbatches=2, module_fn=wide)
    with pytest.raises(ValueError, match=r"module output has shape \(2, 5\).*expected the shape "
                                         r"\(2, 4\)"):
        _run(mesh, model, jnp.zeros((16, F)))


def test_error_mesh_without_axis(make_jax_mesh):
    mesh = make_jax_mesh(pipeline_axis_size=2)
    model = PipelineModule(model_axis_name="stages", num_microbatches=2, module_fn=Stage)
    with pytest.raises(ValueError, match="model_axis_name='stages' is not bound"):
        _run(mesh, model, jnp.zeros((16, F)))
