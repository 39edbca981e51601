"""Train the GPT on both backends from the same weights and compare them step by step.

Runs ``train_jax.py`` (which writes its initial weights) and then ``train_torch.py`` (which
loads them) in separate processes, as on TPU where the two runtimes cannot share the chips, and
compares the loss curves and the final weights. Exit status 1 if a loss differs by more than
``--rtol`` (relative) or a final weight by more than ``--rtol`` (normwise relative,
max|torch - jax| / max|jax|), or if the loss did not decrease.

    python examples/gpt_block/compare.py [--tp 4] [--mode plain|ring] [--steps 20] [--rtol 1e-4]
"""

from __future__ import annotations

import _common  # noqa: F401  (environment and sys.path)

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def main() -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init, out = pathlib.Path(tmp, "init.npz"), {}
        common = ["--tp", str(args.tp), "--mode", args.mode, "--norm", args.norm,
                  "--label-smoothing", str(args.label_smoothing), "--steps", str(args.steps),
                  "--lr", str(args.lr), "--init", str(init)]
        for backend in ("jax", "torch"):
            out[backend] = pathlib.Path(tmp, f"{backend}.npz")
            cmd = [sys.executable, str(HERE / f"train_{backend}.py"), *common,
                   "--save", str(out[backend])] + (["--hlo"] if args.hlo else [])
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, check=True)
        with np.load(out["jax"]) as j, np.load(out["torch"]) as t:
            jl, tl = j["__losses__"], t["__losses__"]
            loss_err = np.abs(tl - jl) / np.abs(jl)
            weights = sorted(k for k in j.files if k != "__losses__")
            w_err = {k: float(np.max(np.abs(t[k] - j[k])) / max(np.max(np.abs(j[k])), 1e-30))
                     for k in weights}
    print(f"\n{'step':>4}  {'jax loss':>10}  {'torch loss':>10}  rel diff")
    for i, (a, b, e) in enumerate(zip(jl, tl, loss_err)):
        print(f"{i:4d}  {a:10.6f}  {b:10.6f}  {e:.1e}")
    worst = max(w_err, key=w_err.get)
    print(f"\nworst loss difference {loss_err.max():.2e}; worst final weight {worst} "
          f"{w_err[worst]:.2e}; loss {jl[0]:.4f} -> {jl[-1]:.4f}")
    ok = loss_err.max() <= args.rtol and w_err[worst] <= args.rtol and jl[-1] < jl[0]
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
