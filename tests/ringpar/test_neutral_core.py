"""ringpar's neutral core: ring pairs, validation, seeds, the CPU device environment, doctests."""

from __future__ import annotations

import doctest
import importlib
import os

import pytest

from ringpar import devices, rings, seeding, validation


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ring_perm_is_a_cyclic_shift_and_down_inverts_up(n):
    up, down = rings.ring_perm(n), rings.ring_perm(n, shift_up=False)
    assert sorted(s for s, _ in up) == list(range(n)) == sorted(t for _, t in up)
    assert all(t == (s + 1) % n for s, t in up)
    assert sorted((t, s) for s, t in up) == sorted(down)


def test_ring_perm_pairs():
    assert rings.ring_perm(4) == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert rings.ring_perm(4, shift_up=False) == [(1, 0), (2, 1), (3, 2), (0, 3)]
    assert rings.ring_perm(1) == [(0, 0)]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "4"])
def test_ring_perm_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match=r"n=.*expected a positive int"):
        rings.ring_perm(bad)


def test_validation_names_argument_and_value():
    assert validation.positive_int("width", 3) == 3
    for bad in (0, -2, 1.5, True, None):
        with pytest.raises(ValueError, match=r"width=.*positive int"):
            validation.positive_int("width", bad)
    with pytest.raises(ValueError, match=r"mode='gathr': expected one of \('gather', 'scatter'\)"):
        validation.check_choice("mode", "gathr", ("gather", "scatter"))
    with pytest.raises(ValueError, match="heads=6 is not divisible by tp=4"):
        validation.check_divisible("heads", 6, "tp", 4)


def test_seeds_are_checked_drawn_and_folded_deterministically():
    assert seeding.resolve_seed(5, draw=lambda: 9) == 5
    assert seeding.resolve_seed(None, draw=lambda: 9) == 9
    for bad in (True, 1.0, "1"):
        with pytest.raises(ValueError, match="seed="):
            seeding.check_seed(bad)
    folded = {seeding.fold_in(0, i) for i in range(64)}
    assert len(folded) == 64 and all(0 <= s < 2**63 for s in folded)
    assert seeding.fold_in(3, 1) == seeding.fold_in(3, 1) != seeding.fold_in(4, 1)


def test_set_cpu_devices_replaces_the_count_and_keeps_other_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_force_host_platform_device_count=2")
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    # Restored after the test: a later torch_xla start in this process reads it.
    monkeypatch.setenv("CPU_NUM_DEVICES", os.environ.get("CPU_NUM_DEVICES", "8"))
    devices.set_cpu_devices(4)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_foo=1",
                                               "--xla_force_host_platform_device_count=4"]
    assert os.environ["CPU_NUM_DEVICES"] == "4"
    with pytest.raises(ValueError, match="n=0"):
        devices.set_cpu_devices(0)


@pytest.mark.parametrize("name", ["ringpar", "ringpar.rings", "ringpar.validation",
                                  "ringpar.seeding", "ringpar.gpt_config", "ringpar.devices"])
def test_docstring_examples_run(name, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    monkeypatch.setenv("CPU_NUM_DEVICES", os.environ.get("CPU_NUM_DEVICES", "8"))
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0
