"""jax_impl.optim vs torch_impl.optim directly: the same 20 AdamW steps (clip engaging for the
first 5, warmup then cosine) on the same least-squares problem give the same parameters,
moments and gradient norms; the neutral state exported by one backend continues on the other."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jax_impl import optim as jopt
from tests.optim_problem import CONFIG, problem
from torch_impl import mesh as tmesh
from torch_impl import optim as topt

# Worst |jax - torch(XLA)| of parameters and moments over 20 steps, measured 4.8e-7: margin 4x.
ATOL = 2e-6


def _problem():
    x, y, params = problem()
    return x.astype(np.float32), y.astype(np.float32), params


def _jax_steps(steps, flat=None):
    x, y, p0 = _problem()
    params = {k: jnp.asarray(v, jnp.float32) for k, v in p0.items()}
    tx = jopt.make_optimizer(CONFIG)
    state = tx.init(params) if flat is None else jopt.import_state(tx, params, flat)
    if flat is not None:
        params = {k: jnp.asarray(flat[f"param.{k}"]) for k in params}

    def loss(p):
        r = x @ p["lin.kernel"] + p["lin.bias"] - y
        return 0.5 * jnp.sum(r * r) / x.shape[0]

    step = jax.jit(lambda p, s: jopt.apply_step(tx, p, jax.grad(loss)(p), s))
    out = []
    for _ in range(steps):
        params, state, norm = step(params, state)
        out.append((jopt.export_state(state, params) |
                    {f"param.{k}": np.asarray(v) for k, v in params.items()}, float(norm)))
    return out


def _torch_steps(device, steps, flat=None):
    x, y, p0 = _problem()
    x, y = torch.tensor(x, device=device), torch.tensor(y, device=device)
    if flat is not None:
        p0 = {k: flat[f"param.{k}"] for k in p0}
    params = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float32, device=device))
              for k, v in p0.items()}
    opt = topt.make_optimizer(params, CONFIG)
    if flat is not None:
        topt.import_state(opt, params, flat)
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        r = x @ params["lin.kernel"] + params["lin.bias"] - y
        (0.5 * torch.sum(r * r) / x.shape[0]).backward()
        norm = topt.apply_step(opt, params, None, CONFIG)
        tmesh.sync()
        out.append((topt.export_state(opt, params) |
                    {f"param.{k}": p.detach().cpu().numpy() for k, p in params.items()},
                    float(norm.cpu())))
    return out


def _worst(a, b):
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - b[k]))) for k in a)


def test_twenty_steps_identical(xla_device):
    jax_run, torch_run = _jax_steps(20), _torch_steps(xla_device, 20)
    worst = 0.0
    for (js, jn), (ts, tn) in zip(jax_run, torch_run):
        assert int(js["step"]) == int(ts["step"])
        assert jn == pytest.approx(tn, rel=1e-6)
        worst = max(worst, _worst(js, ts))
    assert worst < ATOL, worst
    assert sum(n >= CONFIG.clip_norm for _, n in jax_run) == 5


def test_state_moves_across_backends(xla_device):
    """10 steps on JAX, export, 10 more on torch == 20 on JAX (and the other way round)."""
    jax_run = _jax_steps(20)
    resumed = _torch_steps(xla_device, 10, flat=jax_run[9][0])
    assert _worst(jax_run[-1][0], resumed[-1][0]) < ATOL
    torch_first = _torch_steps(xla_device, 10)
    resumed = _jax_steps(10, flat=torch_first[-1][0])
    assert _worst(jax_run[-1][0], resumed[-1][0]) < ATOL
