"""Shared helpers of the tests/torch/test_linear_*.py files: layer factory, the float64 CPU
reference, ``run`` (forward + backward on the mesh, errors and compiled HLO) and the checks of
the compiled collectives (what the JAX twin tests share with these: tests/linear_cases.py).

Every layer x matmul method x reduce option runs on the 8-device CPU mesh (dp, fsdp, pp, tp) =
(8/n, 1, 1, n) for n in 1, 2, 4, 8, on an ordinary global input [2, 3, in] placed with the spec
the layer consumes. Outputs, the input gradient and the kernel / bias gradients (loss sum(y * g))
are compared with a float64 CPU reference built from the layer's own parameters; the same run
reads the compiled, partitioned HLO of the forward pass and of forward+backward
(``torch_impl.mesh.compiled_hlo``; tests/conftest.py sets XLA_DUMP_POST_OPTIMIZATIONS for it
before torch_xla loads) and checks the collectives.

Errors are normwise, max|got - ref| / max|ref| per array. Measured (max over all cases):
    float32: 1.3e-07 (outputs and gradients, every layer x method x reduce option x n);
    asserted <= FP32_RTOL = 1e-5 (tests/linear_cases.py).
    bfloat16 (bf16 params and inputs, bf16 matmuls; partial sums added in bf16): 5.0e-03 over the
    cases of test_bfloat16 (the largest: input grad of row REDUCE_SCATTER_BIDIRECTIONAL, n=8);
    asserted <= BF16_RTOL = 2e-2 (about 5 x eps(bf16)), the bound the JAX twin asserts.
"""

from __future__ import annotations

from collections import Counter

import torch

from parity import hlo
from torch_impl import mesh as M
from torch_impl.linear import (
    ColumnParallelLinear,
    MatrixMultiplyMethod,
    ParallelLinear,
    RowParallelLinear,
    TensorParallelConfig,
)
from torch_impl.linear_ring import ring_split
from tests.linear_cases import IN, OUT, permute_directions, tp_groups

MM = MatrixMultiplyMethod
SHAPE = (2, 3)  # leading dims of the input
LAYERS = {"column": ColumnParallelLinear, "row": RowParallelLinear, "parallel": ParallelLinear}

COMBOS = [
    ("column", MM.PLAIN), ("column", MM.ALL_GATHER), ("column", MM.ALL_GATHER_BIDIRECTIONAL),
    ("row", MM.PLAIN), ("row", MM.REDUCE_SCATTER), ("row", MM.REDUCE_SCATTER_BIDIRECTIONAL),
]
COMBO_IDS = [f"{layer}-{m.value}" for layer, m in COMBOS]


# ------------------------------------------------------------------------------------- helpers
def normal_init(generator, shape, dtype=torch.float32):
    return torch.randn(tuple(shape), generator=generator).to(dtype)


def make_layer(kind, mesh, method, rs, *, in_features=IN, out_features=OUT, **kwargs):
    cfg = TensorParallelConfig(mesh=mesh, axis_name="tp", matmul_method=method,
                               reduce_scatter_output=rs)
    kwargs.setdefault("bias_init", normal_init)  # non-zero biases: every bias path is checked
    kwargs.setdefault("seed", 7)
    return LAYERS[kind](in_features, out_features, parallel_config=cfg, **kwargs)


def input_spec(layer, ndim):
    """The spec a layer consumes its input with (replicated for column PLAIN)."""
    cfg = layer.parallel_config
    sharded = layer.direction == "row" or cfg.method.is_ring
    return (None,) * (ndim - 1) + ("tp" if sharded else None,)


def output_spec(layer, ndim):
    rs = layer.parallel_config.reduce_scatter_output
    return (None,) * (ndim - 1) + ("tp" if rs else None,)


def rel_err(got, ref) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def reference(layer, x_cpu, g_cpu):
    """float64 y = s * x @ K + b from the layer's own params, and autograd of sum(y * g)."""
    k = layer.kernel.detach().cpu().double().requires_grad_()
    b = layer.bias.detach().cpu().double().requires_grad_() if layer.use_bias else None
    x = x_cpu.double().requires_grad_()
    y = layer.scale_value * (x @ k)
    if b is not None:
        y = y + b
    y.backward(g_cpu.double())
    grads = {"x": x.grad, "kernel": k.grad}
    if b is not None:
        grads["bias"] = b.grad
    return y.detach(), grads


def run(layer, mesh, shape=SHAPE, dtype=torch.float32, seed=0, x_spec=None,
        hlo_of=("fwd", "fb")):
    """Errors vs the reference (dict), the output, and the compiled HLO of the forward ("fwd")
    and of forward+backward ("fb") if listed in ``hlo_of`` (each costs one compilation)."""
    gen = torch.Generator().manual_seed(seed)
    out = layer.out_features_total
    x_cpu = torch.randn(*shape, layer.in_features, generator=gen).to(dtype)
    g_cpu = torch.randn(*shape, out, generator=gen).to(dtype)
    dev = M.xla_device()
    ndim = len(shape) + 1
    x = M.mark_sharding(x_cpu.to(dev), mesh, x_spec or input_spec(layer, ndim)).requires_grad_()
    y = layer(x)
    fwd_text = M.compiled_hlo([y]) if "fwd" in hlo_of else None
    g = M.mark_sharding(g_cpu.to(dev), mesh, output_spec(layer, ndim))
    y.backward(g)
    params = {"kernel": layer.kernel}
    if layer.use_bias:
        params["bias"] = layer.bias
    results = [y, x.grad, *[p.grad for p in params.values()]]
    text = M.compiled_hlo(results) if "fb" in hlo_of else None
    M.sync()  # one program for the output and all gradients
    y_ref, grads_ref = reference(layer, x_cpu, g_cpu)
    errs = {"y": rel_err(y, y_ref), "x": rel_err(x.grad, grads_ref["x"])}
    errs.update({k: rel_err(p.grad, grads_ref[k]) for k, p in params.items()})
    return errs, y, fwd_text, text


def assert_close(errs, rtol):
    bad = {k: e for k, e in errs.items() if not e <= rtol}
    assert not bad, f"relative errors above {rtol}: {bad} (all: {errs})"


def groups_text(n):
    return "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in tp_groups(n)) + "}"


def check_communication(kind, method, rs, n, fwd_text, text, out_bytes, in_bytes):
    """The collectives of the forward and of forward+backward, as the JAX twin emits them."""
    ops = hlo.collectives(text)
    if n == 1:  # (the forward is part of forward+backward)
        assert ops == []
        return
    fwd_ops = hlo.collectives(fwd_text)
    groups = groups_text(n)
    assert all(op.replica_groups == groups for op in ops + fwd_ops
               if op.kind != "collective-permute")
    fwd_kinds = Counter(op.kind for op in fwd_ops)
    kinds = Counter(op.kind for op in ops)
    if method.is_ring:
        up, down = ring_split(n, method.bidirectional)
        if n == 2:  # one step, whose up and down pairs are the same
            up, down, back = 1, 0, (2, 0)
        else:
            back = (n - 1, n - 1)  # the backward reverses every step
        assert permute_directions(fwd_ops, n) == (up, down)
        assert permute_directions(ops, n) == back
        # each ring step moves one block: the input block (column) or an output block (row)
        block = (in_bytes if kind == "column" else out_bytes) // n
        assert all(op.result_bytes == block for op in ops if op.kind == "collective-permute")
        gathers = Counter() if rs else Counter({"all-gather": 1})
        assert fwd_kinds == Counter({"collective-permute": n - 1}) + gathers
        assert kinds == Counter({"collective-permute": 2 * (n - 1)}) + gathers
        # the one all-gather is of the [..., OUT] output, never of the input
        assert all(op.result_bytes == out_bytes for op in ops if op.kind == "all-gather")
        return
    assert "collective-permute" not in kinds
    if kind == "column":  # all-gather of the output; the input grad is all-reduced
        assert fwd_kinds == (Counter() if rs else Counter({"all-gather": 1}))
        assert kinds == fwd_kinds + Counter({"all-reduce": 1})
        assert all(op.result_bytes in (out_bytes, in_bytes) for op in ops)
    elif rs:  # reduce-scatter of the partial sums; its transpose all-gathers the output grad
        assert fwd_kinds == Counter({"reduce-scatter": 1})
        assert kinds == Counter({"reduce-scatter": 1, "all-gather": 1})
    else:  # all-reduce of the partial sums; nothing backward
        assert fwd_kinds == Counter({"all-reduce": 1}) and kinds == fwd_kinds
