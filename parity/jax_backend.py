"""The JAX side of the parity harness: builds each case's module and runs forward + backward.

Twin of ``parity.torch_backend``; implements :class:`parity.backend.Backend`. ``run(case, data)``
returns a ``BackendResult`` with the global output, the gradients of ``sum(y * cotangent)`` w.r.t.
the input (``x``) and every parameter (flat paths joined by '.'), and the HLO text of the compiled
forward+backward program and of the forward alone.

Each program is compiled once per case and the compiled executable gives both the HLO text and
the run. Cases whose lowered programs are identical (e.g. several variants at tp=1) share one
compile (:func:`compile_shared`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jax_impl.configs import ParallelConfig
from jax_impl.mesh import create_mesh

from .backend import BackendResult
from .cases import Case

__all__ = ["prepare", "run", "build", "Program", "ADAPTERS", "compile_shared", "to_numpy"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_COMPILED: dict = {}  # (lowered module text, argument tree) -> compiled executable


def prepare() -> None:
    """Nothing to set up: JAX reads the device environment at its first use."""


def compile_shared(fn, *args):
    """``jax.jit(fn).lower(*args).compile()``, reusing the executable of an identical program.

    Lowering is cheap next to XLA's compile; two cases whose lowered modules (and argument
    trees) are equal run the same program, so the second one reuses the first's executable.
    """
    lowered = jax.jit(fn).lower(*args)
    key = (lowered.as_text(), str(jax.tree.structure(args)))
    if key not in _COMPILED:
        _COMPILED[key] = lowered.compile()
    return _COMPILED[key]


def _flat(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) or hasattr(v, "items") and not isinstance(v, nn.Partitioned):
            out.update(_flat(v, path))
        else:
            out[path] = v
    return out


def _fill(abstract, flat: dict, dtype, prefix=""):
    """The boxed parameter tree ``abstract`` with values taken from ``flat`` (checked shapes)."""
    out = {}
    for k, v in abstract.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, nn.Partitioned):
            value = _take(flat, path, v.value.shape, dtype)
            out[k] = v.replace_boxed(value)
        elif hasattr(v, "items"):
            out[k] = _fill(v, flat, dtype, path)
        else:
            out[k] = _take(flat, path, v.shape, dtype)
    return out


def _take(flat, path, shape, dtype):
    if path not in flat:
        raise ValueError(f"parameter {path!r} of the JAX module is not in the case data "
                         f"(have {sorted(flat)})")
    if tuple(flat[path].shape) != tuple(shape):
        raise ValueError(f"parameter {path!r}: case data shape {flat[path].shape} != JAX shape "
                         f"{tuple(shape)}")
    return jnp.asarray(flat[path], dtype=dtype)


def to_numpy(a) -> np.ndarray:
    """A (global) jax array as float32 NumPy.

    Under ``jax.distributed`` (``python -m parity --processes N``) an array may span devices of
    other processes; its shards are then gathered with ``process_allgather``, a collective that
    every process must call in the same order (they all run the same cases).
    """
    a = jnp.asarray(a, jnp.float32)
    if not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)


def _unbox(tree):
    return jax.tree.map(lambda v: v.value if isinstance(v, nn.Partitioned) else v, tree,
                        is_leaf=lambda v: isinstance(v, nn.Partitioned))


def build_shard_mapped(module: nn.Module, mesh, case: Case, data: dict, x_spec, y_spec,
                       post=None):
    """Init-shape and fill ``module``'s params; compile forward + vjp under shard_map."""
    dtype = _DTYPES[case.dtype]
    x = jnp.asarray(data["inputs"]["x"], dtype=dtype)
    cot = jnp.asarray(data["cotangent"]["y"], dtype=dtype)

    def init(rng, xl):
        return module.init(rng, xl)["params"]

    # Per-device boxed tree (out_specs=P() keeps local shapes; Partitioned leaves carry names).
    abstract_local = jax.eval_shape(
        jax.shard_map(init, mesh=mesh, in_specs=(P(), x_spec), out_specs=P(), check_vma=False),
        jax.random.key(0), x)
    specs = nn.get_partition_spec(abstract_local)
    params = _fill(_globalize(abstract_local, mesh), data["params"], dtype)  # stays boxed

    def forward(p, xg):
        def body(pl, xl):
            y = module.apply({"params": pl}, xl)
            return post(y) if post is not None else y

        return jax.shard_map(body, mesh=mesh,
                             in_specs=(specs, x_spec), out_specs=y_spec, check_vma=True)(p, xg)

    def fwd_bwd(p, xg, ct):
        y, vjp = jax.vjp(forward, p, xg)
        gp, gx = vjp(ct)
        return y, gp, gx

    compiled = compile_shared(fwd_bwd, params, x, cot)
    fwd_text = compile_shared(forward, params, x).as_text()
    return Program(lambda: compiled(params, x, cot), compiled.as_text(), fwd_text, compiled)


class Program:
    """A compiled forward+backward program of a case, ready to run (also used by ``bench``)."""

    def __init__(self, step, hlo_text: str, fwd_hlo_text: str, compiled=None):
        self._step = step
        self.hlo_text = hlo_text
        self.fwd_hlo_text = fwd_hlo_text
        self.compiled = compiled

    def step(self):
        """Run forward+backward once and wait for the result."""
        return jax.block_until_ready(self._step())

    def result(self) -> BackendResult:
        """Run once and return outputs and gradients as float32 NumPy."""
        y, gp, gx = self.step()
        to_np = to_numpy
        grads = {k: to_np(v) for k, v in _flat(_unbox(gp)).items()}
        grads["x"] = to_np(gx)
        return BackendResult(outputs={"y": to_np(y)}, grads=grads, hlo_text=self.hlo_text,
                             fwd_hlo_text=self.fwd_hlo_text)


def _globalize(tree, mesh):
    """Abstract per-device boxed tree -> global shapes (Partitioned dims times their axis size)."""
    def glob(v):
        if isinstance(v, nn.Partitioned):
            shape = tuple(d * (mesh.shape[a] if a is not None else 1)
                          for d, a in zip(v.value.shape, v.names))
            return v.replace_boxed(jax.ShapeDtypeStruct(shape, v.value.dtype))
        return v
    return jax.tree.map(glob, tree, is_leaf=lambda v: isinstance(v, nn.Partitioned))


# ------------------------------------------------------------------------------ TP adapters
def _tp(case: Case, data: dict) -> "Program":
    from jax_impl.tensor_parallel import TPAsyncDense, TPDense

    n = case.axis_size
    mesh = create_mesh(ParallelConfig(model_axis_size=n))
    mode, _, direction = case.variant.partition("-")
    dense_out = case.out_features if (case.module == "tpdense" and mode == "scatter") or n == 1 \
        else case.out_features // n
    dense_fn = functools.partial(nn.Dense, features=dense_out)
    if case.module == "tpdense":
        module = TPDense(dense_fn=dense_fn, model_axis_name="tp", tp_mode=mode)
    else:
        module = TPAsyncDense(dense_fn=dense_fn, model_axis_name="tp", tp_mode=mode,
                              use_bidirectional_gather=direction == "bi",
                              use_bidirectional_scatter=direction == "split")
    return build_shard_mapped(module, mesh, case, data, P(None, "tp"), P(None, "tp"))


# -------------------------------------------------------------------------- linear adapter
def _linear(case: Case, data: dict) -> Program:
    from flax import nnx

    from jax_impl.linear import ColumnParallelLinear, RowParallelLinear, TensorParallelConfig

    from .cases import LINEAR_METHODS

    direction, _, method = case.variant.partition("-")
    mesh = create_mesh(ParallelConfig(model_axis_size=case.axis_size))
    cfg = TensorParallelConfig(mesh=mesh, axis_name="tp", matmul_method=LINEAR_METHODS[method],
                               reduce_scatter_output=bool(case.option("rso")))
    cls = ColumnParallelLinear if direction == "column" else RowParallelLinear
    dtype = _DTYPES[case.dtype]
    layer = cls(case.in_features, case.out_features, dtype=dtype, param_dtype=dtype,
                parallel_config=cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    for name in ("kernel", "bias"):
        value = jnp.asarray(data["params"][name], dtype=dtype)
        state[name].value = jax.device_put(value, state[name].value.sharding)
    x = jnp.asarray(data["inputs"]["x"], dtype=dtype)
    cot = jnp.asarray(data["cotangent"]["y"], dtype=dtype)

    def forward(st, xg):
        return nnx.merge(graphdef, st)(xg)

    def fwd_bwd(st, xg, ct):
        y, vjp = jax.vjp(forward, st, xg)
        gs, gx = vjp(ct)
        return y, {k: gs[k].value for k in ("kernel", "bias")}, gx

    compiled = compile_shared(fwd_bwd, state, x, cot)
    fwd_text = compile_shared(forward, state, x).as_text()
    return Program(lambda: compiled(state, x, cot), compiled.as_text(), fwd_text, compiled)


# ------------------------------------------------------------------------ pipeline adapter
class PipelineStage(nn.Module):
    """The parity pipeline stage: tanh(Dense(features)) (twin: torch_backend.PipelineStage)."""

    features: int

    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(self.features, dtype=x.dtype, param_dtype=x.dtype)(x))


def _pipeline(case: Case, data: dict) -> Program:
    from jax_impl.pipeline_parallel import PipelineModule
    from jax_impl.tensor_parallel import ModelParallelismWrapper

    p = case.axis_size
    mesh = create_mesh(ParallelConfig(pipeline_axis_size=p))
    stage = functools.partial(ModelParallelismWrapper, model_axis_name="pp",
                              module_fn=functools.partial(PipelineStage, features=case.in_features))
    model = PipelineModule(model_axis_name="pp", num_microbatches=case.option("microbatches"),
                           module_fn=stage)

    batch = P(("dp", "fsdp"))
    # The output lives on the last stage only (zeros elsewhere): psum over the stages.
    return build_shard_mapped(model, mesh, case, data, batch, batch,
                              post=lambda y: jax.lax.psum(y, "pp"))


# ----------------------------------------------------------------------------- GPT adapter
class GPTProgram:
    """The GPT case's loss + gradients program (twin: torch_backend.GPTProgram)."""

    def __init__(self, model, tokens, targets):
        from jax_impl.gpt import forward_hlo, loss_and_grads

        self.model, self.tokens, self.targets = model, tokens, targets
        self._loss_and_grads = loss_and_grads
        # The compiling call's outputs are the result: no second compile (loss_and_grads jits
        # afresh per call).
        *self._first, self.hlo_text = loss_and_grads(model, tokens, targets, hlo=True)
        self.fwd_hlo_text = forward_hlo(model, tokens)

    def step(self):
        """Run forward+backward once and wait for the result."""
        return jax.block_until_ready(self._loss_and_grads(self.model, self.tokens, self.targets))

    def result(self) -> BackendResult:
        """Loss, logits and parameter gradients as float32 NumPy (of the compiling run)."""
        loss, logits, grads = jax.block_until_ready(self._first)
        to_np = to_numpy
        return BackendResult(outputs={"loss": to_np(loss), "logits": to_np(logits)},
                             grads={k: to_np(v) for k, v in grads.items()},
                             hlo_text=self.hlo_text, fwd_hlo_text=self.fwd_hlo_text)


def _gpt(case: Case, data: dict) -> GPTProgram:
    from flax import nnx

    from jax_impl.gpt import GPT, GPTConfig, load_params

    from .cases import GPT_CONFIG, gpt_tokens

    mesh = create_mesh(ParallelConfig(model_axis_size=case.axis_size))
    model = GPT(GPTConfig(**GPT_CONFIG, tp_mode=case.variant), mesh=mesh,
                param_dtype=_DTYPES[case.dtype], rngs=nnx.Rngs(0))
    load_params(model, data["params"])
    return GPTProgram(model, *gpt_tokens(case, data))


ADAPTERS = {"tpdense": _tp, "tpasync": _tp, "linear": _linear, "pipeline": _pipeline,
            "gpt": _gpt}


def build(case: Case, data: dict) -> Program:
    """Compile ``case``'s forward+backward program on JAX with the weights and input in ``data``."""
    if case.module not in ADAPTERS:
        raise ValueError(f"case.module={case.module!r}: no JAX adapter (have {sorted(ADAPTERS)})")
    return ADAPTERS[case.module](case, data)


def run(case: Case, data: dict) -> BackendResult:
    """Run ``case`` on JAX once: outputs, gradients and the compiled HLO text."""
    return build(case, data).result()


# ------------------------------------------------------------------ circular pipeline (issue 17)
def _pipeline_circular(case: Case, data: dict) -> Program:
    from jax_impl.pipeline_circular import CircularPipelineModule
    from jax_impl.tensor_parallel import ModelParallelismWrapper

    mesh = create_mesh(ParallelConfig(pipeline_axis_size=case.axis_size))
    stage = functools.partial(ModelParallelismWrapper, model_axis_name="pp",
                              module_fn=functools.partial(PipelineStage, features=case.in_features))
    model = CircularPipelineModule(model_axis_name="pp",
                                   num_microbatches=case.option("microbatches"),
                                   num_pipeline_repeats=case.option("repeats"), module_fn=stage)
    batch = P(("dp", "fsdp"))
    return build_shard_mapped(model, mesh, case, data, batch, batch,
                              post=lambda y: jax.lax.psum(y, "pp"))


ADAPTERS["pipeline_circular"] = _pipeline_circular


# ------------------------------------------------------------------- 4-D-mesh GPT (issue 15)
class GPT4DProgram:
    """The "gpt4d" case: the training step's loss + gradients (twin: torch_backend's)."""

    def __init__(self, case: Case, data: dict):
        from jax_impl.model import build_gpt

        from .cases import gpt4d_case_config, gpt4d_tokens

        self.model = build_gpt(gpt4d_case_config(case))
        self.params = self.model.from_reference(data["params"])
        self.batch = gpt4d_tokens(case, data)
        self.hlo_text = self.model.compiled_text(self.params, *self.batch)
        self.fwd_hlo_text = ""  # one program: forward and backward (ModuleSpec)

    def step(self):
        """Run the loss + gradients once and wait for the result."""
        return jax.block_until_ready(self.model.loss_and_grads(self.params, *self.batch))

    def result(self) -> BackendResult:
        """Loss and reference-layout gradients as float32 NumPy."""
        loss, grads = self.step()
        grads = {k: to_numpy(v) for k, v in grads.items()}  # gathered across processes
        return BackendResult(outputs={"loss": to_numpy(loss)},
                             grads=self.model.to_reference(grads), hlo_text=self.hlo_text)


ADAPTERS["gpt4d"] = GPT4DProgram
