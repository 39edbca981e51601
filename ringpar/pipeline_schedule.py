"""The pipeline schedule as data: GPipe (r = 1) and circular / interleaved (r > 1).

Written once here and read by both backends (``jax_impl.pipeline_circular``,
``torch_impl.pipeline_circular``), the bench (``bench.pipeline_schedule``) and the tests.

Terms: p stages (devices on the pipeline axis), m micro-batches, r repeats
(``num_pipeline_repeats``). The model has ``L = r * p`` layers (logical stages), assigned
round-robin: device d holds layers ``d, d + p, d + 2p, ...`` (its repeat k is layer ``k*p + d``).

Schedule: the loop has ``r*m + p - 1`` steps (GPipe, r = 1: ``m + p - 1``). At step t device d
works on ``u = t - d``: micro-batch ``u % m`` at repeat ``u // m`` when ``0 <= u < r*m``,
otherwise it idles (the bubble). After each step every device sends its result to the next
device on the ring, pairs ``(d, d+1 mod p)``. Device 0 keeps a circular buffer of m slots: at step
t it reads slot ``t % m`` (the micro-batch itself on repeat 0, what device p-1 sent back on later
repeats), and what it receives at the end of step ``t >= p-1`` (micro-batch ``(t-p+1) % m``) is
written to slot ``(t-p+1) % m``. A slot is read again m steps after its last read and written
p-1 steps after it, so r > 1 needs ``m >= p`` (the write lands before the next read). The last
device emits micro-batch i's final result at step ``(r-1)*m + p-1 + i``: the last m steps.

Example (p=2, m=2, r=2; each cell is micro-batch/repeat, '.' is idle)::

    >>> print(diagram(2, 2, 2))
    step      0    1    2    3    4
    dev 0   0/0  1/0  0/1  1/1    .
    dev 1     .  0/0  1/0  0/1  1/1
    >>> useful_fraction(2, 2, 2)
    Fraction(4, 5)
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .validation import positive_int

__all__ = ["check_schedule", "num_steps", "work", "layer_index", "layers_on_device",
           "StepTables", "step_tables", "useful_fraction", "formula_fraction", "diagram"]


def check_schedule(num_stages: int, num_microbatches: int, num_pipeline_repeats: int = 1) -> None:
    """ValueError naming the argument unless (p, m, r) is a valid schedule.

    Example:
        >>> check_schedule(4, 2, 2)
        Traceback (most recent call last):
        ...
        ValueError: num_pipeline_repeats=2 needs num_microbatches >= num_stages: got num_microbatches=2 < num_stages=4 (a micro-batch would come back to stage 0 before its slot is free)
    """
    positive_int("num_stages", num_stages)
    positive_int("num_microbatches", num_microbatches)
    positive_int("num_pipeline_repeats", num_pipeline_repeats)
    if num_pipeline_repeats > 1 and num_microbatches < num_stages:
        raise ValueError(
            f"num_pipeline_repeats={num_pipeline_repeats} needs num_microbatches >= num_stages: "
            f"got num_microbatches={num_microbatches} < num_stages={num_stages} (a micro-batch "
            f"would come back to stage 0 before its slot is free)")


def num_steps(p: int, m: int, r: int = 1) -> int:
    """Number of schedule steps: ``r*m + p - 1``."""
    check_schedule(p, m, r)
    return r * m + p - 1


def work(p: int, m: int, r: int, step: int, device: int) -> tuple[int, int] | None:
    """``(micro-batch, repeat)`` that ``device`` works on at ``step``, or None when it idles."""
    u = step - device
    if 0 <= u < r * m:
        return u % m, u // m
    return None


def layer_index(p: int, device: int, repeat: int) -> int:
    """The model layer that ``device`` runs on ``repeat`` (round-robin: ``repeat*p + device``)."""
    return repeat * p + device


def layers_on_device(p: int, r: int, device: int) -> list[int]:
    """The layers device ``device`` holds, in repeat order: ``[d, d+p, ..., d+(r-1)p]``."""
    return [layer_index(p, device, k) for k in range(r)]


@dataclass(frozen=True)
class StepTables:
    """Per-step integer tables the backends feed into their loop (first dim: the step).

    Attributes:
        repeat: ``[steps, p]`` the repeat (weights) device d uses at step t, clipped to
            ``[0, r-1]`` on idle steps (their result is never read).
        active: ``[steps, p]`` 1 where device d does useful work at step t, else 0.
        read_slot: ``[steps]`` the buffer slot device 0 reads at step t.
        read_active: ``[steps]`` 1 where device 0's read is a real micro-batch (0 in the bubble:
            the backends feed zeros then, as GPipe does).
        write_slot: ``[steps]`` the slot device 0 writes what it receives at the end of step t.
        write_active: ``[steps]`` 1 where that write happens (``t >= p-1``).
        output_start: the first step whose last-device result is a final output (the outputs are
            the steps ``output_start .. output_start + m - 1``, micro-batch order).
    """

    repeat: np.ndarray
    active: np.ndarray
    read_slot: np.ndarray
    read_active: np.ndarray
    write_slot: np.ndarray
    write_active: np.ndarray
    output_start: int


def step_tables(p: int, m: int, r: int = 1) -> StepTables:
    """The schedule of ``(p, m, r)`` as :class:`StepTables` (validated first)."""
    steps = num_steps(p, m, r)
    t = np.arange(steps)[:, None]
    u = t - np.arange(p)[None, :]
    active = ((u >= 0) & (u < r * m)).astype(np.int32)
    repeat = np.clip(u // m, 0, r - 1).astype(np.int32)
    t1 = np.arange(steps)
    return StepTables(
        repeat=repeat, active=active,
        read_slot=(t1 % m).astype(np.int32),
        read_active=(t1 < r * m).astype(np.int32),
        write_slot=((t1 - (p - 1)) % m).astype(np.int32),
        write_active=(t1 >= p - 1).astype(np.int32),
        output_start=(r - 1) * m + p - 1)


def useful_fraction(p: int, m: int, r: int = 1) -> Fraction:
    """Fraction of (step, device) slots doing useful work, counted from :func:`work`."""
    steps = num_steps(p, m, r)
    busy = sum(work(p, m, r, t, d) is not None for t in range(steps) for d in range(p))
    return Fraction(busy, steps * p)


def formula_fraction(p: int, m: int, r: int = 1) -> Fraction:
    """The textbook useful-work fraction ``r*m / (r*m + p - 1)``."""
    check_schedule(p, m, r)
    return Fraction(r * m, r * m + p - 1)


def diagram(p: int, m: int, r: int = 1) -> str:
    """The schedule as text: one row per device, one column per step (``micro/repeat``)."""
    steps = num_steps(p, m, r)
    cells = [[("%d/%d" % w) if (w := work(p, m, r, t, d)) else "." for t in range(steps)]
             for d in range(p)]
    width = max(4, *(len(c) for row in cells for c in row))
    lines = ["step  " + "".join(f"{t:>{width + 1}}" for t in range(steps))]
    lines += [f"dev {d:<2}" + "".join(f"{c:>{width + 1}}" for c in row)
              for d, row in enumerate(cells)]
    return "\n".join(lines)
