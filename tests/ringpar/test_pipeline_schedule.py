"""ringpar.pipeline_schedule: the schedule as data (pure Python, no framework)."""

from __future__ import annotations

import doctest
from fractions import Fraction

import numpy as np
import pytest

from ringpar import pipeline_schedule as S

GRID = [(p, m, r) for p in (1, 2, 4, 8) for m in (1, 2, 4, 8, 16) for r in (1, 2, 4)
        if r == 1 or m >= p]


def test_doctests():
    assert doctest.testmod(S).failed == 0


@pytest.mark.parametrize("p,m,r", GRID)
def test_every_layer_of_every_microbatch_runs_once_in_order(p, m, r):
    """Replaying the tables: micro-batch i meets layers 0..r*p-1 in order, one per step."""
    steps = S.num_steps(p, m, r)
    assert steps == r * m + p - 1
    seen = {i: [] for i in range(m)}
    for t in range(steps):
        for d in range(p):
            w = S.work(p, m, r, t, d)
            if w is not None:
                i, k = w
                seen[i].append((t, S.layer_index(p, d, k)))
    for i in range(m):
        assert [layer for _, layer in seen[i]] == list(range(r * p))
        assert all(t1 < t2 for (t1, _), (t2, _) in zip(seen[i], seen[i][1:]))
    assert S.useful_fraction(p, m, r) == S.formula_fraction(p, m, r) == Fraction(
        r * m, r * m + p - 1)


@pytest.mark.parametrize("p,m,r", GRID)
def test_buffer_slot_is_written_before_it_is_read_again(p, m, r):
    """Device 0 reads slot t % m at step t; the returning micro-batch lands there in time."""
    tab = S.step_tables(p, m, r)
    slots = {i: ("input", i, 0) for i in range(m)}  # slot -> (what, micro-batch, repeat)
    for t in range(S.num_steps(p, m, r)):
        if tab.read_active[t]:
            i, k = S.work(p, m, r, t, 0)
            assert slots[tab.read_slot[t]][1:] == (i, k), (t, slots)
        if tab.write_active[t]:
            i, k = S.work(p, m, r, t - (p - 1), 0)
            slots[tab.write_slot[t]] = ("back", i, k + 1)
    np.testing.assert_array_equal(tab.active.sum(), r * m * p)
    assert tab.output_start + m == S.num_steps(p, m, r)


def test_round_robin_layers():
    assert S.layers_on_device(4, 3, 1) == [1, 5, 9]


@pytest.mark.parametrize("args,match", [
    ((4, 2, 2), r"num_pipeline_repeats=2 .*num_microbatches=2 < num_stages=4"),
    ((0, 4, 1), r"num_stages=0"), ((2, 0, 1), r"num_microbatches=0"),
    ((2, 2, 0), r"num_pipeline_repeats=0"), ((2, 2, True), r"num_pipeline_repeats=True")])
def test_invalid_schedules_raise(args, match):
    with pytest.raises(ValueError, match=match):
        S.check_schedule(*args)
