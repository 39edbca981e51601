"""torch_impl.data_parallel: FSDP + data parallelism vs the unsharded model, HLO of gather/remat.

The model is a two-layer MLP of Flax-layout ``Dense`` layers (kernels [32, 128] and [128, 32],
biases below the FSDP threshold) under ``prepare_module(mlp, "MLP", cfg, mesh=...)`` on the
8-device mesh (dp, fsdp, 1, 1), the global batch annotated as sharded over ('dp', 'fsdp') and
the loss the mean over it. The reference is the same weights without a config, run on the XLA
device unannotated (an XLA backward: a CPU backward as the process's first backward breaks later
XLA backwards, torch autograd engine assert, measured). Errors are normwise:
``max|got - ref| / max|ref|``. Results are cached per config (one compile each).
"""

import os

# torch_xla reads this once per process: see torch_impl.mesh.compiled_hlo
os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import functools  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from parity import hlo  # noqa: E402
from torch_impl import mesh as M  # noqa: E402
from torch_impl import xla  # noqa: E402
from torch_impl.configs import ParallelConfig  # noqa: E402
from torch_impl.data_parallel import (FSDPModule, Partitioned, RematModule,  # noqa: E402
                                      gather_array_with_mean_grads, gather_params,
                                      prepare_module, shard_params, sync_gradients)
from torch_impl.tensor_parallel import Dense  # noqa: E402

D, H, B = 32, 128, 16
MIN_WEIGHT = 1024
FP32_TOL = 1e-6  # measured: loss 1.2e-7 (relative), grads <= 1.8e-7 (fsdp 2/4/8, remat)
BF16_TOL = 2e-2  # bf16 gather + bf16 scatter; measured 4.1e-3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.Dense_0, self.Dense_1 = Dense(D, H), Dense(H, D)

    def forward(self, x):
        return self.Dense_1(F.gelu(self.Dense_0(x), approximate="tanh"))


@functools.lru_cache(maxsize=None)
def _weights():
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in MLP().state_dict().items()}, torch.randn(B, D)


def _model(dev):
    m = MLP()
    m.load_state_dict(_weights()[0])
    return m.to(dev)


def _shard_shapes(t):
    """Shapes of what each device really holds (read back from the devices)."""
    if not xla.has_sharding(t):  # unannotated: replicated, every device holds all of it
        return [tuple(t.shape)] * xla.device_count()
    return [tuple(data.shape) for _, _, data in xla.local_shards(t)]


def _err(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@functools.lru_cache(maxsize=None)
def reference(dev):
    m = _model(dev)
    loss = (m(_weights()[1].to(dev)) ** 2).mean()
    loss.backward()
    return loss.cpu(), {k: p.grad.cpu() for k, p in m.named_parameters()}


@functools.lru_cache(maxsize=None)
def run(dev, dp, fsdp, remat=False, gather_dtype=None, scatter_dtype=None):
    """(loss, grads, compiled HLO, per-device shard shapes, fsdp names, state_dict keys)."""
    cfg = ParallelConfig(data_axis_size=dp, fsdp_axis_size=fsdp, fsdp_modules=["MLP"],
                         remat=["MLP"] if remat else [], fsdp_min_weight_size=MIN_WEIGHT,
                         fsdp_gather_dtype=gather_dtype, fsdp_grad_scatter_dtype=scatter_dtype)
    mesh = M.create_mesh(cfg)
    model = prepare_module(_model(dev), "MLP", cfg, mesh=mesh)
    x = xla.mark_sharding(_weights()[1].to(dev), mesh, (("dp", "fsdp"), None))
    loss = (model(x) ** 2).mean()
    loss.backward()
    params = dict(model.named_parameters())
    grads = sync_gradients({k: p.grad for k, p in params.items()}, ("dp", "fsdp"), mesh=mesh)
    text = M.compiled_hlo([loss, *grads.values()])
    shards = {k: _shard_shapes(p)[0] for k, p in params.items()}
    fsdp_model = model.wrapped if isinstance(model, RematModule) else model
    return (loss.cpu(), {k: g.cpu() for k, g in grads.items()}, text, shards,
            dict(fsdp_model.fsdp_names), tuple(model.state_dict()))


@pytest.mark.parametrize("fsdp", [2, 4, 8])
def test_fsdp_matches_unsharded(xla_device, fsdp):
    ref_loss, ref_grads = reference(xla_device)
    loss, grads, text, shards, names, keys = run(xla_device, 8 // fsdp, fsdp)
    assert keys == tuple(_weights()[0])  # the wrapper keeps the state_dict keys
    assert _err(loss, ref_loss) <= FP32_TOL
    errs = {k: _err(grads[k], ref_grads[k]) for k in ref_grads}
    assert max(errs.values()) <= FP32_TOL, errs
    assert names == {"Dense_0.kernel": (None, "fsdp"), "Dense_1.kernel": ("fsdp", None)}
    assert shards["Dense_0.kernel"] == (D, H // fsdp) and shards["Dense_1.kernel"] == (H // fsdp, D)
    assert shards["Dense_0.bias"] == (H,)
    # Forward: one all-gather per kernel over the fsdp rings; backward: one reduce-scatter per
    # kernel over the same rings, then (dp > 1) an all-reduce of the slice over dp: JAX's
    # psum_scatter + sync_gradients. No full-size kernel gradient is all-reduced.
    ops = hlo.collectives(text)
    fsdp_groups = {c.replica_groups for c in ops if c.kind == "all-gather"}
    assert sum(c.kind == "all-gather" for c in ops) == 2 and len(fsdp_groups) == 1
    scatters = [c for c in ops if c.kind == "reduce-scatter"]
    assert len(scatters) == 2 and {c.replica_groups for c in scatters} == fsdp_groups
    full_kernel = D * H * 4
    assert not any(c.kind == "all-reduce" and c.result_bytes == full_kernel for c in ops)
    slices = sum(c.kind == "all-reduce" and c.result_bytes == full_kernel // fsdp for c in ops)
    assert slices == (2 if fsdp < 8 else 0)


def test_per_device_parameter_bytes(xla_device):
    full = sum(v.numel() * 4 for v in _weights()[0].values())
    for fsdp in (2, 4, 8):
        shards = run(xla_device, 8 // fsdp, fsdp)[3]
        local = sum(torch.Size(s).numel() * 4 for s in shards.values())
        kernels = 2 * D * H * 4
        assert local == kernels // fsdp + (full - kernels)
        print(f"fsdp={fsdp}: per-device parameter bytes {local} of {full} ({local / full:.3f})")


def test_gather_and_scatter_dtypes(xla_device):
    """bf16 gather/scatter: the compiled program rounds to bf16 (XLA's CPU backend runs the
    collectives themselves in f32, as for JAX); gradients come back in the parameter dtype."""
    ref_grads = reference(xla_device)[1]
    plain = run(xla_device, 2, 4)
    _, grads, text, *_ = run(xla_device, 2, 4, gather_dtype="bfloat16", scatter_dtype="bfloat16")
    assert "bf16[" in text and "bf16[" not in plain[2]
    assert all(g.dtype == torch.float32 for g in grads.values())
    errs = [_err(grads[k], ref_grads[k]) for k in ref_grads]
    assert 1e-5 < max(errs) <= BF16_TOL, errs  # rounded (not fp32), within bf16 accuracy


def test_remat_is_visible_in_the_compiled_program(xla_device):
    ref_grads = reference(xla_device)[1]
    plain, remat = run(xla_device, 2, 4), run(xla_device, 2, 4, remat=True)
    assert len(re.findall(r" tanh\(", plain[2])) == 1
    assert len(re.findall(r" tanh\(", remat[2])) == 2  # the gelu recomputed in the backward
    assert remat[5] == plain[5]
    errs = [_err(remat[1][k], ref_grads[k]) for k in ref_grads]
    assert max(errs) <= FP32_TOL, errs


# ----------------------------------------------------------------------------- the pieces
def test_shard_params_rule_tp_names_and_gather(xla_device, make_torch_mesh):
    """A tp-sharded [4, 64, 32] kernel: the rule sees the per-device [1, 64, 32] and picks dim 1."""
    mesh = make_torch_mesh(fsdp_axis_size=2, model_axis_size=4, data_axis_size=1)
    w = xla.mark_sharding(torch.randn(4, 64, 32).to(xla_device), mesh, ("tp", None, None))
    odd = torch.randn(6, 10).to(xla_device)
    small = torch.randn(4, 8).to(xla_device)
    out = shard_params({"w": w, "odd": odd, "small": small}, "fsdp", min_weight_size=64 * 32 - 1,
                       mesh=mesh)
    assert out["w"] == Partitioned(w, ("tp", "fsdp", None))
    assert out["odd"] is odd and out["small"] is small
    assert set(_shard_shapes(w)) == {(1, 32, 32)}
    back = gather_params(out, "fsdp", mesh=mesh)
    assert back["w"].names == ("tp", None, None)
    torch.testing.assert_close(back["w"].value.cpu(), w.cpu(), rtol=0, atol=0)
    # per-device [1, 64, 32] = 2048 elements: at the threshold it stays replicated
    w2 = xla.mark_sharding(torch.randn(4, 64, 32).to(xla_device), mesh, ("tp", None, None))
    assert not isinstance(shard_params({"w": w2}, "fsdp", 64 * 32, mesh=mesh)["w"], Partitioned)


def test_validation(xla_device, make_torch_mesh):
    mesh = make_torch_mesh(data_axis_size=2, fsdp_axis_size=4)
    cfg = ParallelConfig(fsdp_modules=["MLP"], remat=["MLP"])
    with pytest.raises(ValueError, match="name"):
        prepare_module(MLP, "", cfg)
    with pytest.raises(ValueError, match="mesh"):
        prepare_module(MLP, "MLP", cfg)
    with pytest.raises(ValueError, match="config"):
        prepare_module(MLP, "MLP", {"fsdp_modules": ["MLP"]}, mesh=mesh)
    assert prepare_module(MLP, "MLP", None) is MLP
    assert prepare_module(MLP, "Other", cfg, mesh=mesh) is MLP
    with pytest.raises(ValueError, match="axis_names"):
        sync_gradients({}, ("dp", "data"), mesh=mesh)
    w = torch.zeros(8, 8, device=xla_device)
    with pytest.raises(ValueError, match="gather_dtype"):
        gather_array_with_mean_grads(w, 0, "fsdp", gather_dtype="int8", mesh=mesh)
    with pytest.raises(ValueError, match="axis"):
        gather_array_with_mean_grads(w, 2, "fsdp", mesh=mesh)
    factory = prepare_module(MLP, "MLP", ParallelConfig(fsdp_modules=["MLP"],
                                                        fsdp_min_weight_size=0), mesh=mesh)
    assert callable(factory) and not isinstance(factory, nn.Module)
    with pytest.raises(ValueError, match="XLA device"):
        factory()  # built on the CPU: FSDP needs parameters on the XLA device
    assert issubclass(FSDPModule, nn.Module)
    remat = RematModule(_model(xla_device))
    with pytest.raises(ValueError, match="positionally"):
        remat(x=torch.zeros(2, D, device=xla_device))


def test_fsdp_of_a_tensor_parallel_layer(xla_device, make_torch_mesh):
    """TPDense (gather) under FSDP on (dp, fsdp, pp, tp) = (1, 2, 1, 4): the stacked kernel
    [4, 16, 32] ('tp' on dim 0, per device [1, 16, 32]) is sharded on dim 2, as in JAX; the
    gradients equal those without FSDP."""
    from torch_impl.tensor_parallel import TPDense

    grads = []
    for fsdp_on in (False, True):
        cfg = ParallelConfig(data_axis_size=1, fsdp_axis_size=2, model_axis_size=4,
                             fsdp_modules=["Dense"] if fsdp_on else [], fsdp_min_weight_size=0)
        mesh = make_torch_mesh(data_axis_size=1, fsdp_axis_size=2, model_axis_size=4)
        layer = prepare_module(TPDense(4, 32, "tp", tp_mode="gather", mesh=mesh, seed=3),
                               "Dense", cfg, mesh=mesh)
        if fsdp_on:
            assert layer.fsdp_names == {"module.sharded.kernel": ("tp", None, "fsdp"),
                                        "module.sharded.bias": ("tp", "fsdp")}
            assert set(_shard_shapes(layer.module.sharded.kernel)) == {(1, 16, 16)}
            # loading fresh XLA tensors leaves the parameters replicated (measured); the
            # wrapper's post-load hook re-shards them
            fresh = {k: v.detach().cpu().to(xla_device) for k, v in layer.state_dict().items()}
            layer.load_state_dict(fresh)
            assert set(_shard_shapes(layer.module.sharded.kernel)) == {(1, 16, 16)}
        gen = torch.Generator().manual_seed(1)
        x = xla.mark_sharding(torch.randn(4, 8, 4, generator=gen).to(xla_device), mesh,
                              ("tp", None, None))
        (layer(x) ** 2).mean().backward()
        grads.append({k: p.grad.cpu() for k, p in layer.named_parameters()})
    for k in grads[0]:
        assert _err(grads[1][k], grads[0][k]) <= FP32_TOL, k
