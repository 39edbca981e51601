"""Run parity cases on both backends and compare them.

Each backend (:mod:`parity.backend`) turns a case and its data (:func:`parity.cases.make_data`)
into a :class:`parity.backend.BackendResult`; :func:`parity.compare.compare` checks the numbers
against the case's tolerances and the collective signatures for equality.

Three modes:

- in-process, serial (``jobs=1``): both runtimes in this process, JAX imported first;
- in-process pool (``jobs=N``): N worker processes (:func:`parity.worker.run_pair`), each with
  both runtimes, take whole cases from a queue, the costliest first (compiling dominates the
  run, and separate processes compile at the same time on separate cores);
- isolated (``isolate=True``): each backend in its own ``python -m parity.worker`` process,
  exchanging ``.npz`` files (required on TPU, where two runtimes cannot share the chips); with
  ``jobs >= 2`` the two backend processes run at the same time (CPU only).

Example::

    from parity import cases, runner
    reports = runner.run_cases(cases.select(cases.default_matrix(), "tpasync n4"), jobs=2)
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile

from . import worker
from .backend import load_backend, run_backend, setup_devices
from .cases import Case, make_data
from .compare import CaseReport, compare
from .defects import defect_patch, plant_defect

__all__ = ["run_case", "run_cases", "load_backend", "setup_devices", "default_jobs"]

# Relative cost of a case per module (seconds on 2 cores, measured): the pool starts the costly
# ones first so that no worker is left with a GPT case at the end.
_COST = {"gpt": 20.0, "pipeline": 3.0}


def default_jobs() -> int:
    """Worker processes for ``python -m parity`` by default: one per core, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def run_case(case: Case, defect: str | None = None) -> CaseReport:
    """Run one case in-process on both backends (JAX first) and compare.

    ``defect`` plants one of :data:`parity.defects.DEFECTS` on the torch side (self-test)."""
    data = make_data(case)
    jax_backend, torch_backend = load_backend("jax"), load_backend("torch")
    ref = run_backend(jax_backend, case, data)
    tcase, tdata = plant_defect(case, data, defect)
    got = run_backend(torch_backend, tcase, tdata, patch=defect_patch(defect))
    return compare(tcase, ref, got)


def run_cases(cases: list[Case], isolate: bool = False, devices: int = 8, jobs: int = 1,
              progress=None) -> list[CaseReport]:
    """Run ``cases`` and return their reports in the order given.

    ``jobs`` > 1 runs cases in that many worker processes (or, with ``isolate``, the two
    backends at the same time). ``progress(done, total, label)`` is called as cases finish.
    """
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: expected a positive int")
    if isolate:
        return _run_isolated(cases, devices, jobs >= 2, progress)
    if jobs > 1 and len(cases) > 1:
        return _run_pool(cases, devices, min(jobs, len(cases)), progress)
    reports = []
    for i, case in enumerate(cases):
        if progress:
            progress(i, len(cases), case.id)
        reports.append(run_case(case))
    if progress:
        progress(len(cases), len(cases), "")
    return reports


def _run_pool(cases: list[Case], devices: int, jobs: int, progress) -> list[CaseReport]:
    by_id = {c.id: c for c in cases}
    order = sorted(cases, key=lambda c: -_COST.get(c.module, 1.0))
    reports = {}
    ctx = multiprocessing.get_context("spawn")  # fresh runtimes: never fork a live XLA client
    # Leaving the block (also on Ctrl-C) terminates the workers.
    with ctx.Pool(jobs, initializer=worker.init_pool, initargs=(devices,)) as pool:
        fields = [worker.case_to_fields(c) for c in order]
        for done, (case_id, ref, got) in enumerate(
                pool.imap_unordered(worker.run_pair, fields, chunksize=1), 1):
            reports[case_id] = compare(by_id[case_id], ref, got)
            if progress:
                progress(done, len(cases), case_id)
    return [reports[c.id] for c in cases]


def _run_isolated(cases: list[Case], devices: int, concurrent: bool,
                  progress) -> list[CaseReport]:
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        spec_path = os.path.join(tmp, "cases.json")
        with open(spec_path, "w") as f:
            json.dump([worker.case_to_fields(c) for c in cases], f)
        total, done = 2 * len(cases), 0
        procs = []
        for backend in ("jax", "torch"):
            cmd = [sys.executable, "-m", "parity.worker", "--backend", backend, "--devices",
                   str(devices), "--cases", spec_path, "--out", os.path.join(tmp, backend)]
            procs.append((backend, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
            if not concurrent:
                done = _follow(*procs[-1], done, total, progress)
        for backend, proc in procs if concurrent else ():
            done = _follow(backend, proc, done, total, progress)
        return [compare(case, worker.load_result(os.path.join(tmp, "jax"), case),
                        worker.load_result(os.path.join(tmp, "torch"), case)) for case in cases]


def _follow(backend: str, proc, done: int, total: int, progress) -> int:
    """Read a worker's ``done <id>`` lines until it exits; RuntimeError if it failed."""
    for line in proc.stdout:
        if line.startswith("done "):
            done += 1
            if progress:
                progress(done, total, f"{backend}: {line.split(' ', 1)[1].strip()}")
    if proc.wait() != 0:
        raise RuntimeError(f"the {backend} worker exited with {proc.returncode}")
    return done
