"""Shared helpers of the tests/jax/test_linear_*.py files: layer factory, inputs, the float64
numpy reference and compiled value_and_grad (what the torch twin tests share with these:
tests/linear_cases.py).

Every layer x matmul method x reduce option runs on the 8-device CPU mesh (dp, fsdp, pp, tp) =
(8/n, 1, 1, n) for n in 1, 2, 4, 8. Outputs, the input gradient and the kernel / bias gradients
are compared with a numpy float64 reference built from the layer's own (gathered) parameters.

Measured (max over all cases, relative error = max|a - ref| / max|ref|):
    float32: 1.1e-07 (outputs and gradients, every layer x method x reduce option x n);
    asserted <= FP32_RTOL = 1e-5 (tests/linear_cases.py).
    bfloat16 (bf16 params and inputs; partial sums are added in bf16, as psum does): outputs
    <= 4.2e-03, gradients <= 4.2e-03 except the input gradient of the bidirectional
    reduce-scatter matmul at n=8 (8 bf16 partial products summed round the ring): 9.6e-03.
    Asserted <= BF16_RTOL = 2e-2 (about 5 x eps(bf16) = 5 x 2**-8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_impl.linear import (
    ColumnParallelLinear,
    MatrixMultiplyMethod,
    ParallelLinear,
    RowParallelLinear,
    TensorParallelConfig,
)
from tests.linear_cases import IN, OUT

M = MatrixMultiplyMethod
LAYERS = {"column": ColumnParallelLinear, "row": RowParallelLinear, "parallel": ParallelLinear}

# (layer, method) pairs that make sense; ParallelLinear is column-parallel by default.
COMBOS = [
    ("column", M.PLAIN), ("column", M.ALL_GATHER), ("column", M.ALL_GATHER_BIDIRECTIONAL),
    ("row", M.PLAIN), ("row", M.REDUCE_SCATTER), ("row", M.REDUCE_SCATTER_BIDIRECTIONAL),
    ("parallel", M.PLAIN), ("parallel", M.ALL_GATHER_BIDIRECTIONAL),
]
COMBO_IDS = [f"{layer}-{m.value}" for layer, m in COMBOS]


# ------------------------------------------------------------------------------------- helpers
def rel_err(actual, ref) -> float:
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (actual.shape, ref.shape)
    return float(np.max(np.abs(actual - ref)) / max(np.max(np.abs(ref)), 1e-30))


def f64(a) -> np.ndarray:
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def dense_reference(layer, x, g):
    """float64 y = s * x @ K + b and the gradients of sum(y * g) wrt x, K, b."""
    kernel = f64(layer.kernel[...])
    s = layer.scale_value
    x64, g64 = f64(x), f64(g)
    y = s * x64 @ kernel
    if layer.use_bias:
        y = y + f64(layer.bias[...])
    x2, g2 = x64.reshape(-1, x64.shape[-1]), g64.reshape(-1, g64.shape[-1])
    grads = {"x": s * g64 @ kernel.T, "kernel": s * x2.T @ g2}
    if layer.use_bias:
        grads["bias"] = g2.sum(0)
    return y, grads


def value_and_grads(layer, x, g):
    """Compiled value_and_grad of sum(layer(x) * g) wrt (params, x): (y, grads dict, hlo text)."""
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x)
        return jnp.sum(y.astype(jnp.float32) * g.astype(jnp.float32)), y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    compiled = fn.lower(state, x).compile()
    (_, y), (gstate, gx) = compiled(state, x)
    grads = {"x": gx, "kernel": gstate["kernel"][...]}
    if layer.use_bias:
        grads["bias"] = gstate["bias"][...]
    return y, grads, compiled.as_text()


def forward_hlo(layer, x) -> str:
    graphdef, state = nnx.split(layer)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return fn.lower(state, x).compile().as_text()


def make_layer(kind, mesh, method, rs, *, in_features=IN, out_features=OUT, **kwargs):
    cfg = TensorParallelConfig(mesh=mesh, axis_name="tp", matmul_method=method,
                               reduce_scatter_output=rs)
    kwargs.setdefault("bias_init", nnx.initializers.normal(1.0))
    return LAYERS[kind](in_features, out_features, parallel_config=cfg, rngs=nnx.Rngs(7), **kwargs)


def inputs(shape, out, dtype=jnp.float32, seed=0):
    kx, kg = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    g = jax.random.normal(kg, shape[:-1] + (out,), jnp.float32).astype(dtype)
    return x, g


def check_against_reference(layer, x, g, rtol):
    y, grads, _ = value_and_grads(layer, x, g)
    y_ref, grads_ref = dense_reference(layer, x, g)
    errs = {"y": rel_err(y, y_ref)}
    errs.update({k: rel_err(grads[k], grads_ref[k]) for k in grads_ref})
    bad = {k: e for k, e in errs.items() if not e <= rtol}
    assert not bad, f"relative errors above {rtol}: {bad} (all: {errs})"
    return y, errs
