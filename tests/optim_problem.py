"""The optimizer test problem that tests/jax/test_optim.py, tests/torch/test_optim.py and
tests/parity/test_optim_twins.py share (framework-neutral: numpy and ringpar only).

A least-squares fit ``x @ kernel + bias ~ y`` with AdamW, a global-norm clip that engages on the
first 5 steps (grad norm 5.9 .. 3.6 > 3) and not after, and 5 warmup steps then cosine.
"""

from __future__ import annotations

import numpy as np

from ringpar.optim import OptimizerConfig, init_state, reference_step

CONFIG = OptimizerConfig(peak_lr=0.3, warmup_steps=5, total_steps=20, min_lr_ratio=0.1,
                         weight_decay=0.1, clip_norm=3.0)


def problem():
    """``(x [8, 4], y [8, 3], params)`` in float64, the same on every call."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)), 3 * rng.normal(size=(8, 3))
    params = {"lin.kernel": rng.normal(size=(4, 3)), "lin.bias": np.zeros(3)}
    return x, y, params


def reference(steps: int = 20) -> list:
    """``[(params, grad norm)]`` after each of ``steps`` float64 steps of
    ``ringpar.optim.reference_step`` on :func:`problem`."""
    x, y, p = problem()
    state, out = init_state(p), []
    for _ in range(steps):
        r = x @ p["lin.kernel"] + p["lin.bias"] - y
        grads = {"lin.kernel": x.T @ r / len(x), "lin.bias": r.sum(0) / len(x)}
        p, state, norm = reference_step(p, grads, state, CONFIG)
        out.append((p, norm))
    return out
