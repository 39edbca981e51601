"""``python -m bench --compile``: first-step time of every ring method, each case in a fresh process.

A user judges a layer first by its first step: trace + compile + first run of forward+backward.
A shape-dependent compile pathology (issue 14: ``ColumnParallelLinear`` 64 -> 256 all-gather at
tp=4 took 50-120 s on torch_xla, 0.3 s on JAX) shows only there, and only in a fresh process
(later cases reuse the compile cache). So every (method, tp, in, out) case runs in its own
subprocess per backend with a timeout; a case that runs out of time is reported as a cliff, with
the timeout as its time, never dropped.

What is timed (``first_step_s``): building the case's program as the parity harness does
(``parity.<backend>_backend.build``: parameters, inputs, and on JAX the jit compile) plus its first
forward+backward step, after the backend runtime has started (a tiny warm-up computation, so
process and device start-up are not counted on either side). ``second_step_s`` is the next step:
near the steady step unless the second call re-traces a different graph.

Example::

    python -m bench --compile --out bench_out/compile      # 40 cases: 80 fresh processes
    python -m bench --compile --quick --out /tmp/c         # one case (tests/test_bench.py)
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

# Every ring method the layers offer, plus the sync partners: (module, variant) as in
# parity.cases. TPAsyncDense has no split gather (use_bidirectional_gather is the only option).
METHODS = [
    ("linear", "column-plain"), ("linear", "column-ag"), ("linear", "column-agbi"),
    ("linear", "row-plain"), ("linear", "row-rs"), ("linear", "row-rsbi"),
    ("tpasync", "gather-uni"), ("tpasync", "gather-bi"),
    ("tpasync", "scatter-uni"), ("tpasync", "scatter-split"),
    ("tpdense", "gather"), ("tpdense", "scatter"),
]
AXIS_SIZES = (2, 4, 8)
# (in, out) pairs: each dim takes 64, 96, 192, 256, 384 and 512 (96, 192, 384: non-power-of-two
# multiples of every tp). Each (method, tp) gets one pair (``per_method`` pairs with --full),
# rotating with the method's index, so the sweep covers every pair at every tp while the cross
# product (12 methods x 3 tps x 36 shapes x 2 backends, ~10 s a process here) stays affordable.
SHAPES = [(64, 256), (96, 384), (192, 64), (256, 512), (384, 96), (512, 192)]
# The cases issue 14 found falling off (always in the sweep).
ISSUE_CASES = [("linear", "column-ag", 4, 64, 256), ("linear", "column-agbi", 4, 64, 256),
               ("linear", "column-ag", 8, 64, 512), ("linear", "column-ag", 4, 96, 384)]
QUICK_CASES = [("linear", "column-ag", 4, 64, 256)]  # the worst cliff before issue 14's fix
BATCH = 64
BACKENDS = ("jax", "torch")


def sweep_cases(quick: bool = False, per_method: int = 1) -> list[tuple]:
    """The (module, variant, tp, in, out) cases of the sweep (or of ``--quick``)."""
    if quick:
        return list(QUICK_CASES)
    cases = []
    for m, (module, variant) in enumerate(METHODS):
        for t, n in enumerate(AXIS_SIZES):
            for k in range(per_method):
                fi, fo = SHAPES[(per_method * t + k + m) % len(SHAPES)]
                cases.append((module, variant, n, fi, fo))
    cases += [c for c in ISSUE_CASES if c not in cases]
    return cases


def _case(module: str, variant: str, n: int, fi: int, fo: int):
    from parity import cases as C

    extra = (("rso", 1),) if module == "linear" else ()
    return C.Case(module, variant, n, "float32", BATCH, fi, fo, extra)


# ------------------------------------------------------------------------------ in the worker
def _warm_up(backend: str) -> None:
    """Start the backend's runtime (devices, client) so that start-up is not timed."""
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        jax.block_until_ready(jnp.ones(4) + 1)
    else:
        import torch

        from torch_impl import mesh as tmesh

        t = torch.ones(4, device=tmesh.xla_device()) + 1
        tmesh.sync(wait=True)
        t.cpu()


def measure(backend: str, module: str, variant: str, n: int, fi: int, fo: int) -> dict:
    """First and second step time of one case (call in a fresh process, devices set up)."""
    from parity import cases as C
    from parity.runner import load_backend

    case = _case(module, variant, n, fi, fo)
    data = C.make_data(case)
    be = load_backend(backend)
    _warm_up(backend)
    print("START", flush=True)  # the parent's timeout runs from here
    t0 = time.perf_counter()
    prog = be.build(case, data)
    if backend == "torch":  # materialize the loaded parameters (their copies are pending ops)
        from torch_impl import mesh as tmesh

        tmesh.sync(wait=True)
    t1 = time.perf_counter()
    prog.step()
    t2 = time.perf_counter()
    prog.step()
    t3 = time.perf_counter()
    # JAX loaded in the torch worker means some torch_xla path imported it (xs.mark_sharding's
    # torchax check cost 3.5 s of a first step before torch_impl.xla stopped calling it).
    return {"build_s": t1 - t0, "first_step_s": t2 - t0, "second_step_s": t3 - t2,
            "jax_loaded": "jax" in sys.modules}


def worker_main(argv: list[str]) -> int:
    """``python -m bench.compile --worker BACKEND MODULE VARIANT N IN OUT [DEVICES]``."""
    backend, module, variant = argv[0], argv[1], argv[2]
    n, fi, fo = (int(a) for a in argv[3:6])
    devices = int(argv[6]) if len(argv) > 6 else 8
    from parity.runner import setup_devices

    setup_devices(devices)
    result = measure(backend, module, variant, n, fi, fo)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------ in the parent
def run_case(backend: str, case: tuple, timeout: float, devices: int = 8,
             command: list[str] | None = None, startup_timeout: float = 300.0) -> dict:
    """Run one case on one backend in a fresh subprocess.

    Returns ``{"status": "ok" | "timeout" | "error", "first_step_s", ...}``. ``timeout`` bounds
    the timed part (the worker prints ``START`` when it begins); imports and runtime start-up get
    ``startup_timeout`` more, so a loaded machine's slow imports are not mistaken for a cliff. A
    timeout counts as a first step of ``timeout`` seconds (a cliff: the real time is at least
    that). ``command`` replaces the worker (tests).
    """
    module, variant, n, fi, fo = case
    cmd = command or [sys.executable, "-m", "bench.compile", "--worker", backend, module, variant,
                      str(n), str(fi), str(fo), str(devices)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    lines: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    deadline, result = t0 + startup_timeout + timeout, None
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.perf_counter(), 0.0))
        except queue.Empty:
            proc.kill()
            proc.wait()
            return {"status": "timeout", "first_step_s": float(timeout),
                    "wall_s": time.perf_counter() - t0}
        if line is None:
            break
        if line.startswith("START"):
            deadline = time.perf_counter() + timeout
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    proc.wait()
    wall = time.perf_counter() - t0
    if result is not None:
        return {"status": "ok", "wall_s": wall, **result}
    tail = "".join(err).strip().splitlines()[-3:]
    return {"status": "error", "first_step_s": None, "wall_s": wall, "error": " | ".join(tail),
            "returncode": proc.returncode}


def bench_compile(cases: list[tuple], timeout: float, devices: int, progress,
                  command: list[str] | None = None, log: str | None = None) -> list[dict]:
    """One row per case: both backends' results and the torch/JAX first-step ratio. Each row is
    also appended to ``log`` (JSON lines) as it completes, so a long sweep's rows survive."""
    rows = []
    for i, case in enumerate(cases):
        module, variant, n, fi, fo = case
        progress(i, len(cases), f"compile {module}-{variant} n{n} {fi}->{fo}")
        row = {"module": module, "variant": variant, "n": n, "in": fi, "out": fo}
        for backend in BACKENDS:
            res = run_case(backend, case, timeout, devices, command)
            for key, value in res.items():
                row[f"{backend}_{key}"] = value
        j, t = row.get("jax_first_step_s"), row.get("torch_first_step_s")
        row["torch_over_jax"] = t / j if (j and t is not None) else None
        row["cliff"] = row["torch_status"] == "timeout" or row["jax_status"] == "timeout"
        rows.append(row)
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
    progress(len(cases), len(cases), "compile sweep done")
    return rows


def summary(rows: list[dict]) -> dict:
    """Median and worst torch/JAX first-step ratio, max torch first step, cliffs, errors."""
    ratios = [r["torch_over_jax"] for r in rows if r["torch_over_jax"] is not None]
    torch_times = [r["torch_first_step_s"] for r in rows if r.get("torch_first_step_s") is not None]
    worst = max(rows, key=lambda r: r["torch_over_jax"] or 0.0, default=None)
    slowest = max(rows, key=lambda r: r.get("torch_first_step_s") or 0.0, default=None)
    return {"cases": len(rows), "median_ratio": statistics.median(ratios) if ratios else None,
            "worst_ratio": max(ratios) if ratios else None,
            "worst_case": _label(worst) if worst else None,
            "max_torch_first_s": max(torch_times) if torch_times else None,
            "slowest_case": _label(slowest) if slowest else None,
            "cliffs": [_label(r) for r in rows if r["cliff"]],
            "errors": [_label(r) for r in rows
                       if "error" in (r["jax_status"], r["torch_status"])]}


def _label(r: dict) -> str:
    return f"{r['module']}-{r['variant']} tp={r['n']} {r['in']}->{r['out']}"


def _cell(r: dict, backend: str) -> str:
    status, v = r.get(f"{backend}_status"), r.get(f"{backend}_first_step_s")
    if status == "timeout":
        return f">{v:.0f} (CLIFF)"
    return "error" if v is None else f"{v:.2f}"


def markdown(rows: list[dict], meta: dict) -> str:
    """The sweep as a markdown table plus its summary line."""
    s = summary(rows)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    out = ["# ringpar compile sweep: first step (trace + compile + first run)", "",
           f"{meta['cases']} cases, batch {BATCH}, {meta['devices']} virtual CPU devices, each case "
           f"in a fresh process per backend, timeout {meta['timeout']:.0f} s; load average "
           f"before / after: {meta['load_before']} / {meta['load_after']}; {meta['date']}.", "",
           f"torch/JAX first step: median {fmt(s['median_ratio'])}, worst {fmt(s['worst_ratio'])} "
           f"({s['worst_case']}); max torch first step {fmt(s['max_torch_first_s'])} s "
           f"({s['slowest_case']}); cliffs (timeouts): {len(s['cliffs'])} {s['cliffs'] or ''}; "
           f"errors: {len(s['errors'])} {s['errors'] or ''}", "",
           "| case | tp | in -> out | JAX s | torch s | torch/JAX | torch 2nd step s |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['module']}-{r['variant']} | {r['n']} | {r['in']} -> {r['out']} | "
                   f"{_cell(r, 'jax')} | {_cell(r, 'torch')} | {fmt(r['torch_over_jax'])} | "
                   f"{fmt(r.get('torch_second_step_s'))} |")
    return "\n".join(out) + "\n"


def plot(path: str, rows: list[dict]) -> None:
    """Scatter of torch vs JAX first-step time, one point per case, cliffs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for n, marker in zip(AXIS_SIZES, "os^"):
        pts = [r for r in rows if r["n"] == n and r.get("jax_first_step_s")
               and r.get("torch_first_step_s")]
        ax.scatter([r["jax_first_step_s"] for r in pts], [r["torch_first_step_s"] for r in pts],
                   marker=marker, label=f"tp={n}")
        for r in pts:
            if r["cliff"]:
                ax.annotate(f"{r['variant']} {r['in']}->{r['out']}",
                            (r["jax_first_step_s"], r["torch_first_step_s"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo, hi = ax.get_xlim()[0], max(ax.get_ylim()[1], ax.get_xlim()[1])
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8, label="torch = JAX")
    ax.set_xlabel("JAX first step, s (build + compile + run)")
    ax.set_ylabel("torch_xla first step, s")
    ax.set_title("first step per case (fresh process each)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out_dir: str, quick: bool, devices: int, timeout: float, progress,
         command: list[str] | None = None) -> int:
    """Run the sweep, write results.json, results.md and compile_first_step.png to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    cases = sweep_cases(quick)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    rows = bench_compile(cases, timeout, devices, progress, command,
                         log=os.path.join(out_dir, "rows.jsonl"))
    meta = {"cases": len(rows), "devices": devices, "timeout": timeout, "quick": quick,
            "load_before": load_before,
            "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "cpus": os.cpu_count(), "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary(rows), "rows": rows}, f, indent=1)
    text = markdown(rows, meta)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    plot(os.path.join(out_dir, "compile_first_step.png"), rows)
    print(text)
    print(f"bench --compile: wrote results.json, results.md, compile_first_step.png to {out_dir} "
          f"in {meta['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2:]))
    print("usage: python -m bench --compile [--quick] [--out DIR]", file=sys.stderr)
    sys.exit(2)
