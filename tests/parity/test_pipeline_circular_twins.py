"""JAX and torch_xla circular pipelines on the same weights: same outputs, same gradients, same
ring permutes (count and pairs) in the compiled programs.

Weights move by parameter path (torch ``state_dict`` key = JAX path joined by '.'):
``RepeatedStage_0.repeats_k.sharded.Dense_0.kernel`` ``[p, F, F]`` on both sides.
Measured (fp32): outputs and gradients agree to <= 4.4e-7 relative; the tests allow 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl.pipeline_circular import CircularPipelineModule as JaxCircular
from parity import hlo
from tests.parity.pipeline_helpers import JAX_STAGE, TorchStage, flat, rel, twins
from torch_impl.mesh import compiled_hlo
from torch_impl.pipeline_circular import CircularPipelineModule as TorchCircular

RTOL = 1e-5
CASES = [(2, 4, 2), (4, 2, 6)]  # (p, r, m); p = 2, 4, 8 x r = 2, 4 run in tests/jax, tests/torch


def _twins(make_jax_mesh, make_torch_mesh, xla_device, p, r, m):
    jmodel = JaxCircular(model_axis_name="pp", num_microbatches=m, num_pipeline_repeats=r,
                         module_fn=JAX_STAGE)
    tmesh = make_torch_mesh(pipeline_axis_size=p)
    return twins(jmodel, TorchCircular("pp", m, TorchStage, mesh=tmesh, num_pipeline_repeats=r),
                 make_jax_mesh(pipeline_axis_size=p), tmesh, xla_device, p, m)


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
    assert rel(ty.detach().cpu(), jy) < RTOL
    assert rel(xx.grad.cpu(), jgx) < RTOL
    jg = flat(jgrads["params"])
    tg = {name: prm.grad.cpu().numpy() for name, prm in tmodel.named_parameters()}
    assert sorted(tg) == sorted(jg) and len(jg) == 2 * r
    for name in jg:
        assert rel(tg[name], jg[name]) < RTOL, name

    # The same ring on both sides: one permute up (forward) and one down (its transpose).
    jtext = grad_fn.lower(variables, x).compile().as_text()
    groups = np.arange(8).reshape(8 // p, p).tolist()
    want = sorted([hlo.ring_pairs(groups, True), hlo.ring_pairs(groups, False)])
    for text in (jtext, ttext):
        assert sorted(op.pairs for op in hlo.collectives(text)
                      if op.kind == "collective-permute") == want
