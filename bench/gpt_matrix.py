"""The issue-15 GPT matrix: every mesh x tp_async_dense, N SGD steps, on one backend per process.

Records per case the loss of every step, the final parameters in the reference layout, the
collective signature of the compiled step and the per-device parameter bytes, so that
``--compare`` can check JAX vs torch (<= 1e-5 relative loss per step), every mesh vs the
single-device JAX run (<= 1e-4) and the compiled collectives of both backends.

Usage (each backend in its own process, then the comparison)::

    python -m bench.gpt_matrix --backend jax --out /tmp/gm      # writes /tmp/gm/jax.npz + .json
    python -m bench.gpt_matrix --backend torch --out /tmp/gm
    python -m bench.gpt_matrix --compare /tmp/gm
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import numpy as np

MESHES = ((8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 1, 8), (1, 1, 2, 4), (2, 2, 1, 2), (1, 2, 2, 2),
          (2, 1, 2, 2))
SIZES = dict(vocab_size=64, hidden_size=32, num_heads=8, num_layers=4, max_seq_len=16,
             num_microbatches=2)
FSDP_ALL = dict(fsdp_modules=["Embed", "Block", "Head"], fsdp_min_weight_size=0)


def model_config(mesh, async_dense: bool, **sizes):
    """The ModelConfig of one case: FSDP on every module whenever fsdp > 1 (``sizes`` override
    :data:`SIZES`)."""
    from ringpar.configs import ParallelConfig
    from ringpar.gpt_model_config import gpt_model_config

    fsdp = FSDP_ALL if mesh[1] > 1 else {}
    par = ParallelConfig(data_axis_size=mesh[0], fsdp_axis_size=mesh[1],
                         pipeline_axis_size=mesh[2], model_axis_size=mesh[3],
                         tp_async_dense=async_dense, **fsdp)
    return gpt_model_config(par, **{**SIZES, **sizes})


def batch(seed: int = 0, batch_size: int = 16):
    """Fixed random tokens / next-token targets [B, S]."""
    tok = np.random.default_rng(seed).integers(0, SIZES["vocab_size"],
                                               (batch_size, SIZES["max_seq_len"] + 1))
    return tok[:, :-1], tok[:, 1:]


def run_jax(cfg, steps: int, lr: float, single: bool = False, with_hlo: bool = True):
    """SGD on the JAX model: (losses, final reference params, signature or None, bytes/device,
    bytes)."""
    import jax

    from jax_impl.mesh import create_mesh
    from jax_impl.model import build_gpt
    from parity import hlo

    devices = jax.devices()[:1] if single else None
    model = build_gpt(cfg, create_mesh(cfg.parallel, devices) if single else None)
    params = model.init_params(0)
    tokens, targets = batch()
    sig = (hlo.signature(model.compiled_text(params, tokens, targets), merge_all_reduces=True)
           if with_hlo else None)
    per_dev = sum(v.addressable_shards[0].data.nbytes for v in params.values())
    full = sum(v.nbytes for v in params.values())
    losses = []
    for _ in range(steps):
        loss, grads = model.loss_and_grads(params, tokens, targets)
        params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
        losses.append(float(loss))
    return losses, model.to_reference(params), sig, per_dev, full


def run_torch(cfg, steps: int, lr: float, with_hlo: bool = True):
    """SGD on the torch model: the same tuple as :func:`run_jax`."""
    import torch

    from parity import hlo
    from torch_impl import xla
    from torch_impl.model import build_gpt

    model = build_gpt(cfg)
    params = model.init_params(0)
    tokens, targets = batch()
    sig = (hlo.signature(model.compiled_text(params, tokens, targets), merge_all_reduces=True)
           if with_hlo else None)
    xla.sync()
    xla.wait_device_ops()
    per_dev = sum(xla.local_shards(p)[0][2].numel() * 4 for p in params.values())
    full = sum(p.numel() * 4 for p in params.values())
    losses = []
    for _ in range(steps):
        loss, grads = model.loss_and_grads(params, tokens, targets)
        with torch.no_grad():
            for k, p in params.items():
                p -= lr * grads[k]
        xla.sync()
        losses.append(float(loss.cpu()))
    return losses, model.to_reference(params), sig, per_dev, full


def run(backend: str, out: pathlib.Path, steps: int, lr: float, meshes) -> None:
    """Run every case on ``backend``; write ``out/<backend>.json`` and ``.npz``."""
    from ringpar.devices import set_cpu_devices

    set_cpu_devices(8)
    if backend == "torch":
        from torch_impl import xla
        xla.enable_spmd()
    results, arrays = {}, {}
    cases = [(m, a) for m in meshes for a in (False, True)]
    if backend == "jax":
        cases = [((1, 1, 1, 1), False)] + cases
    for mesh, async_dense in cases:
        name = f"{','.join(map(str, mesh))}/{'async' if async_dense else 'sync'}"
        t0 = time.time()
        cfg = model_config(mesh, async_dense)
        if backend == "jax":
            res = run_jax(cfg, steps, lr, single=mesh == (1, 1, 1, 1))
        else:
            res = run_torch(cfg, steps, lr)
        losses, ref, sig, per_dev, full = res
        results[name] = {"losses": losses, "seconds": round(time.time() - t0, 1),
                         "signature": sorted([list(map(str, k)), v] for k, v in sig.items()),
                         "param_bytes_per_device": per_dev, "param_bytes": full}
        for k, v in ref.items():
            arrays[f"{name}|{k}"] = v
        print(name, results[name]["seconds"], "s", losses[0], losses[-1], flush=True)
        out.mkdir(parents=True, exist_ok=True)  # after every case: a partial run is usable
        (out / f"{backend}.json").write_text(json.dumps(results, indent=1))
        np.savez(out / f"{backend}.npz", **arrays)


def compare(out: pathlib.Path) -> dict:
    """Print and return the JAX vs torch and mesh vs single-device differences."""
    res = {b: json.loads((out / f"{b}.json").read_text()) for b in ("jax", "torch")}
    arr = {b: np.load(out / f"{b}.npz") for b in ("jax", "torch")}
    base = "1,1,1,1/sync"
    bl = np.array(res["jax"][base]["losses"])
    rows = {}
    for name in res["torch"]:  # the cases both backends have finished
        lj, lt = np.array(res["jax"][name]["losses"]), np.array(res["torch"][name]["losses"])
        keys = [k for k in arr["jax"].files if k.startswith(name + "|")]
        pj = max(float(np.max(np.abs(arr["jax"][k] - arr["torch"][k]))) for k in keys)
        pb = max(float(np.max(np.abs(arr["jax"][k] - arr["jax"][base + k[len(name):]])))
                 for k in keys)
        rows[name] = {
            "jax_vs_torch_loss_rel": float(np.max(np.abs(lj - lt) / np.abs(lj))),
            "jax_vs_single_loss_rel": float(np.max(np.abs(lj - bl) / np.abs(bl))),
            "torch_vs_single_loss_rel": float(np.max(np.abs(lt - bl) / np.abs(bl))),
            "jax_vs_torch_param_abs": pj, "jax_vs_single_param_abs": pb,
            "signatures_equal": res["jax"][name]["signature"] == res["torch"][name]["signature"],
            "fsdp_bytes_ratio_jax": res["jax"][name]["param_bytes_per_device"]
            / res["jax"][name]["param_bytes"],
            "fsdp_bytes_ratio_torch": res["torch"][name]["param_bytes_per_device"]
            / res["torch"][name]["param_bytes"],
        }
        print(name, {k: (round(v, 9) if isinstance(v, float) else v) for k, v in rows[name].items()})
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=("jax", "torch"))
    ap.add_argument("--out", default="/tmp/gpt_matrix")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--meshes", default=None, help="e.g. '1,1,1,8;2,2,1,2' (default: all)")
    ap.add_argument("--compare", default=None, help="directory with jax.* and torch.*")
    args = ap.parse_args(argv)
    if args.compare:
        compare(pathlib.Path(args.compare))
        return
    if not args.backend:
        ap.error("--backend or --compare is required")
    meshes = MESHES if not args.meshes else [tuple(int(x) for x in m.split(","))
                                             for m in args.meshes.split(";")]
    run(args.backend, pathlib.Path(args.out), args.steps, args.lr, meshes)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
