"""One backend in its own process: ``python -m parity.worker --backend jax|torch ...``.

Used by ``python -m parity --isolate``. Runs each case of a JSON case list on one backend and
writes ``<out>/<case id>.npz`` (outputs as ``out:<key>``, gradients as ``grad:<key>``) and
``<out>/<case id>.json`` (HLO text, seconds, error). Prints ``done <case id>`` per case.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from .cases import Case

__all__ = ["save_result", "load_result", "main"]


def save_result(out_dir: str, case: Case, res) -> None:
    """Write a BackendResult for ``case`` into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    arrays = {f"out:{k}": v for k, v in res.outputs.items()}
    arrays.update({f"grad:{k}": v for k, v in res.grads.items()})
    np.savez(os.path.join(out_dir, f"{case.id}.npz"), **arrays)
    with open(os.path.join(out_dir, f"{case.id}.json"), "w") as f:
        json.dump({"hlo_text": res.hlo_text, "fwd_hlo_text": res.fwd_hlo_text,
                   "seconds": res.seconds, "error": res.error}, f)


def load_result(out_dir: str, case: Case):
    """Read back what :func:`save_result` wrote (an error result if the files are missing)."""
    from .runner import BackendResult

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.worker")
    p.add_argument("--backend", choices=("jax", "torch"), required=True)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--cases", required=True, help="JSON list of Case fields")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from .runner import _run_backend, load_backend, setup_devices

    setup_devices(args.devices)
    from . import cases as cases_mod

    with open(args.cases) as f:
        raw = json.load(f)
    cases = [Case(**{**c, "extra": tuple(tuple(e) for e in c["extra"])}) for c in raw]
    backend = load_backend(args.backend)
    for case in cases:
        res = _run_backend(backend, case, cases_mod.make_data(case))
        save_result(args.out, case, res)
        print(f"done {case.id}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
