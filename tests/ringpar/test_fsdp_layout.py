"""ringpar.fsdp_layout: the one FSDP sharding rule both backends use, and module-name checks."""

import doctest
from types import SimpleNamespace as NS

import pytest

from ringpar import fsdp_layout
from ringpar.configs import ParallelConfig
from ringpar.fsdp_layout import check_module_names, fsdp_shard_dim, sharded_names


def test_docstring_examples_run():
    result = doctest.testmod(fsdp_layout, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("shape, n, min_size, names, want", [
    ((32, 128), 4, 0, None, 1),             # largest dim
    ((128, 32), 4, 0, None, 0),
    ((64, 64), 4, 0, None, 1),              # tie: the last dim (xlstm-jax's reversed argsort)
    ((1, 16, 32), 2, 0, ("tp", None, None), 2),
    ((1, 64, 32), 2, 0, ("tp", None, None), 1),
    ((1, 64, 32), 2, 64 * 32, ("tp", None, None), None),  # size <= min_weight_size: replicated
    ((1, 64, 32), 2, 64 * 32 - 1, ("tp", None, None), 1),
    ((6, 10), 4, 0, None, None),            # 4 divides nothing: replicated
    ((6, 12), 4, 0, None, 1),               # only the divisible dim counts
    ((12, 64), 8, 0, (None, "tp"), None),   # the divisible dim is taken by tp
    ((7,), 1, 0, None, 0),                  # size-1 axis still picks a dim (as xlstm-jax)
])
def test_rule(shape, n, min_size, names, want):
    assert fsdp_shard_dim(shape, n, min_size, names) == want


def test_already_sharded_and_names():
    assert fsdp_shard_dim((64, 64), 4, 0, (None, "fsdp"), axis_name="fsdp") is None
    assert sharded_names(("tp", None, None), 3, 2, "fsdp") == ("tp", None, "fsdp")
    assert sharded_names(None, 2, 0, "fsdp") == ("fsdp", None)


def test_bad_input():
    with pytest.raises(ValueError, match="axis_size=0"):
        fsdp_shard_dim((4, 4), 0, 0)
    with pytest.raises(ValueError, match="names="):
        fsdp_shard_dim((4, 4), 2, 0, ("tp",))
    with pytest.raises(ValueError, match="min_weight_size"):
        fsdp_shard_dim((4, 4), 2, "big")


def test_module_names():
    check_module_names(ParallelConfig(fsdp_modules=["Block"], remat=["MLP"]), ["Block", "MLP"])
    with pytest.raises(ValueError, match=r"ParallelConfig.fsdp_modules=\['Blok'\].*'Blok'"):
        check_module_names(ParallelConfig(fsdp_modules=["Blok"]), ["Block"])
    with pytest.raises(ValueError, match=r"ParallelConfig.remat=.*\['mlp'\].*\['Block', 'MLP'\]"):
        check_module_names(ParallelConfig(remat=["MLP", "mlp"]), ["Block", "MLP"])
    with pytest.raises(ValueError, match="expected a list"):
        check_module_names(NS(fsdp_modules="Block", remat=[]), ["Block"])
