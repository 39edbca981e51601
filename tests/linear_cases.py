"""What the JAX and the torch linear-layer tests share (framework-neutral: neither is imported).

Sizes, tolerances, the parameter tables of the twin tests in tests/{jax,torch}/test_linear_*.py
and the ring-permute counter of the compiled HLO. The measured errors behind FP32_RTOL and
BF16_RTOL are in tests/jax/linear_helpers.py and tests/torch/linear_helpers.py. Class names in the
tables are looked up in each backend's ``linear`` module (``getattr(linear, name)``), so the test
ids are the class names on both backends.
"""

from __future__ import annotations

from parity import hlo
from ringpar.matmul_methods import MatrixMultiplyMethod as M

IN, OUT = 16, 32  # divisible by every axis size under test
FP32_RTOL = 1e-5
BF16_RTOL = 2e-2  # about 5 x eps(bf16) = 5 x 2**-8

# (layer, method, reduce_scatter_output, tp size) of the bfloat16 tests
BF16_CASES = [
    ("column", M.ALL_GATHER_BIDIRECTIONAL, False, 4),
    ("column", M.PLAIN, True, 8),
    ("row", M.REDUCE_SCATTER_BIDIRECTIONAL, True, 8),
    ("row", M.PLAIN, False, 2),
]

# (class name, method) pairs where the method does not apply to the layer's direction
WRONG_DIRECTION = [("ColumnParallelLinear", M.REDUCE_SCATTER),
                   ("ColumnParallelLinear", M.REDUCE_SCATTER_BIDIRECTIONAL),
                   ("ParallelLinear", M.REDUCE_SCATTER),
                   ("RowParallelLinear", M.ALL_GATHER),
                   ("RowParallelLinear", M.ALL_GATHER_BIDIRECTIONAL)]

# (class name, method, reduce_scatter_output, in, out, the bad argument) at tp = 4
NOT_DIVISIBLE = [
    ("ColumnParallelLinear", M.PLAIN, False, 16, 30, "out_features=30"),
    ("ColumnParallelLinear", M.ALL_GATHER, True, 18, 32, "in_features=18"),
    ("ParallelLinear", M.PLAIN, True, 16, (8, 6), r"out_features=\(8, 6\) \(total 14\)"),
    ("RowParallelLinear", M.PLAIN, False, 18, 32, "in_features=18"),
    ("RowParallelLinear", M.PLAIN, True, 16, 30, "out_features=30"),
    ("RowParallelLinear", M.REDUCE_SCATTER, False, 16, 30, "out_features=30"),
]

# (ParallelLinear kwargs, the bad argument) refused on both backends
BAD_CONSTRUCTOR_ARGS = [
    (dict(in_features=0, out_features=4), "in_features=0"),
    (dict(in_features=4, out_features=-1), "out_features=-1"),
    (dict(in_features=4, out_features=()), r"out_features=\(\)"),
    (dict(in_features=4, out_features=(4, 0)), "out_features=0"),
    (dict(in_features=4, out_features=4, scale="fan_mid"), "scale='fan_mid'"),
    (dict(in_features=4, out_features=4, parallel_config="tp"), "parallel_config='tp'"),
]


def tp_groups(n: int) -> list[list[int]]:
    """The tp groups of the 8-device mesh (dp, fsdp, pp, tp) = (8/n, 1, 1, n)."""
    return [[r * n + j for j in range(n)] for r in range(8 // n)]


def permute_directions(ops, n: int) -> tuple[int, int]:
    """(#up, #down) ring permutes (pairs of a cyclic shift within every tp group) of the
    ``hlo.collectives`` ops; fails on any other permute. For n == 2 both directions have the same
    pairs: all count as up."""
    up_pairs, down_pairs = hlo.ring_pairs(tp_groups(n), True), hlo.ring_pairs(tp_groups(n), False)
    up = down = 0
    for op in ops:
        if op.kind != "collective-permute":
            continue
        assert op.pairs in (up_pairs, down_pairs), f"non-ring permute pairs {op.pairs}"
        if op.pairs == up_pairs:
            up += 1
        else:
            down += 1
    return up, down
