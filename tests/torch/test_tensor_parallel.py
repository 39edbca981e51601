"""torch_impl.tensor_parallel vs a dense CPU reference built from each layer's own parameters.

Every layer/mode runs on the mesh (dp, fsdp, pp, tp) = (8/n, 1, 1, n), n in (1, 2, 4, 8), on a
stacked input ``x`` ``[n, B, in]`` (row d = device d's input). The reference is float64 CPU torch,
written per device from the documented semantics (which device's input meets which shard's
kernel, where each output block lands), differentiated by autograd for the loss ``sum(y * g)``.
Errors are normwise: ``max|got - ref| / max|ref|`` per array (output, input grad, each param grad).

The same run also reads the compiled, partitioned HLO (``torch_impl.mesh.compiled_hlo``) of the
forward alone and of forward+backward and checks the collectives: ring paths use only
collective-permutes (one per ring step and direction, inverse pairs in the backward) and never an
all-gather / all-to-all / all-reduce / reduce-scatter.
"""

import os

# torch_xla reads this once per process: see torch_impl.mesh.compiled_hlo
os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import functools  # noqa: E402
from collections import Counter  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from parity import hlo  # noqa: E402
from torch_impl import mesh as M  # noqa: E402
from torch_impl import tensor_parallel as tp  # noqa: E402

B, FL, O = 2, 4, 8  # batch, per-device input features, dense features
FP32_TOL = 1e-5
BF16_TOL = 2**-7  # two bf16 ulps (7.8e-3); measured max 4.7e-3 (test_bf16_matches_reference)

CASES = {  # name: (class, tp_mode, options)
    "dense_none": (tp.TPDense, "none", {}),
    "dense_gather": (tp.TPDense, "gather", {}),
    "dense_scatter": (tp.TPDense, "scatter", {}),
    "dense_gather_skip": (tp.TPDense, "gather", {"skip_communication": True}),
    "dense_scatter_skip": (tp.TPDense, "scatter", {"skip_communication": True}),
    "async_gather_uni": (tp.TPAsyncDense, "gather", {"use_bidirectional_gather": False}),
    "async_gather_bi": (tp.TPAsyncDense, "gather", {"use_bidirectional_gather": True}),
    "async_scatter_uni": (tp.TPAsyncDense, "scatter", {"use_bidirectional_scatter": False}),
    "async_scatter_split": (tp.TPAsyncDense, "scatter", {"use_bidirectional_scatter": True}),
}


def in_features(case, n):
    _, mode, opts = CASES[case]
    return n * FL if (mode == "gather" and opts.get("skip_communication")) else FL


def make(case, mesh, features=O, dtype=torch.float32, seed=0, **overrides):
    cls, mode, opts = CASES[case]
    n = mesh.mesh_shape[-1]
    return cls(in_features(case, n), features, "tp", mode, mesh=mesh, seed=seed, dtype=dtype,
               **{**opts, **overrides})


# ------------------------------------------------------------------------------- the reference
def reference(case, n, p, x, features=O):
    """float64 output of ``case`` per device from params ``p`` {state_dict key: tensor}."""
    cls, mode, opts = CASES[case]
    if mode == "none" or n == 1:
        name = "Dense_0" if cls is tp.TPDense else "shard_0"
        return x @ p[f"{name}.kernel"] + p[f"{name}.bias"]
    if cls is tp.TPDense:
        K, b = p["module.sharded.kernel"], p["module.sharded.bias"]
        if mode == "gather":
            full = x if opts.get("skip_communication") else torch.cat(list(x), -1).expand(n, -1, -1)
            return torch.stack([full[d] @ K[d] + b[d] for d in range(n)])
        partial = torch.stack([x[d] @ K[d] + b[d] for d in range(n)])
        if opts.get("skip_communication"):
            return partial
        return torch.stack(partial.sum(0).chunk(n, -1))  # device j: block j of the sum
    K = [p[f"shard_{i}.sharded.kernel"] for i in range(n)]
    b0 = p["shard_0.sharded.bias"]
    if mode == "gather":  # shard_i of device d sees the input of device d - i
        return torch.stack([sum(x[(d - i) % n] @ K[i][d] for i in range(n)) + b0[d]
                            for d in range(n)])
    lo = features // 2
    split = opts.get("use_bidirectional_scatter")
    out = [[] for _ in range(n)]
    for e in range(n):
        for i in range(n):
            c = x[e] @ K[i][e] + (b0[e] if i == 0 else 0)
            if not split:  # shard_i of device e feeds device e - 1 - i
                out[(e - 1 - i) % n].append(c)
            else:  # first features//2 go to e - 1 - i, the rest to e + 1 + i
                pad = torch.nn.functional.pad
                out[(e - 1 - i) % n].append(pad(c[..., :lo], (0, features - lo)))
                out[(e + 1 + i) % n].append(pad(c[..., lo:], (lo, 0)))
    return torch.stack([sum(parts) for parts in out])


def rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def run(case, mesh, n, dtype=torch.float32, features=O, seed=0):
    """Errors vs the reference, and the partitioned HLO of the forward and of fwd+bwd."""
    gen = torch.Generator().manual_seed(seed)
    module = make(case, mesh, features, dtype, seed)
    with torch.no_grad():  # non-zero biases, so that every bias path is checked
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(tuple(param.shape), generator=gen).to(param.device, dtype))
    x_cpu = torch.randn(n, B, in_features(case, n), generator=gen).to(dtype)
    x = M.mark_stacked(x_cpu.to(M.xla_device()), mesh, "tp").requires_grad_()
    y = module(x)
    fwd_text = M.compiled_hlo([y])
    g_cpu = torch.randn(tuple(y.shape), generator=gen).to(dtype)
    y.backward(M.mark_stacked(g_cpu.to(M.xla_device()), mesh, "tp"))
    names, params = zip(*module.named_parameters())
    text = M.compiled_hlo([y, x.grad, *[p.grad for p in params]])

    ref_p = {k: p.detach().cpu().double().requires_grad_() for k, p in zip(names, params)}
    ref_x = x_cpu.double().requires_grad_()
    y_ref = reference(case, n, ref_p, ref_x, features)
    y_ref.backward(g_cpu.double())
    errs = {"y": rel_err(y, y_ref), "dx": rel_err(x.grad, ref_x.grad)}
    for k, p in zip(names, params):
        errs["d" + k] = rel_err(p.grad, ref_p[k].grad)
    return errs, fwd_text, text


# ---------------------------------------------------------------------------------- numerics
def groups(n):
    return [[r * n + j for j in range(n)] for r in range(8 // n)]


def expected_permutes(case, n, backward):
    """Counter of permute pairs: forward ring steps, plus their inverses if ``backward``."""
    up, down = hlo.ring_pairs(groups(n), True), hlo.ring_pairs(groups(n), False)
    _, mode, opts = CASES[case]
    if mode == "gather" and opts.get("use_bidirectional_gather"):
        fwd = [up] * (n // 2) + [down] * ((n - 1) // 2)
    elif mode == "scatter" and opts.get("use_bidirectional_scatter"):
        fwd = [up] * (n - 1) + [down] * (n - 1)
    else:
        fwd = [up] * (n - 1)
    inverse = {up: down, down: up}
    return Counter(fwd + ([inverse[p] for p in fwd] if backward else []))


def check_communication(case, n, fwd_text, text):
    fwd_ops, ops = hlo.collectives(fwd_text), hlo.collectives(text)
    cls, mode, opts = CASES[case]
    if n == 1 or opts.get("skip_communication"):
        assert fwd_ops == [] and ops == []
        return
    tp_groups = "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in groups(n)) + "}"
    if mode == "none":  # the replicated params' grads: ONE all-reduce over tp (as JAX)
        assert fwd_ops == []
        assert [(op.kind, op.replica_groups) for op in ops] == [("all-reduce", tp_groups)]
    elif cls is tp.TPDense:
        kind, transpose = (("all-gather", "reduce-scatter") if mode == "gather"
                           else ("reduce-scatter", "all-gather"))
        assert [(op.kind, op.replica_groups) for op in fwd_ops] == [(kind, tp_groups)]
        assert sorted(op.kind for op in ops) == sorted([kind, transpose])
        assert all(op.replica_groups == tp_groups for op in ops)
    else:  # async: ring permutes only, forward and backward
        assert {op.kind for op in fwd_ops} == {"collective-permute"}
        assert {op.kind for op in ops} == {"collective-permute"}
        assert Counter(op.pairs for op in fwd_ops) == expected_permutes(case, n, backward=False)
        assert Counter(op.pairs for op in ops) == expected_permutes(case, n, backward=True)


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference_and_communication(torch_mesh, axis_size, case):
    errs, fwd_text, text = run(case, torch_mesh, axis_size)
    print(case, axis_size, f"max rel err {max(errs.values()):.2e}")
    bad = {k: v for k, v in errs.items() if not v <= FP32_TOL}
    assert not bad, f"fp32 errors above {FP32_TOL}: {bad}"
    check_communication(case, axis_size, fwd_text, text)


def test_split_scatter_odd_features(make_torch_mesh):
    """5 features: the first 2 travel up the ring, the other 3 down."""
    errs, _, _ = run("async_scatter_split", make_torch_mesh(model_axis_size=4), 4, features=5)
    assert max(errs.values()) <= FP32_TOL, errs


@pytest.mark.parametrize("case", ["dense_gather", "dense_scatter", "async_gather_bi",
                                  "async_scatter_split"])
def test_bf16_matches_reference(make_torch_mesh, case):
    """bfloat16 params, inputs, matmuls and grads vs float64 on the same bf16 values."""
    errs, _, _ = run(case, make_torch_mesh(model_axis_size=4), 4, dtype=torch.bfloat16)
    print(case, f"bf16 max rel err {max(errs.values()):.2e}", errs)
    bad = {k: v for k, v in errs.items() if not v <= BF16_TOL}
    assert not bad, f"bf16 errors above {BF16_TOL}: {bad}"


def test_reference_detects_a_wrong_layer(make_torch_mesh, monkeypatch):
    """The numeric check can fail: a gather ring shifted the wrong way is caught."""
    from torch_impl import async_collectives

    original = async_collectives.ring_permute
    monkeypatch.setattr(async_collectives, "ring_permute",
                        lambda x, a, shift_up=True, *, mesh: original(x, a, shift_up=not shift_up,
                                                                      mesh=mesh))
    errs, _, _ = run("async_gather_uni", make_torch_mesh(model_axis_size=4), 4)
    assert errs["y"] > 0.1


# ---------------------------------------------------------------------------- parameter trees
def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_parameter_tree(torch_mesh, axis_size, case):
    """state_dict keys/shapes = the JAX parameter paths joined by '.' (jax_impl docstring)."""
    n = axis_size
    cls, mode, opts = CASES[case]
    got = shapes(make(case, torch_mesh))
    if mode == "none" or n == 1:
        name = "Dense_0" if cls is tp.TPDense else "shard_0"
        fin = in_features(case, n)
        assert got == {f"{name}.kernel": (fin, O), f"{name}.bias": (O,)}
    elif cls is tp.TPDense:
        rows = n * FL if (mode == "gather" and not opts.get("skip_communication")) else \
            in_features(case, n)
        assert got == {"module.sharded.kernel": (n, rows, O), "module.sharded.bias": (n, O)}
    else:
        expected = {f"shard_{i}.sharded.kernel": (n, FL, O) for i in range(n)}
        expected["shard_0.sharded.bias"] = (n, O)
        assert got == expected


def test_parameter_tree_options_and_sharding(make_torch_mesh):
    import torch_xla

    mesh = make_torch_mesh(model_axis_size=2)
    m = make("dense_gather", mesh, dense_name="proj", use_bias=False)
    assert shapes(m) == {"proj.sharded.kernel": (2, 2 * FL, O)}
    m = make("async_scatter_uni", mesh, use_bias=False)
    assert shapes(m) == {f"shard_{i}.sharded.kernel": (2, FL, O) for i in range(2)}
    # stacked params: dim 0 over tp (2 ways), replicated over the 4 dp rows; kept after loading
    spec = "{devices=[2,1,1,4]0,2,4,6,1,3,5,7 last_tile_dim_replicate}"
    assert torch_xla._XLAC._get_xla_sharding_spec(m.shard_1.sharded.kernel) == spec
    m.load_state_dict({k: torch.ones(v.shape) for k, v in m.state_dict().items()})
    assert torch_xla._XLAC._get_xla_sharding_spec(m.shard_1.sharded.kernel) == spec
    assert torch.equal(m.shard_1.sharded.kernel.cpu(), torch.ones(2, FL, O))


@pytest.mark.parametrize("case", ["dense_gather", "async_gather_bi"])
def test_init_differs_across_model_axis(torch_mesh, axis_size, case):
    n = axis_size
    m = make(case, torch_mesh, seed=3)
    kernels = [p.detach().cpu() for k, p in m.named_parameters() if k.endswith("sharded.kernel")]
    if n == 1:
        assert kernels == []
        return
    blocks = [k[j] for k in kernels for j in range(n)]
    assert len(blocks) == (n * n if case.startswith("async") else n)
    for a in range(len(blocks)):  # every device and every ring step has its own kernel
        for c in range(a):
            assert not torch.allclose(blocks[a], blocks[c])
    std = torch.cat([b.ravel() for b in blocks]).std().item()
    fan_in = kernels[0].shape[1]
    assert 0.7 < std * fan_in ** 0.5 < 1.3  # lecun_normal
    again = make(case, torch_mesh, seed=3)
    for (k1, p1), (k2, p2) in zip(m.named_parameters(), again.named_parameters()):
        assert k1 == k2 and torch.equal(p1.cpu(), p2.cpu())  # reproducible from one seed


def test_kernel_init_adjustment_and_scale_init(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    base = make("async_gather_uni", mesh)
    scaled = make("async_gather_uni", mesh, kernel_init_adjustment=0.5)
    for (k, a), (_, b) in zip(base.named_parameters(), scaled.named_parameters()):
        torch.testing.assert_close(b.cpu(), 0.5 * a.cpu(), rtol=1e-6, atol=0)
    ones = lambda gen, shape, dtype=torch.float32: torch.ones(shape, dtype=dtype)  # noqa: E731
    init = tp.scale_init(ones, 3.0)
    assert torch.equal(init(None, (2, 2)), torch.full((2, 2), 3.0))
    assert tp.scale_init(ones)(None, (1,))[0] == 1.0
    # none mode: the plain kernel_init, without the adjustment (as JAX)
    m = make("dense_none", mesh, kernel_init=ones, kernel_init_adjustment=0.5)
    assert torch.equal(m.Dense_0.kernel.cpu(), torch.ones(FL, O))


class TwoLayer(torch.nn.Module):
    """A module with two parameters and a keyword argument, to wrap."""

    def __init__(self, scale_bias=1.0):
        super().__init__()
        self.inner = tp.Dense(FL, O, bias_init=lambda g, s, d: torch.full(s, scale_bias, dtype=d))
        self.gain = torch.nn.Parameter(torch.randn(O))

    def forward(self, x, shift=0.0):
        return torch.tanh(self.inner(x)) * self.gain + shift


@pytest.mark.parametrize("split_rngs, mask", [(True, "last"), (False, None), (True, None)])
def test_model_parallelism_wrapper(torch_mesh, axis_size, split_rngs, mask):
    n = axis_size
    keep = n - 1 if mask == "last" else None
    w = tp.ModelParallelismWrapper("tp", TwoLayer, mask_except_model_idx=keep,
                                   split_rngs=split_rngs, module_kwargs={"scale_bias": 2.0},
                                   mesh=torch_mesh, seed=5)
    assert shapes(w) == {"sharded.inner.kernel": (n, FL, O), "sharded.inner.bias": (n, O),
                         "sharded.gain": (n, O)}
    kernel, bias = w.sharded.inner.kernel.detach().cpu(), w.sharded.inner.bias.detach().cpu()
    for j in range(n):
        zero = keep is not None and j != keep
        assert bool(torch.all(kernel[j] == 0)) == zero
        assert bool(torch.all(bias[j] == (0 if zero else 2)))
    if not split_rngs:
        assert all(torch.equal(kernel[j], kernel[0]) for j in range(n))
    elif n > 1 and keep is None:
        assert not torch.allclose(kernel[0], kernel[1])
    # forward = vmap(functional_call) over dim 0 = each device's module on its row
    x = torch.randn(n, B, FL)
    y = w(M.mark_stacked(x.to(M.xla_device()), torch_mesh, "tp"), shift=0.5).cpu()
    gain = w.sharded.gain.detach().cpu()
    ref = torch.stack([torch.tanh(x[j] @ kernel[j] + bias[j]) * gain[j] + 0.5 for j in range(n)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_lecun_normal_and_dense():
    init = tp.lecun_normal()
    k = init(torch.Generator().manual_seed(0), (400, 300))
    assert abs(k.std().item() * 20 - 1) < 0.02 and k.abs().max() <= 2 * 20 ** -1 / 0.8796 + 1e-6
    d = tp.Dense(3, 5, use_bias=False)
    assert [n for n, _ in d.named_parameters()] == ["kernel"] and d.kernel.shape == (3, 5)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("cls", [tp.TPDense, tp.TPAsyncDense])
def test_unknown_tp_mode(make_torch_mesh, cls):
    with pytest.raises(ValueError, match=r"tp_mode='all': expected one of \('scatter', 'gather', "
                                         r"'none'\)"):
        cls(FL, O, "tp", "all", mesh=make_torch_mesh(model_axis_size=2))


@pytest.mark.parametrize("cls", [tp.TPDense, tp.TPAsyncDense])
def test_mesh_without_axis(make_torch_mesh, cls):
    with pytest.raises(ValueError, match=r"axis_name='model' is not an axis of the mesh \('dp', "
                                         r"'fsdp', 'pp', 'tp'\)"):
        cls(FL, O, "model", "gather", mesh=make_torch_mesh(model_axis_size=2))


def test_scatter_features_not_divisible(make_torch_mesh):
    with pytest.raises(ValueError, match=r"out_features=6: expected a number divisible by the size "
                                         r"4 of axis 'tp' for tp_mode='scatter'"):
        tp.TPDense(FL, 6, "tp", "scatter", mesh=make_torch_mesh(model_axis_size=4))
    with pytest.raises(ValueError, match=r"in_features=0: expected a positive int"):
        tp.TPAsyncDense(0, 6, "tp", "scatter", mesh=make_torch_mesh(model_axis_size=4))


def test_wrong_input(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(model_axis_size=4)
    m = make("async_gather_bi", mesh)
    with pytest.raises(ValueError, match=r"x is on device cpu, expected the XLA device"):
        m(torch.zeros(4, B, FL))
    with pytest.raises(ValueError, match=r"x.shape=\(2, 2, 4\): expected the stacked view \[n=4, "
                                         r"\.\.\., in_features=4\]"):
        m(torch.zeros(2, B, FL, device=xla_device))
    with pytest.raises(ValueError, match=r"x.shape=\(4, 2, 5\)"):
        m(torch.zeros(4, B, 5, device=xla_device))


def test_ring_list_errors(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(model_axis_size=4)
    x = M.mark_stacked(torch.zeros(4, B, 3, device=xla_device), mesh, "tp")
    for fn in (tp.async_scatter, tp.async_scatter_split):
        with pytest.raises(ValueError, match=r"len\(xs\)=3: expected one input per device, the "
                                             r"size 4 of axis 'tp'"):
            fn([x] * 3, "tp", mesh=mesh)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=3: expected the number of features to be "
                                         r"divisible by 2"):
        tp.async_gather_split(x, "tp", mesh=mesh)
    with pytest.raises(ValueError, match=r"mask_except=4: expected None or an index in \[0, 4\)"):
        tp.ModelParallelismWrapper("tp", functools.partial(tp.Dense, 2, 2),
                                   mask_except_model_idx=4, mesh=mesh)


def test_spmd_not_enabled(make_torch_mesh, monkeypatch):
    import torch_xla.runtime as xr

    mesh = make_torch_mesh(model_axis_size=2)
    monkeypatch.setattr(xr, "is_spmd", lambda: False)
    for cls in (tp.TPDense, tp.TPAsyncDense):
        with pytest.raises(ValueError, match="torch_xla SPMD is not enabled"):
            cls(FL, O, "tp", "gather", mesh=mesh)


# --------------------------------------------------------------------------- ring functions
@pytest.mark.parametrize("shift_up", [True, False], ids=["up", "down"])
def test_async_gather_orders(make_torch_mesh, shift_up):
    """Bidirectional gather returns the same list, in the same order, as the one-way ring."""
    n = 8
    mesh = make_torch_mesh(model_axis_size=n)
    x_cpu = torch.randn(n, B, 2)
    x = M.mark_stacked(x_cpu.to(M.xla_device()), mesh, "tp")
    uni = tp.async_gather(x, "tp", shift_up=shift_up, mesh=mesh)
    bi = tp.async_gather_bidirectional(x, "tp", shift_up=shift_up, mesh=mesh)
    assert len(uni) == len(bi) == n
    s = 1 if shift_up else -1
    for i in range(n):  # element i, row d = x[d - i] (up) / x[d + i] (down)
        expected = torch.roll(x_cpu, s * i, 0)
        torch.testing.assert_close(uni[i].cpu(), expected, rtol=0, atol=0)
        torch.testing.assert_close(bi[i].cpu(), expected, rtol=0, atol=0)
    split = tp.async_gather_split(x, "tp", mesh=mesh)
    assert len(split) == 2 * n - 1
    torch.testing.assert_close(split[0].cpu(), x_cpu, rtol=0, atol=0)
    for i in range(1, n):
        torch.testing.assert_close(split[i].cpu(), torch.roll(x_cpu, i, 0)[..., :1], rtol=0, atol=0)
        torch.testing.assert_close(split[n - 1 + i].cpu(), torch.roll(x_cpu, -i, 0)[..., 1:],
                                   rtol=0, atol=0)
