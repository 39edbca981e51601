"""An independent float64 NumPy oracle for the GPT block case: both backends against it.

``tests/parity/test_gpt_twins.py`` compares torch with JAX and JAX-parallel with JAX-unsharded:
if both backends shared a modelling mistake (a wrong mask, a transposed kernel, the wrong
label-smoothing term), nothing there would see it. Here the forward pass is written again from
the model's definition (``jax_impl.gpt`` docstring: head-major fused qkv, pre-norm blocks, exact
GELU, causal softmax attention, LM head without bias, mean label-smoothed cross-entropy over the
targets that are not ``ignore_index``) in float64 NumPy, sharing nothing with either backend but
the parameter names; both backends' loss and logits (tensor-parallel, float32) must match it.

Measured (2026-12-03, float32 backends vs the float64 oracle, tp=4, normwise relative error
max|a - b| / max|b|): loss 2.8e-08 (plain) / 5.7e-08 (ring) on both backends; logits JAX
3.1e-07 / 2.1e-07, torch 2.8e-07 / 1.8e-07. TOL = 1e-5 leaves a margin of 30x.
``test_oracle_sees_a_planted_bug`` shows the comparison can fail: the oracle with a non-causal
mask, or with q and k swapped in the qkv layout, is far outside TOL.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import jax  # noqa: E402,F401  (JAX before torch_xla, docs/design.md)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

TOL = 1e-5
B, S = 2, 8
SIZES = dict(vocab_size=64, max_seq_len=8, hidden_size=32, num_heads=4, num_layers=2,
             mlp_hidden_size=64, label_smoothing=0.1)
MODES = {"plain": dict(tp_mode="plain", norm="layernorm"),
         "ring": dict(tp_mode="ring", norm="rmsnorm")}
IGNORE = -100

_erf = np.vectorize(math.erf)


# ----------------------------------------------------------------------------------- oracle
def _norm(x, p, name, kind, eps):
    if kind == "layernorm":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p[f"{name}.scale"] + p[f"{name}.bias"]
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p[f"{name}.scale"]


def _linear(x, p, name):
    y = x @ p[f"{name}.kernel"]
    return y + p[f"{name}.bias"] if f"{name}.bias" in p else y


def _attention(x, p, name, heads, causal=True, swap_qk=False):
    b, s, d = x.shape
    hd = d // heads
    qkv = _linear(x, p, f"{name}.qkv").reshape(b, s, heads, 3, hd)  # head-major columns
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    if swap_qk:
        q, k = k, q
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    if causal:
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, d)
    return _linear(out, p, f"{name}.proj")


def numpy_gpt(flat, tokens, targets, cfg, **bugs):
    """float64 (loss, logits [B, S, V]) of the GPT defined in the jax_impl.gpt docstring."""
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    kind, eps = cfg["norm"], 1e-5
    x = p["wte.embedding"][tokens] + p["wpe.embedding"][:tokens.shape[1]]
    for i in range(cfg["num_layers"]):
        blk = f"blocks.{i}"
        x = x + _attention(_norm(x, p, f"{blk}.ln_1", kind, eps), p, f"{blk}.attn",
                           cfg["num_heads"], **bugs)
        h = _linear(_norm(x, p, f"{blk}.ln_2", kind, eps), p, f"{blk}.mlp.fc")
        x = x + _linear(0.5 * h * (1.0 + _erf(h / math.sqrt(2.0))), p, f"{blk}.mlp.proj")
    logits = _norm(x, p, "ln_f", kind, eps) @ p["lm_head.kernel"]
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    valid = targets != IGNORE
    picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    smooth = cfg["label_smoothing"]
    per_token = lse - (1 - smooth) * picked - smooth * logits.mean(-1)
    return float(per_token[valid].sum() / valid.sum()), logits


# ------------------------------------------------------------------------------------- data
def make_data(cfg):
    from ringpar.gpt_config import GPTConfig, gpt_param_shapes

    rng = np.random.default_rng(11)
    flat = {}
    for path, shape in gpt_param_shapes(GPTConfig(**cfg)).items():
        if path.endswith(".scale"):
            flat[path] = (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
        else:
            scale = 0.3 if path.endswith("embedding") else (
                0.2 if path.endswith("kernel") else 0.05)
            flat[path] = (scale * rng.normal(size=shape)).astype(np.float32)
    tokens = rng.integers(0, cfg["vocab_size"], size=(B, S))
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -1] = IGNORE
    targets[1, 3] = IGNORE
    return flat, tokens, targets


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


_RESULTS: dict = {}


def backend_forward(backend, mode, tp, make_jax_mesh, make_torch_mesh):
    """(loss, logits) as float64 numpy of ``backend``'s tensor-parallel GPT (cached)."""
    key = (backend, mode, tp)
    if key not in _RESULTS:
        cfg = {**SIZES, **MODES[mode]}
        flat, tokens, targets = make_data(cfg)
        if backend == "jax":
            from flax import nnx

            from jax_impl import gpt
            model = gpt.GPT(gpt.GPTConfig(**cfg), mesh=make_jax_mesh(model_axis_size=tp),
                            rngs=nnx.Rngs(0))
        else:
            from torch_impl import gpt
            model = gpt.GPT(gpt.GPTConfig(**cfg), mesh=make_torch_mesh(model_axis_size=tp), seed=0)
        gpt.load_params(model, flat)
        loss, logits, _ = gpt.loss_and_grads(model, tokens, targets)
        if backend == "torch":
            loss, logits = loss.detach().cpu(), logits.detach().cpu()
        _RESULTS[key] = (np.asarray(loss, np.float64), np.asarray(logits, np.float64))
    return _RESULTS[key]


@pytest.mark.parametrize("backend", ["jax", "torch"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_gpt_matches_the_numpy_oracle(backend, mode, make_jax_mesh, make_torch_mesh):
    cfg = {**SIZES, **MODES[mode]}
    flat, tokens, targets = make_data(cfg)
    want_loss, want_logits = numpy_gpt(flat, tokens, targets, cfg)
    loss, logits = backend_forward(backend, mode, 4, make_jax_mesh, make_torch_mesh)
    errs = rel(loss, want_loss), rel(logits, want_logits)
    print(f"{backend} {mode} tp=4: loss rel {errs[0]:.1e}, logits rel {errs[1]:.1e}")
    assert errs[0] <= TOL and errs[1] <= TOL, errs


@pytest.mark.parametrize("bug", [dict(causal=False), dict(swap_qk=True)])
def test_oracle_sees_a_planted_bug(bug, make_jax_mesh, make_torch_mesh):
    cfg = {**SIZES, **MODES["plain"]}
    flat, tokens, targets = make_data(cfg)
    _, bad_logits = numpy_gpt(flat, tokens, targets, cfg, **bug)
    _, logits = backend_forward("jax", "plain", 4, make_jax_mesh, make_torch_mesh)
    assert rel(logits, bad_logits) > 100 * TOL
