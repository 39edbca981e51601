"""jax_impl.collectives and the ring collectives of jax_impl.tensor_parallel vs jax.lax collectives.

Inputs are stacked over the model axis: a global array ``X`` of shape ``[n, ...]`` sharded
``P('tp')`` gives device j (in every dp row) the value ``X[j]``. Expected values are computed with
numpy or with the jax.lax collective the ring version replaces.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jax_impl import collectives as C
from jax_impl import tensor_parallel as tp
from parity import hlo

B, F = 2, 8


def stacked(n, *shape, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def run(mesh, fn, X, check_vma=True):
    """Apply per-device ``fn`` (value [*S] -> value [*T]) to ``X`` [n, *S]; returns [n, *T]."""
    body = lambda x: fn(x[0])[None]  # noqa: E731
    return np.asarray(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"),
                                            check_vma=check_vma))(X))


def run_list(mesh, fn, X):
    """Like ``run`` for ``fn`` returning a list of equally shaped values: returns [n, L, *T]."""
    return run(mesh, lambda x: jnp.stack(fn(x)), X)


# ------------------------------------------------------------------------------ collectives.py
def test_ring_perm_pairs():
    """The re-export of the one neutral definition (its pairs and errors: test_neutral_core)."""
    from ringpar import rings

    assert C.ring_perm is rings.ring_perm


@pytest.mark.parametrize("shift_up", [True, False], ids=["up", "down"])
def test_ring_permute_is_a_cyclic_shift(jax_mesh, axis_size, shift_up):
    X = stacked(axis_size, B, F)
    out = run(jax_mesh, lambda x: C.ring_permute(x, "tp", shift_up=shift_up), X)
    np.testing.assert_array_equal(out, np.roll(X, 1 if shift_up else -1, axis=0))


@pytest.mark.parametrize("shift_up", [True, False], ids=["up", "down"])
def test_ring_permute_compiles_to_one_cyclic_permute(jax_mesh, axis_size, shift_up):
    n = axis_size
    body = lambda x: C.ring_permute(x, "tp", shift_up=shift_up)  # noqa: E731
    f = jax.shard_map(body, mesh=jax_mesh, in_specs=P(("dp", "tp")), out_specs=P(("dp", "tp")))
    ops = hlo.collectives(jax.jit(f).lower(np.zeros((8, F), np.float32)).compile().as_text())
    if n == 1:
        assert ops == []
        return
    groups = [[r * n + j for j in range(n)] for r in range(8 // n)]
    assert [(op.kind, op.pairs) for op in ops] == [
        ("collective-permute", hlo.ring_pairs(groups, shift_up=shift_up))]


def test_axis_index(jax_mesh, axis_size):
    out = run(jax_mesh, lambda x: C.axis_index("tp")[None], np.zeros((axis_size, 1), np.float32))
    np.testing.assert_array_equal(out[:, 0], np.arange(axis_size))


def test_all_gather_and_reduce_scatter_features_match_lax(jax_mesh, axis_size):
    n = axis_size
    X = stacked(n, B, F)
    out = run(jax_mesh, lambda x: C.all_gather_features(x, "tp"), X)
    expected = np.concatenate(list(X), axis=-1)  # device order along the features
    np.testing.assert_array_equal(out, np.broadcast_to(expected, (n,) + expected.shape))

    Z = stacked(n, B, n * 4, seed=1)
    out = run(jax_mesh, lambda z: C.reduce_scatter_features(z, "tp"), Z)
    ref = run(jax_mesh, lambda z: jax.lax.psum_scatter(z, "tp", scatter_dimension=1, tiled=True), Z)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    total = Z.sum(0)
    for j in range(n):
        np.testing.assert_allclose(out[j], total[:, 4 * j:4 * (j + 1)], rtol=1e-5, atol=1e-5)


def test_reduce_scatter_features_rejects_indivisible_features(make_jax_mesh):
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=6: expected .* divisible by the size 4"):
        run(make_jax_mesh(model_axis_size=4), lambda z: C.reduce_scatter_features(z, "tp"),
            stacked(4, B, 6))


def test_split_features():
    x = {"a": jnp.arange(12.0).reshape(2, 6), "b": jnp.arange(4.0)}
    parts = C.split_features(x, 2)
    np.testing.assert_array_equal(parts[0]["a"], np.arange(12.0).reshape(2, 6)[:, :3])
    np.testing.assert_array_equal(parts[1]["b"], [2.0, 3.0])
    with pytest.raises(ValueError, match=r"xs.shape\[-1\]=6: expected .* divisible by 4"):
        C.split_features(x, 4, argument="xs")


@pytest.mark.parametrize("fn", [
    lambda x: C.ring_permute(x, "model"),
    lambda x: C.axis_index("model"),
    lambda x: C.all_gather_features(x, "model"),
    lambda x: C.reduce_scatter_features(x, "model"),
    lambda x: tp.async_gather(x, "model"),
    lambda x: tp.async_scatter([x], "model"),
], ids=["ring_permute", "axis_index", "all_gather", "reduce_scatter", "async_gather",
        "async_scatter"])
def test_unbound_axis_raises_value_error(jax_devices, fn):
    with pytest.raises(ValueError, match="axis_name='model' is not bound"):
        fn(jnp.zeros((2, 4)))


# ------------------------------------------------------------ ring collectives of tensor_parallel
def gathered_by_lax(mesh, X):
    """[n, n, *S]: device d's ``jax.lax.all_gather`` of the stacked X (untiled)."""
    return run(mesh, lambda x: jax.lax.all_gather(x, "tp"), X)


@pytest.mark.parametrize("shift_up", [True, False], ids=["up", "down"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_async_gather_matches_all_gather(jax_mesh, axis_size, shift_up, bidirectional):
    n = axis_size
    X = stacked(n, B, F)
    gather = tp.async_gather_bidirectional if bidirectional else tp.async_gather
    out = run_list(jax_mesh, lambda x: gather(x, "tp", shift_up=shift_up), X)
    ref = gathered_by_lax(jax_mesh, X)
    assert out.shape == (n, n, B, F)
    sign = 1 if shift_up else -1
    for d in range(n):
        for i in range(n):  # element i on device d is the input of device d -/+ i
            np.testing.assert_array_equal(out[d, i], X[(d - sign * i) % n])
            np.testing.assert_array_equal(out[d, i], ref[d, (d - sign * i) % n])


def test_async_gather_pytree(jax_mesh, axis_size):
    n = axis_size
    X, Y = stacked(n, B, F), stacked(n, 3, seed=2)

    def body(x, y):
        out = tp.async_gather({"x": x[0], "y": y[0]}, "tp")
        return jnp.stack([o["x"] for o in out])[None], jnp.stack([o["y"] for o in out])[None]

    ox, oy = jax.jit(jax.shard_map(body, mesh=jax_mesh, in_specs=P("tp"), out_specs=P("tp")))(X, Y)
    for d in range(n):
        for i in range(n):
            np.testing.assert_array_equal(ox[d, i], X[(d - i) % n])
            np.testing.assert_array_equal(oy[d, i], Y[(d - i) % n])


def test_async_gather_split_matches_all_gather(jax_mesh, axis_size):
    n = axis_size
    X = stacked(n, B, F)
    out = run(jax_mesh, lambda x: tp.async_gather_split(x, "tp")[0], X)
    np.testing.assert_array_equal(out, X)
    h = F // 2
    if n == 1:
        assert run_list(jax_mesh, lambda x: tp.async_gather_split(x, "tp"), X).shape == (1, 1, B, F)
        return
    lst = run_list(jax_mesh, lambda x: tp.async_gather_split(x, "tp")[1:], X)
    assert lst.shape == (n, 2 * n - 2, B, h)  # plus element 0: 2n - 1 in total
    ref = gathered_by_lax(jax_mesh, X)
    for d in range(n):
        rebuilt = {d: X[d]}
        for k in range(1, n):
            lo, hi = lst[d, k - 1], lst[d, n - 2 + k]
            np.testing.assert_array_equal(lo, X[(d - k) % n][:, :h])
            np.testing.assert_array_equal(hi, X[(d + k) % n][:, h:])
            rebuilt.setdefault((d - k) % n, [None, None])[0] = lo
            rebuilt.setdefault((d + k) % n, [None, None])[1] = hi
        full = np.concatenate([rebuilt[e] if e == d else np.concatenate(rebuilt[e], -1)
                               for e in range(n)], -1)
        np.testing.assert_array_equal(full, np.concatenate(list(ref[d]), -1))


def test_async_gather_split_length_and_odd_features(make_jax_mesh, axis_size):
    mesh = make_jax_mesh(model_axis_size=axis_size)
    lengths = []

    def body(x):
        lengths.append(len(tp.async_gather_split(x, "tp")))
        return x

    run(mesh, body, stacked(axis_size, B, F))
    assert lengths == [2 * axis_size - 1]
    if axis_size > 1:
        with pytest.raises(ValueError, match=r"x.shape\[-1\]=5: expected .* divisible by 2"):
            run(mesh, lambda x: tp.async_gather_split(x, "tp")[0], stacked(axis_size, B, 5))


def _block(z, k, size):
    return jax.lax.dynamic_slice_in_dim(z, (k % C.axis_size("tp")) * size, size, axis=-1)


@pytest.mark.parametrize("mode", ["up", "down", "split", "split_odd"])
def test_async_scatter_matches_psum_scatter(jax_mesh, axis_size, mode):
    """xs[i] holds the block destined to device d-1-i (up) / d+1+i (down), see the docstrings."""
    n = axis_size
    size = 5 if mode == "split_odd" else 4
    Z = stacked(n, B, n * size, seed=3)

    def body(z):
        d = C.axis_index("tp")
        up = [_block(z, d - 1 - i, size) for i in range(n)]
        down = [_block(z, d + 1 + i, size) for i in range(n)]
        if mode == "up":
            return tp.async_scatter(up, "tp", shift_up=True)
        if mode == "down":
            return tp.async_scatter(down, "tp", shift_up=False)
        h = size // 2
        return tp.async_scatter_split([jnp.concatenate([u[..., :h], w[..., h:]], -1)
                                       for u, w in zip(up, down)], "tp")

    out = run(jax_mesh, body, Z)
    ref = run(jax_mesh, lambda z: jax.lax.psum_scatter(z, "tp", scatter_dimension=1, tiled=True), Z)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [False, True], ids=["uni", "split"])
def test_async_scatter_rejects_wrong_list_length(jax_mesh, axis_size, split):
    fn = tp.async_scatter_split if split else tp.async_scatter
    with pytest.raises(ValueError, match=rf"len\(xs\)={axis_size + 1}: expected .* size "
                                         rf"{axis_size} of axis 'tp'"):
        run(jax_mesh, lambda x: fn([x] * (axis_size + 1), "tp"), stacked(axis_size, B, F))
