"""``python -m bench --pipeline``: useful-work fraction of the circular pipeline, measured.

For p in {2, 4, 8} stages, m in {4, 8, 16} micro-batches and r in {1, 2, 4} repeats (r > 1 with
m < p is not a valid schedule: reported as such, not run), the JAX circular pipeline
(``jax_impl.pipeline_circular``) runs a probe layer on an 8-device CPU mesh and the fraction of
(step, device) slots that did useful work is measured from what the program executes:

- executed slots: p devices times the trip count of the compiled program's ``while`` loop (read
  from the compiled HLO's ``known_trip_count``), since every device runs its layer every step;
- useful slots: the probe layer maps ``[flag, count]`` to ``[flag, count + flag]``; real
  micro-batches enter with flag 1 and the bubble carries zeros, so the counts that come out of the
  pipeline add up the layer applications on real data that reached the output.

The table sets the measured fraction next to the formula ``r*m / (r*m + p - 1)`` (exact
fractions) and ``plot`` draws both. Example::

    python -m bench --pipeline --out bench_out/pipeline
"""

from __future__ import annotations

import json
import os
import re
import time
from fractions import Fraction

STAGES = (2, 4, 8)
MICROBATCHES = (4, 8, 16)
REPEATS = (1, 2, 4)


def _probe_module():
    import flax.linen as nn
    import jax.numpy as jnp

    class Probe(nn.Module):
        """``[flag, count] -> [flag, count + flag]``: counts layer applications on real rows."""

        @nn.compact
        def __call__(self, h):
            return jnp.stack([h[..., 0], h[..., 1] + h[..., 0]], axis=-1)

    return Probe


def measure(p: int, m: int, r: int, devices: int) -> dict:
    """Run the probe pipeline for (p, m, r); the measured counts and fractions."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from jax_impl.configs import ParallelConfig
    from jax_impl.mesh import create_mesh
    from jax_impl.pipeline_circular import CircularPipelineModule
    from ringpar import pipeline_schedule as schedule

    mesh = create_mesh(ParallelConfig(pipeline_axis_size=p, data_axis_size=devices // p))
    model = CircularPipelineModule(model_axis_name="pp", num_microbatches=m,
                                   num_pipeline_repeats=r, module_fn=_probe_module())
    dp = devices // p
    x = jnp.concatenate([jnp.ones((dp * m, 1)), jnp.zeros((dp * m, 1))], axis=1)  # 1 row / mb

    def run(x):
        return jax.lax.psum(model.apply({}, x), "pp")

    f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=P(("dp", "fsdp")),
                              out_specs=P(("dp", "fsdp"))))
    text = f.lower(x).compile().as_text()
    trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', text)]
    if len(trips) != 1:
        raise RuntimeError(f"expected one while loop in the compiled pipeline, found {trips}")
    y = np.asarray(f(x))
    useful = int(round(float(y[: m, 1].sum())))  # data shard 0: m micro-batches of one row
    measured = Fraction(useful, p * trips[0])
    return {"stages": p, "microbatches": m, "repeats": r, "valid": True,
            "compiled_steps": trips[0], "schedule_steps": schedule.num_steps(p, m, r),
            "useful_slots": useful, "executed_slots": p * trips[0],
            "measured": str(measured), "formula": str(schedule.formula_fraction(p, m, r)),
            "equal": measured == schedule.formula_fraction(p, m, r)}


def sweep(devices: int, progress) -> list[dict]:
    """Every (p, m, r) of the grid: measured rows, and invalid ones marked ``valid: False``."""
    from ringpar import pipeline_schedule as schedule

    grid = [(p, m, r) for p in STAGES if devices % p == 0 for m in MICROBATCHES for r in REPEATS]
    rows = []
    for i, (p, m, r) in enumerate(grid):
        progress(i, len(grid), f"pipeline p={p} m={m} r={r}")
        try:
            schedule.check_schedule(p, m, r)
        except ValueError as exc:
            rows.append({"stages": p, "microbatches": m, "repeats": r, "valid": False,
                         "reason": str(exc).split(" (")[0]})
            continue
        rows.append(measure(p, m, r, devices))
    progress(len(grid), len(grid), "pipeline done")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """The table: measured fraction next to the formula, per (p, m, r)."""
    lines = ["# Circular pipeline: useful-work fraction (measured vs r*m/(r*m+p-1))", "",
             f"{meta['date']}, {meta['devices']} CPU devices, JAX, {meta['seconds']:.0f} s. "
             "Measured = useful slots (probe counts at the output) / (p x compiled loop trips).",
             "", "| p | m | r | compiled steps | useful / executed slots | measured | formula | "
             "equal |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['stages']} | {r['microbatches']} | {r['repeats']} |"
        if not r["valid"]:
            lines.append(f"{head} - | invalid: {r['reason']} | - | - | - |")
            continue
        meas, form = Fraction(r["measured"]), Fraction(r["formula"])
        lines.append(f"{head} {r['compiled_steps']} | {r['useful_slots']} / "
                     f"{r['executed_slots']} | {meas} = {float(meas):.4f} | {form} = "
                     f"{float(form):.4f} | {'yes' if r['equal'] else 'NO'} |")
    valid = [r for r in rows if r["valid"]]
    lines += ["", f"{sum(r['equal'] for r in valid)} of {len(valid)} valid rows: measured == "
              f"formula exactly; {len(rows) - len(valid)} invalid (r > 1 needs m >= p)."]
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict]) -> None:
    """Measured fraction (markers) and formula (lines) against r*m, one colour per p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, p in enumerate(sorted({r["stages"] for r in rows})):
        pts = sorted((r["repeats"] * r["microbatches"], float(Fraction(r["measured"])))
                     for r in rows if r["valid"] and r["stages"] == p)
        xs = list(range(1, max(x for x, _ in pts) + 1))
        ax.plot(xs, [x / (x + p - 1) for x in xs], color=f"C{i}", lw=1, label=f"p={p} formula")
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o", color=f"C{i}",
                label=f"p={p} measured")
    ax.set_xlabel("r * m (repeats x micro-batches)")
    ax.set_ylabel("useful-work fraction")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("circular pipeline: measured vs r*m/(r*m+p-1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(out_dir: str, devices: int, progress) -> int:
    """Run the sweep, write results.json, results.md and pipeline_fraction.png to ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    rows = sweep(devices, progress)
    meta = {"devices": devices, "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = markdown(rows, meta)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    plot(os.path.join(out_dir, "pipeline_fraction.png"), rows)
    print(text)
    print(f"bench --pipeline: wrote results.json, results.md, pipeline_fraction.png to {out_dir}")
    valid = [r for r in rows if r["valid"]]
    return 0 if all(r["equal"] for r in valid) else 1
