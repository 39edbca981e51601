"""Backends in worker processes: ``python -m parity.worker`` and the in-process pool workers.

Two uses, both depending only on :mod:`parity.backend` and :mod:`parity.cases`:

- ``python -m parity.worker --backend jax|torch --cases cases.json --out DIR`` (used by
  ``python -m parity --isolate``): runs each case of a JSON case list on one backend and writes
  ``<out>/<case id>.npz`` (outputs as ``out:<key>``, gradients as ``grad:<key>``) and
  ``<out>/<case id>.json`` (HLO texts, seconds, error). Prints ``done <case id>`` per case.
- :func:`init_pool` / :func:`run_pair` (used by ``python -m parity --jobs N``): each pool process
  loads both backends (JAX first) once and runs whole cases, returning both results.

Example::

    python -m parity.worker --backend torch --devices 8 --cases cases.json --out /tmp/torch
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

import numpy as np

from .backend import BackendResult, load_backend, run_backend, setup_devices
from .cases import Case, make_data

__all__ = ["save_result", "load_result", "case_to_fields", "case_from_fields", "init_pool",
           "run_pair", "main"]

_POOL_BACKENDS: list = []  # (jax, torch) of this pool process, loaded by init_pool


def case_to_fields(case: Case) -> dict:
    """A case as JSON-ready fields (inverse: :func:`case_from_fields`)."""
    return asdict(case)


def case_from_fields(fields: dict) -> Case:
    """The case whose fields :func:`case_to_fields` wrote (JSON lists back to tuples)."""
    return Case(**{**fields, "extra": tuple(tuple(e) for e in fields["extra"])})


def save_result(out_dir: str, case: Case, res: BackendResult) -> None:
    """Write a BackendResult for ``case`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    arrays = {f"out:{k}": v for k, v in res.outputs.items()}
    arrays.update({f"grad:{k}": v for k, v in res.grads.items()})
    np.savez(os.path.join(out_dir, f"{case.id}.npz"), **arrays)
    with open(os.path.join(out_dir, f"{case.id}.json"), "w") as f:
        json.dump({"hlo_text": res.hlo_text, "fwd_hlo_text": res.fwd_hlo_text,
                   "seconds": res.seconds, "error": res.error}, f)


def load_result(out_dir: str, case: Case) -> BackendResult:
    """Read back what :func:`save_result` wrote (an error result if the files are missing)."""
    meta_path = os.path.join(out_dir, f"{case.id}.json")
    if not os.path.exists(meta_path):
        return BackendResult(error=f"no result file for {case.id} in {out_dir}")
    with open(meta_path) as f:
        meta = json.load(f)
    res = BackendResult(hlo_text=meta["hlo_text"], fwd_hlo_text=meta["fwd_hlo_text"],
                        seconds=meta["seconds"], error=meta["error"])
    with np.load(os.path.join(out_dir, f"{case.id}.npz")) as z:
        for name in z.files:
            kind, key = name.split(":", 1)
            (res.outputs if kind == "out" else res.grads)[key] = z[name]
    return res


def init_pool(devices: int) -> None:
    """Pool-process initializer: the device environment, then both backends (JAX first).

    A failure is kept and reported by every :func:`run_pair` of this process (a raising
    initializer would make the pool restart the process forever)."""
    try:
        setup_devices(devices)
        _POOL_BACKENDS[:] = [load_backend("jax"), load_backend("torch")]
    except Exception as exc:  # noqa: BLE001 - reported per case by run_pair
        _POOL_BACKENDS[:] = [f"backend setup failed: {type(exc).__name__}: {exc}"]


def run_pair(fields: dict) -> tuple[str, BackendResult, BackendResult]:
    """Run one case (as :func:`case_to_fields`) on both backends of this pool process."""
    case = case_from_fields(fields)
    if len(_POOL_BACKENDS) != 2:
        failed = BackendResult(error=str(_POOL_BACKENDS[0] if _POOL_BACKENDS else "no backends"))
        return case.id, failed, failed
    data = make_data(case)
    jax_backend, torch_backend = _POOL_BACKENDS
    return case.id, run_backend(jax_backend, case, data), run_backend(torch_backend, case, data)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.worker")
    p.add_argument("--backend", choices=("jax", "torch"), required=True)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--cases", required=True, help="JSON list of Case fields")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    setup_devices(args.devices)
    with open(args.cases) as f:
        cases = [case_from_fields(c) for c in json.load(f)]
    backend = load_backend(args.backend)
    for case in cases:
        save_result(args.out, case, run_backend(backend, case, make_data(case)))
        print(f"done {case.id}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
