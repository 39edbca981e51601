"""jax_impl.linear communication: the collectives of the compiled, partitioned forward and
training step of every layer x method (read from the HLO with ``parity.hlo``), and the ring
helpers of jax_impl.linear_ring against the plain collectives they replace.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_impl.linear_ring import all_gather_matmul, reduce_scatter_matmul, ring_split
from parity import hlo
from tests.jax.linear_helpers import (COMBO_IDS, COMBOS, M, forward_hlo, inputs, make_layer,
                                      value_and_grads)
from tests.linear_cases import FP32_RTOL, IN, OUT, permute_directions


# ------------------------------------------------------------------------- communication (HLO)
@pytest.mark.parametrize("rs", [False, True], ids=["replicated", "scattered"])
@pytest.mark.parametrize("kind,method", COMBOS[:6], ids=COMBO_IDS[:6])
def test_forward_communication(jax_mesh, axis_size, kind, method, rs):
    n = axis_size
    layer = make_layer(kind, jax_mesh, method, rs)
    x, _ = inputs((4, IN), OUT)
    text = forward_hlo(layer, x)
    ops = hlo.collectives(text)
    kinds = [op.kind for op in ops]
    out_bytes = 4 * OUT * 4  # f32[4, OUT] on each device
    if n == 1:  # XLA keeps some collectives over one-device groups; hlo.collectives drops them
        assert ops == []
        return
    if method.is_ring:
        up, down = permute_directions(ops, n)
        exp_up, exp_down = ring_split(n, method.bidirectional)
        assert (up, down) == (exp_up, exp_down)
        assert up + down == n - 1
        assert kinds.count("reduce-scatter") == 0 and kinds.count("all-reduce") == 0
        gathers = [op for op in ops if op.kind == "all-gather"]
        if rs:
            assert gathers == []
        else:  # one all-gather, of the [4, OUT] output (never of the input)
            assert len(gathers) == 1 and gathers[0].result_bytes == out_bytes
        # each ring step moves one block: the input block (column) or an output block (row)
        block_bytes = 4 * (IN if kind == "column" else OUT) // n * 4
        assert all(op.result_bytes == block_bytes for op in ops if op.kind == "collective-permute")
        return
    assert "collective-permute" not in kinds
    if kind == "column":
        assert kinds == ([] if rs else ["all-gather"])
        if not rs:
            assert ops[0].result_bytes == out_bytes
    else:
        assert kinds == (["reduce-scatter"] if rs else ["all-reduce"])


@pytest.mark.parametrize("kind,method", [("column", M.ALL_GATHER),
                                         ("column", M.ALL_GATHER_BIDIRECTIONAL),
                                         ("row", M.REDUCE_SCATTER),
                                         ("row", M.REDUCE_SCATTER_BIDIRECTIONAL)],
                         ids=lambda v: getattr(v, "value", v))
@pytest.mark.parametrize("n", [4, 8])
def test_training_step_communication_of_ring_methods(make_jax_mesh, kind, method, n):
    """value_and_grad of a ring layer: forward ring plus its transpose, nothing else."""
    layer = make_layer(kind, make_jax_mesh(model_axis_size=n), method, True)
    x, g = inputs((4, IN), OUT)
    _, _, text = value_and_grads(layer, x, g)
    ops = hlo.collectives(text)
    up, down = permute_directions(ops, n)
    assert (up, down) == (n - 1, n - 1)  # backward reverses every forward step
    # nothing else but the all-reduce of the scalar loss (sum over the sharded output)
    others = [(op.kind, op.result_bytes) for op in ops if op.kind != "collective-permute"]
    assert others == [("all-reduce", 4)]


def test_plain_column_backward_all_reduces_input_gradient(make_jax_mesh):
    layer = make_layer("column", make_jax_mesh(model_axis_size=4), M.PLAIN, False)
    x, g = inputs((4, IN), OUT)
    _, _, text = value_and_grads(layer, x, g)
    assert hlo.count(text, "all-reduce") == 1
    assert hlo.count(text, "collective-permute") == 0


# ------------------------------------------------------------------------- ring helpers directly
@pytest.mark.parametrize("bidirectional", [False, True])
def test_ring_helpers_match_collectives(make_jax_mesh, bidirectional):
    """all_gather_matmul == all_gather(x) @ w and reduce_scatter_matmul == psum_scatter(x @ w)."""
    n = 8
    mesh = make_jax_mesh(model_axis_size=n)
    x = jax.random.normal(jax.random.key(0), (3, 16))
    w = jax.random.normal(jax.random.key(1), (16, 32))

    def per_device(x, w):
        ring_ag = all_gather_matmul(x, w, "tp", bidirectional)
        plain_ag = jax.lax.all_gather(x, "tp", axis=1, tiled=True) @ w
        ring_rs = reduce_scatter_matmul(x, w[: x.shape[-1]], "tp", bidirectional)
        plain_rs = jax.lax.psum_scatter(x @ w[: x.shape[-1]], "tp", scatter_dimension=1,
                                        tiled=True)
        return ring_ag - plain_ag, ring_rs - plain_rs, plain_ag, plain_rs

    out = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(None, "tp"), P()),
                                out_specs=P(None, "tp"), check_vma=False))(x, w)
    d_ag, d_rs, ag, rs = (np.asarray(a) for a in out)
    assert np.abs(d_ag).max() <= FP32_RTOL * np.abs(ag).max()
    assert np.abs(d_rs).max() <= FP32_RTOL * np.abs(rs).max()


@pytest.mark.parametrize("n,bidirectional,expected", [
    (1, False, (0, 0)), (1, True, (0, 0)), (2, False, (1, 0)), (2, True, (1, 0)),
    (4, False, (3, 0)), (4, True, (2, 1)), (8, True, (4, 3)), (7, True, (3, 3)),
])
def test_ring_split(n, bidirectional, expected):
    assert ring_split(n, bidirectional) == expected
