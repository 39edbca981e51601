"""Compare one backend's result with the other's: numbers and compiled collectives.

Numbers get two checks, both against the JAX reference ``b``:

- normwise: ``max|a - b| / max|b| <= case.tol`` per array (one bad element in a large array
  is still visible; a uniform drift of the whole array too);
- elementwise: ``|a - b| <= atol + rtol * |b|`` for every element, as
  ``numpy.testing.assert_allclose`` does, with the per-dtype ``(atol, rtol)`` of
  :func:`parity.cases.Case.elementwise` (a small element that is wrong by a lot fails here even
  when the array's largest element hides it from the normwise check).

Collectives: the multiset of :meth:`parity.hlo.Collective.exact_key` (kind, permute pairs,
replica groups in device order, result bytes) of the forward+backward program, and of the
forward alone, must be equal. Program order is not compared: XLA's scheduler orders
independent collectives differently per front end (seen in the forward too). All-reduces over
the same groups are merged first (XLA's combiner fuses reductions into tuple ops by heuristics
that differ per front end) and compared by total bytes per group set; a module whose spec says
``all_reduce_bytes=False`` compares them by presence only (see ``parity.cases``).

Example::

    rep = compare(case, jax_result, torch_result)
    rep.passed, rep.reasons
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import hlo
from .backend import BackendResult
from .cases import MAX_TOLERANCES, MODULES, Case

__all__ = ["CaseReport", "compare", "errors", "allclose_ratio", "atol_needed", "signature"]


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
    atol: float = float("nan")
    rtol: float = float("nan")
    elem_ratio: float = float("nan")
    worst_elem: str = ""
    atol_needed: float = float("nan")  # the smallest atol that passes at this rtol (calibration)
    comm_match: bool = False
    comm_detail: str = ""
    jax_seconds: float = 0.0
    torch_seconds: float = 0.0
    num_collectives: int = 0
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs error, normwise relative error max|a-b| / max|b|) of a against reference b."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.all(np.isfinite(a)):
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    scale = float(np.max(np.abs(b)))
    m = float(np.max(np.abs(a - b)))
    return m, (m / scale if scale > 0 else (0.0 if m == 0 else float("inf")))


def allclose_ratio(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> float:
    """max over elements of ``|a - b| / (atol + rtol * |b|)``: <= 1 iff
    ``numpy.testing.assert_allclose(a, b, rtol=rtol, atol=atol)`` passes (inf on a shape
    mismatch or a non-finite value)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.all(np.isfinite(a)):
        return float("inf")
    if a.size == 0:
        return 0.0
    diff = np.abs(a - b)
    bound = atol + rtol * np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(diff == 0, 0.0, diff / bound)
    return float(np.max(ratio))


def atol_needed(a: np.ndarray, b: np.ndarray, rtol: float) -> float:
    """The smallest atol with ``|a - b| <= atol + rtol * |b|`` everywhere (0 if rtol suffices)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.all(np.isfinite(a)):
        return float("inf")
    return float(max(0.0, np.max(np.abs(a - b) - rtol * np.abs(b)))) if a.size else 0.0


def _numbers(case: Case, ref: BackendResult, got: BackendResult, rep: CaseReport) -> None:
    rep.atol, rep.rtol = case.elementwise
    worst = {"output": (0.0, 0.0, ""), "grad": (0.0, 0.0, "")}
    rep.elem_ratio, rep.worst_elem, rep.atol_needed = 0.0, "", 0.0
    for what, r_map, g_map in (("output", ref.outputs, got.outputs),
                               ("grad", ref.grads, got.grads)):
        for key in sorted(set(r_map) | set(g_map)):
            if key not in g_map or key not in r_map:
                side = "torch" if key not in g_map else "jax"
                rep.reasons.append(f"{what} {key!r} missing on the {side} side")
                worst[what] = (float("inf"), float("inf"), key)
                continue
            a, b = g_map[key], r_map[key]
            if np.shape(a) != np.shape(b):
                rep.reasons.append(f"{what} {key!r} shape {np.shape(a)} != {np.shape(b)}")
            abs_err, rel_err = errors(a, b)
            if rel_err >= worst[what][1]:
                worst[what] = (abs_err, rel_err, key)
            rep.atol_needed = max(rep.atol_needed, atol_needed(a, b, rep.rtol))
            ratio = allclose_ratio(a, b, rep.atol, rep.rtol)
            if ratio >= rep.elem_ratio:
                rep.elem_ratio, rep.worst_elem = ratio, f"{what} {key}"
    rep.out_abs, rep.out_rel, _ = worst["output"]
    rep.grad_abs, rep.grad_rel, rep.worst_grad = worst["grad"]
    if not rep.out_rel <= case.tol:
        rep.reasons.append(f"output error {rep.out_rel:.3g} > tolerance {case.tol:g}")
    if not rep.grad_rel <= case.tol:
        rep.reasons.append(f"grad error {rep.grad_rel:.3g} ({rep.worst_grad}) > tolerance "
                           f"{case.tol:g}")
    if not rep.elem_ratio <= 1.0:
        rep.reasons.append(f"elementwise error {rep.elem_ratio:.3g} x (atol {rep.atol:g} + rtol "
                           f"{rep.rtol:g} |ref|) in {rep.worst_elem}")


def signature(case: Case, text: str):
    """The collective signature :func:`compare` uses for ``case`` (see the module docstring)."""
    exact_ar = MODULES[case.module].all_reduce_bytes if case.module in MODULES else True
    if exact_ar:
        return hlo.signature(text, merge_all_reduces=True, exact=True)
    sig = hlo.signature(text, exact=True)
    for key in [k for k in sig if k[0] == "all-reduce"]:
        del sig[key]
    sig.update({("all-reduce", (), g, "any bytes"): 1
                for g in {op.ordered_groups for op in hlo.collectives(text)
                          if op.kind == "all-reduce"}})
    return sig


def _collectives(case: Case, ref: BackendResult, got: BackendResult, rep: CaseReport) -> None:
    details = []
    programs = [("forward+backward", ref.hlo_text, got.hlo_text)]
    if case.module not in MODULES or MODULES[case.module].forward_signature:
        programs.append(("forward", ref.fwd_hlo_text, got.fwd_hlo_text))
    for what, a, b in programs:
        if not (a and b):
            details.append(f"{what}: missing HLO")
            continue
        sig_ref, sig_got = signature(case, a), signature(case, b)
        if what == "forward+backward":
            rep.num_collectives = len(hlo.collectives(a))
        if sig_ref != sig_got:
            details.append(f"{what}: jax-only {_fmt_sig(sig_ref - sig_got)}; "
                           f"torch-only {_fmt_sig(sig_got - sig_ref)}")
    rep.comm_match = not details
    if details:
        rep.comm_detail = " | ".join(details)
        rep.reasons.append(f"collectives differ: {rep.comm_detail}")


def _fmt_sig(sig) -> str:
    def one(key, n):
        kind, pairs, groups, size = key
        where = list(pairs) if pairs else groups
        return f"{n}x {kind}{where} {size}{'' if isinstance(size, str) else ' B'}"
    return ", ".join(one(k, n) for k, n in sorted(sig.items(), key=str)) or "-"


def compare(case: Case, ref: BackendResult, got: BackendResult) -> CaseReport:
    """Compare the torch result ``got`` with the JAX reference ``ref`` for ``case``."""
    rep = CaseReport(case.id, case.tol, jax_seconds=ref.seconds, torch_seconds=got.seconds)
    bound = MAX_TOLERANCES[case.dtype]
    if not (0 <= case.tol <= bound):
        rep.reasons.append(f"tolerance {case.tol:g} is outside [0, {bound:g}] allowed for "
                           f"{case.dtype}")
    for name, res in (("jax", ref), ("torch", got)):
        if res.error:
            rep.reasons.append(f"{name} failed: {res.error}")
    if not (ref.error or got.error):
        _numbers(case, ref, got, rep)
        _collectives(case, ref, got, rep)
    rep.passed = not rep.reasons
    return rep
