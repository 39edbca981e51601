"""``python -m bench --gpt``: steady training-step time of the GPT model, torch_xla vs JAX.

The step is forward + loss + backward of ``jax_impl.gpt.GPT`` / ``torch_impl.gpt.GPT`` (the
``SIZES`` below: one transformer block between the embeddings and the vocab-parallel head) at
tp 2, 4 and 8 in both tensor-parallel modes ("plain" and "ring"). Both backends load the same
random parameters and tokens; the first step's losses must agree (``LOSS_RTOL``) or the row says
so. Timed, median of ``repeats`` steps after ``warmup``:

- JAX: ``jax_impl.gpt.cached_loss_and_grads`` (one compiled program, called on the model's
  parameters each step);
- torch lazy: ``torch_impl.gpt.loss_and_grads`` (the model re-traced on the host every step);
- torch cached: ``torch_impl.gpt.cached_loss_and_grads`` (traced and compiled once, replayed).

``first_s`` is building the step plus its first call (trace + compile + run), in this process
(so after the other rows' imports and runtime start-up; the fresh-process first step of the
layers is ``python -m bench --compile``).

Example::

    python -m bench --gpt --out bench_out/gpt     # 6 rows: tp 2, 4, 8 x plain, ring
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from .core import _median_time, ratio_lines

# One block of a small GPT: big enough that the step is not only launch overhead.
SIZES = dict(vocab_size=512, max_seq_len=32, hidden_size=256, num_heads=8, num_layers=1,
             mlp_hidden_size=1024)
BATCH = 8
AXIS_SIZES = (2, 4, 8)
MODES = ("plain", "ring")
LOSS_RTOL = 1e-5  # float32, same parameters: measured differences are ~1e-7


def make_inputs(seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    """Random parameters {path: array} (``gpt_param_shapes``), tokens and targets [B, S]."""
    from ringpar.gpt_config import GPTConfig, gpt_param_shapes

    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in sorted(gpt_param_shapes(GPTConfig(**SIZES)).items()):
        scale = 1.0 / np.sqrt(shape[0]) if len(shape) == 2 else 0.1
        params[path] = (rng.standard_normal(shape) * scale).astype(np.float32)
        if path.endswith("scale"):
            params[path] += 1.0
    shape = (BATCH, SIZES["max_seq_len"])
    tokens = rng.integers(0, SIZES["vocab_size"], shape)
    targets = rng.integers(0, SIZES["vocab_size"], shape)
    return params, tokens, targets


def jax_row(n: int, mode: str, inputs, warmup: int, repeats: int) -> dict:
    """JAX: first step and steady step of the compiled loss + gradients."""
    import jax
    from flax import nnx

    from jax_impl import gpt
    from jax_impl.configs import ParallelConfig
    from jax_impl.mesh import create_mesh

    params, tokens, targets = inputs
    mesh = create_mesh(ParallelConfig(model_axis_size=n))
    model = gpt.GPT(gpt.GPTConfig(**SIZES, tp_mode=mode), mesh=mesh, rngs=nnx.Rngs(0))
    gpt.load_params(model, params)
    t0 = time.perf_counter()
    step = gpt.cached_loss_and_grads(model, tokens, targets)
    loss = float(jax.block_until_ready(step())[0])
    first = time.perf_counter() - t0
    steady = _median_time(lambda: jax.block_until_ready(step()), warmup, repeats)
    return {"jax_first_s": first, "jax_s": steady, "jax_loss": loss}


def torch_row(n: int, mode: str, inputs, warmup: int, repeats: int) -> dict:
    """torch_xla: first step (cached path) and steady step, lazy and cached."""
    from torch_impl import gpt
    from torch_impl import mesh as tmesh
    from torch_impl.configs import ParallelConfig

    params, tokens, targets = inputs
    mesh = tmesh.create_mesh(ParallelConfig(model_axis_size=n))
    model = gpt.GPT(gpt.GPTConfig(**SIZES, tp_mode=mode), mesh=mesh, seed=0)
    gpt.load_params(model, params)
    tmesh.sync(wait=True)
    wait = lambda: tmesh.sync(wait=True)  # noqa: E731
    t0 = time.perf_counter()
    step = gpt.cached_loss_and_grads(model, tokens, targets)
    out = step()
    wait()
    first = time.perf_counter() - t0
    loss = float(out[0].cpu())
    cached = _median_time(lambda: (step(), wait()), warmup, repeats)
    lazy = _median_time(lambda: (gpt.loss_and_grads(model, tokens, targets), wait()), warmup,
                        repeats)
    return {"torch_first_s": first, "torch_cached_s": cached, "torch_s": lazy,
            "torch_loss": loss}


def bench_gpt(warmup: int, repeats: int, progress, sizes=AXIS_SIZES) -> list[dict]:
    """One row per (tp, mode): both backends' times, ratios and the loss check."""
    from parity.backend import load_backend

    load_backend("jax"), load_backend("torch")  # JAX first; torch_xla's SPMD mode on
    inputs = make_inputs()
    todo = [(n, mode) for n in sizes for mode in MODES]
    rows = []
    for i, (n, mode) in enumerate(todo):
        progress(i, len(todo), f"gpt tp={n} {mode}")
        row = {"n": n, "mode": mode, **jax_row(n, mode, inputs, warmup, repeats),
               **torch_row(n, mode, inputs, warmup, repeats)}
        row["loss_rel_diff"] = abs(row["torch_loss"] - row["jax_loss"]) / abs(row["jax_loss"])
        row["loss_ok"] = row["loss_rel_diff"] <= LOSS_RTOL
        row["torch_cached_over_jax"] = row["torch_cached_s"] / row["jax_s"]
        row["torch_lazy_over_jax"] = row["torch_s"] / row["jax_s"]
        row["torch_first_over_jax"] = row["torch_first_s"] / row["jax_first_s"]
        rows.append(row)
    progress(len(todo), len(todo), "gpt done")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """The rows as a markdown table with the median / worst ratios."""
    out = ["# ringpar GPT step: torch_xla vs JAX", "",
           f"GPT {SIZES}, batch {BATCH}, float32, {meta['devices']} virtual CPU devices; median "
           f"of {meta['repeats']} steps after {meta['warmup']} warm-up; {meta['date']}, load "
           f"before / after {meta['load_before']} / {meta['load_after']}.", "",
           "| tp | mode | JAX ms | torch cached ms | torch lazy ms | cached/JAX | lazy/JAX | "
           "JAX first s | torch first s | loss rel diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flag = "" if r["loss_ok"] else " (OVER)"
        out.append(f"| {r['n']} | {r['mode']} | {r['jax_s'] * 1e3:.2f} | "
                   f"{r['torch_cached_s'] * 1e3:.2f} | {r['torch_s'] * 1e3:.2f} | "
                   f"{r['torch_cached_over_jax']:.2f} | {r['torch_lazy_over_jax']:.2f} | "
                   f"{r['jax_first_s']:.2f} | {r['torch_first_s']:.2f} | "
                   f"{r['loss_rel_diff']:.1e}{flag} |")
    out += ratio_lines(rows, {"cached": "torch_cached_over_jax", "lazy": "torch_lazy_over_jax"})
    return "\n".join(out) + "\n"


def main(out_dir: str, devices: int, quick: bool, progress) -> int:
    """Run the GPT rows, write results.json and results.md to ``out_dir``; 1 if a loss differs."""
    os.makedirs(out_dir, exist_ok=True)
    warmup, repeats = (1, 3) if quick else (3, 15)
    sizes = (2,) if quick else tuple(n for n in AXIS_SIZES if devices % n == 0)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    rows = bench_gpt(warmup, repeats, progress, sizes)
    meta = {"devices": devices, "warmup": warmup, "repeats": repeats, "sizes": SIZES,
            "batch": BATCH, "load_before": load_before,
            "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(rows, meta)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"bench --gpt: wrote results.json, results.md to {out_dir} in {meta['seconds']:.0f} s")
    return 0 if all(r["loss_ok"] for r in rows) else 1
