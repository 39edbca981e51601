"""Benchmarks of the ringpar layers on both backends (see README "Benchmarks").

Every program timed here is the one the parity harness verifies (``parity.jax_backend.build`` /
``parity.torch_backend.build``): forward + backward of a case. Reported, never asserted:

1. step time (median of repeats after warm-up) per case and backend, with the ratios
   torch_xla / JAX, async / sync (same direction, same axis size) and TP / single-device dense;
2. communication bytes per device of the compiled forward program (sum of collective operand
   sizes, ``parity.hlo.communication_bytes``) against the ring minimum, (n-1)/n of the full
   activation that must travel (the gathered input, or the reduced output);
3. compile time and compiled instruction count of the pipeline vs the number of micro-batches;
4. useful vs executed FLOPs of the pipeline against the GPipe bound m / (m + p - 1): executed =
   the dot FLOPs of the compiled per-device program with every loop body times its trip count
   (``parity.hlo.dot_flops``; XLA's cost analysis counts a loop body once), useful = the stage's
   three matmuls on the device's m micro-batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from parity import cases as C
from parity import hlo

TARGETS = {"torch_over_jax": 1.10, "bytes_over_min": 1.00, "compile_growth": 1.10,
           "tp_over_single": 1.5}

# (module, variant, extra) of the step-time matrix; sync/async partners for the ratio.
STEP_CASES = [
    ("tpdense", "gather", ()), ("tpdense", "scatter", ()),
    ("tpasync", "gather-uni", ()), ("tpasync", "gather-bi", ()),
    ("tpasync", "scatter-uni", ()), ("tpasync", "scatter-split", ()),
    ("linear", "column-plain", (("rso", 1),)), ("linear", "column-ag", (("rso", 1),)),
    ("linear", "column-agbi", (("rso", 1),)), ("linear", "row-plain", (("rso", 1),)),
    ("linear", "row-rs", (("rso", 1),)), ("linear", "row-rsbi", (("rso", 1),)),
]
SYNC_PARTNER = {("tpasync", "gather-uni"): ("tpdense", "gather"),
                ("tpasync", "gather-bi"): ("tpdense", "gather"),
                ("tpasync", "scatter-uni"): ("tpdense", "scatter"),
                ("tpasync", "scatter-split"): ("tpdense", "scatter"),
                ("linear", "column-ag"): ("linear", "column-plain"),
                ("linear", "column-agbi"): ("linear", "column-plain"),
                ("linear", "row-rs"): ("linear", "row-plain"),
                ("linear", "row-rsbi"): ("linear", "row-plain")}
ASYNC = set(SYNC_PARTNER)


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line[:140].ljust(140) + ("\n" if done == total else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _median_time(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _split_median(host, device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median host time and median device time of ``host(); device()`` steps (each part timed
    on its own: host = tracing or launching, device = sync + wait for the devices)."""
    for _ in range(warmup):
        host()
        device()
    hosts, devices = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        host()
        t1 = time.perf_counter()
        device()
        hosts.append(t1 - t0)
        devices.append(time.perf_counter() - t1)
    return statistics.median(hosts), statistics.median(devices)


def torch_step_times(prog, warmup: int, repeats: int) -> dict:
    """Steady torch step split into host tracing and device time, lazy and cached.

    Lazy: every step re-traces forward+backward (host) and then syncs (device: graph hash, cache
    look-up, run, wait). Cached: ``torch_impl.cached_step`` replays the compiled program (host:
    launch only)."""
    from torch_impl import mesh as tmesh
    from torch_impl.cached_step import cached_forward_backward

    module, x, cot = prog.module, prog.x, prog.cot

    def trace():
        module.zero_grad(set_to_none=True)
        x.grad = None
        (module(x) * cot).sum().backward()

    wait = lambda: tmesh.sync(wait=True)  # noqa: E731
    out = {}
    out["torch_trace_s"], out["torch_device_s"] = _split_median(trace, wait, warmup, repeats)
    step = cached_forward_backward(module, x, cot)
    out["torch_cached_host_s"], out["torch_cached_device_s"] = _split_median(
        step, wait, warmup, repeats)
    out["torch_cached_s"] = out["torch_cached_host_s"] + out["torch_cached_device_s"]
    return out


def ring_minimum_bytes(case: C.Case) -> int:
    """Bytes per device the forward's communication cannot go below: (n-1)/n of the activation
    that must travel (the gathered input for gather / column; the reduced output for scatter /
    row), float32 or bfloat16."""
    n = case.axis_size
    itemsize = 4 if case.dtype == "float32" else 2
    mode = case.variant.split("-")[0]
    gathers_input = mode in ("gather", "column")
    if case.module == "linear" and mode == "column" and case.variant.endswith("plain"):
        gathers_input = False  # plain column computes locally and gathers the output (if at all)
    elems = case.batch * (case.in_features if gathers_input else case.out_features)
    return (n - 1) * elems * itemsize // n


def _single_device_time(case: C.Case, warmup: int, repeats: int) -> float:
    """JAX forward+backward of the unsharded dense [B, in] @ [in, out] + b on one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    dev = jax.devices()[0]
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((case.batch, case.in_features), np.float32), dev)
    w = jax.device_put(rng.standard_normal((case.in_features, case.out_features), np.float32), dev)
    b = jax.device_put(np.zeros(case.out_features, np.float32), dev)
    ct = jax.device_put(rng.standard_normal((case.batch, case.out_features), np.float32), dev)

    @jax.jit
    def step(w, b, x, ct):
        y, vjp = jax.vjp(lambda w, b, x: x @ w + b, w, b, x)
        return y, vjp(ct)

    return _median_time(lambda: jax.block_until_ready(step(w, b, x, ct)), warmup, repeats)


def bench_steps(sizes, shape, warmup, repeats, progress) -> list[dict]:
    """Step time, bytes and ratios for every STEP_CASES entry at each axis size."""
    from parity.runner import load_backend

    jb, tb = load_backend("jax"), load_backend("torch")
    b, fi, fo = shape
    rows = []
    todo = [(m, v, e, n) for n in sizes for (m, v, e) in STEP_CASES]
    singles = {}
    for i, (module, variant, extra, n) in enumerate(todo):
        progress(i, len(todo), f"step {module}-{variant} n{n}")
        case = C.Case(module, variant, n, "float32", b, fi, fo, extra)
        data = C.make_data(case)
        row = {"case": case.id, "module": module, "variant": variant, "n": n}
        for name, backend in (("jax", jb), ("torch", tb)):
            prog = backend.build(case, data)
            row[f"{name}_s"] = _median_time(prog.step, warmup, repeats)
            row[f"{name}_fwd_bytes"] = hlo.communication_bytes(prog.fwd_hlo_text)
            row[f"{name}_fwd_collectives"] = len(hlo.collectives(prog.fwd_hlo_text))
            if name == "torch":
                row.update(torch_step_times(prog, warmup, repeats))
        row["min_bytes"] = ring_minimum_bytes(case)
        for name in ("jax", "torch"):
            row[f"{name}_bytes_over_min"] = (row[f"{name}_fwd_bytes"] / row["min_bytes"]
                                             if row["min_bytes"] else None)
        row["torch_over_jax"] = row["torch_s"] / row["jax_s"]
        row["torch_cached_over_jax"] = row["torch_cached_s"] / row["jax_s"]
        if (b, fi, fo) not in singles:
            singles[(b, fi, fo)] = _single_device_time(case, warmup, repeats)
        row["single_s"] = singles[(b, fi, fo)]
        row["jax_tp_over_single"] = row["jax_s"] / row["single_s"]
        row["torch_tp_over_single"] = row["torch_s"] / row["single_s"]
        rows.append(row)
    progress(len(todo), len(todo), "steps done")
    by_key = {(r["module"], r["variant"], r["n"]): r for r in rows}
    for r in rows:
        partner = SYNC_PARTNER.get((r["module"], r["variant"]))
        if partner and (partner + (r["n"],)) in by_key:
            p = by_key[partner + (r["n"],)]
            r["sync_case"] = p["case"]
            r["jax_async_over_sync"] = r["jax_s"] / p["jax_s"]
            r["torch_async_over_sync"] = r["torch_s"] / p["torch_s"]
    return rows


def args_devices(stages: int) -> int:
    """Data-parallel shards of the pipeline case's mesh (all devices / stages)."""
    import jax

    return jax.device_count() // stages


def bench_pipeline(microbatches, stages, progress) -> list[dict]:
    """Compile time, instruction count and FLOP efficiency of the pipeline vs micro-batches."""
    if "pipeline" not in C.MODULES:
        return []
    from parity.runner import load_backend

    jb, tb = load_backend("jax"), load_backend("torch")
    rows = []
    for i, m in enumerate(microbatches):
        progress(i, len(microbatches), f"pipeline m={m}")
        case = C.Case("pipeline", "mlp", stages, "float32", batch=args_devices(stages) * m * 4,
                      in_features=32, out_features=32, extra=(("microbatches", m),))
        data = C.make_data(case)
        row = {"microbatches": m, "stages": stages, "gpipe_bound": m / (m + stages - 1)}
        for name, backend in (("jax", jb), ("torch", tb)):
            t0 = time.perf_counter()
            prog = backend.build(case, data)
            text = prog.hlo_text  # compiles (torch compiles lazily here)
            row[f"{name}_compile_s"] = time.perf_counter() - t0
            row[f"{name}_instructions"] = hlo.instruction_count(text)
            row[f"{name}_flops"] = hlo.dot_flops(text)
        # Useful work per device: its stage on m micro-batches of b rows, forward (x @ W) and
        # backward (dy @ W^T, x^T @ dy): 3 matmuls of 2 * b * F * F each.
        rows_per_mb = case.batch // (m * (args_devices(stages)))
        row["useful_flops"] = 3 * 2 * m * rows_per_mb * case.in_features ** 2
        for name in ("jax", "torch"):
            row[f"{name}_flop_efficiency"] = row["useful_flops"] / row[f"{name}_flops"]
        rows.append(row)
    progress(len(microbatches), len(microbatches), "pipeline done")
    base = rows[0] if rows else None
    for r in rows:
        for name in ("jax", "torch"):
            r[f"{name}_compile_growth"] = r[f"{name}_compile_s"] / base[f"{name}_compile_s"]
            r[f"{name}_instruction_growth"] = r[f"{name}_instructions"] / base[f"{name}_instructions"]
    return rows


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def _host_device_table(steps: list[dict]) -> list[str]:
    """Markdown lines: the torch step split into host tracing and device time, lazy and cached."""
    rows = [r for r in steps if r.get("torch_cached_s") is not None]
    if not rows:
        return []
    ms = lambda v: _fmt(None if v is None else v * 1e3)  # noqa: E731
    out = ["", "## torch step: host tracing vs device, lazy and cached (torch_impl.cached_step)",
           "", "| case | lazy trace ms | lazy device ms | cached host ms | cached device ms | "
           "cached ms | torch/JAX lazy | torch/JAX cached |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['module']}-{r['variant']} n{r['n']} | {ms(r['torch_trace_s'])} | "
                   f"{ms(r['torch_device_s'])} | {ms(r['torch_cached_host_s'])} | "
                   f"{ms(r['torch_cached_device_s'])} | {ms(r['torch_cached_s'])} | "
                   f"{r['torch_over_jax']:.2f} | {r['torch_cached_over_jax']:.2f} |")
    out += ratio_lines(rows, {"lazy": "torch_over_jax", "cached": "torch_cached_over_jax"})
    return out


def ratio_lines(rows: list[dict], keys: dict[str, str]) -> list[str]:
    """One "torch/JAX <name>: median .., worst .." line per ``{name: row key}``."""
    out = []
    for name, key in keys.items():
        vals = [r[key] for r in rows]
        out.append(f"\ntorch/JAX {name}: median {statistics.median(vals):.2f}, worst "
                   f"{max(vals):.2f}")
    return out


def write_markdown(path: str, steps: list[dict], pipe: list[dict], meta: dict) -> None:
    """The results as markdown tables, with each target and whether it was met."""
    t = TARGETS
    out = ["# ringpar benchmark results", "",
           f"Machine: {meta['machine']}, {meta['cpus']} CPUs, {meta['devices']} virtual CPU "
           f"devices per backend; median of {meta['repeats']} steps after {meta['warmup']} "
           f"warm-up steps; problem [B, in] x [in, out] = {meta['shape']}; {meta['date']}.", "",
           "## Step time (forward + backward) and communication", "",
           "| case | JAX ms | torch ms | torch/JAX | async/sync JAX | async/sync torch | "
           "TP/single JAX | TP/single torch | fwd bytes/min JAX | fwd bytes/min torch |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        out.append(f"| {r['module']}-{r['variant']} n{r['n']} | {r['jax_s'] * 1e3:.2f} | "
                   f"{r['torch_s'] * 1e3:.2f} | {r['torch_over_jax']:.2f} | "
                   f"{_fmt(r.get('jax_async_over_sync'))} | {_fmt(r.get('torch_async_over_sync'))} | "
                   f"{r['jax_tp_over_single']:.2f} | {r['torch_tp_over_single']:.2f} | "
                   f"{_fmt(r['jax_bytes_over_min'])} | {_fmt(r['torch_bytes_over_min'])} |")
    out += _host_device_table(steps)
    met = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    worst_tj = max((r["torch_over_jax"] for r in steps), default=None)
    async_rows = [r for r in steps if (r["module"], r["variant"]) in ASYNC]
    bytes_ok = all(abs((r[f"{b}_bytes_over_min"] or 0) - 1.0) < 1e-9
                   for r in async_rows for b in ("jax", "torch"))
    worst_single = max((max(r["jax_tp_over_single"], r["torch_tp_over_single"])
                        for r in steps if r["n"] == 8), default=None)
    out += ["", "## Targets", "",
            f"- torch_xla step time <= {t['torch_over_jax']} x JAX on every case: worst "
            f"{_fmt(worst_tj)} ({met(worst_tj is not None and worst_tj <= t['torch_over_jax'])})",
            f"- forward bytes per device / ring minimum = 1.00 on every async case, both backends: "
            f"{met(bytes_ok)}",
            f"- TP on 8 devices <= {t['tp_over_single']} x single-device dense: worst "
            f"{_fmt(worst_single)} ({met(worst_single is not None and worst_single <= t['tp_over_single'])})"]
    if pipe:
        last = pipe[-1]
        out += [f"- compile time and instructions at {last['microbatches']} micro-batches <= "
                f"{t['compile_growth']} x those at {pipe[0]['microbatches']}: JAX compile "
                f"{last['jax_compile_growth']:.2f}, instructions {last['jax_instruction_growth']:.2f}; "
                f"torch compile {last['torch_compile_growth']:.2f}, instructions "
                f"{last['torch_instruction_growth']:.2f}",
                "", "## Pipeline vs micro-batches", "",
                "| m | stages | GPipe bound m/(m+p-1) | JAX compile s | JAX instr | torch compile s "
                "| torch instr | useful/executed dot FLOPs JAX | torch |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in pipe:
            out.append(f"| {r['microbatches']} | {r['stages']} | {r['gpipe_bound']:.3f} | "
                       f"{r['jax_compile_s']:.2f} | {r['jax_instructions']} | "
                       f"{r['torch_compile_s']:.2f} | {r['torch_instructions']} | "
                       f"{r['jax_flop_efficiency']:.3f} | {r['torch_flop_efficiency']:.3f} |")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def _save_plot(plt, fig, ax, path: str) -> str:
    """Finish one plot (legend, layout), write it to ``path`` and close it; returns ``path``."""
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(out_dir: str, steps: list[dict], pipe: list[dict]) -> list[str]:
    """PNG plots: step time per case and backend; pipeline compile growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if steps:
        fig, ax = plt.subplots(figsize=(12, 5))
        labels = [f"{r['module']}-{r['variant']}\nn{r['n']}" for r in steps]
        xs = range(len(steps))
        ax.bar([x - 0.2 for x in xs], [r["jax_s"] * 1e3 for r in steps], 0.4, label="JAX")
        ax.bar([x + 0.2 for x in xs], [r["torch_s"] * 1e3 for r in steps], 0.4, label="torch_xla")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ax.set_ylabel("forward+backward step, ms (median)")
        paths.append(_save_plot(plt, fig, ax, os.path.join(out_dir, "step_times.png")))
    if pipe:
        fig, ax = plt.subplots(figsize=(6, 4))
        ms = [r["microbatches"] for r in pipe]
        for name in ("jax", "torch"):
            ax.plot(ms, [r[f"{name}_instructions"] for r in pipe], marker="o", label=f"{name} instructions")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("micro-batches")
        ax.set_ylabel("compiled HLO instructions")
        paths.append(_save_plot(plt, fig, ax, os.path.join(out_dir, "pipeline_growth.png")))
    return paths


def _ints(text: str, count: int | None, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or (count and len(values) != count) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
    return values


def _shape(text: str) -> tuple[int, ...]:
    return _ints(text, 3, "three positive ints B,IN,OUT, e.g. 32,256,256")


def _axis_sizes(text: str) -> list[int]:
    return list(_ints(text, None, "positive ints separated by commas, e.g. 8 or 2,4,8"))


def main(argv=None) -> int:
    """Entry point of ``python -m bench``."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices per backend")
    p.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    p.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    p.add_argument("--compile", action="store_true",
                   help="first-step (trace + compile + run) sweep, each case in a fresh process")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="--compile: seconds per case and backend before it counts as a cliff")
    p.add_argument("--pipeline", action="store_true",
                   help="circular pipeline: measured useful-work fraction per (p, m, r)")
    p.add_argument("--gpt", action="store_true",
                   help="GPT training step (forward + loss + backward), torch lazy / cached vs JAX")
    p.add_argument("--shape", type=_shape, default=None, metavar="B,IN,OUT",
                   help="step-time problem [B, in] x [in, out] (default 64,512,512; --quick "
                        "32,256,256)")
    p.add_argument("--tp", type=_axis_sizes, default=None, metavar="N[,N...]",
                   help="step-time axis sizes (default every one of 2, 4, 8 dividing --devices)")
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.devices < 2 or args.devices % 2:
        p.print_usage(sys.stderr)
        print(f"python -m bench: error: --devices={args.devices}: expected an even number >= 2",
              file=sys.stderr)
        return 2
    from parity.runner import setup_devices

    if args.compile:  # the workers set their own devices; the parent imports neither backend
        from . import compile as compile_sweep

        return compile_sweep.main(args.out, args.quick, args.devices, args.timeout, _progress)
    setup_devices(args.devices)
    if args.pipeline:
        from . import pipeline_schedule

        return pipeline_schedule.main(args.out, args.devices, _progress)
    if args.gpt:
        from . import gpt_block

        return gpt_block.main(args.out, args.devices, args.quick, _progress)
    os.makedirs(args.out, exist_ok=True)
    sizes = args.tp or [n for n in (2, 4, 8) if args.devices % n == 0]
    bad = [n for n in sizes if args.devices % n]
    if bad:
        print(f"python -m bench: error: --tp={bad}: expected sizes dividing --devices="
              f"{args.devices}", file=sys.stderr)
        return 2
    warmup, repeats = (1, 3) if args.quick else (3, 15)
    shape = args.shape or ((32, 256, 256) if args.quick else (64, 512, 512))
    bad = [v for v in shape[1:] if any(v % n for n in sizes)]
    if bad:
        print(f"python -m bench: error: --shape={','.join(map(str, shape))}: in and out must be "
              f"divisible by every axis size {sizes}", file=sys.stderr)
        return 2
    microbatches = (4, 16) if args.quick else (4, 16, 64)
    stages = min(4, args.devices)
    t0 = time.perf_counter()
    steps = bench_steps(sizes, shape, warmup, repeats, _progress)
    pipe = bench_pipeline(microbatches, stages, _progress)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(), "devices": args.devices, "warmup": warmup,
            "repeats": repeats, "shape": list(shape), "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d"), "targets": TARGETS}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "steps": steps, "pipeline": pipe}, f, indent=1)
    write_markdown(os.path.join(args.out, "results.md"), steps, pipe, meta)
    plots = write_plots(args.out, steps, pipe)
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"bench: wrote results.json, results.md, {', '.join(os.path.basename(x) for x in plots)} "
          f"to {args.out} in {meta['seconds']:.0f} s")
    return 0
