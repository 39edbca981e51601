"""torch_impl.scan_random on CPU tensors: seeded dropout masks; other random ops refused."""

from __future__ import annotations

import pytest
import torch

from torch_impl.scan_random import StepRandomness, hash_uniform


def test_hash_uniform_is_deterministic_uniform_and_seed_dependent():
    seed = torch.tensor(12345, dtype=torch.int64)
    u = hash_uniform(seed, (64, 64), 1)
    assert torch.equal(u, hash_uniform(seed, (64, 64), 1))
    assert not torch.equal(u, hash_uniform(seed + 1, (64, 64), 1))
    assert not torch.equal(u, hash_uniform(seed, (64, 64), 2))
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.02  # 4096 samples: std of the mean 0.0045


def test_dropout_under_the_mode_follows_the_seed():
    x = torch.ones(8, 16)
    drop = torch.nn.Dropout(0.5).train()

    def masks(seed):
        with StepRandomness(torch.tensor(seed, dtype=torch.int64)):
            return drop(x), drop(x)  # two layers in one step: two different masks

    a1, a2 = masks(7)
    b1, _ = masks(7)
    c1, _ = masks(8)
    assert set(a1.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(a1, b1) and not torch.equal(a1, a2) and not torch.equal(a1, c1)
    with StepRandomness(torch.tensor(7)):
        assert torch.equal(drop.eval()(x), x)


def test_other_random_ops_are_refused():
    with StepRandomness(torch.tensor(1)):
        with pytest.raises(ValueError, match="random op .*randn"):
            torch.randn(3)
