"""The parity harness itself: it passes clean cases and reports every planted defect."""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from parity import backend as B
from parity import cases as C
from parity import compare as K
from parity import defects, runner

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def backends(jax_devices, xla_device):
    """Both runtimes up in this process (JAX first)."""
    return B.load_backend("jax"), B.load_backend("torch")


def _case(module, variant, n, **kw):
    return C.Case(module, variant, n, **kw)


def _pipeline_case(p, m):
    """The matrix's own pipeline case with p stages and m micro-batches."""
    return next(c for c in C.default_matrix() if c.module == "pipeline" and c.axis_size == p
                and c.dtype == "float32" and c.option("microbatches") == m)


@pytest.mark.parametrize("case", [
    _case("tpasync", "gather-bi", 4), _case("tpdense", "scatter", 2),
    _case("tpasync", "scatter-split", 8, dtype="bfloat16"),
], ids=lambda c: c.id)
def test_clean_case_passes(backends, case):
    rep = runner.run_case(case)
    assert rep.passed, rep.reasons
    assert rep.comm_match and rep.out_rel <= case.tol and rep.grad_rel <= case.tol
    assert rep.elem_ratio <= 1.0


@pytest.mark.parametrize("defect, case, expect", [
    ("perturbed_weight", _case("tpasync", "gather-uni", 4), "output error"),
    ("perturbed_weight", _case("tpdense", "gather", 2), "grad error"),
    ("reversed_ring", _case("tpasync", "gather-uni", 4), "collectives differ"),
    ("reversed_ring", _case("tpasync", "scatter-uni", 8), "output error"),
    ("missing_bias", _case("tpdense", "scatter", 4), "missing on the torch side"),
    ("missing_bias", _case("tpasync", "gather-bi", 2), "output error"),
    ("wrong_tolerance", _case("tpasync", "scatter-split", 4), "tolerance 0.5 is outside"),
    ("dropped_microbatch", _pipeline_case(2, 5), "output error"),
], ids=lambda v: v if isinstance(v, str) else v.id if isinstance(v, C.Case) else None)
def test_planted_defect_is_reported(backends, defect, case, expect):
    assert runner.run_case(case).passed  # the same case is clean without the defect
    rep = runner.run_case(case, defect=defect)
    assert not rep.passed
    assert any(expect in r for r in rep.reasons), rep.reasons


def test_unknown_defect_is_rejected():
    with pytest.raises(ValueError, match="defect='typo'"):
        defects.plant_defect(_case("tpdense", "gather", 2), {"params": {}}, "typo")


def test_compare_flags_missing_and_misshapen_results():
    case = _case("tpdense", "gather", 2)
    ref = B.BackendResult(outputs={"y": np.ones((2, 2))}, grads={"x": np.ones(3)}, hlo_text="x")
    got = B.BackendResult(outputs={"y": np.ones((2, 3))}, grads={}, hlo_text="x")
    rep = K.compare(case, ref, got)
    assert not rep.passed
    assert any("shape (2, 3) != (2, 2)" in r for r in rep.reasons)
    assert any("'x' missing on the torch side" in r for r in rep.reasons)
    nan = B.BackendResult(outputs={"y": np.full((2, 2), np.nan)}, grads={"x": np.ones(3)},
                          hlo_text="x")
    assert not K.compare(case, ref, nan).passed
    err = B.BackendResult(error="boom")
    assert any("torch failed: boom" in r for r in K.compare(case, ref, err).reasons)


# ----------------------------------------------------------------- elementwise and signatures
_HLO = """ENTRY %main {
  %ag = f32[8,32]{1,0} all-gather(f32[8,8]{1,0} %x), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={1}
  %cp = f32[8,8]{1,0} collective-permute(f32[8,8]{1,0} %y), channel_id=2, source_target_pairs={{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}
  %ar = (f32[8]{0}, f32[8,8]{1,0}) all-reduce(f32[8]{0} %b, f32[8,8]{1,0} %w), channel_id=3, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
}"""


def _result(y, text=_HLO):
    return B.BackendResult(outputs={"y": np.asarray(y, np.float32)}, grads={}, hlo_text=text,
                           fwd_hlo_text=text)


def test_elementwise_check_catches_what_the_normwise_one_misses():
    case = _case("tpdense", "gather", 2)
    atol, rtol = case.elementwise
    ref = np.array([1000.0, 1e-3, 1.0])
    small_wrong = ref.copy()
    small_wrong[1] += 100 * (atol + rtol * 1e-3)  # normwise: tiny next to max|ref| = 1000
    rep = K.compare(case, _result(ref), _result(small_wrong))
    assert rep.out_rel <= case.tol  # the normwise check alone would pass
    assert not rep.passed and rep.elem_ratio > 1
    assert any("elementwise error" in r and "output y" in r for r in rep.reasons), rep.reasons
    within = ref.copy()
    within[1] += 0.5 * (atol + rtol * 1e-3)
    assert K.compare(case, _result(ref), _result(within)).passed


def test_allclose_ratio_agrees_with_numpy():
    rng = np.random.default_rng(0)
    b = rng.standard_normal(1000)
    for scale in (1e-7, 1e-5, 1e-3):
        a = b + scale * rng.standard_normal(1000)
        ratio = K.allclose_ratio(a, b, 1e-6, 1e-5)
        try:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            ok = True
        except AssertionError:
            ok = False
        assert ok == (ratio <= 1.0), (scale, ratio)


@pytest.mark.parametrize("edit, what", [
    (("{{0,1,2,3},{4,5,6,7}}", "{{1,0,2,3},{4,5,6,7}}"), "reordered replica group"),
    (("f32[8,32]{1,0} all-gather", "f32[8,64]{1,0} all-gather"), "all-gather of other bytes"),
    (("{{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}",
      "{{1,0},{2,1},{3,2},{0,3},{5,4},{6,5},{7,6},{4,7}}"), "ring in the other direction"),
    (("(f32[8]{0}, f32[8,8]{1,0}) all-reduce", "f32[8,8]{1,0} all-reduce"),
     "all-reduce of fewer bytes"),
])
def test_signature_is_exact(edit, what):
    case = _case("tpdense", "gather", 4)
    rep = K.compare(case, _result([1.0]), _result([1.0], _HLO.replace(*edit)))
    assert not rep.passed and not rep.comm_match, what
    assert any("collectives differ" in r for r in rep.reasons)


def test_combined_all_reduces_match_separate_ones_of_the_same_bytes():
    # XLA's combiner may fuse the bias and kernel reductions into one tuple op on one side only.
    split = _HLO.replace(
        "%ar = (f32[8]{0}, f32[8,8]{1,0}) all-reduce(f32[8]{0} %b, f32[8,8]{1,0} %w)",
        "%ar1 = f32[8]{0} all-reduce(f32[8]{0} %b)") + (
        "\n  %ar2 = f32[8,8]{1,0} all-reduce(f32[8,8]{1,0} %w), channel_id=4, "
        "replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add")
    case = _case("tpdense", "gather", 4)
    assert K.compare(case, _result([1.0]), _result([1.0], split)).passed


# --------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("module, variants", [
    ("tpasync", ("gather-uni", "gather-bi", "scatter-uni", "scatter-split")),
    ("linear", ("column-ag", "column-agbi", "row-rs", "row-rsbi")),
])
def test_every_async_ring_method_runs_at_n4_and_n8(module, variants):
    """At n=2 both ring directions give the same pairs; n=4 and n=8 make direction and chunk
    order observable (pairs and numbers)."""
    matrix = C.default_matrix()
    for variant in variants:
        for n in (4, 8):
            for dtype in C.DTYPES:
                assert any(c.module == module and c.variant == variant and c.axis_size == n
                           and c.dtype == dtype for c in matrix), (module, variant, n, dtype)


def test_elementwise_tolerances_are_per_dtype_and_bounded():
    """A module may loosen its dtype's atol (documented in parity.cases), never its rtol."""
    for case in C.default_matrix():
        atol, rtol = case.elementwise
        default_atol, default_rtol = C.ELEMENTWISE[case.dtype]
        assert 0 < atol <= 5 * default_atol and 0 < rtol <= default_rtol, case.id


# ---------------------------------------------------------------------------- code structure
def _parity_imports() -> dict[str, list[tuple[str, list[str]]]]:
    """{module: [(imported parity module, [names])]} from the source of parity/."""
    out = {}
    for path in sorted((ROOT / "parity").glob("*.py")):
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                target = node.module or ""
                names = [a.name for a in node.names]
                found += [(target, names)] if target else [(n, []) for n in names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("parity."):
                found.append((node.module.split(".", 1)[1], [a.name for a in node.names]))
        out[path.stem] = found
    return out


def test_parity_modules_import_in_one_direction_without_private_names():
    imports = _parity_imports()
    graph = {m: {t.split(".")[0] for t, _ in deps} for m, deps in imports.items()}
    # The interface never imports an implementation, the runner or the worker.
    assert graph["backend"] <= {"cases", "hlo"}
    for impl in ("jax_backend", "torch_backend", "worker", "compare"):
        assert not graph[impl] & {"runner", "cli", "jax_backend", "torch_backend"}, impl
    seen, stack = set(), []

    def visit(m):  # depth-first search for a cycle
        if m in stack:
            raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
        if m in seen:
            return
        stack.append(m)
        for d in graph.get(m, ()):
            visit(d)
        stack.pop()
        seen.add(m)

    for m in graph:
        visit(m)
    private = [(m, t, n) for m, deps in imports.items() for t, names in deps for n in names
               if n.startswith("_")]
    assert not private, private


def test_backends_implement_the_interface(backends):
    for b in backends:
        assert isinstance(b, B.Backend), b.__name__


def test_load_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend='mxnet'"):
        B.load_backend("mxnet")


# ----------------------------------------------------------------------------------------- CLI
def _cli(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "parity", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "--devices=0: expected a positive int"),
    (["--jobs", "0"], "--jobs=0: expected a positive int"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["-k", "no-such-module"], "no case of -k 'no-such-module'"),
    (["--devices", "3", "-k", "n8"], "axis sizes must divide the device count"),
])
def test_cli_bad_arguments_exit_2(args, message):
    res = _cli(*args, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr


def test_cli_pool_and_isolate_give_the_same_verdicts_as_serial(tmp_path):
    selection = ["-k", "tpdense-gather-n2"]  # its float32 and bfloat16 cases
    verdicts = {}
    for mode in (["--jobs", "1"], ["--jobs", "2"], ["--isolate", "--jobs", "2"]):
        name = "-".join(m.strip("-") for m in mode)
        out, md = tmp_path / f"{name}.json", tmp_path / f"{name}.md"
        res = _cli(*selection, *mode, "--json", str(out), "--markdown", str(md))
        assert res.returncode == 0, res.stdout + res.stderr
        assert "parity: 2 passed, 0 failed" in res.stdout
        report = json.loads(out.read_text())
        assert report["meta"]["isolate"] == ("--isolate" in mode)
        verdicts[name] = {c["case_id"]: (c["passed"], c["comm_match"], c["out_rel"], c["grad_rel"])
                          for c in report["cases"]}
        assert "| tpdense-gather-n2" in md.read_text()
    first = verdicts["jobs-1"]
    assert len(first) == 2 and all(v == first for v in verdicts.values()), verdicts


def test_gpt_case_layout_is_the_models_own():
    from jax_impl.gpt import GPTConfig as JaxConfig
    from jax_impl.gpt import gpt_param_shapes as jax_shapes
    from torch_impl.gpt import GPTConfig as TorchConfig
    from torch_impl.gpt import gpt_param_shapes as torch_shapes

    case = next(c for c in C.default_matrix() if c.module == "gpt")
    mine = C.gpt_param_shapes(case)
    assert mine == dict(jax_shapes(JaxConfig(**C.GPT_CONFIG)))
    assert mine == dict(torch_shapes(TorchConfig(**C.GPT_CONFIG)))
    tokens, targets = C.gpt_tokens(case, C.make_data(case))
    assert tokens.min() >= 0 and tokens.max() < C.GPT_CONFIG["vocab_size"]
    assert (targets == -100).any() and (targets >= 0).any()
