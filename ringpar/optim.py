"""The optimizer both backends train with, as neutral facts: hyperparameters, the weight-decay
rule, the neutral state layout, and the update rule itself as a numpy reference.

AdamW with global-norm gradient clipping and the warmup + cosine schedule of
:mod:`ringpar.schedule`; ``jax_impl.optim`` builds it from optax, ``torch_impl.optim`` from
``torch.optim.AdamW``. One step, for the 0-based step ``t`` and gradients ``g`` of every
parameter (the update of ``optax.chain(clip_by_global_norm, adamw)`` and of torch's AdamW):

    n = sqrt(sum over all parameters of sum(g**2))          # the logged grad_norm
    g = g if n < clip_norm else g / n * clip_norm
    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g**2
    p = p - lr(t) * ( m / (1 - b1**(t+1)) / (sqrt(v / (1 - b2**(t+1))) + eps) + wd * p )

``wd`` is ``weight_decay`` for parameters that :func:`applies_weight_decay`, else 0. ``eps`` is
outside the square root (torch's and optax's default ``eps_root=0``).

The neutral optimizer state (what checkpoints hold, what the twins export and import) is a flat
dict: ``"step"`` (int64 scalar: updates taken), ``"mu.<path>"`` and ``"nu.<path>"`` (the global
first and second moments, float32, the parameter's shape).

Example:
    >>> cfg = OptimizerConfig(peak_lr=0.1, warmup_steps=0, total_steps=10)
    >>> applies_weight_decay("blocks.0.mlp.fc.kernel"), applies_weight_decay("ln_f.scale")
    (True, False)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .schedule import check_schedule, schedule_table

__all__ = ["OptimizerConfig", "NO_DECAY_NAMES", "applies_weight_decay", "init_state",
           "reference_step"]

NO_DECAY_NAMES = ("bias", "scale")
"""Last path components of the parameters without weight decay (biases and norm scales)."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + clipping + schedule hyperparameters (the same object drives both backends).

    Attributes:
        peak_lr: Learning rate at the end of the warmup.
        warmup_steps: Linear warmup steps (0: start at the peak).
        total_steps: Step at which the cosine reaches ``peak_lr * min_lr_ratio``.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        weight_decay: Decoupled weight decay (``p -= lr * weight_decay * p``).
        b1, b2, eps: Adam's moment decays and epsilon (added outside the square root).
        clip_norm: Global gradient-norm threshold (``None``: no clipping).
    """

    peak_lr: float = 3e-3
    warmup_steps: int = 10
    total_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        check_schedule(self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr_ratio)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value!r}: expected a float in [0, 1)")
        for name in ("eps", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}={value!r}: expected a float >= 0")
        if self.clip_norm is not None and (not isinstance(self.clip_norm, (int, float))
                                           or not self.clip_norm > 0):
            raise ValueError(f"clip_norm={self.clip_norm!r}: expected None or a float > 0")

    def lr_table(self) -> np.ndarray:
        """float32 ``[total_steps + 1]`` learning rates (``ringpar.schedule.schedule_table``)."""
        return schedule_table(peak_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                              total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio)

    def lr(self, step: int) -> float:
        """The float32 learning rate of 0-based step ``step`` as a Python float."""
        table = self.lr_table()
        return float(table[min(int(step), len(table) - 1)])


def applies_weight_decay(path: str) -> bool:
    """Whether the parameter at ``path`` ('.'-joined) is decayed: all but biases and scales."""
    return path.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def init_state(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Neutral optimizer state of step 0 for ``params`` {path: array}: zero moments."""
    state = {"step": np.asarray(0, np.int64)}
    for path, value in params.items():
        state[f"mu.{path}"] = np.zeros(np.shape(value), np.float32)
        state[f"nu.{path}"] = np.zeros(np.shape(value), np.float32)
    return state


def reference_step(params: dict, grads: dict, state: dict, config: OptimizerConfig):
    """One update in float64 numpy (the module docstring's rule): the spec the twins are
    tested against.

    Returns:
        ``(new_params, new_state, grad_norm)``.
    """
    t = int(state["step"])
    norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                             for g in grads.values())))
    scale = 1.0 if config.clip_norm is None or norm < config.clip_norm else config.clip_norm / norm
    lr = config.lr(t)
    new_params, new_state = {}, {"step": np.asarray(t + 1, np.int64)}
    for path, p in params.items():
        p, g = np.asarray(p, np.float64), np.asarray(grads[path], np.float64) * scale
        m = config.b1 * np.asarray(state[f"mu.{path}"], np.float64) + (1 - config.b1) * g
        v = config.b2 * np.asarray(state[f"nu.{path}"], np.float64) + (1 - config.b2) * g * g
        m_hat, v_hat = m / (1 - config.b1 ** (t + 1)), v / (1 - config.b2 ** (t + 1))
        wd = config.weight_decay if applies_weight_decay(path) else 0.0
        new_params[path] = p - lr * (m_hat / (np.sqrt(v_hat) + config.eps) + wd * p)
        new_state[f"mu.{path}"], new_state[f"nu.{path}"] = m, v
    return new_params, new_state, norm
