"""Run parity cases on both backends and compare them.

Each backend module (``parity.jax_backend``, ``parity.torch_backend``) turns a case and its data
(:func:`parity.cases.make_data`) into a :class:`BackendResult`: forward outputs, gradients of
``sum(y * cotangent)`` with respect to the input and every parameter (keyed ``x`` and the
parameter path), and the HLO text of the compiled forward+backward program. :func:`compare`
checks numbers against the case's tolerance and the collective signatures for equality.

Two modes: in-process (both runtimes in this process, JAX imported first; the default on CPU) and
isolated (each backend in its own ``python -m parity.worker`` process, exchanging ``.npz`` files:
required on TPU, where two runtimes cannot share the chips).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import hlo
from .cases import MAX_TOLERANCES, Case

__all__ = ["BackendResult", "CaseReport", "DEFECTS", "compare", "run_cases", "setup_devices",
           "plant_defect", "load_backend"]

# Planted defects for the self-test: each must turn a passing case into a reported mismatch.
DEFECTS = ("perturbed_weight", "reversed_ring", "missing_bias", "dropped_microbatch",
           "wrong_tolerance")


@dataclass
class BackendResult:
    """What one backend produced for a case (arrays as float32 NumPy)."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    hlo_text: str = ""
    fwd_hlo_text: str = ""
    seconds: float = 0.0
    error: str | None = None


@dataclass
class CaseReport:
    """The verdict of one case."""

    case_id: str
    tolerance: float
    out_abs: float = float("nan")
    out_rel: float = float("nan")
    grad_abs: float = float("nan")
    grad_rel: float = float("nan")
    worst_grad: str = ""
    comm_match: bool = False
    comm_detail: str = ""
    jax_seconds: float = 0.0
    torch_seconds: float = 0.0
    num_collectives: int = 0
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def setup_devices(n: int) -> None:
    """Set the environment for ``n`` virtual CPU devices on both backends (before any import)."""
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if os.environ["PJRT_DEVICE"] == "CPU":
        os.environ["CPU_NUM_DEVICES"] = str(n)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # read once by torch_xla


def load_backend(name: str):
    """Import ``parity.jax_backend`` or ``parity.torch_backend`` (JAX first when both are used)."""
    if name == "jax":
        from . import jax_backend

        return jax_backend
    if name == "torch":
        from torch_impl.mesh import enable_spmd

        enable_spmd()
        from . import torch_backend

        return torch_backend
    raise ValueError(f"backend={name!r}: expected 'jax' or 'torch'")


def _err(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs error, normwise relative error max|a-b| / max|b|) of a against reference b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    diff = np.abs(a - b)
    if not np.all(np.isfinite(a)):
        return float("inf"), float("inf")
    scale = float(np.max(np.abs(b)))
    m = float(np.max(diff))
    return m, (m / scale if scale > 0 else (0.0 if m == 0 else float("inf")))


def _worst(ref: dict, got: dict, reasons: list[str], what: str) -> tuple[float, float, str]:
    worst_abs, worst_rel, worst_key = 0.0, 0.0, ""
    for key in sorted(set(ref) | set(got)):
        if key not in got or key not in ref:
            side = "torch" if key not in got else "jax"
            reasons.append(f"{what} {key!r} missing on the {side} side")
            worst_abs, worst_rel, worst_key = float("inf"), float("inf"), key
            continue
        a, r = _err(got[key], ref[key])
        if a == float("inf") and np.shape(got[key]) != np.shape(ref[key]):
            reasons.append(f"{what} {key!r} shape {np.shape(got[key])} != {np.shape(ref[key])}")
        if r >= worst_rel:
            worst_abs, worst_rel, worst_key = a, r, key
    return worst_abs, worst_rel, worst_key


def compare(case: Case, ref: BackendResult, got: BackendResult) -> CaseReport:
    """Compare the torch result ``got`` with the JAX reference ``ref`` for ``case``."""
    rep = CaseReport(case.id, case.tol, jax_seconds=ref.seconds, torch_seconds=got.seconds)
    reasons = rep.reasons
    bound = MAX_TOLERANCES[case.dtype]
    if not (0 <= case.tol <= bound):
        reasons.append(f"tolerance {case.tol:g} is outside [0, {bound:g}] allowed for {case.dtype}")
    for name, res in (("jax", ref), ("torch", got)):
        if res.error:
            reasons.append(f"{name} failed: {res.error}")
    if ref.error or got.error:
        return rep
    rep.out_abs, rep.out_rel, _ = _worst(ref.outputs, got.outputs, reasons, "output")
    rep.grad_abs, rep.grad_rel, rep.worst_grad = _worst(ref.grads, got.grads, reasons, "grad")
    if not rep.out_rel <= case.tol:
        reasons.append(f"output error {rep.out_rel:.3g} > tolerance {case.tol:g}")
    if not rep.grad_rel <= case.tol:
        reasons.append(f"grad error {rep.grad_rel:.3g} ({rep.worst_grad}) > tolerance {case.tol:g}")
    # Forward+backward as a multiset, plus the forward program alone: XLA's scheduler orders the
    # backward's ops differently per front end, but the forward's pairs pin each ring's direction.
    # All-reduces over the same groups count once (the combiner merges them by heuristics).
    details = []
    for what, a, b in (("forward+backward", ref.hlo_text, got.hlo_text),
                       ("forward", ref.fwd_hlo_text, got.fwd_hlo_text)):
        if not (a and b):
            details.append(f"{what}: missing HLO")
            continue
        sig_ref = hlo.signature(a, merge_all_reduces=True)
        sig_got = hlo.signature(b, merge_all_reduces=True)
        if what == "forward+backward":
            rep.num_collectives = sum(sig_ref.values())
        if sig_ref != sig_got:
            details.append(f"{what}: jax-only {_fmt_sig(sig_ref - sig_got)}; "
                           f"torch-only {_fmt_sig(sig_got - sig_ref)}")
    rep.comm_match = not details
    if details:
        rep.comm_detail = " | ".join(details)
        reasons.append(f"collectives differ: {rep.comm_detail}")
    rep.passed = not reasons
    return rep


def _fmt_sig(sig) -> str:
    return ", ".join(f"{n}x {k[0]}{list(k[1]) if k[1] else ''}" for k, n in sorted(sig.items())) or "-"


# ------------------------------------------------------------------------------ planted defects
def plant_defect(case: Case, data: dict, defect: str | None) -> tuple[Case, dict]:
    """The torch side's case and data with ``defect`` planted (data-level defects only)."""
    if defect is None or defect == "reversed_ring":
        return case, data
    if defect not in DEFECTS:
        raise ValueError(f"defect={defect!r}: expected one of {DEFECTS}")
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
        m = case.option("microbatches")
        if not m:
            raise ValueError(f"case {case.id} is not a pipeline case (no micro-batches)")
        x = data["inputs"]["x"].copy()
        shards = 8 // case.axis_size  # data-parallel shards of the case's 8-device mesh
        rows = x.reshape(shards, m, -1, x.shape[-1])
        rows[:, m - 1] = 0.0  # every shard's last micro-batch never enters the pipeline
        data["inputs"]["x"] = rows.reshape(x.shape)
    elif defect == "wrong_tolerance":
        case = replace(case, tolerance=0.5)
    return case, data


@contextlib.contextmanager
def _reversed_ring():
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
    for m in pkgutil.iter_modules(torch_impl.__path__):
        mod = importlib.import_module(f"torch_impl.{m.name}")
        if getattr(mod, "ring_permute", None) is original:
            patched.append(mod)
            mod.ring_permute = flipped
    try:
        yield
    finally:
        for mod in patched:
            mod.ring_permute = original


def _run_backend(backend, case: Case, data: dict, defect: str | None = None) -> BackendResult:
    t0 = time.perf_counter()
    try:
        ctx = _reversed_ring() if defect == "reversed_ring" else contextlib.nullcontext()
        with ctx:
            res = backend.run(case, data)
        for k in data.get("drop_grads", {}):
            res.grads.pop(k, None)
    except Exception as exc:  # reported as a failed case, never swallowed silently
        res = BackendResult(error=f"{type(exc).__name__}: {exc}")
    res.seconds = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------ running
def run_case(case: Case, defect: str | None = None) -> CaseReport:
    """Run one case in-process on both backends (JAX first) and compare."""
    from .cases import make_data

    data = make_data(case)
    jax_backend, torch_backend = load_backend("jax"), load_backend("torch")
    ref = _run_backend(jax_backend, case, data)
    tcase, tdata = plant_defect(case, data, defect)
    got = _run_backend(torch_backend, tcase, tdata, defect)
    return compare(tcase, ref, got)


def run_cases(cases: list[Case], isolate: bool = False, devices: int = 8,
              progress=None) -> list[CaseReport]:
    """Run ``cases`` (in-process, or each backend in its own process) and return the reports."""
    if not isolate:
        reports = []
        for i, case in enumerate(cases):
            if progress:
                progress(i, len(cases), case.id)
            reports.append(run_case(case))
        if progress:
            progress(len(cases), len(cases), "")
        return reports
    return _run_isolated(cases, devices, progress)


def _run_isolated(cases: list[Case], devices: int, progress) -> list[CaseReport]:
    from .worker import load_result

    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        spec_path = os.path.join(tmp, "cases.json")
        with open(spec_path, "w") as f:
            json.dump([asdict(c) for c in cases], f)
        total = 2 * len(cases)
        done = 0
        for backend in ("jax", "torch"):
            out_dir = os.path.join(tmp, backend)
            cmd = [sys.executable, "-m", "parity.worker", "--backend", backend, "--devices",
                   str(devices), "--cases", spec_path, "--out", out_dir]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            for line in proc.stdout:
                if line.startswith("done "):
                    done += 1
                    if progress:
                        progress(done, total, f"{backend}: {line.split(' ', 1)[1].strip()}")
            if proc.wait() != 0:
                raise RuntimeError(f"the {backend} worker exited with {proc.returncode}")
        return [compare(case, load_result(os.path.join(tmp, "jax"), case),
                        load_result(os.path.join(tmp, "torch"), case)) for case in cases]
