"""torch_impl.array_utils: per-device rngs, splitting into the stacked view, stacking parameters."""

import pytest
import torch

from torch_impl import array_utils as A


def sharding(t):
    import torch_xla

    return torch_xla._XLAC._get_xla_sharding_spec(t)


def test_fold_rng_over_axis(torch_mesh, axis_size):
    n = axis_size
    gens = A.fold_rng_over_axis(7, "tp", mesh=torch_mesh)
    assert len(gens) == n
    draws = [torch.randn(16, generator=g) for g in gens]
    for a in range(n):  # every device of the axis draws different numbers
        for b in range(a):
            assert not torch.equal(draws[a], draws[b])
    again = [torch.randn(16, generator=g) for g in A.fold_rng_over_axis(7, "tp", mesh=torch_mesh)]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))  # reproducible from the seed
    other = [torch.randn(16, generator=g) for g in A.fold_rng_over_axis(8, "tp", mesh=torch_mesh)]
    assert not torch.equal(other[0], draws[0])


def test_fold_rng_from_generator_advances_it(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=2)
    g = torch.Generator().manual_seed(0)
    first = [x.initial_seed() for x in A.fold_rng_over_axis(g, "tp", mesh=mesh)]
    second = [x.initial_seed() for x in A.fold_rng_over_axis(g, "tp", mesh=mesh)]
    assert first != second and len(set(first)) == 2
    with pytest.raises(ValueError, match=r"rng=1.5: expected an int seed or a torch.Generator"):
        A.fold_rng_over_axis(1.5, "tp", mesh=mesh)
    with pytest.raises(ValueError, match=r"axis_name='model' is not an axis"):
        A.fold_rng_over_axis(0, "model", mesh=mesh)


@pytest.mark.parametrize("split_axis", [0, 1, -1])
def test_split_array_over_mesh(torch_mesh, axis_size, split_axis):
    n = axis_size
    x = torch.randn(2 * n, n, 4 * n)
    y = A.split_array_over_mesh(x, "tp", split_axis, mesh=torch_mesh)
    assert y.device.type == "xla" and y.dim() == 4
    if n > 1:  # dim 0 tiled over tp, dims 1..3 whole, replicated over the 8/n dp rows
        replicate = f",{8 // n}" if n < 8 else ""
        assert sharding(y).startswith(f"{{devices=[{n},1,1,1{replicate}]")
    blocks = torch.chunk(x, n, dim=split_axis)  # row j = block j
    torch.testing.assert_close(y.cpu(), torch.stack(blocks), rtol=0, atol=0)


def test_split_array_over_mesh_errors(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=4)
    with pytest.raises(ValueError, match=r"x.shape\[1\]=6: expected a size divisible by the size 4 "
                                         r"of axis 'tp'"):
        A.split_array_over_mesh(torch.zeros(4, 6), "tp", 1, mesh=mesh)
    with pytest.raises(ValueError, match=r"split_axis=2: expected an axis of a tensor with 2 dim"):
        A.split_array_over_mesh(torch.zeros(4, 6), "tp", 2, mesh=mesh)
    with pytest.raises(ValueError, match="not an axis"):
        A.split_array_over_mesh(torch.zeros(4, 6), "x", 0, mesh=mesh)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_stack_unstack_round_trip(torch_mesh, axis_size, axis):
    n = axis_size
    per_device = [{"w": torch.randn(3, 5), "sub": {"b": torch.randn(5)}} for _ in range(n)]
    stacked = A.stack_params(per_device, "tp", axis=axis, mesh=torch_mesh)
    w = stacked["w"]
    assert w.device.type == "xla"
    torch.testing.assert_close(w.cpu(), torch.stack([p["w"] for p in per_device], axis))
    pos = axis % 3
    expected_dims = [1, 1, 1]
    expected_dims[pos] = n
    if n > 1:  # "devices=[a,b,c,...]": the tp dim is tiled n ways, the others 1
        tiles = sharding(w).split("devices=[")[1].split("]")[0].split(",")[:3]
        assert [int(t) for t in tiles] == expected_dims
    back = A.unstack_params({"w": w.cpu(), "sub": {"b": stacked["sub"]["b"].cpu()}}, "tp",
                            axis=axis, mesh=torch_mesh)
    assert len(back) == n
    for j in range(n):
        torch.testing.assert_close(back[j]["w"], per_device[j]["w"], rtol=0, atol=0)
        torch.testing.assert_close(back[j]["sub"]["b"], per_device[j]["sub"]["b"], rtol=0, atol=0)


def test_stack_params_mask_except(torch_mesh, axis_size):
    n = axis_size
    keep = n - 1
    per_device = [{"w": torch.randn(2, 2) + 3} for _ in range(n)]
    w = A.stack_params(per_device, "tp", mask_except=keep, mesh=torch_mesh)["w"].cpu()
    for j in range(n):
        if j == keep:
            torch.testing.assert_close(w[j], per_device[j]["w"], rtol=0, atol=0)
        else:
            assert torch.count_nonzero(w[j]) == 0


def test_stack_params_errors(make_torch_mesh):
    mesh = make_torch_mesh(model_axis_size=2)
    one = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"len\(params\)=1: expected one parameter pytree per "
                                         r"device, the size 2 of axis 'tp'"):
        A.stack_params([one], "tp", mesh=mesh)
    with pytest.raises(ValueError, match=r"mask_except=2: expected None or an index in \[0, 2\)"):
        A.stack_params([one, one], "tp", mask_except=2, mesh=mesh)
    with pytest.raises(ValueError, match="different shapes on different devices"):
        A.stack_params([one, {"w": torch.zeros(3)}], "tp", mesh=mesh)
    with pytest.raises(ValueError, match="structure"):
        A.stack_params([one, {"v": torch.zeros(2)}], "tp", mesh=mesh)
    with pytest.raises(ValueError, match=r"expected size 2 \(axis 'tp'\) at dim 0"):
        A.unstack_params({"w": torch.zeros(3, 2)}, "tp", mesh=mesh)
