"""jax_impl vs torch_impl data_parallel: same weights, same numbers, collectives compared.

A two-layer MLP (Flax ``Dense`` / torch_impl ``Dense``, kernels [32, 128] and [128, 32]) under
``prepare_module(..., "MLP", cfg)`` with FSDP (and optionally remat) on the mesh (dp, fsdp, 1, 1)
= (2, 4, 1, 1) of both backends, the batch split over ('dp', 'fsdp'):

1. the same parameters are FSDP-sharded on the same dims (one rule, ``ringpar.fsdp_layout``);
2. with the JAX weights loaded into torch, the loss and every parameter gradient agree (the JAX
   side per device + ``sync_gradients``, the torch side the global mean): fp32 normwise relative
   error <= FP32_TOL;
3. collectives: the compiled programs have the same signature (``parity.hlo.signature``): per
   kernel one all-gather over fsdp in the forward, one reduce-scatter over fsdp in the backward
   (torch: ``FSDPModule`` runs the module per data shard, so each shard's partial gradient is
   reduce-scattered explicitly, as ``psum_scatter``), then the all-reduce over dp.
"""

import functools
import os

# torch_xla reads this once per process: see torch_impl.mesh.compiled_hlo
os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import jax  # noqa: E402  (JAX before torch_xla, docs/design.md)
import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from parity import hlo  # noqa: E402

D, H, B = 32, 128, 16
MIN_WEIGHT = 1024
DP, FSDP = 2, 4
FP32_TOL = 1e-6  # measured: loss 0 (equal), grads <= 1.3e-7 (normwise relative), plain and remat


def _cfg(remat):
    from ringpar.configs import ParallelConfig

    return ParallelConfig(data_axis_size=DP, fsdp_axis_size=FSDP, fsdp_modules=["MLP"],
                          remat=["MLP"] if remat else [], fsdp_min_weight_size=MIN_WEIGHT)


def _inputs():
    return np.asarray(jax.random.normal(jax.random.PRNGKey(1), (B, D)), np.float32)


# ----------------------------------------------------------------------------------------- JAX
@functools.lru_cache(maxsize=None)
def run_jax(remat):
    from jax_impl.data_parallel import prepare_module, sync_gradients
    from jax_impl.mesh import create_mesh

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(H)(x))  # Dense_0 (flax numbers modules in creation order)
            return nn.Dense(D)(h)

    cfg = _cfg(remat)

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return prepare_module(MLP, "MLP", cfg)(name="mlp")(x)

    mesh, model, x = create_mesh(cfg), Model(), jnp.asarray(_inputs())
    data = P(("dp", "fsdp"))

    def init(rng, xx):
        return model.init(rng, xx)["params"]

    shape = jax.eval_shape(jax.shard_map(init, mesh=mesh, in_specs=(P(), data), out_specs=P(),
                                         check_vma=False), jax.random.PRNGKey(0), x)
    specs = nn.get_partition_spec(shape)
    params = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=(P(), data), out_specs=specs,
                                   check_vma=False))(jax.random.PRNGKey(0), x)

    def step(p, xx):
        loss, g = jax.value_and_grad(lambda q: jnp.mean(model.apply({"params": q}, xx) ** 2))(p)
        return jax.lax.pmean(loss, ("dp", "fsdp")), sync_gradients(g, ("dp", "fsdp"))

    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, data), out_specs=(P(), specs),
                               check_vma=False))
    loss, grads = fn(params, x)
    text = fn.lower(params, x).compile().as_text()
    flat = lambda tree: {f"{a}.{b}": np.asarray(v) for a, d in nn.unbox(tree)["mlp"].items()
                         for b, v in d.items()}
    names = {f"{a}.{b}": tuple(v.names) for a, d in params["mlp"].items() for b, v in d.items()
             if isinstance(v, nn.Partitioned)}
    return float(loss), flat(params), flat(grads), names, text


# --------------------------------------------------------------------------------------- torch
@functools.lru_cache(maxsize=None)
def run_torch(remat, dev):
    from torch_impl import xla
    from torch_impl.data_parallel import RematModule, prepare_module, sync_gradients
    from torch_impl.mesh import compiled_hlo, create_mesh
    from torch_impl.tensor_parallel import Dense

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.Dense_0, self.Dense_1 = Dense(D, H), Dense(H, D)

        def forward(self, x):
            return self.Dense_1(F.gelu(self.Dense_0(x), approximate="tanh"))

    cfg = _cfg(remat)
    mesh = create_mesh(cfg)
    mlp = MLP()
    mlp.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in run_jax(False)[1].items()})
    model = prepare_module(mlp.to(dev), "MLP", cfg, mesh=mesh)
    x = xla.mark_sharding(torch.from_numpy(_inputs().copy()).to(dev), mesh, (("dp", "fsdp"), None))
    loss = (model(x) ** 2).mean()
    loss.backward()
    grads = sync_gradients({k: p.grad for k, p in model.named_parameters()}, ("dp", "fsdp"),
                           mesh=mesh)
    text = compiled_hlo([loss, *grads.values()])
    fsdp = model.wrapped if isinstance(model, RematModule) else model
    return (float(loss.detach().cpu()), {k: g.cpu().numpy() for k, g in grads.items()},
            dict(fsdp.fsdp_names), text)


def _err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_same_numbers_and_layout(xla_device, remat):
    j_loss, _, j_grads, j_names, _ = run_jax(remat)
    t_loss, t_grads, t_names, _ = run_torch(remat, xla_device)
    assert t_names == j_names == {"Dense_0.kernel": (None, "fsdp"),
                                  "Dense_1.kernel": ("fsdp", None)}
    assert set(t_grads) == set(j_grads)
    assert _err(t_loss, j_loss) <= FP32_TOL
    errs = {k: _err(t_grads[k], j_grads[k]) for k in j_grads}
    assert max(errs.values()) <= FP32_TOL, errs


def _gathers(text):
    ops = hlo.collectives(text)
    return sorted((c.kind, c.replica_groups) for c in ops if c.kind == "all-gather")


def test_forward_all_gathers_match(xla_device):
    j_text, t_text = run_jax(False)[4], run_torch(False, xla_device)[3]
    assert _gathers(j_text) == _gathers(t_text)
    assert len(_gathers(j_text)) == 2


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_collective_signatures_match(xla_device, remat):
    j_text, t_text = run_jax(remat)[4], run_torch(remat, xla_device)[3]
    j_sig = hlo.signature(j_text, merge_all_reduces=True)
    assert j_sig == hlo.signature(t_text, merge_all_reduces=True)
    assert j_sig[("reduce-scatter", (), "{{0,1,2,3},{4,5,6,7}}")] == 2  # one per kernel
