"""The 4-D-mesh GPT twins: the same model on JAX and torch_xla gives the same numbers.

Tiny model (V 64, D 32, H 8, L 2, S 16, B 16, 2 micro-batches), same seeded weights, same
batch, 3 SGD steps on each backend on the same mesh. Measured on 8 CPU devices (L 4 variant, 2
steps, tp=8): losses equal, parameters within 2.8e-8; tolerances (1e-5, 1e-6) keep a 30x margin.
Over 20 SGD steps at lr 0.5 (an oscillating loss) the rounding differences grow to ~2e-5, as
they do between meshes of one backend; 20 AdamW training steps (bench/gpt_matrix.py) stay within
2.3e-7. The compiled collectives
are compared with the harness's signatures (``parity.hlo.signature``): equal on every mesh (the
torch activations keep the batch sharded over (dp, fsdp): ``torch_impl.mesh.sharded_batch``).
With FSDP each sharded parameter's gradient is reduce-scattered over fsdp on both backends
(JAX: ``psum_scatter``; torch: ``FSDPModule`` runs the module per data shard, and the pipeline
loop takes its stage parameters as per-shard rows, ``torch_impl.data_parallel``).
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.gpt_matrix import model_config, run_jax, run_torch
from parity import hlo

SMALL = dict(num_layers=2)
STEPS, LR = 3, 0.5

CASES = {
    # tp only, ring layers: the same permutes, all-gathers and reduce-scatters on both backends
    "1,1,1,8-async": ((1, 1, 1, 8), True),
    # dp x pp x tp: torch runs the blocks in the GPipe scan of torch_impl.pipeline_parallel, as
    # JAX's PipelineModule: the same ring permutes over pp and tp, the same collectives
    "2,1,2,2-async": ((2, 1, 2, 2), True),
    # fsdp x pp x tp: the pipeline as above, FSDP gradients reduce-scattered over fsdp
    "1,2,2,2-sync-fsdp": ((1, 2, 2, 2), False),
}
# (8,1,1,1), (2,2,1,2) and the other meshes run in the main job (parity "gpt4d" cases) and in
# bench/gpt_matrix.py; each case here costs one compile of the step per backend (~1 min).
WITH_FSDP = [name for name, (mesh, _) in CASES.items() if mesh[1] > 1]
WITH_PIPELINE = [name for name, (mesh, _) in CASES.items() if mesh[2] > 1]


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def twins(request, jax_devices, xla_device):
    mesh, async_dense = CASES[request.param]
    cfg = model_config(mesh, async_dense, **SMALL)
    return request.param, run_jax(cfg, STEPS, LR), run_torch(cfg, STEPS, LR)


def _axis_groups(mesh, axis: int) -> str:
    """The replica groups of one mesh axis as ``parity.hlo`` prints them (sorted)."""
    ids = np.moveaxis(np.arange(8).reshape(mesh), axis, -1).reshape(-1, mesh[axis])
    groups = sorted(sorted(int(i) for i in g) for g in ids)
    return "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in groups) + "}"


def test_losses_and_parameters_match(twins):
    _, jax_run, torch_run = twins
    np.testing.assert_allclose(torch_run[0], jax_run[0], rtol=1e-5)
    for k, v in jax_run[1].items():
        np.testing.assert_allclose(torch_run[1][k], v, atol=1e-6, err_msg=k)
    assert torch_run[3] == jax_run[3]  # the same parameter bytes per device


def test_compiled_collectives(twins):
    _, jax_run, torch_run = twins
    assert torch_run[2] == jax_run[2]


@pytest.mark.parametrize("twins", WITH_FSDP, indirect=True)
def test_fsdp_gradients_are_reduce_scattered(twins):
    """The FSDP gradients are reduce-scattered over the fsdp rings on both backends, as many
    reduce-scatters in each compiled program (not an all-reduce of the whole gradient + slice)."""
    name, jax_run, torch_run = twins
    key = ("reduce-scatter", (), _axis_groups(CASES[name][0], 1))
    assert torch_run[2][key] == jax_run[2][key] > 0


@pytest.mark.parametrize("twins", WITH_PIPELINE, indirect=True)
def test_pipeline_ring_permutes(twins):
    """With pp > 1 both programs hold the GPipe ring over pp once per while loop: one permute in
    the forward scan and one (the inverse pairs; for pp=2 the same set) in the backward scan."""
    name, jax_run, torch_run = twins
    mesh = CASES[name][0]
    ids = np.moveaxis(np.arange(8).reshape(mesh), 2, -1).reshape(-1, mesh[2]).tolist()
    rings = {hlo.ring_pairs(ids, True), hlo.ring_pairs(ids, False)}

    def count(sig):
        return sum(v for k, v in sig.items() if k[0] == "collective-permute" and k[1] in rings)

    assert count(jax_run[2]) == 2
    assert count(torch_run[2]) == count(jax_run[2])
