"""Planted defects for the harness self-test: each must turn a passing case into a mismatch.

Three kinds, all on the torch side:

- data-level (:func:`plant_defect`): the torch side gets another case or other data;
- code-level (:func:`defect_patch`): a context manager patches ``torch_impl`` (or, for
  ``reordered_replica_group``, the compiled HLO text torch reports) while the torch side runs;
- init-level (``dropped_init_scale``): ``torch_impl``'s init is patched and
  :func:`parity.selftest.init_check` compares the initial weights with their formula.

:data:`EXPOSING` names, per defect, the cheap case that exposes it (``python -m parity
--self-test`` runs them; a ring defect needs n >= 4, where both directions differ).

Example::

    case, data = plant_defect(case, make_data(case), "perturbed_weight")
    with defect_patch("reversed_ring"):
        ...  # torch_impl's ring permutes now shift the other way
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import replace

import numpy as np

from .cases import Case

__all__ = ["DEFECTS", "EXPOSING", "plant_defect", "defect_patch", "reversed_ring"]

DEFECTS = ("perturbed_weight", "reversed_ring", "missing_bias", "dropped_microbatch",
           "wrong_tolerance", "dropped_init_scale", "swapped_bidirectional_halves",
           "extra_collective", "reordered_replica_group", "wrong_bf16_accumulation",
           "wrong_scatter_block_order", "off_by_one_ring_shift", "transposed_kernel")
_DATA_DEFECTS = ("perturbed_weight", "missing_bias", "dropped_microbatch", "wrong_tolerance",
                 "transposed_kernel")
INIT_DEFECTS = ("dropped_init_scale",)

_A = Case("tpasync", "gather-uni", 4)
_PIPE = Case("pipeline", "mlp", 2, batch=20, in_features=16, out_features=16,
             extra=(("microbatches", 5),))
_ROW = Case("linear", "row-rs", 4, extra=(("rso", 0),))
# defect -> a case that exposes it (None: the init check, no case).
EXPOSING: dict[str, Case | None] = {
    "perturbed_weight": _A,
    "reversed_ring": _A,
    "missing_bias": Case("tpdense", "gather", 4),
    "dropped_microbatch": _PIPE,
    "wrong_tolerance": Case("tpasync", "scatter-split", 4),
    "dropped_init_scale": None,
    "swapped_bidirectional_halves": Case("tpasync", "scatter-split", 4),
    "extra_collective": _A,
    "reordered_replica_group": Case("tpdense", "gather", 4),
    "wrong_bf16_accumulation": _ROW,
    "wrong_scatter_block_order": Case("tpdense", "scatter", 4),
    "off_by_one_ring_shift": _A,
    "transposed_kernel": _A,
}


def plant_defect(case: Case, data: dict, defect: str | None) -> tuple[Case, dict]:
    """The torch side's case and data with ``defect`` planted (data-level defects only)."""
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"defect={defect!r}: expected one of {DEFECTS}")
    if defect not in _DATA_DEFECTS:
        return case, data
    data = {k: dict(v) for k, v in data.items()}
    params = data["params"]
    if defect == "perturbed_weight":
        key = next(k for k in sorted(params) if "kernel" in k or "weight" in k)
        w = params[key].copy()
        w.flat[0] += 0.05 * (1 + abs(w.flat[0]))
        params[key] = w
    elif defect == "missing_bias":
        keys = [k for k in params if k.endswith("bias")]
        if not keys:
            raise ValueError(f"case {case.id} has no bias to remove")
        for k in keys:
            params[k] = np.zeros_like(params[k])
        data["drop_grads"] = {k: None for k in keys}
    elif defect == "dropped_microbatch":
        data["inputs"]["x"] = _drop_last_microbatch(case, data["inputs"]["x"])
    elif defect == "wrong_tolerance":
        case = replace(case, tolerance=0.5)
    elif defect == "transposed_kernel":  # a layout conversion that forgot a transpose
        key = next((k for k in sorted(params) if k.endswith("kernel")
                    and params[k].shape[-1] == params[k].shape[-2]), None)
        if key is None:
            raise ValueError(f"case {case.id} has no square kernel to transpose")
        params[key] = np.ascontiguousarray(np.swapaxes(params[key], -1, -2))
    return case, data


def _drop_last_microbatch(case: Case, x: np.ndarray) -> np.ndarray:
    m = case.option("microbatches")
    if not m:
        raise ValueError(f"case {case.id} is not a pipeline case (no micro-batches)")
    x = x.copy()
    shards = 8 // case.axis_size  # data-parallel shards of the case's 8-device mesh
    rows = x.reshape(shards, m, -1, x.shape[-1])
    rows[:, m - 1] = 0.0  # every shard's last micro-batch never enters the pipeline
    return rows.reshape(x.shape)


def defect_patch(defect: str | None):
    """The context manager that plants a code-level ``defect`` while torch runs (or None)."""
    patches = {"reversed_ring": reversed_ring, "extra_collective": extra_collective,
               "off_by_one_ring_shift": off_by_one_ring_shift,
               "swapped_bidirectional_halves": swapped_bidirectional_halves,
               "wrong_scatter_block_order": wrong_scatter_block_order,
               "wrong_bf16_accumulation": wrong_bf16_accumulation,
               "reordered_replica_group": reordered_replica_group,
               "dropped_init_scale": dropped_init_scale}
    return patches[defect]() if defect in patches else None


@contextlib.contextmanager
def _replace_everywhere(module_name: str, name: str, make):
    """Bind ``make(original)`` to every ``torch_impl`` module attribute holding the function
    ``module_name.name`` while the block runs (modules import it by name)."""
    import importlib
    import pkgutil

    import torch_impl

    original = getattr(importlib.import_module(module_name), name)
    replacement = make(original)
    # Import every module before patching any: a module first imported mid-patch would bind
    # the replacement by name and keep it after the block.
    modules = [importlib.import_module(m.name)
               for m in pkgutil.walk_packages(torch_impl.__path__, "torch_impl.")]
    patched = []
    for mod in modules:
        for attr, value in list(vars(mod).items()):
            if value is original:
                patched.append((mod, attr))
                setattr(mod, attr, replacement)
    try:
        yield
    finally:
        for mod, attr in patched:
            setattr(mod, attr, original)


def _ring_variant(steps):
    """A ``ring_permute`` replacement applying ``steps(original, x, shift_up, kwargs)``."""
    def make(original):
        sig = inspect.signature(original)

        def patched(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            kw = dict(bound.arguments)
            x, up = kw.pop("x"), kw.pop("shift_up")
            return steps(original, x, up, kw)
        return patched
    return make


def reversed_ring():
    """Make every torch ring permute shift the other way (the 'ring in the wrong direction')."""
    return _replace_everywhere("torch_impl.collectives", "ring_permute", _ring_variant(
        lambda perm, x, up, kw: perm(x, shift_up=not up, **kw)))


def extra_collective():
    """Every ring permute goes there, back and there again: same numbers, two extra permutes."""
    def steps(perm, x, up, kw):
        there = perm(x, shift_up=up, **kw)
        return perm(perm(there, shift_up=not up, **kw), shift_up=up, **kw)
    return _replace_everywhere("torch_impl.collectives", "ring_permute", _ring_variant(steps))


def off_by_one_ring_shift():
    """``async_gather``'s element i is the input shifted i + 1 times (not i): n permutes."""
    def make(original):
        def shifted(x, axis_name, shift_up=True, *, mesh):
            from torch_impl.collectives import ring_permute

            ps = original(x, axis_name, shift_up, mesh=mesh)
            return ps[1:] + [ring_permute(ps[-1], axis_name, shift_up=shift_up, mesh=mesh)]
        return shifted
    return _replace_everywhere("torch_impl.tensor_parallel", "async_gather", make)


def swapped_bidirectional_halves():
    """``async_scatter_split`` sends the first half of the features down and the second up."""
    def make(original):
        def swapped(xs, axis_name, *, mesh):
            import torch

            from torch_impl.collectives import ring_permute
            from torch_impl.mesh import mark_stacked

            half = xs[0].shape[-1] // 2
            lo, hi = xs[0][..., :half], xs[0][..., half:]
            for x in xs[1:]:
                lo = ring_permute(lo, axis_name, shift_up=False, mesh=mesh) + x[..., :half]
                hi = ring_permute(hi, axis_name, shift_up=True, mesh=mesh) + x[..., half:]
            return mark_stacked(torch.cat([lo, hi], -1), mesh, axis_name)
        return swapped
    return _replace_everywhere("torch_impl.tensor_parallel", "async_scatter_split", make)


def wrong_scatter_block_order():
    """``reduce_scatter_features`` hands device j the block j + 1 (features rotated a block)."""
    def make(original):
        def rotated(x, axis_name, dim=-1, *, mesh):
            import torch

            c = x.shape[-1] // x.shape[0]
            x = torch.cat([x[..., c:], x[..., :c]], -1)
            return original(x, axis_name, dim, mesh=mesh)
        return rotated
    return _replace_everywhere("torch_impl.collectives", "reduce_scatter_features", make)


def wrong_bf16_accumulation():
    """The ring matmuls multiply and accumulate in bfloat16 in a float32 layer (a leftover
    autocast): errors of ~1e-2 where float32 agrees to 1e-7.

    (The converse, a bfloat16 layer whose ring accumulates and sends float32, is not observable
    on XLA:CPU: both backends' bf16 ring permutes already carry float32 there, 256 B for a
    bf16 [8, 8] block, and the numbers agree to 1e-3.)"""
    def make(original):
        def bf16(x, w, precision=None):
            return original(x.bfloat16(), w.bfloat16(), precision).to(x.dtype)
        return bf16
    return _replace_everywhere("torch_impl.linear_ring", "dot", make)


def dropped_init_scale():
    """``scale_init`` ignores its factor: TPDense / TPAsyncDense lose ``kernel_init_adjustment``."""
    return _replace_everywhere("torch_impl.tensor_parallel", "scale_init",
                               lambda original: lambda init_fn, scale_factor=1.0: init_fn)


_GROUPS = re.compile(r"(all-gather|reduce-scatter)(?:-start)?\(.*?replica_groups="
                     r"(\{(?:\{[\d,]*\},?)*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")


def reorder_first_group(text: str) -> str:
    """``text`` with the first all-gather's (or reduce-scatter's) first replica group's first
    two devices swapped (the order an all-gather concatenates in)."""
    from .hlo import canonical_groups

    m = _GROUPS.search(text)
    if m is None:
        raise ValueError("the program has no all-gather or reduce-scatter to reorder")
    groups = [g.split(",") for g in re.findall(r"\{([\d,]+)\}",
                                                canonical_groups(m.group(2), keep_order=True))]
    groups[0][:2] = groups[0][1::-1]
    new = "{" + ",".join("{" + ",".join(g) + "}" for g in groups) + "}"
    return text[:m.start(2)] + new + text[m.end(2):]


@contextlib.contextmanager
def reordered_replica_group():
    """The torch side's compiled programs report a reordered replica group (an HLO mutation:
    e.g. a mesh whose devices are listed in another order)."""
    from . import torch_backend

    original = torch_backend.compiled_hlo_shared
    torch_backend.compiled_hlo_shared = lambda *a, **k: reorder_first_group(original(*a, **k))
    try:
        yield
    finally:
        torch_backend.compiled_hlo_shared = original
