"""JAX and torch_xla circular pipelines on the same weights: same outputs, same gradients, same
ring permutes (count and pairs) in the compiled programs.

Weights move by parameter path (torch ``state_dict`` key = JAX path joined by '.'):
``RepeatedStage_0.repeats_k.sharded.Dense_0.kernel`` ``[p, F, F]`` on both sides.
Measured (fp32): outputs and gradients agree to <= 4.4e-7 relative; the tests allow 1e-5.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from jax_impl.pipeline_circular import CircularPipelineModule as JaxCircular
from jax_impl.tensor_parallel import ModelParallelismWrapper
from parity import hlo
from torch_impl.mesh import compiled_hlo, mark_sharding
from torch_impl.pipeline_circular import CircularPipelineModule as TorchCircular

F = 4
B_LOCAL = 2
RTOL = 1e-5
BATCH = ("dp", "fsdp")
CASES = [(2, 4, 2), (4, 2, 6)]  # (p, r, m); p = 2, 4, 8 x r = 2, 4 run in tests/jax, tests/torch


class JaxStage(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(F, bias_init=nn.initializers.normal(0.5))(x))


class Dense(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.zeros(F, F))
        self.bias = torch.nn.Parameter(torch.zeros(F))

    def forward(self, x):
        return x @ self.kernel + self.bias


class TorchStage(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.Dense_0 = Dense()

    def forward(self, x):
        return torch.tanh(self.Dense_0(x))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
    return {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def _twins(make_jax_mesh, make_torch_mesh, xla_device, p, r, m):
    jmesh, tmesh = make_jax_mesh(pipeline_axis_size=p), make_torch_mesh(pipeline_axis_size=p)
    jmodel = JaxCircular(model_axis_name="pp", num_microbatches=m, num_pipeline_repeats=r,
                         module_fn=functools.partial(ModelParallelismWrapper,
                                                     model_axis_name="pp", module_fn=JaxStage))
    x = np.asarray(jax.random.normal(jax.random.key(p * 100 + m), (8 // p * m * B_LOCAL, F)))
    init = jax.shard_map(jmodel.init, mesh=jmesh, in_specs=(P(), P(BATCH)), out_specs=P(),
                         check_vma=False)
    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(1), x))
    variables = jax.jit(jax.shard_map(jmodel.init, mesh=jmesh, in_specs=(P(), P(BATCH)),
                                      out_specs=specs, check_vma=False))(jax.random.key(1), x)
    jpredict = jax.shard_map(lambda v, x: jax.lax.psum(jmodel.apply(v, x), "pp"), mesh=jmesh,
                             in_specs=(specs, P(BATCH)), out_specs=P(BATCH))
    tmodel = TorchCircular("pp", m, TorchStage, mesh=tmesh, num_pipeline_repeats=r)
    tmodel.load_state_dict({k: torch.from_numpy(v.copy())
                            for k, v in _flat(variables["params"]).items()})
    tmodel.stage.shard_()
    xx = mark_sharding(torch.from_numpy(x.copy()).to(xla_device), tmesh, (BATCH, None))
    return jpredict, variables, tmodel, x, xx.requires_grad_()


@pytest.mark.parametrize("p,r,m", CASES, ids=[f"p{p}-r{r}-m{m}" for p, r, m in CASES])
def test_same_outputs_gradients_and_permutes(make_jax_mesh, make_torch_mesh, xla_device, p, r, m):
    jpredict, variables, tmodel, x, xx = _twins(make_jax_mesh, make_torch_mesh, xla_device, p, r,
                                                m)
    w_out = np.random.default_rng(m).standard_normal(x.shape).astype(np.float32)

    def loss(v, x):
        y = jpredict(v, x)
        return jnp.sum(y * w_out), y

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (jgrads, jgx), jy = grad_fn(variables, x)
    ty = tmodel(xx)
    (ty * torch.from_numpy(w_out).to(xx.device)).sum().backward()
    ttext = compiled_hlo([ty, xx.grad] + [q.grad for q in tmodel.parameters()])  # before .cpu()
    assert _rel(ty.detach().cpu(), jy) < RTOL
    assert _rel(xx.grad.cpu(), jgx) < RTOL
    jg = _flat(jgrads["params"])
    tg = {name: prm.grad.cpu().numpy() for name, prm in tmodel.named_parameters()}
    assert sorted(tg) == sorted(jg) and len(jg) == 2 * r
    for name in jg:
        assert _rel(tg[name], jg[name]) < RTOL, name

    # The same ring on both sides: one permute up (forward) and one down (its transpose).
    jtext = grad_fn.lower(variables, x).compile().as_text()
    groups = np.arange(8).reshape(8 // p, p).tolist()
    want = sorted([hlo.ring_pairs(groups, True), hlo.ring_pairs(groups, False)])
    for text in (jtext, ttext):
        assert sorted(op.pairs for op in hlo.collectives(text)
                      if op.kind == "collective-permute") == want
