"""The 4-D-mesh GPT, framework-neutral part: sizes, validation, initial weights, parameter layout.

``jax_impl.model`` and ``torch_impl.model`` build the same decoder from a
:class:`ringpar.configs.ModelConfig` whose ``model_config`` is a :class:`GPTModelConfig` and whose
``parallel`` is a :class:`ringpar.configs.ParallelConfig` (mesh axes dp, fsdp, pp, tp). This module
is the one place that states, for both backends:

- :func:`check_gpt`: the mesh vs model checks (ValueError naming the field, before any compile);
- :func:`reference_shapes` / :func:`init_reference`: the dense, mesh-independent parameters
  ("reference" layout, names below) and their seeded numpy initial values;
- :func:`layout_shapes` / :func:`to_layout` / :func:`from_layout`: the parameters as the model
  holds them on a mesh (paths = JAX linen paths joined by '.' = torch ``state_dict`` keys, global
  shapes, partition specs incl. FSDP). Every reference element appears exactly once in a layout,
  so SGD / AdamW on the layout equals SGD / AdamW on the reference (mesh-independent numbers).

Reference parameters (D hidden, F mlp, V vocab, S max_seq_len, L layers; qkv columns head-major)::

    wte [V, D]  wpe [S, D]  ln_f.scale|bias [D]  lm_head.kernel [D, V]
    blocks.{i}.ln_1.scale|bias [D]   blocks.{i}.attn.qkv.kernel [D, 3D]  .bias [3D]
    blocks.{i}.attn.proj.kernel [D, D]  .bias [D]   blocks.{i}.ln_2.scale|bias [D]
    blocks.{i}.mlp.fc.kernel [D, F]  .bias [F]   blocks.{i}.mlp.proj.kernel [F, D]  .bias [D]

Layout on a mesh (n = tp size, p = pp size, Lp = L/p; block i lives in stage i // Lp as
``blocks_{i % Lp}``; PIPE = ``pipeline.ModelParallelismWrapper_0.sharded``)::

    embed.wte.sharded.embedding   [n, V/n, D]   ('tp', None, None)   vocab block d on device d
    embed.wpe.sharded.embedding   [n, S, D/n]   ('tp', None, None)   feature block d
    PIPE.blocks_{j}.ln_1.sharded.scale|bias     [p, n, D/n]
    PIPE.blocks_{j}.attn.qkv.<gather dense>     qkv output block d = heads of device d
    PIPE.blocks_{j}.attn.proj.<scatter dense>   (no bias inside the dense layer)
    PIPE.blocks_{j}.attn.proj_bias.sharded.bias [p, n, D/n]
    PIPE.blocks_{j}.ln_2..., mlp.fc.<gather>, mlp.proj.<scatter>, mlp.proj_bias.sharded.bias
    head.ln_f.sharded.scale|bias  [n, D/n]
    head.lm_head.<gather dense, no bias>

``<dense>`` is the seed-000 layer tree: TPDense (``tp_async_dense=False``): n > 1
``module.sharded.kernel`` [n, Fin, Fout/n] (gather) / [n, Fin/n, Fout] (scatter),
``module.sharded.bias`` [n, Fout/n]; n == 1 ``Dense_0.kernel|bias``. TPAsyncDense: n > 1
``shard_{i}.sharded.kernel`` [n, Fin/n, Fout/n], ``shard_0.sharded.bias``; n == 1
``shard_0.kernel|bias``. Block parameters get a leading [p] dim ('pp'). The residual stream is
feature-sharded over tp ([b, S, D/n] per device); norms use all-reduced statistics.

Example:
    >>> from ringpar.configs import ParallelConfig
    >>> cfg = gpt_model_config(ParallelConfig(data_axis_size=2, fsdp_axis_size=2,
    ...                        model_axis_size=2), vocab_size=64, hidden_size=32, num_heads=4,
    ...                        num_layers=2, max_seq_len=16)
    >>> sizes = check_gpt(cfg, num_devices=8, batch_size=8)
    >>> sizes.mesh
    (2, 2, 1, 2)
    >>> ref = init_reference(cfg.model_config, seed=0)
    >>> lay = to_layout(ref, cfg, sizes)
    >>> lay["embed.wte.sharded.embedding"].shape
    (2, 32, 32)
    >>> all((from_layout(lay, cfg, sizes)[k] == v).all() for k, v in ref.items())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from .configs import ConfigDict, ModelConfig, ParallelConfig, mesh_axis_names, mesh_axis_sizes
from .fsdp_layout import check_module_names, fsdp_shard_dim
from .gpt_config import TransformerSizes
from .validation import positive_int

__all__ = ["GPTModelConfig", "GPT_MODULE_NAMES", "MeshSizes", "gpt_model_config", "check_gpt",
           "reference_shapes", "init_reference", "layout_shapes", "layout_specs", "to_layout",
           "from_layout", "PIPE"]

GPT_MODULE_NAMES = ("Embed", "Block", "Head")
COMPUTE_DTYPES = ("float32", "bfloat16")
"""Module names ``ParallelConfig.fsdp_modules`` / ``remat`` may list (passed to prepare_module)."""

PIPE = "pipeline.ModelParallelismWrapper_0.sharded"
"""Prefix of the pipeline-stage parameters (the JAX PipelineModule + pp wrapper path)."""


@dataclass(kw_only=True)
class GPTModelConfig(ConfigDict, TransformerSizes):
    """Sizes of the 4-D-mesh GPT (``ModelConfig.model_config``).

    Attributes:
        vocab_size: V (divisible by tp).
        hidden_size: D (divisible by num_heads and tp).
        num_heads: H (divisible by tp).
        num_layers: L (divisible by pp).
        max_seq_len: S, rows of the position embedding.
        mlp_hidden_size: F (0 = 4 D; divisible by tp).
        num_microbatches: GPipe micro-batches per step (the per-device batch must divide by it).
        norm_eps: LayerNorm epsilon.
        init_std: Standard deviation of the normal initial kernels and embeddings.
        dtype: Compute dtype name, "float32" or "bfloat16". With "bfloat16" the parameters, the
            gradients, the optimizer state and the loss stay float32; each step runs its forward
            and backward on bfloat16 copies of the parameters (LayerNorm statistics, attention
            softmax and the cross-entropy in float32), on both backends alike.
    """

    vocab_size: int = 128
    hidden_size: int = 64
    num_heads: int = 4
    num_layers: int = 4
    max_seq_len: int = 16
    mlp_hidden_size: int = 0
    num_microbatches: int = 1
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_heads", "num_layers", "max_seq_len",
                     "num_microbatches"):
            positive_int(f"GPTModelConfig.{name}", getattr(self, name))
        if self.mlp_hidden_size != 0:
            positive_int("GPTModelConfig.mlp_hidden_size", self.mlp_hidden_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"GPTModelConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")

        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"GPTModelConfig.dtype={self.dtype!r}: expected one of "
                             f"{COMPUTE_DTYPES}")


class MeshSizes(NamedTuple):
    """Resolved axis sizes and names of the 4-D mesh."""

    dp: int
    fsdp: int
    pp: int
    tp: int
    names: tuple[str, str, str, str]

    @property
    def mesh(self) -> tuple[int, int, int, int]:
        """(dp, fsdp, pp, tp)."""
        return (self.dp, self.fsdp, self.pp, self.tp)

    def size(self, axis: str | None) -> int:
        """Size of the axis called ``axis`` (1 for None)."""
        return 1 if axis is None else self.mesh[self.names.index(axis)]


def gpt_model_config(parallel: ParallelConfig, **sizes: Any) -> ModelConfig:
    """A :class:`ModelConfig` for the GPT: ``model_config=GPTModelConfig(**sizes)``."""
    if not isinstance(parallel, ParallelConfig):
        raise ValueError(f"parallel={parallel!r}: expected a ParallelConfig")
    return ModelConfig(model_class=GPTModelConfig, parallel=parallel,
                       model_config=GPTModelConfig(**sizes))


def check_gpt(config: ModelConfig, num_devices: int, batch_size: int | None = None) -> MeshSizes:
    """Validate the model against its mesh; return the resolved axis sizes.

    Raises ValueError naming the field when: the mesh product differs from ``num_devices``;
    tp does not divide num_heads / hidden_size / mlp_hidden_size / vocab_size; pp does not divide
    num_layers; dp * fsdp * num_microbatches does not divide ``batch_size``; fsdp_modules / remat
    name an unknown module.
    """
    if not isinstance(config, ModelConfig) or not isinstance(config.model_config, GPTModelConfig):
        raise ValueError(f"config={config!r}: expected a ModelConfig whose model_config is a "
                         f"GPTModelConfig (see gpt_model_config)")
    par, cfg = config.parallel, config.model_config
    dp, fsdp, pp, tp = mesh_axis_sizes(par, num_devices)
    sizes = MeshSizes(dp, fsdp, pp, tp, mesh_axis_names(par))
    for name, value in (("num_heads", cfg.num_heads), ("hidden_size", cfg.hidden_size),
                        ("mlp_hidden_size", cfg.ffn), ("vocab_size", cfg.vocab_size)):
        if value % tp:
            raise ValueError(f"GPTModelConfig.{name}={value} is not divisible by "
                             f"ParallelConfig.model_axis_size={tp}")
    if cfg.num_layers % pp:
        raise ValueError(f"GPTModelConfig.num_layers={cfg.num_layers} is not divisible by "
                         f"ParallelConfig.pipeline_axis_size={pp}")
    if batch_size is not None:
        positive_int("batch_size", batch_size)
        step = dp * fsdp * cfg.num_microbatches
        if batch_size % step:
            raise ValueError(f"batch_size={batch_size} is not divisible by data_axis_size * "
                             f"fsdp_axis_size * num_microbatches = {dp}*{fsdp}*"
                             f"{cfg.num_microbatches} = {step}")
    check_module_names(par, GPT_MODULE_NAMES)
    return sizes


def check_batch(tokens_shape, targets_shape, config: ModelConfig, sizes: MeshSizes) -> None:
    """ValueError unless tokens and targets are [B, S] with B divisible and S <= max_seq_len."""
    cfg = config.model_config
    if len(tokens_shape) != 2 or tuple(targets_shape) != tuple(tokens_shape):
        raise ValueError(f"tokens.shape={tuple(tokens_shape)}, targets.shape="
                         f"{tuple(targets_shape)}: expected two equal [batch, seq] shapes")
    if tokens_shape[1] > cfg.max_seq_len:
        raise ValueError(f"tokens.shape[1]={tokens_shape[1]}: expected at most "
                         f"GPTModelConfig.max_seq_len={cfg.max_seq_len}")
    check_gpt(config, math.prod(sizes.mesh), batch_size=int(tokens_shape[0]))


# ----------------------------------------------------------------------------- reference
def reference_shapes(cfg: GPTModelConfig) -> dict[str, tuple[int, ...]]:
    """{reference name: shape} of the dense, mesh-independent parameters (module docstring)."""
    d, f, v = cfg.hidden_size, cfg.ffn, cfg.vocab_size
    out = {"wte": (v, d), "wpe": (cfg.max_seq_len, d)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}"
        out.update({f"{b}.ln_1.scale": (d,), f"{b}.ln_1.bias": (d,),
                    f"{b}.attn.qkv.kernel": (d, 3 * d), f"{b}.attn.qkv.bias": (3 * d,),
                    f"{b}.attn.proj.kernel": (d, d), f"{b}.attn.proj.bias": (d,),
                    f"{b}.ln_2.scale": (d,), f"{b}.ln_2.bias": (d,),
                    f"{b}.mlp.fc.kernel": (d, f), f"{b}.mlp.fc.bias": (f,),
                    f"{b}.mlp.proj.kernel": (f, d), f"{b}.mlp.proj.bias": (d,)})
    out.update({"ln_f.scale": (d,), "ln_f.bias": (d,), "lm_head.kernel": (d, v)})
    return out


def init_reference(cfg: GPTModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 initial reference parameters (numpy; identical for both backends).

    Kernels and embeddings ~ N(0, init_std) (output projections scaled by 1/sqrt(2L)), biases 0,
    norm scales 1. One ``numpy.random.default_rng(seed)`` draws the tensors in name order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative int")
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in reference_shapes(cfg).items():
        if name.endswith("scale"):
            out[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            out[name] = np.zeros(shape, np.float32)
        else:
            std = cfg.init_std / (math.sqrt(2 * cfg.num_layers) if name.endswith("proj.kernel")
                                  else 1.0)
            out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


# -------------------------------------------------------------------------------- layout
def _block(a: np.ndarray, axis: int, n: int, d: int) -> np.ndarray:
    size = a.shape[axis] // n
    return np.take(a, np.arange(d * size, (d + 1) * size), axis=axis)


def _stack(parts) -> np.ndarray:
    return np.stack(list(parts), 0)


def _dense(kernel: np.ndarray, bias, kind: str, n: int, async_dense: bool) -> dict:
    """{suffix: (array, names)} of one seed-000 dense layer holding the reference ``kernel``.

    gather: device d computes output block d from the gathered input. scatter: device d holds
    input rows block d; its partial sums are reduce-scattered (TPDense) or sent round the ring
    (TPAsyncDense: ``shard_i`` of device e produces output block ``e - 1 - i``).
    """
    if n == 1:
        name = "shard_0" if async_dense else "Dense_0"
        out = {f"{name}.kernel": (kernel, (None, None))}
        if bias is not None:
            out[f"{name}.bias"] = (bias, (None,))
        return out
    tp3, tp2 = ("tp", None, None), ("tp", None)
    if not async_dense:
        if kind == "gather":
            k = _stack(_block(kernel, 1, n, d) for d in range(n))
        else:
            k = _stack(_block(kernel, 0, n, d) for d in range(n))
        out = {"module.sharded.kernel": (k, tp3)}
        if bias is not None:
            out["module.sharded.bias"] = (_stack(_block(bias, 0, n, d) for d in range(n)), tp2)
        return out
    out = {}
    for i in range(n):
        if kind == "gather":   # shard_i of device d sees the input block of device d - i
            k = _stack(_block(_block(kernel, 1, n, d), 0, n, (d - i) % n) for d in range(n))
        else:                  # shard_i of device e feeds the output block of device e - 1 - i
            k = _stack(_block(_block(kernel, 0, n, e), 1, n, (e - 1 - i) % n) for e in range(n))
        out[f"shard_{i}.sharded.kernel"] = (k, tp3)
    if bias is not None:
        out["shard_0.sharded.bias"] = (_stack(_block(bias, 0, n, d) for d in range(n)), tp2)
    return out


def _sharded_vec(v: np.ndarray, n: int, axis: int = -1) -> np.ndarray:
    axis = axis % v.ndim
    return _stack(_block(v, axis, n, d) for d in range(n))


def _block_entries(ref: Mapping, i: int, n: int, async_dense: bool) -> dict:
    """{path below blocks_j: (array, names)} of reference block i on a tp mesh of n."""
    b = f"blocks.{i}"
    tp2 = ("tp", None)
    out = {}
    for ln in ("ln_1", "ln_2"):
        for p in ("scale", "bias"):
            out[f"{ln}.sharded.{p}"] = (_sharded_vec(ref[f"{b}.{ln}.{p}"], n), tp2)
    for mod, lin, kind in (("attn", "qkv", "gather"), ("attn", "proj", "scatter"),
                           ("mlp", "fc", "gather"), ("mlp", "proj", "scatter")):
        bias = ref[f"{b}.{mod}.{lin}.bias"]
        dense_bias = bias if kind == "gather" else None
        for k, v in _dense(ref[f"{b}.{mod}.{lin}.kernel"], dense_bias, kind, n,
                           async_dense).items():
            out[f"{mod}.{lin}.{k}"] = v
        if kind == "scatter":  # one bias after the reduction (a bias per device would sum n ways)
            out[f"{mod}.{lin}_bias.sharded.bias"] = (_sharded_vec(bias, n), tp2)
    return out


def _layout_entries(ref: Mapping, cfg: GPTModelConfig, sizes: MeshSizes,
                    async_dense: bool) -> dict:
    """{layout path: (array, names with the real axis names)} built from ``ref``."""
    n, p = sizes.tp, sizes.pp
    lp = cfg.num_layers // p
    tp3, tp2 = ("tp", None, None), ("tp", None)
    out = {"embed.wte.sharded.embedding": (_sharded_vec(ref["wte"], n, 0), tp3),
           "embed.wpe.sharded.embedding": (_sharded_vec(ref["wpe"], n, 1), tp3)}
    for j in range(lp):
        stages = [_block_entries(ref, s * lp + j, n, async_dense) for s in range(p)]
        for key, (_, names) in stages[0].items():
            out[f"{PIPE}.blocks_{j}.{key}"] = (_stack(st[key][0] for st in stages),
                                               ("pp",) + names)
    for q in ("scale", "bias"):
        out[f"head.ln_f.sharded.{q}"] = (_sharded_vec(ref[f"ln_f.{q}"], n), tp2)
    for k, v in _dense(ref["lm_head.kernel"], None, "gather", n, async_dense).items():
        out[f"head.lm_head.{k}"] = v
    rename = {"tp": sizes.names[3], "pp": sizes.names[2]}
    return {k: (a, tuple(rename.get(x, x) for x in names)) for k, (a, names) in out.items()}


def _resolve(config: ModelConfig, sizes: MeshSizes | None) -> MeshSizes:
    if sizes is None:
        par = config.parallel
        sizes = MeshSizes(*(max(s, 1) for s in (par.data_axis_size, par.fsdp_axis_size,
                                                 par.pipeline_axis_size, par.model_axis_size)),
                          mesh_axis_names(par))
    return sizes


def to_layout(ref: Mapping[str, np.ndarray], config: ModelConfig,
              sizes: MeshSizes | None = None) -> dict[str, np.ndarray]:
    """Reference parameters -> {layout path: global array} for this mesh (module docstring)."""
    cfg, sizes = config.model_config, _resolve(config, sizes)
    missing = sorted(set(reference_shapes(cfg)) - set(ref))
    if missing:
        raise ValueError(f"ref is missing reference parameters {missing[:5]}")
    entries = _layout_entries(ref, cfg, sizes, config.parallel.tp_async_dense)
    return {k: np.ascontiguousarray(a) for k, (a, _) in entries.items()}


def layout_shapes(config: ModelConfig, sizes: MeshSizes | None = None) -> dict[str, tuple]:
    """{layout path: global shape} for this mesh."""
    shapes = reference_shapes(config.model_config)
    fake = {k: np.zeros(s, np.int8) for k, s in shapes.items()}
    return {k: tuple(v.shape) for k, v in to_layout(fake, config, sizes).items()}


def _module_of(path: str) -> str:
    if path.startswith("embed."):
        return "Embed"
    if path.startswith(PIPE):
        return "Block"
    return "Head"


def layout_specs(config: ModelConfig, sizes: MeshSizes | None = None) -> dict[str, tuple]:
    """{layout path: partition names per dim} incl. the FSDP axis for ``fsdp_modules``.

    FSDP follows :func:`ringpar.fsdp_layout.fsdp_shard_dim` on the per-device shape the module
    sees (named dims excluded, size = global size / sizes of the named axes).
    """
    sizes = _resolve(config, sizes)
    par = config.parallel
    shapes = reference_shapes(config.model_config)
    fake = {k: np.zeros(s, np.int8) for k, s in shapes.items()}
    entries = _layout_entries(fake, config.model_config, sizes, par.tp_async_dense)
    out = {}
    for path, (a, names) in entries.items():
        if _module_of(path) in par.fsdp_modules:
            local = [s // sizes.size(nm) if nm else s for s, nm in zip(a.shape, names)]
            per_device = math.prod(local)
            dim = fsdp_shard_dim(a.shape, sizes.fsdp, -1, names, par.fsdp_axis_name)
            if dim is not None and per_device > par.fsdp_min_weight_size:
                names = names[:dim] + (par.fsdp_axis_name,) + names[dim + 1:]
        out[path] = names
    return out


def from_layout(layout: Mapping[str, np.ndarray], config: ModelConfig,
                sizes: MeshSizes | None = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_layout`: {reference name: array} from the layout arrays."""
    shapes = reference_shapes(config.model_config)
    offsets, total = {}, 0
    for name, shape in shapes.items():
        offsets[name] = total
        total += math.prod(shape)
    index = {k: np.arange(offsets[k], offsets[k] + math.prod(s), dtype=np.int64).reshape(s)
             for k, s in shapes.items()}
    where = to_layout(index, config, sizes)
    missing = sorted(set(where) - set(layout))
    if missing:
        raise ValueError(f"layout is missing parameters {missing[:5]}")
    dtype = np.result_type(*[np.asarray(layout[k]).dtype for k in where])
    flat = np.zeros(total, dtype)
    for k, idx in where.items():
        value = np.asarray(layout[k])
        if value.shape != idx.shape:
            raise ValueError(f"layout[{k!r}].shape={value.shape}: expected {idx.shape}")
        flat[idx.ravel()] = value.ravel()
    return {k: flat[offsets[k]:offsets[k] + math.prod(s)].reshape(s) for k, s in shapes.items()}
