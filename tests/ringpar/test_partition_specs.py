"""ringpar.partition_specs (spec algebra on plain tuples), ringpar.linear_args (the
ParallelLinear argument rules both backends share) and the doctests of ringpar.layer_args (the
norm / embedding / loss rules): no framework needed.

The backends' wrappers (``get_matmul_output_sharding`` etc.) are checked against real shardings
in tests/jax/test_linear_config.py and tests/torch/test_linear_config.py; here the neutral
functions are checked on their own, with numpy as the independent oracle for the device order.

Checked to fail (2026-12-03, scratch copies): swapping ``used.update`` and ``out.append`` in
``matmul_output_spec`` made six of the seven ``test_matmul_output_spec`` cases and the doctests
fail; reading the device ids in mesh order instead of the transposed order in
``_transposed_ids`` made ``test_tile_layout_matches_numpy``,
``test_candidate_specs_are_distinct_layouts`` and the doctests fail.
"""

from __future__ import annotations

import doctest
import itertools

import numpy as np
import pytest

from ringpar import layer_args, linear_args, partition_specs
from ringpar.linear_args import check_tp_sizes, resolve_out_features, resolve_scale
from ringpar.matmul_methods import MatrixMultiplyMethod as M
from ringpar.partition_specs import (axes_of, candidate_specs, matmul_output_spec,
                                     parse_sharding_text, spec_entries, tile_layout,
                                     tp_matmul_output_spec)

NAMES = ("dp", "fsdp", "pp", "tp")


@pytest.mark.parametrize("module", [partition_specs, linear_args, layer_args])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_axes_of_and_spec_entries():
    assert axes_of(None) == () and axes_of("tp") == ("tp",) and axes_of(["dp", "tp"]) == ("dp", "tp")
    assert spec_entries(("tp",), 3) == ("tp", None, None)
    assert spec_entries((), 0) == ()
    with pytest.raises(ValueError, match=r"has 3 entries for a 2-D array"):
        spec_entries(("dp", None, "tp"), 2)


@pytest.mark.parametrize("lhs,rhs,expected", [
    (("dp", None), (None, "tp"), ("dp", "tp")),
    (("tp", None), (None, "tp"), ("tp", None)),            # tp already used by the batch dim
    ((("dp", "tp"), None), (None, "tp"), (("dp", "tp"), None)),
    ((None, "dp", None), (None, ("dp", "tp")), (None, "dp", ("tp",))),  # tuple loses dp
    ((("dp", "fsdp"), "tp"), ("tp", None), (("dp", "fsdp"), None)),  # contracted dim dropped
    ((None, None), (None, None), (None, None)),
    ((None,), (None, "tp"), ("tp",)),                       # x [k] @ W [k, j] -> [j]
])
def test_matmul_output_spec(lhs, rhs, expected):
    assert matmul_output_spec(lhs, rhs) == expected


def test_matmul_output_spec_of_unknown_is_empty():
    assert matmul_output_spec(None, (None, "tp")) == () == matmul_output_spec(("dp",), None)


@pytest.mark.parametrize("method", [None, "plain", M.PLAIN])
def test_tp_output_spec_plain_is_the_matmul_spec(method):
    assert tp_matmul_output_spec(("dp",), ("tp",), method, "tp", lhs_ndim=2,
                                 rhs_ndim=2) == ("dp", None)
    assert tp_matmul_output_spec((None, None), (None, "tp"), method, "tp", lhs_ndim=2,
                                 rhs_ndim=2) == (None, "tp")


@pytest.mark.parametrize("method", [m for m in M if m.is_ring])
def test_tp_output_spec_ring_is_split_on_the_axis(method):
    # the leading dims keep the lhs spec without the tp axis; the last dim is split over it
    got = tp_matmul_output_spec((("dp", "tp"), "fsdp", "tp"), ("tp", None), method.value, "tp",
                                lhs_ndim=3, rhs_ndim=2)
    assert got == (("dp",), "fsdp", "tp")
    assert tp_matmul_output_spec(("tp",), (), method, "tp", lhs_ndim=2, rhs_ndim=2) == (None, "tp")


def test_tp_output_spec_errors():
    with pytest.raises(ValueError, match="matmul_method='ring'"):
        tp_matmul_output_spec((None,), (None,), "ring", "tp", lhs_ndim=1, rhs_ndim=1)
    with pytest.raises(ValueError, match="2 entries for a 1-D array"):
        tp_matmul_output_spec((None, None), (None,), None, "tp", lhs_ndim=1, rhs_ndim=1)


@pytest.mark.parametrize("sizes", [(2, 1, 1, 4), (1, 2, 2, 2), (8, 1, 1, 1), (1, 1, 1, 1)])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_candidate_specs_are_distinct_layouts(sizes, rank):
    """Each candidate is a different layout, so reading a sharding back finds one spec only."""
    specs = list(candidate_specs(NAMES, sizes, rank))
    assert len(specs) == len(set(specs)) and specs[0] == (None,) * rank
    used = {a for s in specs for e in s for a in axes_of(e)}
    assert used == {a for a, s in zip(NAMES, sizes) if s > 1}
    ids = np.random.default_rng(0).permutation(8).tolist()
    layouts = [tile_layout(NAMES, sizes, ids, s) for s in specs]
    assert len(set(layouts)) == len(layouts)


@pytest.mark.parametrize("sizes", [(2, 1, 1, 4), (2, 2, 1, 2), (1, 2, 2, 2)])
def test_tile_layout_matches_numpy(sizes):
    ids = np.random.default_rng(1).permutation(8)
    for spec in candidate_specs(NAMES, sizes, 2):
        dims, order, replicated = tile_layout(NAMES, sizes, ids, spec)
        used = [a for e in spec for a in axes_of(e)]
        perm = [NAMES.index(a) for a in used + [a for a in NAMES if a not in used]]
        expected = tuple(ids.reshape(sizes).transpose(perm).reshape(-1).tolist())
        assert order == (expected if any(d > 1 for d in dims) else ())
        rest = int(np.prod([s for a, s in zip(NAMES, sizes) if a not in used]))
        assert replicated == (rest > 1 and any(d > 1 for d in dims))


def test_tile_layout_examples():
    # dp=2 x tp=4, devices 0..7 row-major: tp splits the last dim, dp replicas are the last tile
    assert tile_layout(("dp", "tp"), (2, 4), range(8), (None, "tp")) == (
        (1, 4, 2), (0, 4, 1, 5, 2, 6, 3, 7), True)
    assert tile_layout(("dp", "tp"), (2, 4), range(8), (("dp", "tp"), None)) == (
        (8, 1), tuple(range(8)), False)
    assert tile_layout(("dp", "tp"), (2, 4), range(8), (None, None)) == ((1, 1), (), False)


@pytest.mark.parametrize("text,rank,expected", [
    ("{replicated}", 2, ((1, 1), (), False)),
    (" {devices=[1,4,2]0,4,1,5,2,6,3,7 last_tile_dim_replicate} ", 2,
     ((1, 4, 2), (0, 4, 1, 5, 2, 6, 3, 7), True)),
    ("{devices=[4,1]0,1,2,3}", 2, ((4, 1), (0, 1, 2, 3), False)),
    ("{devices=[1,1,8]0,1,2,3,4,5,6,7 last_tile_dim_replicate}", 2, ((1, 1), (), False)),
    ("{maximal device=0}", 2, None),
    ("{manual}", 1, None),
])
def test_parse_sharding_text(text, rank, expected):
    assert parse_sharding_text(text, rank) == expected


def test_parse_then_match_recovers_the_spec():
    """What get_sharding does on torch: the printed layout of a spec is read back to that spec."""
    sizes, ids = (2, 1, 1, 4), list(range(8))
    for spec in candidate_specs(NAMES, sizes, 3):
        dims, order, rep = tile_layout(NAMES, sizes, ids, spec)
        if order:
            text = (f"{{devices=[{','.join(map(str, dims))}]{','.join(map(str, order))}"
                    f"{' last_tile_dim_replicate' if rep else ''}}}")
        else:
            text = "{replicated}"
        parsed = parse_sharding_text(text, 3)
        found = [s for s in candidate_specs(NAMES, sizes, 3)
                 if tile_layout(NAMES, sizes, ids, s) == parsed]
        assert found == [spec]


# ---------------------------------------------------------------------------- linear_args
def test_resolve_out_features():
    assert resolve_out_features(12) == (12, 1, 12)
    assert resolve_out_features([4, 8]) == ((4, 8), 2, 12)
    for bad in (0, -3, 2.0, True, "8", [], [4, 0], (4, "4")):
        with pytest.raises(ValueError, match="out_features="):
            resolve_out_features(bad)


def test_resolve_scale():
    assert resolve_scale(1, in_features=4, out_total=9) == 1.0
    assert resolve_scale("fan_in", in_features=4, out_total=9) == 0.5
    assert resolve_scale("fan_out", in_features=4, out_total=9) == pytest.approx(1 / 3)
    for bad in ("fan", True, None, [1.0]):
        with pytest.raises(ValueError, match=r"scale=.*expected a float, 'fan_in' or 'fan_out'"):
            resolve_scale(bad, in_features=4, out_total=9)


def _check(direction, method, fin, fout, n, rs=False):
    check_tp_sizes(direction, method, in_features=fin, out_features=fout, axis_name="tp",
                   axis_size=n, reduce_scatter_output=rs, layer="Layer")


@pytest.mark.parametrize("direction,method", [
    (d, m) for d, m in itertools.product(("row", "column"), M) if d in m.directions])
def test_check_tp_sizes_accepts_divisible_sizes(direction, method):
    _check(direction, method, 16, (8, 8), 4, rs=True)
    _check(direction, method, 3, 5, 1)


def test_check_tp_sizes_names_what_does_not_divide():
    with pytest.raises(ValueError, match=r"in_features=6: expected a multiple of the 'tp' axis "
                                         r"size 4 \(row-parallel, plain\)"):
        _check("row", "plain", 6, 8, 4)
    _check("column", "plain", 6, 8, 4)  # plain column: the input is not split
    with pytest.raises(ValueError, match=r"in_features=6.*column-parallel, all_gather_matmul"):
        _check("column", "all_gather_matmul", 6, 8, 4)
    with pytest.raises(ValueError, match=r"out_features=\(3, 3\) \(total 6\): expected a multiple"):
        _check("column", "plain", 8, (3, 3), 4)
    _check("row", "plain", 8, 6, 4)  # plain row, replicated output: the output is not split
    with pytest.raises(ValueError, match=r"out_features=6 \(total 6\)"):
        _check("row", "plain", 8, 6, 4, rs=True)


def test_check_tp_sizes_rejects_a_method_of_the_other_direction():
    with pytest.raises(ValueError, match=r"matmul_method='reduce_scatter_matmul' does not apply "
                                         r"to a column-parallel layer \(Layer\): expected one of"):
        _check("column", M.REDUCE_SCATTER, 8, 8, 2)
    with pytest.raises(ValueError, match=r"all_gather_matmul.*row-parallel"):
        _check("row", "all_gather_matmul", 8, 8, 2)


def test_tensor_parallel_config_rules():
    assert linear_args.mesh_request(None, False) is None
    assert linear_args.mesh_request("all_gather_matmul", False) == "matmul_method='all_gather_matmul'"
    assert linear_args.mesh_request(M.PLAIN, True) == "matmul_method='plain'"
    assert linear_args.mesh_request(None, True) == "reduce_scatter_output=True"
    assert linear_args.check_axis_name("tp") == "tp"
    with pytest.raises(ValueError, match=r"axis_name=3: expected a mesh axis name \(str\)"):
        linear_args.check_axis_name(3)
    linear_args.check_reduce_options(True, False)
    linear_args.check_reduce_options(False, True)
    with pytest.raises(ValueError, match="reduce_output=True with reduce_scatter_output=True"):
        linear_args.check_reduce_options(True, True)
