"""The parity case matrix, as data (framework-neutral: imports neither JAX nor torch).

A :class:`Case` names a module and variant, the model-axis size, the dtype and the problem
shape. :class:`ModuleSpec` describes, per module, the parameter layout both backends share (flat
``{path: shape}`` dicts whose keys are the JAX parameter paths joined by '.', i.e. the torch
``state_dict`` keys) and the global input shape. :func:`make_data` draws the weights, the input and
the output cotangent for a case from one seeded NumPy generator, so both backends see the same
numbers.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

__all__ = ["Case", "ModuleSpec", "MODULES", "TOLERANCES", "ELEMENTWISE", "AXIS_SIZES", "DTYPES",
           "register", "default_matrix", "select", "make_data"]

AXIS_SIZES = (1, 2, 4, 8)
DTYPES = ("float32", "bfloat16")
# Normwise relative error bound, max|a - b| / max|b|, per dtype (see parity.compare).
TOLERANCES = {"float32": 1e-5, "bfloat16": 2e-2}
# The loosest tolerance a case may claim per dtype: a case asking for more is itself a defect.
MAX_TOLERANCES = {"float32": 1e-5, "bfloat16": 5e-2}
# Elementwise bound (atol, rtol) per dtype: |a - b| <= atol + rtol * |b| for every element, as
# numpy.testing.assert_allclose (see parity.compare); modules may set their own (ModuleSpec).
# Measured on the full 176-case run of 2026-12-03 (CaseReport.atol_needed: the smallest atol
# passing at that rtol): float32 <= 7.0e-7 at rtol 1e-4 (pipeline p=4 m=9; tp/linear/GPT
# <= 4.1e-7); bfloat16 <= 7.8e-3 at rtol 2e-2 (tpdense scatter n=8; linear 7.0e-3). Worst
# elementwise ratio with the bounds below: 0.47 (float32), 0.44 (bfloat16, default bounds).
ELEMENTWISE = {"float32": (2e-6, 1e-4), "bfloat16": (2e-2, 2e-2)}


@dataclass(frozen=True)
class Case:
    """One parity case: module/variant on a model axis of ``axis_size`` devices."""

    module: str
    variant: str
    axis_size: int
    dtype: str = "float32"
    batch: int = 8
    in_features: int = 32
    out_features: int = 32
    extra: tuple[tuple[str, object], ...] = ()
    tolerance: float | None = None

    @property
    def id(self) -> str:
        """Stable, human-readable id, e.g. ``tpdense-gather-n4-float32-b8x32x32``."""
        ex = "".join(f"-{k}{v}" for k, v in self.extra)
        return (f"{self.module}-{self.variant}-n{self.axis_size}-{self.dtype}"
                f"-b{self.batch}x{self.in_features}x{self.out_features}{ex}")

    @property
    def tol(self) -> float:
        """The case's tolerance (its own, or the dtype default)."""
        return TOLERANCES[self.dtype] if self.tolerance is None else self.tolerance

    @property
    def elementwise(self) -> tuple[float, float]:
        """The case's elementwise ``(atol, rtol)``: its module's, or the dtype default."""
        spec = MODULES.get(self.module)
        own = spec.elementwise.get(self.dtype) if spec is not None else None
        return own if own is not None else ELEMENTWISE[self.dtype]

    def option(self, key: str, default=None):
        """Value of an ``extra`` option."""
        return dict(self.extra).get(key, default)

    def seed(self) -> int:
        """Seed of the case's data: a hash of the id without the tolerance."""
        return zlib.crc32(self.id.encode())


@dataclass(frozen=True)
class ModuleSpec:
    """How a module appears in the matrix: its variants, parameter layout and input shape."""

    name: str
    variants: tuple[str, ...]
    param_shapes: Callable[[Case], dict[str, tuple[int, ...]]]
    input_shape: Callable[[Case], tuple[int, ...]]
    output_shape: Callable[[Case], tuple[int, ...]]
    shapes: tuple[tuple[int, int, int], ...] = ((8, 32, 32),)
    axis_sizes: tuple[int, ...] = AXIS_SIZES
    dtypes: tuple[str, ...] = DTYPES
    extras: Callable[[str, int], list[tuple[tuple[str, object], ...]]] = field(
        default=lambda variant, n: [()])
    batch_for: Callable[[int, tuple], int] | None = None
    tolerances: dict[str, float] = field(default_factory=dict)
    elementwise: dict[str, tuple[float, float]] = field(default_factory=dict)
    # False: all-reduces over the same groups are compared by presence, not total bytes (a
    # documented, known difference of the module; see parity.compare).
    all_reduce_bytes: bool = True
    # False: only the forward+backward program is compiled and compared (the module has no
    # separate forward program, e.g. the training step of "gpt4d").
    forward_signature: bool = True


MODULES: dict[str, ModuleSpec] = {}


def register(spec: ModuleSpec) -> ModuleSpec:
    """Add a module to the matrix (its name must be new)."""
    if spec.name in MODULES:
        raise ValueError(f"module {spec.name!r} is already registered")
    MODULES[spec.name] = spec
    return spec


def default_matrix() -> list[Case]:
    """Every registered module x variant x axis size x dtype x shape (x extra options)."""
    cases = []
    for spec in MODULES.values():
        for variant in spec.variants:
            for n in spec.axis_sizes:
                for extra in spec.extras(variant, n):
                    for dtype in spec.dtypes:
                        for b, fi, fo in spec.shapes:
                            if spec.batch_for is not None:
                                b = spec.batch_for(n, extra)
                            cases.append(Case(spec.name, variant, n, dtype, b, fi, fo, extra,
                                              spec.tolerances.get(dtype)))
    return cases


def select(cases: list[Case], filter: str | None = None,
           dtypes: list[str] | None = None) -> list[Case]:
    """Cases whose id contains every comma-free word of ``filter`` and whose dtype is allowed."""
    words = filter.split() if filter else []
    return [c for c in cases if all(w in c.id for w in words)
            and (not dtypes or c.dtype in dtypes)]


def make_data(case: Case) -> dict[str, dict[str, np.ndarray]]:
    """Weights, input and output cotangent of a case from one seeded generator (float32 values).

    Returns ``{"params": {path: array}, "inputs": {"x": array}, "cotangent": {"y": array}}``.
    Values are drawn in float32; a bfloat16 case rounds them on each backend the same way.
    """
    spec = MODULES[case.module]
    rng = np.random.default_rng(case.seed())
    params = {}
    for path, shape in sorted(spec.param_shapes(case).items()):
        fan_in = shape[-2] if len(shape) >= 2 else 1
        scale = 1.0 / np.sqrt(fan_in) if "kernel" in path or "weight" in path else 0.5
        params[path] = (rng.standard_normal(shape) * scale).astype(np.float32)
    x = rng.standard_normal(spec.input_shape(case)).astype(np.float32)
    cot = rng.standard_normal(spec.output_shape(case)).astype(np.float32)
    return {"params": params, "inputs": {"x": x}, "cotangent": {"y": cot}}


def with_tolerance(case: Case, tolerance: float) -> Case:
    """The same case claiming another tolerance."""
    return replace(case, tolerance=tolerance)


# ------------------------------------------------------------------------------- TP modules
# Convention for every TP case: the global input is [B, F] with the features sharded over the
# model axis (per device [B, F/n]); the global output is [B, O] with the features sharded (per
# device [B, O/n]); in torch's stacked view both are [n, B, features/n]. With n == 1 every mode
# falls back to a plain dense layer ("Dense_0" for TPDense, "shard_0" for TPAsyncDense).

def _tp_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    n, fi, fo = case.axis_size, case.in_features, case.out_features
    mode = case.variant.split("-")[0]
    if n == 1 or mode == "none":
        local_in, dense_out = fi // n, fo // n
        prefix = "Dense_0" if case.module == "tpdense" else "shard_0"
        return {f"{prefix}.kernel": (local_in, dense_out), f"{prefix}.bias": (dense_out,)}
    if case.module == "tpdense":
        if mode == "gather":
            return {"module.sharded.kernel": (n, fi, fo // n), "module.sharded.bias": (n, fo // n)}
        return {"module.sharded.kernel": (n, fi // n, fo), "module.sharded.bias": (n, fo)}
    shapes = {f"shard_{i}.sharded.kernel": (n, fi // n, fo // n) for i in range(n)}
    shapes["shard_0.sharded.bias"] = (n, fo // n)
    return shapes


register(ModuleSpec(
    name="tpdense", variants=("none", "gather", "scatter"), param_shapes=_tp_shapes,
    input_shape=lambda c: (c.batch, c.in_features),
    output_shape=lambda c: (c.batch, c.out_features)))
register(ModuleSpec(
    name="tpasync", variants=("gather-uni", "gather-bi", "scatter-uni", "scatter-split"),
    param_shapes=_tp_shapes, input_shape=lambda c: (c.batch, c.in_features),
    output_shape=lambda c: (c.batch, c.out_features)))


# ------------------------------------------------------------------------- ParallelLinear
# Global tensors on both backends: input [B, in], output [B, out]; parameters kernel [in, out]
# and bias [out]. Variant = direction-method; option rso = reduce_scatter_output (0/1).
LINEAR_METHODS = {"plain": "plain", "ag": "all_gather_matmul",
                  "agbi": "all_gather_matmul_bidirectional", "rs": "reduce_scatter_matmul",
                  "rsbi": "reduce_scatter_matmul_bidirectional"}

register(ModuleSpec(
    name="linear",
    variants=("column-plain", "column-ag", "column-agbi", "row-plain", "row-rs", "row-rsbi"),
    param_shapes=lambda c: {"kernel": (c.in_features, c.out_features), "bias": (c.out_features,)},
    input_shape=lambda c: (c.batch, c.in_features),
    output_shape=lambda c: (c.batch, c.out_features),
    extras=lambda variant, n: [(("rso", 0),), (("rso", 1),)]))


# ------------------------------------------------------------------------------- pipeline
# GPipe over the pipeline axis ('pp', p stages) of the mesh (dp, fsdp, pp, tp) = (8/p, 1, p, 1):
# stage = tanh(Dense(F)), stacked per stage [p, ...]; input [B, F] sharded over the batch axes;
# output [B, F] (the last stage's). Micro-batches m in {1, 2p+1} (m = p is in tests/); B = 2 rows per micro-batch
# per data-parallel shard on 8 devices.
PIPELINE_STAGE = "ModelParallelismWrapper_0.sharded.Dense_0"

register(ModuleSpec(
    name="pipeline", variants=("mlp",),
    param_shapes=lambda c: {f"{PIPELINE_STAGE}.kernel": (c.axis_size, c.in_features, c.in_features),
                            f"{PIPELINE_STAGE}.bias": (c.axis_size, c.in_features)},
    input_shape=lambda c: (c.batch, c.in_features),
    output_shape=lambda c: (c.batch, c.in_features),
    shapes=((0, 16, 16),),
    extras=lambda variant, n: [(("microbatches", m),) for m in sorted({1, 2 * n + 1})],
    batch_for=lambda n, extra: (8 // n) * dict(extra)["microbatches"] * 2,
    # bf16 through 8 tanh-dense stages: input-gradient error 2.6e-2 measured (fp32: <= 8e-7).
    tolerances={"bfloat16": 5e-2},
    # bf16 weight gradients summed over every micro-batch: atol 5.25e-2 needed at rtol 2e-2
    # (p=2, m=5; the other 7 bf16 cases <= 5.0e-2).
    elementwise={"bfloat16": (0.1, 2e-2)},
    # Known difference: torch's pipeline backward all-reduces the whole (m + p - 1)-step output
    # buffer over the stages where JAX all-reduces one micro-batch (p=4, m=9: 1536 B vs 128 B per
    # device; m=1: 512 B vs 128 B). Same groups, different volume: compared by presence until the
    # torch pipeline is fixed.
    all_reduce_bytes=False))


# ------------------------------------------------------------------------------------ GPT
# The GPT block of jax_impl.gpt / torch_impl.gpt (tp_mode "plain" or "ring") on the tp axis:
# integer tokens and targets [B, S] (some targets ignored), outputs the loss and the global
# logits, gradients of every parameter (no input gradient: the inputs are token ids).
GPT_CONFIG = dict(vocab_size=64, max_seq_len=8, hidden_size=32, num_heads=8, num_layers=2,
                  mlp_hidden_size=64, label_smoothing=0.1)


def gpt_param_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    """The GPT parameter tree of ``GPT_CONFIG`` (tests pin it to ``jax_impl.gpt``'s own)."""
    c = GPT_CONFIG
    d, f, v, s = c["hidden_size"], c["mlp_hidden_size"], c["vocab_size"], c["max_seq_len"]
    shapes = {"wte.embedding": (v, d), "wpe.embedding": (s, d), "ln_f.scale": (d,),
              "ln_f.bias": (d,), "lm_head.kernel": (d, v)}
    for i in range(c["num_layers"]):
        b = f"blocks.{i}"
        shapes.update({f"{b}.ln_1.scale": (d,), f"{b}.ln_1.bias": (d,), f"{b}.ln_2.scale": (d,),
                       f"{b}.ln_2.bias": (d,), f"{b}.attn.qkv.kernel": (d, 3 * d),
                       f"{b}.attn.qkv.bias": (3 * d,), f"{b}.attn.proj.kernel": (d, d),
                       f"{b}.attn.proj.bias": (d,), f"{b}.mlp.fc.kernel": (d, f),
                       f"{b}.mlp.fc.bias": (f,), f"{b}.mlp.proj.kernel": (f, d),
                       f"{b}.mlp.proj.bias": (d,)})
    return shapes


def token_ids(values: np.ndarray, vocab_size: int) -> np.ndarray:
    """Integer ids in [0, vocab_size) derived from a case's seeded float draws."""
    return (np.abs(values) * 1000).astype(np.int64) % vocab_size


def gpt_tokens(case: Case, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and targets [B, S] derived from the case's seeded data (same on both sides);
    targets whose cotangent draw is below -1.5 are ignored (-100)."""
    v = GPT_CONFIG["vocab_size"]
    tokens = token_ids(data["inputs"]["x"], v)
    cot = data["cotangent"]["y"]
    targets = token_ids(cot, v)
    targets[cot < -1.5] = -100
    return tokens, targets


register(ModuleSpec(
    name="gpt", variants=("plain", "ring"), param_shapes=gpt_param_shapes,
    input_shape=lambda c: (c.batch, GPT_CONFIG["max_seq_len"]),
    output_shape=lambda c: (c.batch, GPT_CONFIG["max_seq_len"]),
    shapes=((4, 32, 32),),
    # ~20 s a case here: tp=4 keeps the default matrix under 10 minutes (every tp 1..8 passed
    # in a separate run; tests/parity/test_gpt_twins.py covers them).
    axis_sizes=(4,),
    # bf16 torch vs JAX through 2 blocks and the loss: gradients up to 1.9e-2 measured.
    tolerances={"bfloat16": 5e-2},
    # bf16 logits/gradients: atol 1.1e-2 needed at rtol 2e-2 (ring; full run of 2026-12-03).
    elementwise={"bfloat16": (5e-2, 2e-2)}))


# ------------------------------------------------------------------ circular pipeline (issue 17)
# The pipeline case with r = 2 repeats (jax_impl / torch_impl.pipeline_circular): 2p layers
# tanh(Dense(F)), layer k*p + d is row d of repeat k; m = p + 1 micro-batches (a returning
# micro-batch waits one step in device 0's buffer). Case ids contain "repeats2".
def _circular_shapes(c: Case) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for k in range(c.option("repeats")):
        stem = f"RepeatedStage_0.repeats_{k}.sharded.Dense_0"
        shapes[f"{stem}.kernel"] = (c.axis_size, c.in_features, c.in_features)
        shapes[f"{stem}.bias"] = (c.axis_size, c.in_features)
    return shapes


register(ModuleSpec(
    name="pipeline_circular", variants=("mlp",), param_shapes=_circular_shapes,
    input_shape=lambda c: (c.batch, c.in_features),
    output_shape=lambda c: (c.batch, c.in_features),
    shapes=((0, 16, 16),), axis_sizes=(2, 4),
    extras=lambda variant, n: [(("microbatches", n + 1), ("repeats", 2))],
    batch_for=lambda n, extra: (8 // n) * dict(extra)["microbatches"] * 2,
    tolerances={"bfloat16": 5e-2},
    # bf16 weight gradients reach |g| ~ 9 (bf16 spacing 0.0625 there): near-zero elements are
    # off by up to atol 0.043 (rtol 0.02) measured at n2, 0.030 at n4 (GPipe cases: up to 0.053).
    elementwise={"bfloat16": (0.1, 0.02)},
    all_reduce_bytes=False))  # the output all-reduce, as for "pipeline" above


# ------------------------------------------------------------------- 4-D-mesh GPT (issue 15)
# The GPT of jax_impl.model / torch_impl.model trained by examples/train_gpt.py, on a mesh
# (dp, fsdp, pp, tp) of 8 devices: axis_size = tp, options dp / fsdp / pp, variant "sync"
# (TPDense) or "async" (TPAsyncDense); FSDP on every module when fsdp > 1. Outputs the loss,
# gradients of every parameter in the mesh-independent reference layout. The default matrix
# holds one variant of five of issue 15's meshes, one with every axis but dp (1,2,2,2: FSDP
# gradients reduce-scattered on both backends); tests/parity/test_model_twins.py and
# bench/gpt_matrix.py run every mesh and variant. Micro-batches: 2 with a pipeline, 1 without
# (the torch model does not split the batch when pp == 1; JAX would, halving every message).
GPT4D_SIZES = dict(vocab_size=64, hidden_size=32, num_heads=8, num_layers=2, max_seq_len=16)
GPT4D_MESHES = {(1, 1, 1, 8): "async", (8, 1, 1, 1): "sync", (1, 1, 2, 4): "sync",
                (2, 1, 2, 2): "async", (1, 2, 2, 2): "async"}


def gpt4d_model_config(mesh: tuple[int, int, int, int], async_dense: bool, **sizes):
    """The ``ModelConfig`` of the GPT on ``mesh`` (dp, fsdp, pp, tp); ``sizes`` override
    :data:`GPT4D_SIZES`. FSDP shards every module (any size) whenever fsdp > 1."""
    from ringpar.configs import ParallelConfig
    from ringpar.gpt_model_config import gpt_model_config

    fsdp = (dict(fsdp_modules=["Embed", "Block", "Head"], fsdp_min_weight_size=0)
            if mesh[1] > 1 else {})
    par = ParallelConfig(data_axis_size=mesh[0], fsdp_axis_size=mesh[1],
                         pipeline_axis_size=mesh[2], model_axis_size=mesh[3],
                         tp_async_dense=async_dense, **fsdp)
    micro = {"num_microbatches": 2 if mesh[2] > 1 else 1}
    return gpt_model_config(par, **{**GPT4D_SIZES, **micro, **sizes})


def gpt4d_case_config(case: Case):
    """The ``ModelConfig`` of a "gpt4d" case."""
    mesh = (case.option("dp"), case.option("fsdp"), case.option("pp"), case.axis_size)
    return gpt4d_model_config(mesh, case.variant == "async")


def _gpt4d_shapes(case: Case) -> dict[str, tuple[int, ...]]:
    from ringpar.gpt_model_config import reference_shapes

    return reference_shapes(gpt4d_case_config(case).model_config)


def gpt4d_tokens(case: Case, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and next-token targets [B, S] from the case's seeded data."""
    v = GPT4D_SIZES["vocab_size"]
    return token_ids(data["inputs"]["x"], v), token_ids(data["cotangent"]["y"], v)


register(ModuleSpec(
    name="gpt4d", variants=("sync", "async"), param_shapes=_gpt4d_shapes,
    input_shape=lambda c: (c.batch, GPT4D_SIZES["max_seq_len"]),
    output_shape=lambda c: (c.batch, GPT4D_SIZES["max_seq_len"]),
    shapes=((16, 32, 32),), axis_sizes=tuple(sorted({m[3] for m in GPT4D_MESHES})),
    dtypes=("float32",),
    extras=lambda variant, n: [(("dp", m[0]), ("fsdp", m[1]), ("pp", m[2]))
                               for m, v in GPT4D_MESHES.items() if m[3] == n and v == variant],
    forward_signature=False,
    # Known difference: the same all-reduces (groups, order, count) but not the same bytes. The
    # partitioner sums the replicated parameters' gradients in other pieces than JAX's psums
    # (n8: 24576 B vs 27648 B over all 8), and the torch pipeline backward all-reduces its whole
    # output buffer over the stages (pp2: 20480 B vs 4676 B), as for "pipeline" above. Every
    # other collective is compared exactly (measured 2026-12-03).
    all_reduce_bytes=False))
