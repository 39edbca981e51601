"""Tests of torch_impl.linear: tensor-parallel linear layers on torch_xla SPMD vs a dense reference.

Every layer x matmul method x reduce option runs on the 8-device CPU mesh (dp, fsdp, pp, tp) =
(8/n, 1, 1, n) for n in 1, 2, 4, 8, on an ordinary global input [2, 3, in] placed with the spec
the layer consumes. Outputs, the input gradient and the kernel / bias gradients (loss sum(y * g))
are compared with a float64 CPU reference built from the layer's own parameters; the same run
reads the compiled, partitioned HLO of the forward pass and of forward+backward
(``torch_impl.mesh.compiled_hlo``) and checks the collectives.

Errors are normwise, max|got - ref| / max|ref| per array. Measured here (max over all cases):
    float32: 1.3e-07 (outputs and gradients, every layer x method x reduce option x n);
    asserted <= 1e-5.
    bfloat16 (bf16 params and inputs, bf16 matmuls; partial sums added in bf16): 5.0e-03 over the
    cases of test_bfloat16 (the largest: input grad of row REDUCE_SCATTER_BIDIRECTIONAL, n=8);
    asserted <= 2e-2 (about 5 x eps(bf16)), the bound the JAX twin asserts.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # torch_xla reads it once: see mesh.compiled_hlo

from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from parity import hlo  # noqa: E402
from torch_impl import mesh as M  # noqa: E402
from torch_impl.linear import (  # noqa: E402
    ColumnParallelLinear,
    MatrixMultiplyMethod,
    ParallelLinear,
    RowParallelLinear,
    TensorParallelConfig,
    get_matmul_output_sharding,
    get_output_partition_spec,
    get_sharding,
)
from torch_impl.linear_ring import ring_split  # noqa: E402

MM = MatrixMultiplyMethod
IN, OUT = 16, 32  # divisible by every axis size under test
SHAPE = (2, 3)  # leading dims of the input
FP32_RTOL = 1e-5
BF16_RTOL = 2e-2
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


def tp_groups(n):
    return [[r * n + j for j in range(n)] for r in range(8 // n)]


def groups_text(n):
    return "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in tp_groups(n)) + "}"


def permute_directions(ops, n):
    """(#up, #down) ring permutes (pairs of a cyclic shift within every tp group); fails on any
    other permute. For n == 2 both directions have the same pairs: all count as up."""
    up_pairs, down_pairs = hlo.ring_pairs(tp_groups(n), True), hlo.ring_pairs(tp_groups(n), False)
    up = down = 0
    for op in ops:
        if op.kind != "collective-permute":
            continue
        assert op.pairs in (up_pairs, down_pairs), f"non-ring permute pairs {op.pairs}"
        if op.pairs == up_pairs:
            up += 1
        else:
            down += 1
    return up, down


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


# ------------------------------------------------------------------------ layers vs dense reference
@pytest.mark.parametrize("rs", [False, True], ids=["replicated", "scattered"])
@pytest.mark.parametrize("kind,method", COMBOS, ids=COMBO_IDS)
def test_layer_matches_reference_and_communication(torch_mesh, axis_size, kind, method, rs):
    n = axis_size
    layer = make_layer(kind, torch_mesh, method, rs, scale="fan_in")
    errs, y, fwd_text, text = run(layer, torch_mesh, hlo_of=("fwd", "fb") if n > 1 else ("fb",))
    print(kind, method.value, rs, n, f"max rel err {max(errs.values()):.2e}")
    assert_close(errs, FP32_RTOL)
    rows = SHAPE[0] * SHAPE[1]
    check_communication(kind, method, rs, n, fwd_text, text, out_bytes=rows * OUT * 4,
                        in_bytes=rows * IN * 4)
    # output layout: a global tensor sharded on the out features over tp iff reduce_scatter_output
    assert tuple(y.shape) == (*SHAPE, OUT)
    if n > 1:
        assert get_sharding(y, mesh=torch_mesh) == (None, None, "tp" if rs else None)
        # parameters are global tensors sharded over tp, not stacked
        direction = "row" if kind == "row" else "column"
        assert tuple(layer.kernel.shape) == (IN, OUT) and tuple(layer.bias.shape) == (OUT,)
        expected = (("tp", None), ("tp",) if rs else (None,)) if direction == "row" else \
            ((None, "tp"), ("tp",))
        assert get_sharding(layer.kernel, mesh=torch_mesh) == expected[0]
        assert get_sharding(layer.bias, mesh=torch_mesh) == expected[1]


@pytest.mark.parametrize("kind,method,n,fi,fo", [
    ("column", MM.ALL_GATHER, 4, 64, 256), ("column", MM.ALL_GATHER_BIDIRECTIONAL, 4, 64, 256),
    ("row", MM.REDUCE_SCATTER, 8, 64, 512)])
def test_ring_program_has_no_gather_scatter_or_transpose_copy(make_torch_mesh, kind, method, n,
                                                              fi, fo):
    """The shapes of the issue-14 compile cliff: the compiled forward+backward selects weight
    blocks without gather / scatter (per-element index loops that XLA:CPU's LLVM unrolled, 50-120
    s to compile) and multiplies without materialized transposes (bmm's backward). Structural, not
    timed: at 64 -> 256, tp=4, batch 64 (the parity case) the old program held 4 gathers, 2
    scatters and 8 transposes."""
    mesh = make_torch_mesh(model_axis_size=n)
    layer = make_layer(kind, mesh, method, True, in_features=fi, out_features=fo)
    errs, _, _, text = run(layer, mesh, shape=(16,), hlo_of=("fb",))
    assert_close(errs, FP32_RTOL)
    ops = Counter(op for op in ("gather", "scatter", "transpose")
                  for line in text.splitlines() if f" {op}(" in line)
    assert not ops, f"compiled forward+backward has {dict(ops)}"


def test_parallel_linear_defaults_to_column(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    layer = ParallelLinear(IN, OUT, parallel_config=TensorParallelConfig(mesh=mesh), seed=0,
                           bias_init=normal_init)
    assert layer.direction == "column" and layer.is_parallel
    assert get_sharding(layer.kernel, mesh=mesh) == (None, "tp")
    assert get_sharding(layer.bias, mesh=mesh) == ("tp",)
    row = RowParallelLinear(IN, OUT, parallel_config=TensorParallelConfig(mesh=mesh), seed=0)
    assert get_sharding(row.kernel, mesh=mesh) == ("tp", None)
    assert get_sharding(row.bias, mesh=mesh) == (None,)
    # same seed, same global values whatever the sharding (and without a config)
    plain = ParallelLinear(IN, OUT, seed=0)
    assert torch.equal(layer.kernel.cpu(), row.kernel.cpu())
    assert torch.equal(layer.kernel.cpu(), plain.kernel)
    # the column ring method on ParallelLinear
    cfg = TensorParallelConfig(mesh=mesh, matmul_method=MM.ALL_GATHER_BIDIRECTIONAL)
    layer = ParallelLinear(IN, OUT, parallel_config=cfg, seed=1, bias_init=normal_init)
    errs, _, fwd_text, _ = run(layer, mesh, shape=(4,), hlo_of=("fwd",))
    assert_close(errs, FP32_RTOL)
    assert permute_directions(hlo.collectives(fwd_text), 4) == (2, 1)


def test_replicated_input_is_sliced_locally(make_torch_mesh):
    """A ring / row layer given a replicated input adds no communication (local slice)."""
    n = 4
    mesh = make_torch_mesh(model_axis_size=n)
    for kind, method in (("column", MM.ALL_GATHER), ("row", MM.PLAIN)):
        layer = make_layer(kind, mesh, method, True)
        errs, _, fwd_text, _ = run(layer, mesh, shape=(4,), x_spec=(None, None), hlo_of=("fwd",))
        assert_close(errs, FP32_RTOL)
        fwd = Counter(op.kind for op in hlo.collectives(fwd_text))
        assert fwd == (Counter({"collective-permute": n - 1}) if kind == "column"
                       else Counter({"reduce-scatter": 1}))


@pytest.mark.parametrize("kind,method,rs,n", [
    ("column", MM.ALL_GATHER_BIDIRECTIONAL, False, 4),
    ("column", MM.PLAIN, True, 8),
    ("row", MM.REDUCE_SCATTER_BIDIRECTIONAL, True, 8),
    ("row", MM.PLAIN, False, 2),
])
def test_bfloat16(make_torch_mesh, kind, method, rs, n):
    mesh = make_torch_mesh(model_axis_size=n)
    layer = make_layer(kind, mesh, method, rs, param_dtype=torch.bfloat16, in_features=64)
    errs, y, _, _ = run(layer, mesh, shape=(4,), dtype=torch.bfloat16, hlo_of=())
    print(kind, method.value, rs, n, "bf16", {k: f"{v:.1e}" for k, v in errs.items()})
    assert_close(errs, BF16_RTOL)
    assert y.dtype == torch.bfloat16 and layer.kernel.dtype == torch.bfloat16


def test_dtype_promotion_and_compute_dtype(make_torch_mesh):
    """fp32 params with dtype=bf16 compute in bf16; fp32 input with bf16 params promotes to fp32."""
    mesh = make_torch_mesh(model_axis_size=4)
    dev = M.xla_device()
    x_cpu = torch.randn(4, IN, generator=torch.Generator().manual_seed(0))
    x = M.mark_sharding(x_cpu.to(dev), mesh, (None, "tp"))
    layer = make_layer("row", mesh, MM.REDUCE_SCATTER, False, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y_ref = x_cpu.double() @ layer.kernel.cpu().double() + layer.bias.cpu().double()
    assert rel_err(y, y_ref) <= BF16_RTOL
    layer16 = make_layer("column", mesh, MM.ALL_GATHER, False, param_dtype=torch.bfloat16)
    assert layer16(x).dtype == torch.float32


@pytest.mark.parametrize("kind,method,rs", [
    ("column", MM.ALL_GATHER_BIDIRECTIONAL, True),
    ("row", MM.REDUCE_SCATTER, False),
])
def test_merged_out_features(make_torch_mesh, kind, method, rs):
    parts = (8, 16, 8)
    mesh = make_torch_mesh(model_axis_size=8)
    layer = make_layer(kind, mesh, method, rs, out_features=parts, scale="fan_out")
    assert tuple(layer.kernel.shape) == (IN, sum(parts)) and tuple(layer.bias.shape) == (32,)
    assert layer.tp_merged == 3 and layer.scale_value == pytest.approx(sum(parts) ** -0.5)
    errs, y, _, _ = run(layer, mesh, shape=(3,), hlo_of=())
    assert_close(errs, FP32_RTOL)


@pytest.mark.parametrize("scale,expected", [(0.5, 0.5), ("fan_in", IN ** -0.5),
                                            ("fan_out", 24 ** -0.5)])
def test_scale_variants(make_torch_mesh, scale, expected):
    mesh = make_torch_mesh(model_axis_size=2)
    layer = make_layer("row", mesh, MM.REDUCE_SCATTER_BIDIRECTIONAL, False, out_features=24,
                       scale=scale)
    assert layer.scale_value == pytest.approx(expected)
    errs, _, _, _ = run(layer, mesh, shape=(3,), hlo_of=())
    assert_close(errs, FP32_RTOL)
    plain = ParallelLinear(IN, 24, scale=scale, seed=7, bias_init=normal_init)
    x = torch.randn(3, IN)
    y_ref = expected * (x.double() @ plain.kernel.double()) + plain.bias.double()
    assert rel_err(plain(x), y_ref) <= FP32_RTOL


def test_without_bias(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    for kind, method in (("column", MM.ALL_GATHER), ("row", MM.PLAIN)):
        layer = make_layer(kind, mesh, method, False, use_bias=False)
        assert layer.bias is None and set(layer.state_dict()) == {"kernel"}
        errs, _, _, _ = run(layer, mesh, shape=(3,), hlo_of=())
        assert_close(errs, FP32_RTOL)


def test_kernel_override_w_and_one_dimensional_input(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    dev = M.xla_device()
    layer = make_layer("row", mesh, MM.REDUCE_SCATTER, False)
    x_cpu = torch.randn(3, IN)
    x = M.mark_sharding(x_cpu.to(dev), mesh, (None, "tp"))
    w_cpu = 2.0 * layer.kernel.detach().cpu()
    expected = x_cpu.double() @ w_cpu.double() + layer.bias.detach().cpu().double()
    assert rel_err(layer(x, w=w_cpu.to(dev)), expected) <= FP32_RTOL
    with pytest.raises(ValueError, match=r"w.shape=\(16, 16\)"):
        layer(x, w=torch.ones(IN, IN, device=dev))
    with pytest.raises(ValueError, match=r"w is on device cpu"):
        layer(x, w=w_cpu)
    col = make_layer("column", mesh, MM.ALL_GATHER_BIDIRECTIONAL, False)
    v = torch.randn(IN)
    y = col(v.to(dev))
    assert tuple(y.shape) == (OUT,)
    y_ref = v.double() @ col.kernel.detach().cpu().double() + col.bias.detach().cpu().double()
    assert rel_err(y, y_ref) <= FP32_RTOL


def test_load_state_dict_keeps_sharding(make_torch_mesh):
    """A plain layer's (or JAX's) state_dict loads by name into a parallel layer, sharding kept."""
    mesh = make_torch_mesh(model_axis_size=4)
    plain = ParallelLinear(IN, OUT, seed=11, bias_init=normal_init)
    layer = make_layer("row", mesh, MM.REDUCE_SCATTER_BIDIRECTIONAL, True)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        k: tuple(v.shape) for k, v in plain.state_dict().items()} == {"kernel": (IN, OUT),
                                                                      "bias": (OUT,)}
    layer.load_state_dict(plain.state_dict())
    assert get_sharding(layer.kernel, mesh=mesh) == ("tp", None)
    assert get_sharding(layer.bias, mesh=mesh) == ("tp",)
    assert torch.equal(layer.kernel.cpu(), plain.kernel.detach())
    errs, _, fwd_text, _ = run(layer, mesh, shape=(3,), hlo_of=("fwd",))
    assert_close(errs, FP32_RTOL)
    assert permute_directions(hlo.collectives(fwd_text), 4) == (2, 1)


# ------------------------------------------------------------------------------ from_linear
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_without_config_is_nn_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(IN, 24, bias=bias)
    ours = ParallelLinear.from_linear(lin)
    assert not ours.is_parallel
    assert torch.equal(ours.kernel, lin.weight.detach().t())  # exactly, no rounding
    assert (ours.bias is None) == (not bias)
    if bias:
        assert torch.equal(ours.bias, lin.bias.detach())
    # its own copies: changing the layer does not change the nn.Linear
    with torch.no_grad():
        ours.kernel.add_(1.0)
    assert not torch.equal(ours.kernel, lin.weight.detach().t())
    ours = ParallelLinear.from_linear(lin)
    for shape in ((IN,), (5, IN), (2, 3, IN)):
        # not bitwise: the GEMM sums in another order for the transposed layout (measured max
        # abs difference 3.6e-7 on outputs of size ~1)
        x = torch.randn(shape)
        y, y_ref = ours(x), lin(x)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
        assert rel_err(y, y_ref) <= 1e-6
    x = torch.randn(4, IN)
    torch.sin(ours(x)).sum().backward()
    torch.sin(lin(x)).sum().backward()
    assert torch.allclose(ours.kernel.grad, lin.weight.grad.t(), rtol=1e-6, atol=1e-7)
    scaled = ParallelLinear.from_linear(lin, scale=0.5)
    assert torch.allclose(scaled(x), 0.5 * (x @ lin.weight.t()) + (lin.bias if bias else 0),
                          rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,method,rs", [
    (ColumnParallelLinear, MM.ALL_GATHER, False),
    (RowParallelLinear, MM.REDUCE_SCATTER_BIDIRECTIONAL, True),
    (ParallelLinear, MM.PLAIN, False),
])
def test_from_linear_parallel(make_torch_mesh, cls, method, rs):
    mesh = make_torch_mesh(model_axis_size=4)
    torch.manual_seed(1)
    lin = nn.Linear(IN, OUT)
    cfg = TensorParallelConfig(mesh=mesh, matmul_method=method, reduce_scatter_output=rs)
    layer = cls.from_linear(lin, cfg)
    assert type(layer) is cls and layer.is_parallel
    assert torch.equal(layer.kernel.cpu(), lin.weight.detach().t())
    assert torch.equal(layer.bias.cpu(), lin.bias.detach())
    assert lin.weight.device.type == "cpu"  # the source layer is untouched
    x_cpu = torch.randn(3, IN)
    x = M.mark_sharding(x_cpu.to(M.xla_device()), mesh, input_spec(layer, 2))
    assert rel_err(layer(x), lin(x_cpu)) <= FP32_RTOL


def test_from_linear_bf16_and_errors(make_torch_mesh):
    lin = nn.Linear(IN, 8, dtype=torch.bfloat16)
    ours = RowParallelLinear.from_linear(lin)
    assert ours.kernel.dtype == torch.bfloat16 and torch.equal(ours.kernel, lin.weight.t())
    with pytest.raises(ValueError, match=r"linear=Conv1d: expected a torch.nn.Linear"):
        ParallelLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"from_linear got \['in_features'\]: set by linear"):
        ParallelLinear.from_linear(lin, in_features=4)
    with pytest.raises(ValueError, match=r"from_linear got \['bogus'\]: not a constructor"):
        ParallelLinear.from_linear(lin, bogus=1)
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=8))
    with pytest.raises(ValueError, match=r"in_features=12: expected a multiple of the 'tp' axis"):
        RowParallelLinear.from_linear(nn.Linear(12, 8), cfg)


# ------------------------------------------------------------------ no parallel config: nn.Linear
@pytest.mark.parametrize("config", [None, TensorParallelConfig()], ids=["none", "inactive"])
def test_no_parallel_config_is_plain_linear(config):
    ours = ParallelLinear(IN, 24, parallel_config=config, seed=3)
    assert not ours.is_parallel and ours.kernel.device.type == "cpu"
    assert set(ours.state_dict()) == {"kernel", "bias"}
    assert torch.equal(ours.bias, torch.zeros(24))
    # lecun_normal: truncated normal with variance 1/fan_in
    assert abs(ours.kernel.std().item() - IN ** -0.5) < 0.05
    lin = nn.Linear(IN, 24)
    with torch.no_grad():
        lin.weight.copy_(ours.kernel.t())
        lin.bias.normal_()
        ours.bias.copy_(lin.bias)
    x = torch.randn(5, IN)
    assert rel_err(ours(x), lin(x)) <= 1e-6
    bf = ParallelLinear(IN, 24, dtype=torch.bfloat16, parallel_config=config)
    assert bf(x).dtype == torch.bfloat16 and bf.kernel.dtype == torch.float32


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(5)
    a = ParallelLinear(IN, 8)
    torch.manual_seed(5)
    b = ParallelLinear(IN, 8)
    assert torch.equal(a.kernel, b.kernel)
    assert not torch.equal(ParallelLinear(IN, 8, seed=1).kernel,
                           ParallelLinear(IN, 8, seed=2).kernel)


# ---------------------------------------------------------------------------------------- errors
def test_error_no_mesh_with_method(monkeypatch):
    import torch_xla.distributed.spmd as xs

    monkeypatch.setattr(xs, "get_global_mesh", lambda: None)
    with pytest.raises(ValueError, match=r"mesh=None with matmul_method='all_gather_matmul'"):
        TensorParallelConfig(matmul_method=MM.ALL_GATHER)
    with pytest.raises(ValueError, match=r"mesh=None with reduce_scatter_output=True"):
        TensorParallelConfig(reduce_scatter_output=True)


def test_config_takes_the_global_mesh(make_torch_mesh, monkeypatch):
    import torch_xla.distributed.spmd as xs

    mesh = make_torch_mesh(model_axis_size=4)
    monkeypatch.setattr(xs, "get_global_mesh", lambda: mesh)
    cfg = TensorParallelConfig(matmul_method=MM.REDUCE_SCATTER)
    assert cfg.mesh is mesh and cfg.active and cfg.axis_size == 4
    assert not TensorParallelConfig().active  # nothing asked: inactive even with a global mesh


def test_config_resolves_strings_and_defaults(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=2)
    assert TensorParallelConfig(mesh=mesh, matmul_method="all_gather_matmul").matmul_method \
        is MM.ALL_GATHER
    assert TensorParallelConfig(mesh=mesh, matmul_method="REDUCE_SCATTER").matmul_method \
        is MM.REDUCE_SCATTER
    cfg = TensorParallelConfig(mesh=mesh)
    assert cfg.active and cfg.method is MM.PLAIN and cfg.axis_size == 2
    inactive = TensorParallelConfig()
    assert not inactive.active and inactive.axis_size == 1
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.axis_name = "dp"
    assert {m.value for m in MM} == {
        "plain", "all_gather_matmul", "all_gather_matmul_bidirectional", "reduce_scatter_matmul",
        "reduce_scatter_matmul_bidirectional"}
    assert [m.bidirectional for m in MM] == [False, False, True, False, True]
    assert MM.PLAIN.directions == ("column", "row") and MM.ALL_GATHER.directions == ("column",)


def test_error_axis_not_in_mesh(make_torch_mesh):
    with pytest.raises(ValueError, match=r"axis_name='model' is not an axis of the mesh"):
        TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=2), axis_name="model")


def test_error_not_a_mesh():
    with pytest.raises(ValueError, match=r"mesh='tp': expected a torch_xla.distributed.spmd.Mesh"):
        TensorParallelConfig(mesh="tp")


def test_error_unknown_matmul_method(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=2)
    with pytest.raises(ValueError, match=r"matmul_method='ring'.*all_gather_matmul"):
        TensorParallelConfig(mesh=mesh, matmul_method="ring")
    with pytest.raises(ValueError, match=r"matmul_method=3"):
        TensorParallelConfig(mesh=mesh, matmul_method=3)
    x = M.mark_sharding(torch.ones(4, IN, device=M.xla_device()), mesh, (None, "tp"))
    with pytest.raises(ValueError, match=r"matmul_method='bogus'"):
        get_output_partition_spec(x, x, "bogus", "tp", mesh=mesh)


def test_error_reduce_output_with_reduce_scatter_output(make_torch_mesh):
    with pytest.raises(ValueError, match=r"reduce_output=True with reduce_scatter_output=True"):
        TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=2), reduce_output=True,
                             reduce_scatter_output=True)


@pytest.mark.parametrize("cls,method", [(ColumnParallelLinear, MM.REDUCE_SCATTER),
                                        (ColumnParallelLinear, MM.REDUCE_SCATTER_BIDIRECTIONAL),
                                        (ParallelLinear, MM.REDUCE_SCATTER),
                                        (RowParallelLinear, MM.ALL_GATHER),
                                        (RowParallelLinear, MM.ALL_GATHER_BIDIRECTIONAL)])
def test_error_method_does_not_apply_to_direction(make_torch_mesh, cls, method):
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=2), matmul_method=method)
    with pytest.raises(ValueError, match=rf"matmul_method='{method.value}' does not apply to a "
                                         rf"(row|column)-parallel layer"):
        cls(IN, OUT, parallel_config=cfg)


@pytest.mark.parametrize("cls,method,rs,in_f,out_f,bad", [
    (ColumnParallelLinear, MM.PLAIN, False, 16, 30, "out_features=30"),
    (ColumnParallelLinear, MM.ALL_GATHER, True, 18, 32, "in_features=18"),
    (ParallelLinear, MM.PLAIN, True, 16, (8, 6), r"out_features=\(8, 6\) \(total 14\)"),
    (RowParallelLinear, MM.PLAIN, False, 18, 32, "in_features=18"),
    (RowParallelLinear, MM.PLAIN, True, 16, 30, "out_features=30"),
    (RowParallelLinear, MM.REDUCE_SCATTER, False, 16, 30, "out_features=30"),
])
def test_error_features_not_divisible(make_torch_mesh, cls, method, rs, in_f, out_f, bad):
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=4), matmul_method=method,
                               reduce_scatter_output=rs)
    with pytest.raises(ValueError, match=bad + r".*multiple of the 'tp' axis size 4"):
        cls(in_f, out_f, parallel_config=cfg)


def test_divisibility_only_where_needed(make_torch_mesh):
    """Column PLAIN needs no in-feature split, row PLAIN all-reduce needs no out-feature split."""
    mesh = make_torch_mesh(model_axis_size=4)
    col = ColumnParallelLinear(18, OUT, parallel_config=TensorParallelConfig(mesh=mesh), seed=0)
    row = RowParallelLinear(IN, 30, parallel_config=TensorParallelConfig(mesh=mesh), seed=0,
                            bias_init=normal_init)
    for layer in (col, row):
        errs, _, _, _ = run(layer, mesh, shape=(2,), hlo_of=())
        assert_close(errs, FP32_RTOL)


@pytest.mark.parametrize("parallel", [False, True])
def test_error_wrong_input_feature_size(make_torch_mesh, parallel):
    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=4)) if parallel else None
    layer = RowParallelLinear(IN, OUT, parallel_config=cfg)
    dev = M.xla_device() if parallel else "cpu"
    with pytest.raises(ValueError, match=r"inputs.shape=\(2, 12\): expected the last dim to be "
                                         r"in_features=16"):
        layer(torch.ones(2, 12, device=dev))


def test_error_input_not_on_the_xla_device(make_torch_mesh):
    layer = make_layer("column", make_torch_mesh(model_axis_size=4), MM.ALL_GATHER, False)
    with pytest.raises(ValueError, match=r"inputs is on device cpu, expected the XLA device"):
        layer(torch.ones(2, IN))


@pytest.mark.parametrize("kwargs,bad", [
    (dict(in_features=0, out_features=4), "in_features=0"),
    (dict(in_features=4, out_features=-1), "out_features=-1"),
    (dict(in_features=4, out_features=()), r"out_features=\(\)"),
    (dict(in_features=4, out_features=(4, 0)), "out_features=0"),
    (dict(in_features=4, out_features=4, scale="fan_mid"), "scale='fan_mid'"),
    (dict(in_features=4, out_features=4, parallel_config="tp"), "parallel_config='tp'"),
    (dict(in_features=4, out_features=4, precision="fast"), "precision='fast'"),
    (dict(in_features=4, out_features=4, param_dtype="float32"), "param_dtype='float32'"),
    (dict(in_features=4, out_features=4, seed=1.5), "seed=1.5"),
    (dict(in_features=4, out_features=4, kernel_init=lambda g, s, d: torch.ones(2)),
     r"kernel_init returned \(2,\): expected a tensor of shape \(4, 4\)"),
])
def test_error_bad_constructor_arguments(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        ParallelLinear(**kwargs)


def test_error_spmd_not_enabled_monkeypatched(make_torch_mesh, monkeypatch):
    import torch_xla.runtime as xr

    mesh = make_torch_mesh(model_axis_size=2)
    monkeypatch.setattr(xr, "is_spmd", lambda: False)
    with pytest.raises(ValueError, match=r"torch_xla SPMD is not enabled"):
        TensorParallelConfig(mesh=mesh)


# ---------------------------------------------------------------------- partition-spec helpers
@pytest.mark.parametrize("spec", [(None, "tp"), ("tp", None), (None, None), ("dp", "tp"),
                                  (("dp", "tp"), None), (("tp", "dp"), None), ("tp", "dp")])
def test_get_sharding_round_trip(make_torch_mesh, spec):
    mesh = make_torch_mesh(model_axis_size=4)
    t = M.mark_sharding(torch.zeros(8, 8, device=M.xla_device()), mesh, spec)
    assert get_sharding(t, mesh=mesh) == spec


def test_get_sharding_none_cases(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    dev = M.xla_device()
    assert get_sharding(torch.ones(4, 8), mesh=mesh) is None  # CPU
    assert get_sharding(torch.ones(4, 8, device=dev), mesh=mesh) is None  # not annotated
    assert get_sharding(object(), mesh=mesh) is None
    t = M.mark_sharding(torch.zeros(8, 8, device=dev), mesh, ("fsdp", "tp"))
    assert get_sharding(t, mesh=mesh) == (None, "tp")  # axes of size 1 are not named
    # the same devices seen through a mesh without 'tp' are another layout
    other = make_torch_mesh(model_axis_size=2)
    assert get_sharding(t, mesh=other) is None


@pytest.mark.parametrize("lhs,rhs,expected", [
    (("dp", None), (None, "tp"), ("dp", "tp")),
    (("dp", "tp"), ("tp", None), ("dp", None)),
    (("tp", None), (None, "tp"), ("tp", None)),  # an axis is used once
    (("dp", None, None), (None, "tp"), ("dp", None, "tp")),
    ((("dp", "tp"), None), (None, ("tp", "fsdp")), (("dp", "tp"), ("fsdp",))),
    ((None,), (None, "tp"), ("tp",)),
    (None, (None, "tp"), ()),
    (("dp", None), None, ()),
])
def test_get_matmul_output_sharding(lhs, rhs, expected):
    assert get_matmul_output_sharding(lhs, rhs) == expected


def test_get_output_partition_spec(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4, data_axis_size=2)
    dev = M.xla_device()

    def put(shape, spec):
        return M.mark_sharding(torch.ones(shape, device=dev), mesh, spec)

    x_dp = put((4, IN), ("dp", None))
    x_tp = put((2, 4, IN), (None, "tp", None))
    w_col, w_row = put((IN, OUT), (None, "tp")), put((IN, OUT), ("tp", None))
    gop = lambda a, b, m: get_output_partition_spec(a, b, m, "tp", mesh=mesh)  # noqa: E731
    assert gop(x_dp, w_col, MM.PLAIN) == ("dp", "tp")
    assert gop(x_dp, w_row, None) == ("dp", None)
    assert gop(x_dp, w_row, MM.REDUCE_SCATTER) == ("dp", "tp")
    assert gop(x_dp, w_col, "all_gather_matmul") == ("dp", "tp")
    assert gop(x_tp, w_row, MM.REDUCE_SCATTER_BIDIRECTIONAL) == (None, None, "tp")
    assert gop(torch.ones(4, IN), w_col, MM.PLAIN) is None
    assert gop(x_dp, torch.ones(IN, OUT), MM.PLAIN) is None


def test_output_partition_spec_describes_ring_layer_output(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    for kind, method in (("column", MM.ALL_GATHER), ("row", MM.REDUCE_SCATTER)):
        layer = make_layer(kind, mesh, method, True)
        x = M.mark_sharding(torch.ones(4, IN, device=M.xla_device()), mesh, (None, "tp"))
        y = layer(x)
        spec = get_output_partition_spec(x, layer.kernel, method, "tp", mesh=mesh)
        assert spec == (None, "tp") == get_sharding(y, mesh=mesh)
