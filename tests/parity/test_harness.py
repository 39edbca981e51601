"""The parity harness itself: it passes clean cases and reports every planted defect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from parity import cases as C
from parity import runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def backends(jax_devices, xla_device):
    """Both runtimes up in this process (JAX first)."""
    return runner.load_backend("jax"), runner.load_backend("torch")


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
        runner.plant_defect(_case("tpdense", "gather", 2), {"params": {}}, "typo")


def test_compare_flags_missing_and_misshapen_results():
    import numpy as np

    case = _case("tpdense", "gather", 2)
    ref = runner.BackendResult(outputs={"y": np.ones((2, 2))}, grads={"x": np.ones(3)},
                               hlo_text="x")
    got = runner.BackendResult(outputs={"y": np.ones((2, 3))}, grads={}, hlo_text="x")
    rep = runner.compare(case, ref, got)
    assert not rep.passed
    assert any("shape (2, 3) != (2, 2)" in r for r in rep.reasons)
    assert any("'x' missing on the torch side" in r for r in rep.reasons)
    nan = runner.BackendResult(outputs={"y": np.full((2, 2), np.nan)}, grads={"x": np.ones(3)},
                               hlo_text="x")
    assert not runner.compare(case, ref, nan).passed
    err = runner.BackendResult(error="boom")
    assert any("torch failed: boom" in r for r in runner.compare(case, ref, err).reasons)


def _cli(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "parity", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--devices", "0"], "--devices=0: expected a positive int"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["-k", "no-such-module"], "no case of -k 'no-such-module'"),
    (["--devices", "3", "-k", "n8"], "axis sizes must divide the device count"),
])
def test_cli_bad_arguments_exit_2(args, message):
    res = _cli(*args, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr


def test_cli_isolate_gives_the_same_verdicts_as_in_process(tmp_path):
    selection = ["-k", "tpasync-gather-bi-n4-float32", "--dtype", "float32"]
    verdicts = {}
    for mode in ([], ["--isolate"]):
        out = tmp_path / f"r{len(mode)}.json"
        md = tmp_path / f"r{len(mode)}.md"
        res = _cli(*selection, *mode, "--json", str(out), "--markdown", str(md))
        assert res.returncode == 0, res.stdout + res.stderr
        assert "parity: 1 passed, 0 failed" in res.stdout
        report = json.loads(out.read_text())
        assert report["meta"]["isolate"] == bool(mode)
        verdicts[bool(mode)] = {c["case_id"]: (c["passed"], c["comm_match"]) for c in report["cases"]}
        assert "| tpasync-gather-bi-n4" in md.read_text()
    assert verdicts[True] == verdicts[False] and len(verdicts[True]) == 1


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
