"""jax_impl.configs: ParallelConfig, ModelConfig, SubModelConfig, mesh-shape arithmetic."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from ringpar.configs import (ConfigDict, ModelConfig, ParallelConfig, SubModelConfig,
                              mesh_axis_names, mesh_axis_sizes)

# Field -> default documented in seed 004 (xlstm_jax.models.configs.ParallelConfig).
SEED_DEFAULTS = {
    "data_axis_size": -1, "fsdp_axis_size": 1, "pipeline_axis_size": 1, "model_axis_size": 1,
    "data_axis_name": "dp", "fsdp_axis_name": "fsdp", "pipeline_axis_name": "pp",
    "model_axis_name": "tp", "remat": [], "fsdp_modules": [], "fsdp_min_weight_size": 262144,
    "fsdp_gather_dtype": None, "fsdp_grad_scatter_dtype": None, "tp_async_dense": False,
}


def test_parallel_config_fields_and_defaults_match_seed():
    cfg = ParallelConfig()
    assert [f.name for f in dataclasses.fields(cfg)] == list(SEED_DEFAULTS)
    for name, value in SEED_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    # mutable defaults are not shared between instances
    a, b = ParallelConfig(), ParallelConfig()
    a.remat.append("mlp")
    assert b.remat == []


@pytest.mark.parametrize("name", ["fsdp_gather_dtype", "fsdp_grad_scatter_dtype"])
def test_parallel_config_rejects_unknown_dtype(name):
    with pytest.raises(ValueError, match=name):
        ParallelConfig(**{name: "float8"})
    assert getattr(ParallelConfig(**{name: "bfloat16"}), name) == "bfloat16"
    assert getattr(ParallelConfig(**{name: "None"}), name) is None


def test_parallel_config_rejects_duplicate_axis_names():
    with pytest.raises(ValueError, match="distinct"):
        ParallelConfig(model_axis_name="dp")


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_mesh_axis_sizes_infers_the_minus_one_axis(n):
    assert mesh_axis_sizes(ParallelConfig(model_axis_size=n), 8) == (8 // n, 1, 1, n)
    assert mesh_axis_sizes(ParallelConfig(data_axis_size=1, pipeline_axis_size=-1,
                                          model_axis_size=n), 8) == (1, 1, 8 // n, n)
    assert mesh_axis_sizes(ParallelConfig(data_axis_size=8 // n, model_axis_size=n), 8) == (
        8 // n, 1, 1, n)


@pytest.mark.parametrize("kwargs, devices, pattern", [
    (dict(data_axis_size=2, model_axis_size=2), 8, "multiply to 4, but there are 8 devices"),
    (dict(data_axis_size=-1, model_axis_size=-1), 8, "at most one axis size may be inferred"),
    (dict(model_axis_size=0), 8, "model_axis_size=0"),
    (dict(fsdp_axis_size=-2), 8, "fsdp_axis_size=-2"),
    (dict(model_axis_size=3), 8, "8 devices are not divisible by the product 3"),
    (dict(), 0, "num_devices=0"),
])
def test_mesh_axis_sizes_errors_name_the_numbers(kwargs, devices, pattern):
    with pytest.raises(ValueError, match=pattern):
        mesh_axis_sizes(ParallelConfig(**kwargs), devices)


def test_mesh_axis_names_follow_config():
    cfg = ParallelConfig(data_axis_name="data", model_axis_name="model")
    assert mesh_axis_names(cfg) == ("data", "fsdp", "pp", "model")


# --------------------------------------------------------------------------- ModelConfig & co.
@dataclass(kw_only=True)
class _Inner(ConfigDict):
    width: int = 4
    names: tuple[str, ...] = ("a", "b")


@dataclass(kw_only=True)
class _TinyConfig(ConfigDict):
    num_layers: int = 2
    dropout: float = 0.0
    inner: _Inner = field(default_factory=_Inner)
    inners: list[_Inner] = field(default_factory=list)
    act: str = "gelu"
    optional_count: int | None = None
    count: int = 1


class _TinyModel:
    config: _TinyConfig


def test_get_returns_attribute_or_default():
    cfg = ParallelConfig(model_axis_size=4)
    assert cfg.get("model_axis_size") == 4
    assert cfg.get("nope") is None
    assert cfg.get("nope", 7) == 7


def test_to_dict_from_dict_round_trip_nested():
    cfg = _TinyConfig(num_layers=3, dropout=0.1, inner=_Inner(width=8, names=("x",)),
                      inners=[_Inner(width=1), _Inner(width=2)], optional_count=5)
    data = cfg.to_dict()
    json.dumps(data)  # plain data only
    assert data["inner"] == {"width": 8, "names": ("x",)}
    back = ConfigDict.from_dict(_TinyConfig, json.loads(json.dumps(data)))
    assert back == cfg
    assert isinstance(back.inner, _Inner) and isinstance(back.inners[1], _Inner)
    assert back.inner.names == ("x",)  # list from JSON parsed back into the annotated tuple


def test_model_config_round_trip_with_class_path():
    mc = ModelConfig(model_class=_TinyModel, parallel=ParallelConfig(model_axis_size=2),
                     model_config=_TinyConfig(num_layers=5))
    data = mc.to_dict()
    assert data["model_class"] == f"{__name__}._TinyModel"
    back = ConfigDict.from_dict(ModelConfig, data, strict_classname_parsing=True)
    assert back.model_class is _TinyModel
    assert back.parallel == mc.parallel
    # model_config is typed Any, so it stays plain data unless a type is known
    assert back.model_config == data["model_config"]


def test_from_dict_flags():
    # ignore_extensive_attributes
    data = {"num_layers": 1, "unknown_key": 3}
    assert ConfigDict.from_dict(_TinyConfig, data).num_layers == 1
    with pytest.raises(ValueError, match="unknown_key"):
        ConfigDict.from_dict(_TinyConfig, data, ignore_extensive_attributes=False)
    # none_to_zero_for_ints
    assert ConfigDict.from_dict(_TinyConfig, {"count": None}, none_to_zero_for_ints=True).count == 0
    with pytest.raises(TypeError):
        ConfigDict.from_dict(_TinyConfig, {"count": None})
    assert ConfigDict.from_dict(_TinyConfig, {"optional_count": None}).optional_count is None
    # strict_classname_parsing
    bad = {"model_class": "no_such_module.Model", "parallel": {}}
    assert ConfigDict.from_dict(ModelConfig, bad).model_class == "no_such_module.Model"
    with pytest.raises(ValueError, match="no_such_module.Model"):
        ConfigDict.from_dict(ModelConfig, bad, strict_classname_parsing=True)
    # non-dataclass types: T(**dict) / T(value)
    assert ConfigDict.from_dict(complex, {"real": 1, "imag": 2}) == complex(1, 2)
    assert ConfigDict.from_dict(float, "2.5") == 2.5


def test_from_metadata_json_and_parallel_repr():
    parallel = ParallelConfig(model_axis_size=4, remat=["mlp"], fsdp_gather_dtype="bfloat16")
    tiny = _TinyConfig(num_layers=7, inner=_Inner(width=3))
    meta = {"model": {"model_class": f"{__name__}._TinyModel", "parallel": parallel.to_dict(),
                      "model_config": tiny.to_dict()}}
    mc = ModelConfig.from_metadata(json.dumps(meta))
    assert mc.model_class is _TinyModel
    assert mc.parallel == parallel
    assert mc.model_config == tiny and isinstance(mc.model_config.inner, _Inner)
    # xlstm-jax logs may store the parallel config as its repr string
    meta["model"]["parallel"] = repr(parallel)
    assert ModelConfig.from_metadata(json.dumps(meta)).parallel == parallel


@pytest.mark.parametrize("content, pattern", [
    ("{not json", "not valid JSON"),
    ("[]", "'model' object"),
    ('{"model": {"parallel": {}}}', "model_class"),
    ('{"model": {"model_class": "json.JSONDecoder", "parallel": "Foo(x=1)"}}', "ParallelConfig"),
])
def test_from_metadata_errors(content, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig.from_metadata(content)


def test_sub_model_config_to_dict():
    @dataclass
    class Sub(SubModelConfig):
        a: int = 1
        inner: _Inner = field(default_factory=_Inner)
        items: tuple = (1, 2)

    sub = Sub()
    sub.extra = 3.5  # post-init style attribute
    assert sub.to_dict() == {"a": 1, "inner": {"width": 4, "names": ("a", "b")}, "items": (1, 2),
                             "extra": 3.5}


def test_configs_import_no_framework():
    code = ("import sys, jax_impl.configs, torch_impl.configs, ringpar.matmul_methods; "
            "bad = [m for m in ('jax', 'torch', 'flax', 'torch_xla') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
