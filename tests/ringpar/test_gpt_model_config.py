"""The 4-D-mesh GPT's neutral part: validation, seeded init, the parameter layout (no framework)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ringpar.configs import ParallelConfig
from ringpar.gpt_model_config import (GPT_MODULE_NAMES, check_gpt, from_layout, gpt_model_config,
                                      init_reference, layout_shapes, layout_specs,
                                      reference_shapes, to_layout)

SIZES = dict(vocab_size=64, hidden_size=32, num_heads=8, num_layers=4, max_seq_len=16)
MESHES = [(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 1, 8), (1, 1, 2, 4), (2, 2, 1, 2), (1, 2, 2, 2),
          (2, 1, 2, 2), (1, 1, 1, 2)]


def config(mesh, async_dense=False, **kw):
    par = ParallelConfig(data_axis_size=mesh[0], fsdp_axis_size=mesh[1],
                         pipeline_axis_size=mesh[2], model_axis_size=mesh[3],
                         tp_async_dense=async_dense, **kw.pop("parallel", {}))
    return gpt_model_config(par, **{**SIZES, **kw})


@pytest.mark.parametrize("async_dense", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: ",".join(map(str, m)))
def test_layout_holds_every_reference_element_once(mesh, async_dense):
    cfg = config(mesh, async_dense)
    sizes = check_gpt(cfg, math.prod(mesh))
    shapes = reference_shapes(cfg.model_config)
    offsets = np.cumsum([0] + [math.prod(s) for s in shapes.values()])
    index = {k: np.arange(o, o + math.prod(s)).reshape(s)
             for (k, s), o in zip(shapes.items(), offsets)}
    lay = to_layout(index, cfg, sizes)
    flat = np.sort(np.concatenate([v.ravel() for v in lay.values()]))
    np.testing.assert_array_equal(flat, np.arange(offsets[-1]))  # a permutation: SGD-equivalent
    assert {k: v.shape for k, v in lay.items()} == layout_shapes(cfg, sizes)
    ref = init_reference(cfg.model_config, seed=3)
    back = from_layout(to_layout(ref, cfg, sizes), cfg, sizes)
    assert all(np.array_equal(back[k], v) for k, v in ref.items())


def test_tp_layouts_put_whole_heads_on_each_device():
    cfg = config((1, 1, 1, 4))
    sizes = check_gpt(cfg, 4)
    ref = init_reference(cfg.model_config, seed=0)
    k = to_layout(ref, cfg, sizes)[
        "pipeline.ModelParallelismWrapper_0.sharded.blocks_0.attn.qkv.module.sharded.kernel"]
    # device d computes columns d*3D/4 .. (d+1)*3D/4 of the head-major qkv: heads 2d, 2d+1
    np.testing.assert_array_equal(k[0, 0], ref["blocks.0.attn.qkv.kernel"][:, :24])
    np.testing.assert_array_equal(k[0, 3], ref["blocks.0.attn.qkv.kernel"][:, 72:])
    assert k.shape == (1, 4, 32, 24)


def test_init_reference_is_seeded():
    cfg = config((1, 1, 1, 1)).model_config
    a, b, c = init_reference(cfg, 1), init_reference(cfg, 1), init_reference(cfg, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte"], c["wte"])
    assert float(np.std(a["wte"])) == pytest.approx(0.02, rel=0.1)


def test_fsdp_specs_shard_one_eighth_at_fsdp8():
    cfg = config((1, 8, 1, 1), parallel=dict(fsdp_modules=list(GPT_MODULE_NAMES),
                                              fsdp_min_weight_size=0))
    sizes = check_gpt(cfg, 8)
    shapes, specs = layout_shapes(cfg, sizes), layout_specs(cfg, sizes)
    full = sum(math.prod(s) for s in shapes.values())
    per_device = sum(math.prod(s) // (8 if "fsdp" in specs[k] else 1) for k, s in shapes.items())
    assert per_device / full == pytest.approx(1 / 8)
    off = layout_specs(config((1, 8, 1, 1)), sizes)
    assert not any("fsdp" in v for v in off.values())


@pytest.mark.parametrize("mesh, sizes, batch, match", [
    ((2, 2, 1, 1), {}, 8, "multiply to 4, but there are 8 devices"),
    ((1, 1, 1, 8), {"num_heads": 4}, 8, "GPTModelConfig.num_heads=4 is not divisible by "
                                        "ParallelConfig.model_axis_size=8"),
    ((1, 1, 1, 8), {"vocab_size": 60, "num_heads": 8}, 8, "GPTModelConfig.vocab_size=60"),
    ((1, 1, 1, 8), {"hidden_size": 36, "num_heads": 4}, 8, "num_heads=4 is not divisible"),
    ((1, 1, 8, 1), {}, 8, "GPTModelConfig.num_layers=4 is not divisible by "
                          "ParallelConfig.pipeline_axis_size=8"),
    ((2, 2, 1, 2), {"num_microbatches": 2}, 12, "batch_size=12 is not divisible"),
])
def test_bad_mesh_or_sizes_fail_naming_the_field(mesh, sizes, batch, match):
    with pytest.raises(ValueError, match=match):
        check_gpt(config(mesh, **sizes), 8, batch_size=batch)


def test_unknown_module_names_fail():
    with pytest.raises(ValueError, match="fsdp_modules=.*Blok"):
        check_gpt(config((1, 8, 1, 1), parallel=dict(fsdp_modules=["Blok"])), 8)
    with pytest.raises(ValueError, match="remat=.*MLP"):
        check_gpt(config((1, 8, 1, 1), parallel=dict(remat=["MLP"])), 8)


def test_compute_dtype_is_float32_or_bfloat16():
    assert config((1, 1, 1, 8), dtype="bfloat16").model_config.dtype == "bfloat16"
    for bad in ("float16", "bf16", 32):
        with pytest.raises(ValueError, match=r"GPTModelConfig.dtype=.*expected one of "
                                             r"\('float32', 'bfloat16'\)"):
            config((1, 1, 1, 8), dtype=bad)
