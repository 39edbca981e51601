"""jax_impl.data_parallel: FSDP + data parallelism vs the unsharded model, HLO of gather/remat.

The model is a two-layer MLP (kernels [32, 128] and [128, 32], biases below the FSDP threshold)
under ``prepare_module(MLP, "MLP", cfg)``, run under ``shard_map`` on the 8-device mesh (dp, fsdp,
1, 1) with the batch split over ('dp', 'fsdp') and the gradients synced by ``sync_gradients``.
The reference is the same module without a config (unsharded, one device), same init key.
Errors are normwise: ``max|got - ref| / max|ref|``. Compiled programs are cached per config.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_impl.configs import ParallelConfig
from jax_impl.data_parallel import (gather_params, prepare_module, shard_params, sync_gradients)
from jax_impl.mesh import create_mesh
from parity import hlo
from ringpar.fsdp_layout import check_module_names

D, H, B = 32, 128, 16
MIN_WEIGHT = 1024  # kernels (4096 elements) are sharded, biases (128, 32) stay replicated
FP32_TOL = 1e-6  # measured: loss 4.7e-7 (relative), grads <= 2.5e-7 (fsdp 2/4/8, remat)
BF16_TOL = 2e-2  # bf16 gather + bf16 scatter; measured 4.4e-3


class MLP(nn.Module):
    hidden: int = H

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(x.shape[-1])(h)


class Model(nn.Module):
    cfg: ParallelConfig | None

    @nn.compact
    def __call__(self, x):
        return prepare_module(MLP, "MLP", self.cfg)(name="mlp")(x)


def _loss(model, params, x):
    return jnp.mean(model.apply({"params": params}, x) ** 2)


def _inputs():
    return jax.random.normal(jax.random.PRNGKey(1), (B, D))


@functools.lru_cache(maxsize=None)
def reference():
    model = Model(None)
    params = model.init(jax.random.PRNGKey(0), _inputs())["params"]
    loss, grads = jax.value_and_grad(functools.partial(_loss, model))(params, _inputs())
    return params, loss, grads


def _err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


@functools.lru_cache(maxsize=None)
def run(dp, fsdp, remat=False, fsdp_on=True, gather_dtype=None, scatter_dtype=None):
    """(params, loss, grads, compiled HLO, HLO before XLA's passes) of one synced step."""
    cfg = ParallelConfig(data_axis_size=dp, fsdp_axis_size=fsdp,
                         fsdp_modules=["MLP"] if fsdp_on else [], remat=["MLP"] if remat else [],
                         fsdp_min_weight_size=MIN_WEIGHT, fsdp_gather_dtype=gather_dtype,
                         fsdp_grad_scatter_dtype=scatter_dtype)
    mesh, model, x = create_mesh(cfg), Model(cfg), _inputs()
    data = P(("dp", "fsdp"))

    def init(rng, xx):
        return model.init(rng, xx)["params"]

    abstract = jax.eval_shape(jax.shard_map(init, mesh=mesh, in_specs=(P(), data), out_specs=P(),
                                            check_vma=False), jax.random.PRNGKey(0), x)
    specs = nn.get_partition_spec(abstract)
    params = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=(P(), data), out_specs=specs,
                                   check_vma=False))(jax.random.PRNGKey(0), x)

    def step(p, xx):
        loss, grads = jax.value_and_grad(functools.partial(_loss, model))(p, xx)
        return jax.lax.pmean(loss, ("dp", "fsdp")), sync_gradients(grads, ("dp", "fsdp"))

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, data), out_specs=(P(), specs),
                               check_vma=False))
    lowered = fn.lower(params, x)
    loss, grads = fn(params, x)
    return params, loss, grads, lowered.compile().as_text(), lowered.as_text(dialect="hlo")


def _leaves(tree):
    return jax.tree.leaves(nn.unbox(tree))


@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_fsdp_matches_unsharded(fsdp):
    ref_params, ref_loss, ref_grads = reference()
    params, loss, grads, text, _ = run(8 // fsdp, fsdp)
    for got, want in zip(_leaves(params), _leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # same init
    assert _err(loss, ref_loss) <= FP32_TOL
    errs = [_err(g, r) for g, r in zip(_leaves(grads), _leaves(ref_grads))]
    assert max(errs) <= FP32_TOL, errs
    # Collectives: per kernel one all-gather (forward) and one reduce-scatter (backward) over the
    # fsdp rings; with dp > 1 one all-reduce over the dp rings (XLA may merge several).
    sig = hlo.signature(text)
    kinds = {k for k, _, _ in sig}
    assert sum(c for (k, _, _), c in sig.items() if k == "all-gather") == 2
    assert sum(c for (k, _, _), c in sig.items() if k == "reduce-scatter") == 2
    assert kinds <= {"all-gather", "reduce-scatter", "all-reduce"}


def test_sharded_params_are_partitioned_and_small():
    """Kernels are nn.Partitioned over fsdp on their largest dim; per-device bytes ~ 1/fsdp."""
    ref_params = reference()[0]
    full = sum(x.nbytes for x in _leaves(ref_params))
    for fsdp in (2, 4, 8):
        params = run(8 // fsdp, fsdp)[0]
        names = {k: v["kernel"].names for k, v in params["mlp"].items()}
        assert names == {"Dense_0": (None, "fsdp"), "Dense_1": ("fsdp", None)}
        assert not isinstance(params["mlp"]["Dense_0"]["bias"], nn.Partitioned)
        local = sum(x.addressable_shards[0].data.nbytes for x in _leaves(params))
        kernels = 2 * D * H * 4
        assert local == kernels // fsdp + (full - kernels)
        print(f"fsdp={fsdp}: per-device parameter bytes {local} of {full} "
              f"({local / full:.3f}; kernels alone 1/{fsdp})")


def _collective_dtypes(text, kind):
    pat = re.compile(r"=\s*\(?([a-z0-9]+)\[[^=]*?\s" + re.escape(kind) + r"(?:-start)?\(")
    return sorted({m.group(1) for m in pat.finditer(text)})


def test_gather_and_scatter_dtypes_in_hlo():
    """The program JAX emits gathers / scatters in the configured dtypes.

    XLA's CPU backend has no bf16 collectives: its float-normalization pass rounds to bf16 and
    runs the collective in f32 (``convert`` to bf16 and back around an f32 all-gather), so the
    dtype is checked in the HLO before XLA's passes, and the rounding in the compiled one.
    """
    ref_grads = reference()[2]
    text32 = run(2, 4)[4]
    assert _collective_dtypes(text32, "all-gather") == ["f32"]
    assert _collective_dtypes(text32, "reduce-scatter") == ["f32"]
    _, loss, grads, compiled, text = run(2, 4, gather_dtype="bfloat16", scatter_dtype="bfloat16")
    assert _collective_dtypes(text, "all-gather") == ["bf16"]
    assert _collective_dtypes(text, "reduce-scatter") == ["bf16"]
    assert "bf16[" in compiled and "bf16[" not in run(2, 4)[3]
    assert all(g.dtype == jnp.float32 for g in _leaves(grads))  # cast back to the param dtype
    errs = [_err(g, r) for g, r in zip(_leaves(grads), _leaves(ref_grads))]
    assert max(errs) <= BF16_TOL, errs


def test_remat_is_visible_in_the_compiled_program():
    """Remat: an optimization barrier in the lowered program, the gelu's tanh computed twice."""
    ref_grads = reference()[2]
    plain, remat = run(2, 4), run(2, 4, remat=True)
    assert "opt-barrier" not in plain[4]
    assert "opt-barrier" in remat[4]
    assert len(re.findall(r" tanh\(", plain[3])) == 1
    assert len(re.findall(r" tanh\(", remat[3])) == 2
    errs = [_err(g, r) for g, r in zip(_leaves(remat[2]), _leaves(ref_grads))]
    assert max(errs) <= FP32_TOL, errs


# ----------------------------------------------------------------------------- the pieces
def _per_device(fn, mesh, *args):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=tuple(P() for _ in args),
                                 out_specs=P(("dp", "fsdp")), check_vma=False))(*args)


def test_shard_params_rule_and_gather_roundtrip(make_jax_mesh):
    """Largest free divisible dim; tp-named dims skipped; too small / indivisible -> replicated."""
    mesh = make_jax_mesh(data_axis_size=2, fsdp_axis_size=4)
    rng = np.random.default_rng(0)
    tree = {"big": rng.normal(size=(64, 256)).astype(np.float32),
            "tp": rng.normal(size=(1, 64, 32)).astype(np.float32),
            "odd": rng.normal(size=(6, 10)).astype(np.float32),
            "small": rng.normal(size=(8,)).astype(np.float32)}

    def fn(big, tpv, odd, small):
        t = {"big": big, "tp": nn.Partitioned(tpv, ("tp", None, None)), "odd": odd, "small": small}
        sharded = shard_params(t, "fsdp", min_weight_size=16)
        info = jnp.asarray([sharded["big"].names == (None, "fsdp"),
                            sharded["tp"].names == ("tp", "fsdp", None),
                            not isinstance(sharded["odd"], nn.Partitioned),
                            not isinstance(sharded["small"], nn.Partitioned),
                            sharded["big"].value.shape == (64, 64)])
        back = gather_params(sharded, "fsdp")
        ok = jnp.all(back["big"] == big) & jnp.all(back["tp"].value == tpv)
        return (jnp.all(info) & ok)[None]

    out = _per_device(fn, mesh, tree["big"], tree["tp"], tree["odd"], tree["small"])
    assert bool(np.all(out))


def test_sync_gradients_is_the_mean(make_jax_mesh):
    """pmean over (dp, fsdp) for replicated grads; Partitioned-over-fsdp grads only over dp."""
    mesh = make_jax_mesh(data_axis_size=2, fsdp_axis_size=4)
    idx_fn = lambda: (jax.lax.axis_index("dp") * 4 + jax.lax.axis_index("fsdp")).astype(jnp.float32)

    def fn():
        i = idx_fn()
        grads = {"rep": jnp.full((3,), i), "part": nn.Partitioned(jnp.full((2,), i), ("fsdp",))}
        synced = sync_gradients(grads, ("dp", "fsdp"))
        return jnp.concatenate([synced["rep"], synced["part"].value])[None]

    out = np.asarray(_per_device(fn, mesh))  # rows = devices 0..7 (dp major)
    np.testing.assert_allclose(out[:, :3], 3.5)  # mean of 0..7
    fsdp_idx = np.arange(8) % 4
    np.testing.assert_allclose(out[:, 3:], np.stack([fsdp_idx + 2.0] * 2, 1))  # mean over dp


def test_validation():
    with pytest.raises(ValueError, match="name"):
        prepare_module(MLP, "", ParallelConfig())
    with pytest.raises(ValueError, match="config"):
        prepare_module(MLP, "MLP", {"fsdp_modules": ["MLP"]})
    assert prepare_module(MLP, "MLP", None) is MLP
    assert prepare_module(MLP, "Other", ParallelConfig(fsdp_modules=["MLP"], remat=["MLP"])) is MLP
    with pytest.raises(ValueError, match=r"fsdp_modules.*'Blok'"):
        check_module_names(ParallelConfig(fsdp_modules=["Blok"]), ["Block", "MLP"])
    with pytest.raises(ValueError, match=r"remat.*'mlp'"):
        check_module_names(ParallelConfig(remat=["mlp"]), ["Block", "MLP"])
    with pytest.raises(ValueError, match="gather_dtype"):
        from jax_impl.data_parallel import gather_array_with_mean_grads
        gather_array_with_mean_grads(jnp.ones(4), 0, "fsdp", gather_dtype="int8")


def test_fsdp_of_a_tensor_parallel_layer():
    """TPDense (gather) under FSDP on (dp, fsdp, pp, tp) = (1, 2, 1, 4): stacked kernel
    [4, 16, 32] (per device [1, 16, 32], 'tp' on dim 0) is sharded on dim 2; same gradients."""
    from jax_impl.tensor_parallel import TPDense

    grads = []
    for fsdp_on in (False, True):
        cfg = ParallelConfig(data_axis_size=1, fsdp_axis_size=2, model_axis_size=4,
                             fsdp_modules=["Dense"] if fsdp_on else [], fsdp_min_weight_size=0)
        layer = functools.partial(TPDense, dense_fn=functools.partial(nn.Dense, features=32),
                                  model_axis_name="tp", tp_mode="gather")

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                return prepare_module(layer, "Dense", cfg)(name="d")(x)

        net, mesh = Net(), create_mesh(cfg)
        x, spec = jax.random.normal(jax.random.PRNGKey(1), (8, 16)), P(("dp", "fsdp"), "tp")
        init = lambda r, xx: net.init(r, xx)["params"]  # noqa: E731
        shapes = jax.eval_shape(jax.shard_map(init, mesh=mesh, in_specs=(P(), spec),
                                              out_specs=P(), check_vma=False),
                                jax.random.PRNGKey(0), x)
        specs = nn.get_partition_spec(shapes)
        params = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=(P(), spec), out_specs=specs,
                                       check_vma=False))(jax.random.PRNGKey(0), x)

        def step(p, xx):
            g = jax.grad(lambda q: jnp.mean(net.apply({"params": q}, xx) ** 2))(p)
            return sync_gradients(g, ("dp", "fsdp"))

        fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, spec), out_specs=specs,
                                   check_vma=False))
        grads.append(_leaves(fn(params, x)))
        sharded = specs["d"]["module"]["sharded"]
        if fsdp_on:
            assert sharded == {"kernel": P("tp", None, "fsdp"), "bias": P("tp", "fsdp")}
            text = fn.lower(params, x).compile().as_text()
            assert hlo.count(text, "reduce-scatter") == 2  # kernel and bias
    for got, want in zip(*grads):
        assert _err(got, want) <= FP32_TOL
