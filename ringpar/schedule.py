"""The learning-rate schedule of the optimizer twins: linear warmup, then cosine decay.

Written once here (plain Python floats) and read by both backends: ``jax_impl.optim`` indexes a
float32 table of it inside the jitted step, ``torch_impl.optim`` sets each step's ``lr`` to the
same float32 value, so the two see bit-identical learning rates.

``lr(step)`` for the 0-based optimizer step (the first update uses ``lr(0)``):

- warmup, ``step < warmup_steps``: ``peak * (step + 1) / warmup_steps`` (the first step already
  moves; no wasted zero-lr step),
- then ``end + (peak - end) * (1 + cos(pi * t)) / 2`` with
  ``t = min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps))`` and
  ``end = peak * min_lr_ratio``; steps past ``total_steps`` stay at ``end``.

Example:
    >>> round(warmup_cosine(0, peak_lr=1.0, warmup_steps=4, total_steps=10), 6)
    0.25
    >>> round(warmup_cosine(3, peak_lr=1.0, warmup_steps=4, total_steps=10), 6)
    1.0
    >>> round(warmup_cosine(10, peak_lr=1.0, warmup_steps=4, total_steps=10, min_lr_ratio=0.1), 6)
    0.1
"""

from __future__ import annotations

import math

import numpy as np

from .validation import positive_int

__all__ = ["check_schedule", "warmup_cosine", "schedule_table"]


def check_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float) -> None:
    """ValueError naming the argument unless the schedule's arguments make sense."""
    if isinstance(peak_lr, bool) or not isinstance(peak_lr, (int, float)) or not peak_lr > 0:
        raise ValueError(f"peak_lr={peak_lr!r}: expected a float > 0")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r}: expected an int >= 0")
    positive_int("total_steps", total_steps)
    if not isinstance(min_lr_ratio, (int, float)) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio!r}: expected a float in [0, 1]")


def warmup_cosine(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.0) -> float:
    """Learning rate of 0-based optimizer step ``step`` (module docstring has the formula)."""
    check_schedule(peak_lr, warmup_steps, total_steps, min_lr_ratio)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step={step!r}: expected an int >= 0")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    end = peak_lr * min_lr_ratio
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (peak_lr - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def schedule_table(*, peak_lr: float, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float = 0.0) -> np.ndarray:
    """float32 ``[total_steps + 1]``: ``lr(0) .. lr(total_steps)``; index ``min(step, total)``.

    The one table both backends read (the last entry covers every later step).

    Example:
        >>> schedule_table(peak_lr=1.0, warmup_steps=1, total_steps=2).tolist()
        [1.0, 1.0, 0.0]
    """
    kw = dict(peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps,
              min_lr_ratio=min_lr_ratio)
    return np.asarray([warmup_cosine(s, **kw) for s in range(total_steps + 1)], np.float32)
