"""The torch_xla side of the parity harness: builds each case's module and runs forward + backward.

Twin of ``parity.jax_backend``; implements :class:`parity.backend.Backend`. Layers run in torch's
stacked view: a JAX global array ``[B, F]`` whose features are sharded over the model axis (per
device ``[B, F/n]``) is the tensor ``[n, B, F/n]`` here, dim 0 sharded. Parameters load from the case data by name: the
``state_dict`` keys are the JAX parameter paths joined by '.'.

Per case, :meth:`Program.result` compiles the forward alone for its HLO text (the graph is then
dropped, never executed), traces forward+backward once, compiles it for its HLO text, runs it
(``sync``; torch_xla's own graph cache shares that compile between cases with the same
program) and reads the results back shard by shard (``torch_impl.xla.local_shards``: a plain
``.cpu()`` of a sharded tensor compiles a gather program per tensor). The HLO texts of an
identical earlier program are reused (:func:`compiled_hlo_shared`).
"""

from __future__ import annotations

import numpy as np
import torch

from torch_impl import mesh as tmesh
from torch_impl import xla
from torch_impl.configs import ParallelConfig

from .backend import BackendResult
from .cases import Case

__all__ = ["prepare", "run", "build", "Program", "ADAPTERS", "to_stacked", "from_stacked",
           "to_numpy", "compiled_hlo_shared"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prepare() -> None:
    """Turn torch_xla SPMD mode on (before any XLA tensor exists; idempotent)."""
    tmesh.enable_spmd()


_TEXTS: dict = {}  # (graph hash, input shardings) -> compiled HLO text


def compiled_hlo_shared(tensors, inputs) -> str:
    """``tmesh.compiled_hlo(tensors)``, reusing the text of an identical earlier program.

    Compiling for the text is separate from torch_xla's compile-and-run (its own cache already
    shares that between cases). The key is torch_xla's graph hash plus the shardings of the
    graph's ``inputs`` (parameters and input tensors), so only the same program on the same
    layout shares a text.
    """
    key = (xla.graph_hash(tensors), tuple(xla.sharding_text(t) for t in inputs))
    if key not in _TEXTS:
        _TEXTS[key] = tmesh.compiled_hlo(tensors)
    return _TEXTS[key]


def to_numpy(tensors) -> list[np.ndarray]:
    """Executed XLA tensors as float32 NumPy (global view), read shard by shard.

    Sharded tensors are assembled from each device's shard on the host: ``.cpu()`` would compile
    and run a gather program per tensor (about 0.1-0.3 s each here).
    """
    out = []
    for t in tensors:
        t = t.detach()
        if t.device.type == "xla" and xla.has_sharding(t):
            full = np.empty(tuple(t.shape), np.float32)
            for _, index, data in xla.local_shards(t):
                full[index] = data.to(torch.float32).numpy()
            out.append(full)
        else:
            out.append(t.to(torch.float32).cpu().numpy() if t.device.type != "xla"
                       else t.cpu().to(torch.float32).numpy())
    return out


def to_stacked(x: np.ndarray, n: int) -> np.ndarray:
    """JAX global ``[B, F]`` (features sharded n ways) -> stacked view ``[n, B, F/n]``."""
    b, f = x.shape
    return np.ascontiguousarray(x.reshape(b, n, f // n).transpose(1, 0, 2))


def from_stacked(x: np.ndarray) -> np.ndarray:
    """Stacked view ``[n, B, F/n]`` -> JAX global ``[B, F]``."""
    n, b, f = x.shape
    return np.ascontiguousarray(x.transpose(1, 0, 2).reshape(b, n * f))


def _device_tensor(a: np.ndarray, dtype, mesh, axis_name: str | None, requires_grad=False):
    t = torch.tensor(a, dtype=dtype, device=tmesh.xla_device())
    if axis_name is not None:
        tmesh.mark_stacked(t, mesh, axis_name)
    return t.requires_grad_(requires_grad)


class Program:
    """A case's forward+backward on torch_xla, ready to run (also used by ``bench``)."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor, cot: torch.Tensor,
                 to_global=from_stacked):
        """``to_global`` maps the module's output / input-gradient layout to JAX's global one."""
        self.module, self.x, self.cot, self.to_global = module, x, cot, to_global
        self._hlo_text: str | None = None
        self._fwd_hlo_text: str | None = None

    def _forward_backward(self):
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        y = self.module(self.x)
        (y * self.cot).sum().backward()
        return y

    def _tensors(self, y):
        params = [p for _, p in self.module.named_parameters()]
        return [y, self.x.grad] + [p.grad for p in params if p.grad is not None]

    @property
    def hlo_text(self) -> str:
        """HLO text of the compiled (partitioned) forward+backward program."""
        if self._hlo_text is None:
            self._traced_fwd_bwd()
            tmesh.sync()
        return self._hlo_text

    @property
    def fwd_hlo_text(self) -> str:
        """HLO text of the compiled (partitioned) forward program alone (never executed)."""
        if self._fwd_hlo_text is None:
            with torch.no_grad():
                y = self.module(self.x)
            self._fwd_hlo_text = compiled_hlo_shared([y], self._inputs())
            del y  # drop the pending forward graph: only its text is wanted
        return self._fwd_hlo_text

    def _traced_fwd_bwd(self) -> list:
        """Trace forward+backward (pending, not executed) and its HLO text (compiled once)."""
        tensors = self._tensors(self._forward_backward())
        if self._hlo_text is None:
            self._hlo_text = compiled_hlo_shared(tensors, self._inputs())
        return tensors

    def _inputs(self) -> list:
        return [self.x, self.cot] + [p for _, p in self.module.named_parameters()]

    def step(self):
        """Run forward+backward once and wait for the devices."""
        y = self._forward_backward()
        tmesh.sync(wait=True)
        return y

    def result(self) -> BackendResult:
        """Run once and return outputs and gradients (JAX layout) as float32 NumPy."""
        fwd_hlo_text = self.fwd_hlo_text
        tensors = self._traced_fwd_bwd()
        tmesh.sync(wait=True)
        names = [k for k, p in self.module.named_parameters() if p.grad is not None]
        y, gx, *gp = to_numpy(tensors)
        grads = dict(zip(names, gp))
        grads["x"] = self.to_global(gx)
        return BackendResult(outputs={"y": self.to_global(y)}, grads=grads,
                             hlo_text=self._hlo_text, fwd_hlo_text=fwd_hlo_text)


def _load(module: torch.nn.Module, params: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(v) for k, v in params.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"case weights do not match the torch module: missing {missing}, "
                         f"unexpected {unexpected}")


# ------------------------------------------------------------------------------ TP adapters
def _tp(case: Case, data: dict) -> Program:
    from torch_impl.tensor_parallel import TPAsyncDense, TPDense

    n = case.axis_size
    mesh = tmesh.create_mesh(ParallelConfig(model_axis_size=n))
    dtype = _DTYPES[case.dtype]
    mode, _, direction = case.variant.partition("-")
    dense_out = case.out_features if (case.module == "tpdense" and mode == "scatter") or n == 1 \
        else case.out_features // n
    if case.module == "tpdense":
        module = TPDense(case.in_features // n, dense_out, "tp", tp_mode=mode, mesh=mesh,
                         seed=0, dtype=dtype)
    else:
        module = TPAsyncDense(case.in_features // n, dense_out, "tp", tp_mode=mode,
                              use_bidirectional_gather=direction == "bi",
                              use_bidirectional_scatter=direction == "split",
                              mesh=mesh, seed=0, dtype=dtype)
    _load(module, data["params"])
    x = _device_tensor(to_stacked(data["inputs"]["x"], n), dtype, mesh, "tp", requires_grad=True)
    cot = _device_tensor(to_stacked(data["cotangent"]["y"], n), dtype, mesh, "tp")
    return Program(module, x, cot)


# -------------------------------------------------------------------------- linear adapter
def _linear(case: Case, data: dict) -> Program:
    from torch_impl.linear import ColumnParallelLinear, RowParallelLinear, TensorParallelConfig

    from .cases import LINEAR_METHODS

    direction, _, method = case.variant.partition("-")
    mesh = tmesh.create_mesh(ParallelConfig(model_axis_size=case.axis_size))
    cfg = TensorParallelConfig(mesh=mesh, axis_name="tp", matmul_method=LINEAR_METHODS[method],
                               reduce_scatter_output=bool(case.option("rso")))
    cls = ColumnParallelLinear if direction == "column" else RowParallelLinear
    dtype = _DTYPES[case.dtype]
    layer = cls(case.in_features, case.out_features, dtype=dtype, param_dtype=dtype,
                parallel_config=cfg)
    _load(layer, data["params"])
    x = _device_tensor(data["inputs"]["x"], dtype, mesh, None, requires_grad=True)
    cot = _device_tensor(data["cotangent"]["y"], dtype, mesh, None)
    if case.option("rso"):  # the cotangent is laid out like the output: features sharded
        tmesh.mark_sharding(cot, mesh, (None, "tp"))
    return Program(layer, x, cot, to_global=lambda a: a)


# ------------------------------------------------------------------------ pipeline adapter
class PipelineStage(torch.nn.Module):
    """The parity pipeline stage: tanh(Dense(features)) (twin: jax_backend.PipelineStage)."""

    def __init__(self, features: int):
        super().__init__()
        from torch_impl.tensor_parallel import Dense

        self.Dense_0 = Dense(features, features)

    def forward(self, x):
        return torch.tanh(self.Dense_0(x))


def _pipeline_program(model: torch.nn.Module, data: dict, mesh, dtype) -> Program:
    """The program of a pipeline case (GPipe or circular): ``model`` loaded with the case's
    parameters in ``dtype`` and its stages sharded; input and cotangent split over the data axes."""
    model.load_state_dict({k: torch.from_numpy(v) for k, v in data["params"].items()})
    model.to(dtype)
    model.stage.shard_()
    batch = ("dp", "fsdp")
    x = torch.tensor(data["inputs"]["x"], dtype=dtype, device=tmesh.xla_device())
    tmesh.mark_sharding(x, mesh, (batch, None))
    cot = torch.tensor(data["cotangent"]["y"], dtype=dtype, device=tmesh.xla_device())
    tmesh.mark_sharding(cot, mesh, (batch, None))
    return Program(model, x.requires_grad_(True), cot, to_global=lambda a: a)


def _pipeline(case: Case, data: dict) -> Program:
    import functools

    from torch_impl.pipeline_parallel import PipelineModule

    p = case.axis_size
    mesh = tmesh.create_mesh(ParallelConfig(pipeline_axis_size=p))
    dtype = _DTYPES[case.dtype]
    model = PipelineModule("pp", case.option("microbatches"),
                           functools.partial(PipelineStage, case.in_features), mesh=mesh)
    return _pipeline_program(model, data, mesh, dtype)


# ----------------------------------------------------------------------------- GPT adapter
class GPTProgram:
    """The GPT case's loss + gradients program (twin: jax_backend.GPTProgram)."""

    def __init__(self, model, tokens, targets):
        from torch_impl.gpt import loss_and_grads

        self.model, self.tokens, self.targets = model, tokens, targets
        self._loss_and_grads = loss_and_grads
        self._hlo_text: str | None = None
        self._fwd_hlo_text: str | None = None
        self._first = None

    @property
    def hlo_text(self) -> str:
        """HLO text of the compiled forward+backward (compiled and run once; run kept)."""
        if self._hlo_text is None:
            *self._first, self._hlo_text = self._loss_and_grads(
                self.model, self.tokens, self.targets, hlo=True)
        return self._hlo_text

    @property
    def fwd_hlo_text(self) -> str:
        """HLO text of the compiled forward alone (never executed)."""
        if self._fwd_hlo_text is None:
            tokens = torch.as_tensor(self.tokens, dtype=torch.int64).to(tmesh.xla_device())
            with torch.no_grad():
                logits = self.model(tokens)
            self._fwd_hlo_text = compiled_hlo_shared([logits], list(self.model.parameters()))
            del logits  # drop the pending forward graph: only its text is wanted
        return self._fwd_hlo_text

    def step(self):
        """Run forward+backward once and wait for the devices."""
        out = self._loss_and_grads(self.model, self.tokens, self.targets)
        tmesh.sync(wait=True)
        return out

    def result(self) -> BackendResult:
        """Loss, logits and parameter gradients as float32 NumPy (of the compiling run)."""
        fwd_hlo_text, hlo_text = self.fwd_hlo_text, self.hlo_text
        loss, logits, grads = self._first
        tmesh.sync(wait=True)
        loss, logits, *values = to_numpy([loss, logits, *grads.values()])
        return BackendResult(outputs={"loss": loss, "logits": logits},
                             grads=dict(zip(grads, values)),
                             hlo_text=hlo_text, fwd_hlo_text=fwd_hlo_text)


def _gpt(case: Case, data: dict) -> GPTProgram:
    from torch_impl.gpt import GPT, GPTConfig, load_params

    from .cases import GPT_CONFIG, gpt_tokens

    mesh = tmesh.create_mesh(ParallelConfig(model_axis_size=case.axis_size))
    model = GPT(GPTConfig(**GPT_CONFIG, tp_mode=case.variant), mesh=mesh,
                param_dtype=_DTYPES[case.dtype], seed=0)
    load_params(model, data["params"])
    return GPTProgram(model, *gpt_tokens(case, data))


ADAPTERS = {"tpdense": _tp, "tpasync": _tp, "linear": _linear, "pipeline": _pipeline,
            "gpt": _gpt}


def build(case: Case, data: dict) -> Program:
    """Build ``case``'s forward+backward program on torch_xla with the weights in ``data``."""
    if case.module not in ADAPTERS:
        raise ValueError(f"case.module={case.module!r}: no torch adapter (have {sorted(ADAPTERS)})")
    tmesh.require_spmd()
    return ADAPTERS[case.module](case, data)


def run(case: Case, data: dict) -> BackendResult:
    """Run ``case`` on torch_xla once: outputs, gradients and the compiled HLO text."""
    return build(case, data).result()


# ------------------------------------------------------------------ circular pipeline (issue 17)
def _pipeline_circular(case: Case, data: dict) -> Program:
    import functools

    from torch_impl.pipeline_circular import CircularPipelineModule

    mesh = tmesh.create_mesh(ParallelConfig(pipeline_axis_size=case.axis_size))
    dtype = _DTYPES[case.dtype]
    model = CircularPipelineModule("pp", case.option("microbatches"),
                                   functools.partial(PipelineStage, case.in_features), mesh=mesh,
                                   num_pipeline_repeats=case.option("repeats"))
    return _pipeline_program(model, data, mesh, dtype)


ADAPTERS["pipeline_circular"] = _pipeline_circular


# ------------------------------------------------------------------- 4-D-mesh GPT (issue 15)
class GPT4DProgram:
    """The "gpt4d" case: the training step's loss + gradients (twin: jax_backend's)."""

    def __init__(self, case: Case, data: dict):
        from torch_impl.model import build_gpt

        from .cases import gpt4d_case_config, gpt4d_tokens

        self.model = build_gpt(gpt4d_case_config(case))
        self.params = self.model.from_reference(data["params"])
        self.batch = gpt4d_tokens(case, data)
        self.hlo_text = self.model.compiled_text(self.params, *self.batch)
        self.fwd_hlo_text = ""  # one program: forward and backward (ModuleSpec)

    def step(self):
        """Run the loss + gradients once and wait for the devices."""
        out = self.model.loss_and_grads(self.params, *self.batch)
        tmesh.sync(wait=True)
        return out

    def result(self) -> BackendResult:
        """Loss and reference-layout gradients as float32 NumPy."""
        loss, grads = self.step()
        return BackendResult(outputs={"loss": to_numpy([loss])[0]},
                             grads=self.model.to_reference(grads), hlo_text=self.hlo_text)


ADAPTERS["gpt4d"] = GPT4DProgram
