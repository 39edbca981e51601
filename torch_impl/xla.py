"""The one boundary between ringpar's torch backend and torch_xla.

Every torch_xla call of :mod:`torch_impl` goes through this module: SPMD mode, the device
handle, the mesh class, sharding annotations (plain, traceable and manual), the two SPMD
collectives the partitioner will not emit on its own (all-reduce and reduce-scatter inside a
manual-sharding region), ``scan``, ``sync`` and the compiled HLO. A source-scan test
(``tests/test_xla_boundary.py``) fails if any other ``torch_impl`` file imports torch_xla.

Why one file: torch_xla is in maintenance (no release after 2.9) and several of these calls
reach private APIs (``torch_xla._XLAC``). Moving the torch backend to another SPMD runtime
means rewriting this file and nothing else. See ``docs/design.md`` ("Rooms").

torch_xla is imported lazily (inside each function), so ``import torch_impl`` stays cheap and
works on a machine where only the pure-torch parts are used.

Example::

    from torch_impl import xla
    xla.enable_spmd()
    mesh = xla.make_mesh(range(xla.device_count()), (1, 1, 1, 8), ("dp", "fsdp", "pp", "tp"))
    w = xla.mark_sharding(torch.zeros(8, 4, device=xla.device()), mesh, ("tp", None))
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["is_spmd", "enable_spmd", "device", "device_count", "Mesh", "is_mesh", "make_mesh",
           "get_global_mesh", "set_global_mesh", "mark_sharding", "mark_sharding_with_gradients",
           "aot_mark_sharding", "sharding_text", "has_sharding", "local_shards",
           "enable_manual_sharding", "disable_manual_sharding", "spmd_all_reduce", "spmd_reduce_scatter", "manual_reduce_scatter_op", "checkpoint",
           "clear_sharding", "scan", "sync", "compile_count",
           "wait_device_ops", "compiled_hlo", "graph_hash", "capture_graph", "data_handle",
           "tensor_id", "run_graph",
           "REDUCE_SUM"]

REDUCE_SUM = "sum"  # torch_xla's reduce-type string (``xm.REDUCE_SUM``)


# --------------------------------------------------------------------------------- lazy imports
def _torch_xla():
    import torch_xla

    return torch_xla


def _xs():
    import torch_xla.distributed.spmd as xs

    return xs


def _xr():
    import torch_xla.runtime as xr

    return xr


def __getattr__(name: str):
    # ``xla.Mesh`` is torch_xla's mesh class, resolved on first use (module __getattr__, PEP 562)
    # so that importing this module does not import torch_xla.
    if name == "Mesh":
        return _xs().Mesh
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------ runtime / device
def is_spmd() -> bool:
    """True when torch_xla SPMD mode is on."""
    return bool(_xr().is_spmd())


def enable_spmd() -> None:
    """Turn torch_xla SPMD mode on (idempotent); must run before any XLA tensor is created."""
    if not is_spmd():
        _xr().use_spmd()


def device() -> torch.device:
    """The SPMD virtual device that global-view tensors live on."""
    return _torch_xla().device()


def device_count() -> int:
    """Number of devices in the SPMD program (every device: torch_xla meshes cover all)."""
    return int(_xr().global_runtime_device_count())


# ----------------------------------------------------------------------------------------- mesh
def is_mesh(obj: Any) -> bool:
    """True if ``obj`` is a torch_xla SPMD mesh."""
    return isinstance(obj, _xs().Mesh)


def make_mesh(device_ids: Sequence[int], shape: Sequence[int], axis_names: Sequence[str]):
    """A torch_xla mesh over ``device_ids`` (row-major over ``shape``) with ``axis_names``."""
    return _xs().Mesh(np.asarray(list(device_ids)), tuple(shape), tuple(axis_names))


def get_global_mesh():
    """torch_xla's process-global mesh (set with :func:`set_global_mesh`), or None."""
    return _xs().get_global_mesh()


def set_global_mesh(mesh) -> None:
    """Make ``mesh`` torch_xla's process-global mesh."""
    _xs().set_global_mesh(mesh)


# ------------------------------------------------------------------------------------ shardings
def mark_sharding(tensor: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """Annotate ``tensor`` in place (on its device data) with ``spec`` over ``mesh``; returns it.

    Not traceable: inside ``scan`` use :func:`mark_sharding_with_gradients`.

    Calls torch_xla's annotation directly: ``xs.mark_sharding`` first imports torchax (and with
    it JAX, Flax and Orbax) to check for a torchax tensor, which cost 3.5 s on the first call in
    a process here, most of a small layer's first step (issue 14). ringpar never passes a
    torchax tensor, so the check is skipped; the annotation is the same call.
    """
    _torch_xla()._XLAC._xla_mark_sharding(tensor, mesh.get_op_sharding(tuple(spec)))
    return tensor


def mark_sharding_with_gradients(tensor: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """Sharding constraint on ``tensor`` and on its gradient; traceable (usable inside scan)."""
    return _ConstrainWithGradient.apply(tensor, mesh, tuple(spec))


def aot_mark_sharding(tensor: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """Sharding constraint without autograd, traceable (for custom autograd functions)."""
    return _sharded_copy(tensor, str(mesh), str(tuple(spec)))


# torch_xla's own traceable constraint (``xs.mark_sharding_with_gradients`` and the
# ``xla::aot_mark_sharding`` op) goes through ``xs.mark_sharding`` and so imports torchax + JAX on
# first use (see :func:`mark_sharding`). These are the same two steps, a copy then the
# annotation, as an opaque custom op: AOTAutograd (scan, custom Functions) traces it through its
# fake rule and XLA sees the same annotated copy.
@torch.library.custom_op("ringpar::sharded_copy", mutates_args=())
def _sharded_copy(tensor: torch.Tensor, mesh: str, spec: str) -> torch.Tensor:
    import ast

    out = tensor.clone()
    mark_sharding(out, _xs().Mesh.from_str(mesh), ast.literal_eval(spec))
    return out


@_sharded_copy.register_fake
def _sharded_copy_fake(tensor: torch.Tensor, mesh: str, spec: str) -> torch.Tensor:
    return torch.empty_like(tensor)


class _ConstrainWithGradient(torch.autograd.Function):
    """The value and its gradient each get the sharding ``spec``."""

    @staticmethod
    def forward(ctx, tensor, mesh, spec):
        ctx.mesh_spec = (str(mesh), str(spec))
        return _sharded_copy(tensor, *ctx.mesh_spec)

    @staticmethod
    def backward(ctx, grad):
        return _sharded_copy(grad, *ctx.mesh_spec), None, None


def sharding_text(tensor: torch.Tensor) -> str:
    """torch_xla's sharding string of ``tensor`` (e.g. ``{devices=[4,1]0,1,2,3}``); '' if none."""
    return _torch_xla()._XLAC._get_xla_sharding_spec(tensor)


def has_sharding(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` carries a sharding annotation (e.g. after :func:`mark_sharding`)."""
    return bool(sharding_text(tensor))


def local_shards(tensor: torch.Tensor) -> list[tuple[int, tuple, torch.Tensor]]:
    """What each device really holds: ``(device id, index into the global tensor, CPU data)``.

    Reads the placed shards back from the devices (used by tests to check a placement, not only
    the annotation). One entry per device, in device order.
    """
    full = (slice(None),) * tensor.dim()
    out = []
    for s in _xs().wrap_if_sharded(tensor).local_shards:
        index = full if s.indices is Ellipsis else tuple(s.indices)  # Ellipsis: replicated
        out.append((int(str(s.shard_device).rsplit(":", 1)[-1]), index, s.data.cpu()))
    return sorted(out, key=lambda e: e[0])


def clear_sharding(tensor: torch.Tensor) -> torch.Tensor:
    """Drop ``tensor``'s sharding annotation in place (values kept), so it can be re-annotated:
    :func:`mark_sharding` refuses a tensor that already has one."""
    _torch_xla()._XLAC._xla_clear_sharding(tensor)
    return tensor


def enable_manual_sharding(tensor: torch.Tensor, mesh, spec: Sequence) -> torch.Tensor:
    """Enter a manual-sharding region: the returned tensor is one device's shard of ``tensor``."""
    mark_sharding(tensor, mesh, spec)  # as xs.enable_manual_sharding, minus its torchax import
    return _torch_xla()._XLAC._spmd_full_to_shard_shape(tensor)


def disable_manual_sharding(local: torch.Tensor, mesh, spec: Sequence,
                            full_shape: Sequence[int]) -> torch.Tensor:
    """Leave a manual-sharding region: shards ``local`` -> global tensor of ``full_shape``."""
    return _xs().disable_manual_sharding(local, tuple(spec), tuple(full_shape),
                                         mesh=mesh).global_tensor


# ----------------------------------------------------------------------------------- collectives
def spmd_all_reduce(local: torch.Tensor, groups: list[list[int]], scale: float = 1.0,
                    reduce_type: str = REDUCE_SUM) -> torch.Tensor:
    """One ``all-reduce`` of the per-device ``local`` over ``groups`` (inside manual sharding)."""
    return _torch_xla()._XLAC._xla_spmd_all_reduce(reduce_type, local, float(scale), groups)


def spmd_reduce_scatter(local: torch.Tensor, dim: int, groups: list[list[int]],
                        scale: float = 1.0, reduce_type: str = REDUCE_SUM) -> torch.Tensor:
    """One ``reduce-scatter`` of ``local`` along ``dim`` over ``groups`` (inside manual sharding).

    Each group of size n sums its members' ``local`` and keeps block j of ``dim`` on member j.
    """
    n = len(groups[0])
    return _torch_xla()._XLAC._xla_spmd_reduce_scatter(reduce_type, local, float(scale), dim, n,
                                                        groups)


_RS_OP = None


def manual_reduce_scatter_op(tensor: torch.Tensor, mesh, spec: Sequence, dim: int,
                             groups: list[list[int]]) -> torch.Tensor:
    """Enter manual sharding with ``spec``, one ``reduce-scatter`` of ``dim`` over ``groups``,
    leave it (the result has ``dim`` divided by the group size, sharded by ``spec``).

    A custom op with a shape-only fake implementation, so that it can be traced inside ``scan``
    (whose body AOTAutograd traces with fake tensors); used by ``torch_impl.vmap_axes``."""
    global _RS_OP
    if _RS_OP is None:
        _RS_OP = _define_reduce_scatter_op()
    flat = [d for g in groups for d in g]
    return _RS_OP(tensor, str(mesh), str(tuple(spec)), int(dim), flat, len(groups[0]))


def _define_reduce_scatter_op():
    @torch.library.custom_op("ringpar::manual_reduce_scatter", mutates_args=())
    def op(t: torch.Tensor, mesh: str, spec: str, dim: int, groups: list[int],
           size: int) -> torch.Tensor:
        import ast

        m, sp = _xs().Mesh.from_str(mesh), ast.literal_eval(spec)
        local = enable_manual_sharding(t.clone(), m, sp)
        local = spmd_reduce_scatter(local, dim, [groups[i:i + size]
                                                 for i in range(0, len(groups), size)])
        full = list(t.shape)
        full[dim] //= size
        return disable_manual_sharding(local, m, sp, full)

    @op.register_fake
    def _(t, mesh, spec, dim, groups, size):
        shape = list(t.shape)
        shape[dim] //= size
        return t.new_empty(shape)

    return op


# ------------------------------------------------------------------------------------ remat
def checkpoint(function: Callable, *args: Any) -> Any:
    """torch_xla's activation checkpoint (reentrant): ``function(*args)`` is recomputed in the
    backward, behind optimization barriers that keep XLA from merging the recomputation back
    into the forward. (``torch.utils.checkpoint`` raises on XLA tensors in torch 2.9: torch has
    no ``xla`` device module for its RNG fork; measured.) Positional arguments only."""
    from torch_xla.utils.checkpoint import checkpoint as _checkpoint

    return _checkpoint(function, *args, use_reentrant=True)


# --------------------------------------------------------------------------------- control flow
def scan(fn: Callable, init: Any, xs: Any, cache: bool = False):
    """``torch_xla.experimental.scan``: one XLA while loop over the leading dim of ``xs``.

    ``cache``: ``fn`` is pure (reads only its arguments), so its traced forward and backward
    graphs are kept and reused whenever the same ``fn`` object comes back with the same shapes
    (torch_xla's ``is_fn_pure``); they stay cached, and ``fn`` alive, for the process."""
    from torch_xla.experimental.scan import scan as _scan

    return _scan(fn, init, xs, is_fn_pure=cache)


def compile_count() -> int:
    """Programs torch_xla has compiled in this process so far (its ``CompileTime`` metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def sync() -> None:
    """Compile and run the pending lazy graph (``torch_xla.sync``)."""
    _torch_xla().sync()


def wait_device_ops() -> None:
    """Block until every pending device computation has finished."""
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()


# ------------------------------------------------------------------------------ compiled programs
_POST_OPT_ENV = "XLA_DUMP_POST_OPTIMIZATIONS"


def compiled_hlo(tensors: Sequence[torch.Tensor]) -> str:
    """HLO text of the compiled, SPMD-partitioned program that computes ``tensors``.

    torch_xla reads ``XLA_DUMP_POST_OPTIMIZATIONS`` once per process, at the first HLO request:
    this sets it if unset and raises RuntimeError if that first request happened without it.
    Callers validate ``tensors`` (see :func:`torch_impl.mesh.compiled_hlo`).
    """
    if os.environ.get(_POST_OPT_ENV, "") in ("", "0", "false", "False"):
        os.environ[_POST_OPT_ENV] = "1"
    # Keep the cyclic collector off while torch_xla compiles: XLA tensors freed by a collection
    # inside this call crashed the process (measured in long test runs). No full collection
    # first: with JAX and torch loaded it costs ~0.6 s a call, a third of a parity case.
    enabled = gc.isenabled()
    gc.disable()
    try:
        text = _torch_xla()._XLAC._get_xla_tensors_hlo(list(tensors))
    finally:
        if enabled:
            gc.enable()
    if "is_scheduled=true" not in text.split("\n", 1)[0]:
        raise RuntimeError(
            "torch_xla returned the HLO before partitioning: it read XLA_DUMP_POST_OPTIMIZATIONS "
            "before it was set (an earlier _get_xla_tensors_hlo call in this process). Set "
            "XLA_DUMP_POST_OPTIMIZATIONS=1 in the environment at process start.")
    return text


def graph_hash(tensors: Sequence[torch.Tensor]) -> str:
    """Hash of the pending lazy graph computing ``tensors`` (torch_xla's compile-cache key), as
    hex text; the parity harness keys its HLO-text cache on it."""
    return _torch_xla()._XLAC._get_graph_hash(list(tensors)).hex()


# ------------------------------------------------------------------- cached graphs (issue 14)
def capture_graph(outputs: Sequence[torch.Tensor]) -> tuple[Any, list[int], list[torch.Tensor]]:
    """Compile the pending graph that computes ``outputs`` without running it, and drop it.

    Returns ``(graph hash, input tensor ids, input values)``: the device data the graph reads, in
    its parameter order (what the dynamo bridge does). The pending IR of every live tensor is
    cleared afterwards, so the caller must have synced everything else first.
    """
    x = _torch_xla()._XLAC
    outputs = list(outputs)
    graph_hash = x._get_graph_hash(outputs)
    ids, values = x._get_tensors_xla_device_data_node(outputs)
    x._xla_warm_up_cache(outputs, [])
    x._clear_pending_irs(str(device()))
    return graph_hash, list(ids), list(values)


def data_handle(tensor: torch.Tensor) -> int | None:
    """The device buffer an XLA tensor holds (None while it is a pending computation). Matches
    the input values of :func:`capture_graph` where tensor ids may not: an input node can carry
    the id of another tensor that shared the buffer (a no-op ``.to``, a parameter built from it)."""
    try:
        return _torch_xla()._XLAC._get_tensors_handle([tensor])[0]
    except RuntimeError:  # "XlaTensor does not have data handle": not materialized
        return None


def tensor_id(tensor: torch.Tensor) -> int:
    """torch_xla's id of an XLA tensor (the ids :func:`capture_graph` returns are those of the
    tensors that created the input nodes, not always the tensors passed: see
    :func:`data_handle`)."""
    return _torch_xla()._XLAC._xla_get_tensor_id(tensor)


def run_graph(graph_hash: Any, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run a graph compiled by :func:`capture_graph` on ``inputs``: no tracing, no hashing."""
    return list(_torch_xla()._XLAC._run_cached_graph(graph_hash, list(inputs)))
