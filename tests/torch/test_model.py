"""The 4-D-mesh GPT on torch_xla: two different meshes train identically; sharding is kept.

Tiny model (V 64, D 32, H 8, L 2, S 16, B 16), 3 SGD steps per mesh, one compile per mesh.
Measured on 8 CPU devices (the L 4 variant, bench/gpt_matrix.py sizes): every torch mesh within
2.3e-7 relative of the single-device JAX losses after 3 steps; parameters agree to ~3e-8 after
2 steps. The tolerances (1e-5 relative, 1e-6 absolute) keep a 30x margin.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.gpt_matrix import batch, model_config, run_torch

SMALL = dict(num_layers=2)
STEPS, LR = 3, 0.5


@pytest.fixture(scope="module")
def fsdp8(xla_device):
    return run_torch(model_config((1, 8, 1, 1), False, **SMALL), STEPS, LR, with_hlo=False)


def test_dp_pp_tp_mesh_trains_like_the_fsdp_mesh(fsdp8):
    losses, ref, _, per_dev, full = run_torch(model_config((2, 1, 2, 2), False, **SMALL), STEPS,
                                              LR, with_hlo=False)
    np.testing.assert_allclose(losses, fsdp8[0], rtol=1e-5)
    assert losses[-1] < losses[0]
    for k, v in fsdp8[1].items():
        np.testing.assert_allclose(ref[k], v, atol=1e-6, err_msg=k)
    assert 1 / 8 < per_dev / full < 1 / 2  # tp halves everything, pp halves the blocks


def test_fsdp8_holds_one_eighth_of_the_parameters(fsdp8):
    _, _, _, per_dev, full = fsdp8
    print(f"fsdp=8: {per_dev} of {full} parameter bytes per device ({per_dev / full:.4f})")
    assert per_dev / full == pytest.approx(1 / 8)


def test_parameters_are_the_layout(xla_device):
    from ringpar.gpt_model_config import init_reference, layout_shapes, layout_specs
    from torch_impl import xla
    from torch_impl.model import build_gpt

    cfg = model_config((1, 2, 2, 2), True, **SMALL)
    model = build_gpt(cfg)
    params = model.init_params(0)
    assert {k: tuple(p.shape) for k, p in params.items()} == layout_shapes(cfg, model.sizes)
    assert model.param_specs() == layout_specs(cfg, model.sizes)
    assert list(model.state_dict()) == list(params)  # state_dict keys = JAX paths
    xla.wait_device_ops()
    ref = model.to_reference(params)
    assert all(np.array_equal(ref[k], v) for k, v in init_reference(cfg.model_config, 0).items())
    k = "pipeline.ModelParallelismWrapper_0.sharded.blocks_0.attn.qkv.shard_1.sharded.kernel"
    assert xla.sharding_text(params[k]) != "{replicated}"


def test_bad_input_fails_before_compile(xla_device):
    from torch_impl.model import build_gpt

    with pytest.raises(ValueError, match="num_layers=2 is not divisible by "
                                         "ParallelConfig.pipeline_axis_size=4"):
        build_gpt(model_config((1, 1, 4, 2), False, **SMALL))
    model = build_gpt(model_config((2, 2, 1, 2), False, **SMALL))
    tokens, targets = batch(batch_size=12)
    with pytest.raises(ValueError, match="batch_size=12 is not divisible"):
        model.loss_and_grads(dict(model.named_parameters()), tokens, targets)
    with pytest.raises(ValueError, match="model's own parameters"):
        model.loss_and_grads({}, *batch())
