"""AdamW with global-norm clipping and a warmup + cosine schedule, on ``torch.optim`` (twin of
``jax_impl.optim``).

The rule, the hyperparameters (:class:`ringpar.optim.OptimizerConfig`), the weight-decay rule and
the schedule table are neutral (:mod:`ringpar.optim`, :mod:`ringpar.schedule`). This module builds
them from ``torch.optim.AdamW`` (two parameter groups: decayed and not) and its own global-norm
clip, written as optax's (keep the gradients when ``norm < max_norm``, else ``g / norm * max_norm``;
``torch.nn.utils.clip_grad_norm_`` divides by ``norm + 1e-6`` instead, a 1e-6 relative
difference). Each step sets the group learning rate to the same float32 table value JAX indexes,
so both backends use bit-identical learning rates. Parameters may live on the CPU or the XLA
device; the clip has no data-dependent Python branch, so it stays inside the lazy graph.

Parameters are a ``{path: torch.nn.Parameter}`` dict (``dict(model.named_parameters())``):
the same paths ``jax_impl.optim`` reads from its parameter tree.

Example:
    >>> import torch
    >>> from ringpar.optim import OptimizerConfig
    >>> cfg = OptimizerConfig(peak_lr=0.1, warmup_steps=0, total_steps=10)
    >>> params = {"w.kernel": torch.nn.Parameter(torch.ones(2, 2)),
    ...           "w.bias": torch.nn.Parameter(torch.zeros(2))}
    >>> opt = make_optimizer(params, cfg)
    >>> for p in params.values():
    ...     p.grad = torch.ones_like(p)
    >>> round(float(apply_step(opt, params, None, cfg)), 4)
    2.4495
"""

from __future__ import annotations

import typing as tp

import numpy as np
import torch

from ringpar.optim import OptimizerConfig, applies_weight_decay

__all__ = ["param_paths", "global_norm", "clip_by_global_norm", "learning_rate_schedule",
           "weight_decay_mask", "make_optimizer", "apply_step", "step_count", "export_state",
           "import_state"]


def param_paths(params: tp.Mapping[str, torch.Tensor]) -> list[str]:
    """The paths of ``params`` (``{path: parameter}``), in order."""
    return list(params)


def global_norm(grads: tp.Iterable[torch.Tensor]) -> torch.Tensor:
    """sqrt of the sum of squares of every gradient (float32 scalar, on their device)."""
    grads = list(grads)
    if not grads:
        raise ValueError("grads: expected at least one gradient")
    return torch.sqrt(sum(torch.sum(g.float() * g.float()) for g in grads))


def clip_by_global_norm(grads: tp.Sequence[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """In place: scale ``grads`` by ``max_norm / norm`` when their global norm is >= ``max_norm``
    (optax's rule; ``None``: no clipping). Returns the norm before clipping."""
    norm = global_norm(grads)
    if max_norm is not None:
        keep = norm < max_norm
        for g in grads:
            g.copy_(torch.where(keep, g, g / norm.to(g.dtype) * max_norm))
    return norm


def learning_rate_schedule(config: OptimizerConfig) -> tp.Callable[[int], float]:
    """``step -> lr``: the neutral float32 table value (as a Python float) of 0-based ``step``."""
    table = config.lr_table()
    return lambda step: float(table[min(int(step), table.shape[0] - 1)])


def weight_decay_mask(params: tp.Mapping[str, torch.Tensor]) -> dict[str, bool]:
    """``{path: bool}``: True where :func:`ringpar.optim.applies_weight_decay`."""
    return {path: applies_weight_decay(path) for path in param_paths(params)}


def make_optimizer(params: tp.Mapping[str, torch.nn.Parameter],
                   config: OptimizerConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` with a decayed and a non-decayed group."""
    if not isinstance(config, OptimizerConfig):
        raise ValueError(f"config={config!r}: expected a ringpar.optim.OptimizerConfig")
    if not isinstance(params, tp.Mapping) or not params:
        raise ValueError("params: expected a non-empty {path: parameter} dict "
                         "(dict(model.named_parameters()))")
    mask = weight_decay_mask(params)
    groups = [{"params": [p for k, p in params.items() if mask[k] == decay],
               "weight_decay": config.weight_decay if decay else 0.0} for decay in (True, False)]
    # foreach=False: the single-tensor path on every device (CPU and XLA alike).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr(0),
                             betas=(config.b1, config.b2), eps=config.eps, foreach=False)


def apply_step(optimizer: torch.optim.AdamW, params: tp.Mapping[str, torch.nn.Parameter],
               grads: tp.Mapping[str, torch.Tensor] | None,
               config: OptimizerConfig) -> torch.Tensor:
    """One update: clip, set the step's lr, ``optimizer.step()`` (twin of the JAX
    ``apply_step(tx, params, grads, opt_state)``; the state lives in ``optimizer``).

    Args:
        optimizer: From :func:`make_optimizer` over ``params``.
        params: ``{path: parameter}``, updated in place.
        grads: ``{path: gradient}`` (set as the parameters' ``.grad``), or None to use the
            ``.grad`` that ``backward()`` left.
        config: The optimizer's config (clip norm and schedule).

    Returns:
        The gradient norm before clipping (a lazy tensor on the XLA device).
    """
    if grads is not None:
        missing = sorted(set(params) - set(grads))
        if missing:
            raise ValueError(f"grads: missing {missing[:5]}")
        for k, p in params.items():
            p.grad = grads[k]
    missing = [k for k, p in params.items() if p.grad is None]
    if missing:
        raise ValueError(f"params {missing[:5]}: no gradient (run backward first)")
    step = step_count(optimizer)
    with torch.no_grad():
        norm = clip_by_global_norm([p.grad for p in params.values()], config.clip_norm)
    lr = learning_rate_schedule(config)(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return norm


def step_count(optimizer: torch.optim.AdamW) -> int:
    """Updates taken so far (torch keeps one count per parameter; they are all equal)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def export_state(optimizer: torch.optim.AdamW,
                 params: tp.Mapping[str, torch.nn.Parameter]) -> dict[str, np.ndarray]:
    """The neutral optimizer state (:mod:`ringpar.optim`): ``step``, ``mu.<path>``,
    ``nu.<path>`` as global numpy arrays (zeros before the first step)."""
    out = {"step": np.asarray(step_count(optimizer), np.int64)}
    for path, p in params.items():
        state = optimizer.state.get(p, {})
        for name, key in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):
            value = state.get(key)
            out[f"{name}.{path}"] = (np.zeros(tuple(p.shape), np.float32) if value is None else
                                     value.detach().to("cpu").float().numpy())
    return out


def import_state(optimizer: torch.optim.AdamW, params: tp.Mapping[str, torch.nn.Parameter],
                 flat: tp.Mapping[str, tp.Any]) -> None:
    """Set ``optimizer``'s state from the neutral ``flat`` state (moments on each parameter's
    device). ValueError naming the key if one is missing or has the wrong shape."""
    if "step" not in flat:
        raise ValueError("optimizer state: missing 'step'")
    step = int(np.asarray(flat["step"]))
    new = {}
    for path, p in params.items():
        entry = {"step": torch.tensor(float(step))}
        for name, key in (("mu", "exp_avg"), ("nu", "exp_avg_sq")):
            if f"{name}.{path}" not in flat:
                raise ValueError(f"optimizer state: missing {name}.{path!r}")
            value = np.asarray(flat[f"{name}.{path}"])
            if value.shape != tuple(p.shape):
                raise ValueError(f"optimizer state '{name}.{path}': shape {value.shape}, "
                                 f"expected {tuple(p.shape)}")
            entry[key] = torch.tensor(value).to(device=p.device, dtype=p.dtype)
        new[p] = entry
    for p, entry in new.items():  # only after every key checked: a failed import changes nothing
        optimizer.state[p] = entry
