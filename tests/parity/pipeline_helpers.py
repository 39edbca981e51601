"""The stage twins and the JAX-initialised pair of pipelines shared by the pipeline twin tests
(tests/parity/test_pipeline_twins.py: GPipe, test_pipeline_circular_twins.py: circular).

The torch stage is the twin of the flax stage (``Dense_0.kernel`` [in, out], ``Dense_0.bias``), so
weights move by parameter path: torch ``state_dict`` key = JAX path joined by '.'.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import PartitionSpec as P

from jax_impl.tensor_parallel import ModelParallelismWrapper
from torch_impl.mesh import mark_sharding

F = 4
B_LOCAL = 2
BATCH = ("dp", "fsdp")


class JaxStage(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(F, bias_init=nn.initializers.normal(0.5))(x))


#: ``module_fn`` of the JAX pipelines: the stage wrapped over the pipeline axis.
JAX_STAGE = functools.partial(ModelParallelismWrapper, model_axis_name="pp", module_fn=JaxStage)


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


def rel(a, b) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def flat(tree) -> dict[str, np.ndarray]:
    """{path joined by '.': array} of a (boxed) JAX parameter tree."""
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
    return {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def twins(jmodel, tmodel, jmesh, tmesh, xla_device, p: int, m: int):
    """Initialise ``jmodel`` under ``shard_map``, load its weights into ``tmodel`` (sharded).

    Returns ``(jpredict, variables, tmodel, x, xx)``: the JAX forward (the last stage's output
    psummed over the stages, batch over the data axes), its variables, the torch model, the numpy
    batch ``[8/p * m * B_LOCAL, F]`` and the same batch on the XLA device (requires grad).
    """
    x = np.asarray(jax.random.normal(jax.random.key(p * 100 + m), (8 // p * m * B_LOCAL, F)))
    init = jax.shard_map(jmodel.init, mesh=jmesh, in_specs=(P(), P(BATCH)), out_specs=P(),
                         check_vma=False)
    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(1), x))
    variables = jax.jit(jax.shard_map(jmodel.init, mesh=jmesh, in_specs=(P(), P(BATCH)),
                                      out_specs=specs, check_vma=False))(jax.random.key(1), x)
    jpredict = jax.shard_map(lambda v, x: jax.lax.psum(jmodel.apply(v, x), "pp"), mesh=jmesh,
                             in_specs=(specs, P(BATCH)), out_specs=P(BATCH))
    tmodel.load_state_dict({k: torch.from_numpy(v.copy())
                            for k, v in flat(variables["params"]).items()})
    tmodel.stage.shard_()
    xx = mark_sharding(torch.from_numpy(x.copy()).to(xla_device), tmesh, (BATCH, None))
    return jpredict, variables, tmodel, x, xx.requires_grad_()
