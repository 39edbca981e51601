"""Planted defects for the harness self-test: each must turn a passing case into a mismatch.

Data-level defects change the torch side's case or data (:func:`plant_defect`); code-level ones
patch ``torch_impl`` while the torch side runs (:func:`defect_patch`).

Example::

    case, data = plant_defect(case, make_data(case), "perturbed_weight")
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import replace

import numpy as np

from .cases import Case

__all__ = ["DEFECTS", "plant_defect", "defect_patch", "reversed_ring"]

DEFECTS = ("perturbed_weight", "reversed_ring", "missing_bias", "dropped_microbatch",
           "wrong_tolerance")
_CODE_DEFECTS = ("reversed_ring",)


def plant_defect(case: Case, data: dict, defect: str | None) -> tuple[Case, dict]:
    """The torch side's case and data with ``defect`` planted (data-level defects only)."""
    if defect is not None and defect not in DEFECTS:
        raise ValueError(f"defect={defect!r}: expected one of {DEFECTS}")
    if defect is None or defect in _CODE_DEFECTS:
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
    return reversed_ring() if defect == "reversed_ring" else None


@contextlib.contextmanager
def reversed_ring():
    """Make every torch ring permute shift the other way (the 'ring in the wrong direction')."""
    import importlib
    import pkgutil

    import torch_impl
    import torch_impl.collectives as col

    original = col.ring_permute
    sig = inspect.signature(original)

    def flipped(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments["shift_up"] = not bound.arguments["shift_up"]
        return original(*bound.args, **bound.kwargs)

    patched = []
    for m in pkgutil.walk_packages(torch_impl.__path__, "torch_impl."):
        mod = importlib.import_module(m.name)
        if getattr(mod, "ring_permute", None) is original:
            patched.append(mod)
            mod.ring_permute = flipped
    try:
        yield
    finally:
        for mod in patched:
            mod.ring_permute = original
