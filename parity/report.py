"""Reports of a parity run: the terminal table, the summary line, JSON and markdown."""

from __future__ import annotations

import json
import platform

__all__ = ["table", "summary", "write_json", "write_markdown"]

# "elem": the worst |a - b| / (atol + rtol |b|) over all elements (passes at <= 1).
_COLS = ("case", "out err", "grad err", "tol", "elem", "comm", "jax s", "torch s", "verdict")


def _row(r) -> tuple[str, ...]:
    return (r.case_id, f"{r.out_rel:.1e}", f"{r.grad_rel:.1e}", f"{r.tolerance:.0e}",
            f"{r.elem_ratio:.2f}", "same" if r.comm_match else "DIFF", f"{r.jax_seconds:.2f}",
            f"{r.torch_seconds:.2f}", "ok" if r.passed else "MISMATCH")


def table(reports) -> str:
    """Fixed-width text table, one row per case, then the reasons of every mismatch."""
    rows = [_COLS] + [_row(r) for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in reports:
        if not r.passed:
            lines.append(f"{r.case_id}: " + "; ".join(r.reasons))
    return "\n".join(lines)


def summary(reports, seconds: float) -> str:
    """One line: counts of passed / mismatched cases and the wall time."""
    bad = sum(not r.passed for r in reports)
    return (f"parity: {len(reports) - bad} passed, {bad} failed ({len(reports)} cases, "
            f"{seconds:.0f} s)")


def _meta(seconds: float, devices: int, isolate: bool) -> dict:
    return {"seconds": round(seconds, 2), "devices": devices, "isolate": isolate,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "python": platform.python_version()}


def write_json(path: str, reports, seconds: float, devices: int, isolate: bool) -> None:
    """Write every field of every case report plus run metadata."""
    with open(path, "w") as f:
        json.dump({"meta": _meta(seconds, devices, isolate),
                   "passed": sum(r.passed for r in reports), "failed": sum(not r.passed for r in reports),
                   "cases": [r.to_dict() for r in reports]}, f, indent=1)


def write_markdown(path: str, reports, seconds: float, devices: int, isolate: bool) -> None:
    """Write the table as markdown, with the summary line and mismatch reasons."""
    meta = _meta(seconds, devices, isolate)
    out = ["# ringpar parity report", "",
           f"{summary(reports, seconds)}; {devices} devices, "
           f"{'isolated processes' if isolate else 'in-process'}, {meta['machine']}", "",
           "Columns: normwise relative errors (output, worst gradient) against `tol`; `elem` is "
           "the worst elementwise |torch - jax| / (atol + rtol |jax|) (passes at <= 1); `comm` "
           "compares the exact collective signatures; seconds are per backend and case.", "",
           "| " + " | ".join(_COLS) + " |", "|" + "---|" * len(_COLS)]
    out += ["| " + " | ".join(_row(r)) + " |" for r in reports]
    bad = [r for r in reports if not r.passed]
    if bad:
        out += ["", "## Mismatches", ""] + [f"- `{r.case_id}`: " + "; ".join(r.reasons) for r in bad]
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
