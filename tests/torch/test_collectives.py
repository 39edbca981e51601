"""torch_impl.collectives in the stacked view: values and gradients vs CPU torch, and collectives
of the compiled, partitioned program (``torch_impl.mesh.compiled_hlo``).

Stacked view: a global ``[n, ...]`` tensor, dim 0 sharded over 'tp', replicated over 'dp' (8/n
rows): every ring / replica group is one dp row of the mesh (dp, fsdp, pp, tp) = (8/n, 1, 1, n).
"""

import os

# torch_xla reads this once per process: see torch_impl.mesh.compiled_hlo
os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from parity import hlo  # noqa: E402
from torch_impl import collectives as C  # noqa: E402
from torch_impl import mesh as M  # noqa: E402

B, F = 2, 8


def groups(n):
    return [[r * n + j for j in range(n)] for r in range(8 // n)]


def groups_text(n):
    return "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in groups(n)) + "}"


def stacked(mesh, t, grad=True):
    """CPU tensor -> XLA stacked view (dim 0 over tp), a leaf that requires grad."""
    x = M.mark_stacked(t.to(M.xla_device()), mesh, "tp")
    return x.requires_grad_() if grad else x


def run(mesh, fn, x_cpu, seed=0):
    """fn on XLA and on CPU; returns (y, dx, y_ref, dx_ref, partitioned HLO of fwd+bwd)."""
    x = stacked(mesh, x_cpu)
    y = fn(x)
    g = torch.randn(tuple(y.shape), generator=torch.Generator().manual_seed(seed))
    y.backward(M.mark_stacked(g.to(M.xla_device()), mesh, "tp"))
    text = M.compiled_hlo([y, x.grad])
    return y.detach().cpu(), x.grad.cpu(), g, text


def cpu_grad(fn, x_cpu, g):
    x = x_cpu.clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


# ---------------------------------------------------------------------------------- ring_perm
def test_ring_perm_pairs():
    """The re-export of the one neutral definition (its pairs and errors: test_neutral_core)."""
    from ringpar import rings

    assert C.ring_perm is rings.ring_perm


# ------------------------------------------------------------------------------- ring_permute
@pytest.mark.parametrize("shift_up", [True, False], ids=["up", "down"])
def test_ring_permute_values_grads_and_hlo(torch_mesh, axis_size, shift_up):
    n = axis_size
    x = torch.randn(n, B, F)
    fn = lambda t: C.ring_permute(t, "tp", shift_up=shift_up, mesh=torch_mesh)  # noqa: E731
    y, dx, g, text = run(torch_mesh, fn, x)
    shift = 1 if shift_up else -1
    torch.testing.assert_close(y, torch.roll(x, shift, 0), rtol=0, atol=0)  # row j = x[j -+ 1]
    torch.testing.assert_close(dx, torch.roll(g, -shift, 0), rtol=0, atol=0)  # inverse shift
    ops = hlo.collectives(text)
    if n == 1:
        assert ops == []
        return
    fwd = hlo.ring_pairs(groups(n), shift_up=shift_up)
    bwd = hlo.ring_pairs(groups(n), shift_up=not shift_up)
    # Regression (docs/design.md): autograd of cat/narrow gives 3 permutes in the backward. The
    # custom Function gives exactly ONE permute each way, the backward with the inverse pairs.
    assert sorted((op.kind, op.pairs) for op in ops) == sorted(
        [("collective-permute", fwd), ("collective-permute", bwd)])


def test_naive_autograd_shift_needs_the_custom_function(make_torch_mesh):
    """Why ring_permute is an autograd.Function: the same shift left to autograd compiles to
    more than one permute in the backward (3 measured), which the test above would reject."""
    n = 4
    mesh = make_torch_mesh(model_axis_size=n)

    def naive(t):
        y = torch.cat([t.narrow(0, n - 1, 1), t.narrow(0, 0, n - 1)], 0)
        return M.mark_stacked(y, mesh, "tp")

    *_, text = run(mesh, naive, torch.randn(n, B, F))
    permutes = hlo.count(text, "collective-permute")
    *_, text_ok = run(mesh, lambda t: C.ring_permute(t, "tp", mesh=mesh), torch.randn(n, B, F))
    assert hlo.count(text_ok, "collective-permute") == 2
    assert permutes > 2, f"naive shift: {permutes} permutes (fwd+bwd)"


def test_ring_permute_pytree(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    a, b = torch.randn(4, 3), torch.randn(4, 2, 2)
    out = C.ring_permute({"a": stacked(mesh, a, False), "b": [stacked(mesh, b, False)]}, "tp",
                         mesh=mesh)
    torch.testing.assert_close(out["a"].cpu(), torch.roll(a, 1, 0), rtol=0, atol=0)
    torch.testing.assert_close(out["b"][0].cpu(), torch.roll(b, 1, 0), rtol=0, atol=0)


def test_ring_permute_bf16(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=8)
    x = torch.randn(8, B, F).to(torch.bfloat16)
    y = C.ring_permute(stacked(mesh, x, False), "tp", shift_up=False, mesh=mesh)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.cpu(), torch.roll(x, -1, 0), rtol=0, atol=0)


# ------------------------------------------------------------------------------ axis_index etc
def test_axis_index_and_size(torch_mesh, axis_size):
    idx = C.axis_index("tp", mesh=torch_mesh)
    assert idx.dtype == torch.int32
    torch.testing.assert_close(idx.cpu(), torch.arange(axis_size, dtype=torch.int32))
    assert C.axis_size("tp", mesh=torch_mesh) == axis_size
    assert C.axis_size("dp", mesh=torch_mesh) == 8 // axis_size


def test_split_features():
    x = torch.arange(12.0).reshape(2, 6)
    parts = C.split_features({"w": x}, 3)
    assert [p["w"].tolist() for p in parts] == [[[0, 1], [6, 7]], [[2, 3], [8, 9]],
                                                [[4, 5], [10, 11]]]
    with pytest.raises(ValueError, match=r"h.shape\[-1\]=6: expected the number of features to be "
                                         r"divisible by 4"):
        C.split_features(x, 4, argument="h")


# -------------------------------------------------------------------- all-gather, reduce-scatter
def gather_ref(x):
    n = x.shape[0]
    full = torch.cat(list(x), -1)
    return full.unsqueeze(0).expand(n, *full.shape)


def scatter_ref(x):
    n = x.shape[0]
    return torch.stack(list(x.sum(0).chunk(n, -1)))


@pytest.mark.parametrize("which", ["gather", "scatter"])
def test_all_gather_reduce_scatter_values_grads_and_hlo(torch_mesh, axis_size, which):
    n = axis_size
    if which == "gather":
        fn = lambda t: C.all_gather_features(t, "tp", mesh=torch_mesh)  # noqa: E731
        ref, x, kinds = gather_ref, torch.randn(n, B, F), ["all-gather", "reduce-scatter"]
    else:
        fn = lambda t: C.reduce_scatter_features(t, "tp", mesh=torch_mesh)  # noqa: E731
        ref, x, kinds = scatter_ref, torch.randn(n, B, n * F), ["reduce-scatter", "all-gather"]
    y, dx, g, text = run(torch_mesh, fn, x)
    y_ref, dx_ref = cpu_grad(ref, x, g)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    ops = hlo.collectives(text)
    if n == 1:
        assert ops == []
        return
    # forward op + its transpose in the backward, over the tp rings only (the JAX ops).
    assert sorted((op.kind, op.replica_groups) for op in ops) == sorted(
        (k, groups_text(n)) for k in kinds)


def test_reduce_scatter_bf16(make_torch_mesh):
    n = 4
    mesh = make_torch_mesh(model_axis_size=n)
    x = torch.randn(n, B, n * F).to(torch.bfloat16)
    y = C.reduce_scatter_features(stacked(mesh, x, False), "tp", mesh=mesh)
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (n, B, F)
    # bf16 sums of 4 terms: within 2 bf16 ulps (2**-7) of the float32 sum, normwise
    ref = scatter_ref(x.float())
    assert (y.float().cpu() - ref).abs().max() <= 2**-7 * ref.abs().max()


# ------------------------------------------------------------------------------------- errors
def test_errors(make_torch_mesh, xla_device):
    mesh = make_torch_mesh(model_axis_size=4)
    x = stacked(mesh, torch.randn(4, B, 6), False)
    with pytest.raises(ValueError, match=r"axis_name='model' is not an axis of the mesh"):
        C.ring_permute(x, "model", mesh=mesh)
    with pytest.raises(ValueError, match=r"x is on device cpu, expected the XLA device"):
        C.ring_permute(torch.randn(4, B), "tp", mesh=mesh)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 3\): expected the stacked view "
                                         r"\[n, \.\.\.\] with dim 0 of size n=4"):
        C.all_gather_features(torch.zeros(2, 3, device=xla_device), "tp", mesh=mesh)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=6: expected the number of features to be "
                                         r"divisible by the size 4 of axis 'tp'"):
        C.reduce_scatter_features(x, "tp", mesh=mesh)
    with pytest.raises(ValueError, match="not an axis"):
        C.axis_index("model", mesh=mesh)
