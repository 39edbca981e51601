"""jax_impl.gpt vs torch_impl.gpt: same parameter tree, same numbers, same collectives.

A small decoder (D=32, H=8, F=64, V=64, 2 layers, batch 2 x seq 8, label smoothing 0.1, three
ignored targets) in both tensor-parallel modes ("plain": LayerNorm, Megatron-style all-reduces;
"ring": RMSNorm, collective-matmul rings, feature-sharded residual stream) on tp = 1, 2, 4, 8 over
the 8-device mesh (dp = 8/tp). For each:

1. the JAX parameter paths (joined by '.') and shapes == the torch ``state_dict`` == the
   framework-neutral ``gpt_param_shapes(config)``;
2. the same random weights (NumPy, loaded by path on both sides), the same tokens: the loss, the
   logits and the gradient of every parameter agree between the backends, and the JAX parallel
   model agrees with the unsharded JAX model (mesh=None): normwise relative error
   max|a - b| / max|b| <= 1e-5. Measured (float32, max over modes, tp and parameters): torch vs
   JAX: loss 1.0e-07, logits 5.4e-07, gradients 1.2e-06; JAX parallel vs unsharded: loss and
   logits 7.1e-07, gradients 1.5e-06;
3. the compiled forward+backward programs, and the forward programs alone, have the same
   collectives (``parity.hlo.signature``: multiset of kind, permute pairs, replica groups),
   and in ring mode no all-gather of anything
   but the [B, S, D/n] embedding cotangent (never a weight).
"""

import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # torch_impl.mesh.compiled_hlo

import jax  # noqa: E402,F401  (JAX before torch_xla, docs/design.md)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from parity import hlo  # noqa: E402

TOL = 1e-5
B, S = 2, 8
SIZES = dict(vocab_size=64, max_seq_len=8, hidden_size=32, num_heads=8, num_layers=2,
             mlp_hidden_size=64, label_smoothing=0.1)
MODES = {"plain": dict(tp_mode="plain", norm="layernorm"),
         "ring": dict(tp_mode="ring", norm="rmsnorm")}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def make_data(config_kwargs):
    from jax_impl.gpt import GPTConfig, gpt_param_shapes

    rng = np.random.default_rng(7)
    flat = {}
    for path, shape in gpt_param_shapes(GPTConfig(**config_kwargs)).items():
        if path.endswith(".scale"):
            flat[path] = (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        else:
            scale = 0.3 if path.endswith("embedding") else (0.2 if path.endswith("kernel")
                                                            else 0.05)
            flat[path] = (scale * rng.normal(size=shape)).astype(np.float32)
    tokens = rng.integers(0, config_kwargs["vocab_size"], size=(B, S))
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -1] = -100
    targets[0, 2] = -100
    return flat, tokens, targets


_REFERENCE = {}


def jax_reference(mode):
    """The unsharded JAX model's (loss, logits, grads) for ``mode`` (cached)."""
    if mode not in _REFERENCE:
        from jax_impl import gpt as jgpt

        kwargs = {**SIZES, **MODES[mode]}
        flat, tokens, targets = make_data(kwargs)
        model = jgpt.GPT(jgpt.GPTConfig(**kwargs), rngs=nnx.Rngs(0))
        jgpt.load_params(model, flat)
        loss, logits, grads = jgpt.loss_and_grads(model, tokens, targets)
        _REFERENCE[mode] = (np.asarray(loss), np.asarray(logits),
                            {k: np.asarray(v) for k, v in grads.items()})
    return _REFERENCE[mode]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_gpt_twins(mode, axis_size, make_jax_mesh, make_torch_mesh):
    from jax_impl import gpt as jgpt
    from torch_impl import gpt as tgpt

    kwargs = {**SIZES, **MODES[mode]}
    flat, tokens, targets = make_data(kwargs)

    jm = jgpt.GPT(jgpt.GPTConfig(**kwargs), mesh=make_jax_mesh(model_axis_size=axis_size),
                  rngs=nnx.Rngs(0))
    tm = tgpt.GPT(tgpt.GPTConfig(**kwargs), mesh=make_torch_mesh(model_axis_size=axis_size),
                  seed=0)
    # 1. one parameter tree
    shapes = tgpt.gpt_param_shapes(tgpt.GPTConfig(**kwargs))
    assert shapes == jgpt.gpt_param_shapes(jgpt.GPTConfig(**kwargs))
    assert {k: v.shape for k, v in jgpt.flat_params(jm).items()} == shapes
    assert {k: tuple(v.shape) for k, v in tm.state_dict().items()} == shapes

    # 2. same numbers
    jgpt.load_params(jm, flat)
    tgpt.load_params(tm, flat)
    jl, jlogits, jg, jtext = jgpt.loss_and_grads(jm, tokens, targets, hlo=True)
    tl, tlogits, tg, ttext = tgpt.loss_and_grads(tm, tokens, targets, hlo=True)
    jg = {k: np.asarray(v) for k, v in jg.items()}
    tg = {k: v.detach().cpu().numpy() for k, v in tg.items()}
    assert set(jg) == set(tg) == set(shapes)
    assert rel(tl.detach().cpu().numpy(), jl) <= TOL
    assert rel(tlogits.detach().cpu().numpy(), jlogits) <= TOL
    worst = max(rel(tg[k], jg[k]) for k in jg)
    assert worst <= TOL, {k: rel(tg[k], jg[k]) for k in jg}
    rloss, rlogits, rgrads = jax_reference(mode)
    assert rel(jl, rloss) <= TOL and rel(jlogits, rlogits) <= TOL
    assert max(rel(jg[k], rgrads[k]) for k in jg) <= TOL

    # 3. same communication, forward + backward and forward alone (which pins ring directions)
    assert hlo.signature(ttext) == hlo.signature(jtext)
    assert hlo.signature(tgpt.forward_hlo(tm, tokens)) == hlo.signature(
        jgpt.forward_hlo(jm, tokens))
    ops = hlo.collectives(jtext)
    if axis_size == 1:
        assert ops == []
    elif mode == "plain":
        assert {op.kind for op in ops} == {"all-reduce"}
    else:
        gathers = [op for op in ops if op.kind == "all-gather"]
        assert len(gathers) == 1 and gathers[0].result_bytes == B * S * SIZES["hidden_size"] * 4
        assert {op.kind for op in ops} == {"all-gather", "all-reduce", "reduce-scatter",
                                           "collective-permute"}


def test_cached_step_equals_the_lazy_step_and_reads_new_parameters(make_jax_mesh,
                                                                    make_torch_mesh):
    """``cached_loss_and_grads`` (compiled once) returns what ``loss_and_grads`` returns, on
    both backends, and after new parameter values are loaded it computes with those. Ring mode
    only: the cached step does not depend on the mode, and a case costs ~15 s here."""
    from jax_impl import gpt as jgpt
    from torch_impl import gpt as tgpt

    kwargs = {**SIZES, **MODES["ring"]}
    flat, tokens, targets = make_data(kwargs)
    jm = jgpt.GPT(jgpt.GPTConfig(**kwargs), mesh=make_jax_mesh(model_axis_size=4),
                  rngs=nnx.Rngs(0))
    tm = tgpt.GPT(tgpt.GPTConfig(**kwargs), mesh=make_torch_mesh(model_axis_size=4), seed=0)
    jgpt.load_params(jm, flat)
    tgpt.load_params(tm, flat)
    jstep = jgpt.cached_loss_and_grads(jm, tokens, targets)
    tstep = tgpt.cached_loss_and_grads(tm, tokens, targets)
    to_np = lambda v: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)  # noqa
    losses = []
    for scale in (1.0, 0.5):  # 0.5: every parameter changed in place after the first call
        if scale != 1.0:
            halved = {k: v * scale for k, v in flat.items()}
            jgpt.load_params(jm, halved)
            tgpt.load_params(tm, halved)
        for mod, model, step in ((jgpt, jm, jstep), (tgpt, tm, tstep)):
            cl, clogits, cg = step()
            ll, llogits, lg = mod.loss_and_grads(model, tokens, targets)
            assert rel(to_np(cl), to_np(ll)) <= 1e-6 and rel(to_np(clogits), to_np(llogits)) <= 1e-6
            assert set(cg) == set(lg) and max(rel(to_np(cg[k]), to_np(lg[k])) for k in lg) <= 1e-6
        losses.append(float(to_np(jstep()[0])))
        assert rel(to_np(tstep()[0]), losses[-1]) <= TOL
    assert abs(losses[0] - losses[1]) > 1e-3  # the new parameters do change the loss


def test_gpt_errors_name_the_module(make_jax_mesh, make_torch_mesh):
    from jax_impl import gpt as jgpt
    from torch_impl import gpt as tgpt

    for mod, mesh in ((jgpt, make_jax_mesh(model_axis_size=4)),
                      (tgpt, make_torch_mesh(model_axis_size=4))):
        kwargs = dict(SIZES, num_heads=2)
        with pytest.raises(ValueError, match=r"blocks.\*.attn: num_heads=2 is not divisible"):
            mod.GPT(mod.GPTConfig(**kwargs), mesh=mesh)
        with pytest.raises(ValueError, match=r"wte: vocab_size=66"):
            mod.GPT(mod.GPTConfig(**dict(SIZES, vocab_size=66)), mesh=mesh)
        with pytest.raises(ValueError, match="hidden_size=30: expected a multiple of num_heads"):
            mod.GPTConfig(**dict(SIZES, hidden_size=30))
        with pytest.raises(ValueError, match="tp_mode"):
            mod.GPTConfig(tp_mode="async")
    with pytest.raises(ValueError, match="expected a model on the XLA device"):
        tgpt.cached_loss_and_grads(tgpt.GPT(tgpt.GPTConfig(**SIZES)), [[1]], [[2]])
