"""The harness self-test (``python -m parity --self-test``): plant every defect, report the catch rate.

For each defect of :data:`parity.defects.DEFECTS` the self-test runs the case that exposes it
(:data:`parity.defects.EXPOSING`) clean (it must pass) and with the defect planted on the torch
side (it must fail). ``dropped_init_scale`` has no case: :func:`init_check` compares the
initial kernels of a TPAsyncDense with the std its formula states, clean and with the defect.
Both runtimes run in this process (JAX first); compiles are shared between the runs of a case.

Example::

    rows = run_self_test(["reversed_ring", "missing_bias"])
    [(r.defect, r.caught) for r in rows]
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from .defects import DEFECTS, EXPOSING, INIT_DEFECTS, defect_patch

__all__ = ["SelfTestRow", "init_check", "run_self_test", "table", "main"]

# The init check: TPAsyncDense 'gather' at n = 4, 256 -> 4 x 128 features per device, kernel
# init adjustment 0.5: 4 x 4 x 256 x 128 = 524288 samples, std = 0.5 / sqrt(256). The sampling
# error of a std over N normal samples is ~1/sqrt(2N) = 0.1%; a 2% bound leaves 20x margin and a
# dropped (or doubled) scale is a 100% error.
INIT_N, INIT_IN, INIT_OUT, INIT_ADJUSTMENT, INIT_REL_TOL = 4, 256, 128, 0.5, 0.02


@dataclass
class SelfTestRow:
    """One planted defect: the case that exposes it, and whether the harness reported it."""

    defect: str
    case_id: str
    clean_passed: bool
    defect_passed: bool
    reasons: list[str]
    seconds: float

    @property
    def caught(self) -> bool:
        """The clean run passed and the planted run was reported."""
        return self.clean_passed and not self.defect_passed


def init_check(defect: str | None = None) -> tuple[bool, list[str]]:
    """(passed, reasons): the std of a fresh torch TPAsyncDense's kernels against its formula
    ``adjustment / sqrt(fan_in)`` (within 2%), with ``defect``'s patch in place if given."""
    import contextlib

    from torch_impl import mesh as tmesh
    from torch_impl.configs import ParallelConfig
    from torch_impl.tensor_parallel import TPAsyncDense

    patch = defect_patch(defect) if defect else None
    with patch if patch is not None else contextlib.nullcontext():
        mesh = tmesh.create_mesh(ParallelConfig(model_axis_size=INIT_N))
        layer = TPAsyncDense(INIT_IN, INIT_OUT, "tp", "gather", mesh=mesh, seed=0,
                             kernel_init_adjustment=INIT_ADJUSTMENT)
    kernels = np.concatenate([p.detach().cpu().float().numpy().ravel()
                              for name, p in layer.named_parameters() if name.endswith("kernel")])
    expected = INIT_ADJUSTMENT / np.sqrt(INIT_IN)
    got = float(kernels.std())
    if abs(got / expected - 1) <= INIT_REL_TOL:
        return True, []
    return False, [f"init: TPAsyncDense kernel std {got:.5f} over {kernels.size} samples, "
                   f"formula {expected:.5f} (off by {abs(got / expected - 1):.1%} > "
                   f"{INIT_REL_TOL:.0%})"]


def run_self_test(defects=DEFECTS, progress=None) -> list[SelfTestRow]:
    """Plant each of ``defects`` on the case that exposes it; one row per defect."""
    from . import runner

    for d in defects:
        if d not in DEFECTS:
            raise ValueError(f"defect={d!r}: expected one of {DEFECTS}")
    runner.load_backend("jax")
    runner.load_backend("torch")
    clean: dict[str, bool] = {}
    rows = []
    for i, defect in enumerate(defects):
        if progress:
            progress(i, len(defects), defect)
        t0 = time.perf_counter()
        case = EXPOSING[defect]
        if defect in INIT_DEFECTS:
            case_id = "init:TPAsyncDense-gather-n4"
            if case_id not in clean:
                clean[case_id] = init_check()[0]
            passed, reasons = init_check(defect)
        else:
            case_id = case.id
            if case_id not in clean:
                clean[case_id] = runner.run_case(case).passed
            rep = runner.run_case(case, defect=defect)
            passed, reasons = rep.passed, rep.reasons
        rows.append(SelfTestRow(defect, case_id, clean[case_id], passed, reasons,
                                time.perf_counter() - t0))
    if progress:
        progress(len(defects), len(defects), "")
    return rows


def table(rows: list[SelfTestRow]) -> str:
    """A text table defect -> case, caught yes/no, the first reason; then the catch rate."""
    lines = [f"{'defect':30s} {'case':48s} caught  first reason"]
    for r in rows:
        why = r.reasons[0] if r.reasons else ("clean case failed" if not r.clean_passed else "-")
        lines.append(f"{r.defect:30s} {r.case_id:48s} {'yes' if r.caught else 'NO ':6s}  "
                     f"{why[:110]}")
    caught = sum(r.caught for r in rows)
    lines.append(f"self-test: caught {caught}/{len(rows)} planted defect classes "
                 f"({100.0 * caught / max(len(rows), 1):.0f}%)")
    return "\n".join(lines)


def main() -> int:
    """Run every defect and print the table; 0 at a 100% catch rate, else 1 (devices set up by
    the caller, ``python -m parity --self-test``)."""
    t0 = time.perf_counter()

    def progress(done, total, label):
        print(f"self-test {done}/{total} {time.perf_counter() - t0:5.0f}s {label}",
              file=sys.stderr, flush=True)

    rows = run_self_test(progress=progress)
    print(table(rows))
    print(f"self-test took {time.perf_counter() - t0:.0f} s")
    return 0 if all(r.caught for r in rows) else 1
