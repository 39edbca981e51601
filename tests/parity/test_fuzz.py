"""Fuzzed parity cases (issue 18): drawing is deterministic and valid, reproducers round-trip,
and a fixed seed of 30 random cases passes on both backends."""

from __future__ import annotations

import json
import os

import pytest

from parity import cases as C
from parity import fuzz

CI_SEED, CI_CASES = 0, 30


def test_drawing_is_deterministic_per_seed():
    assert fuzz.draw_cases(40, 3) == fuzz.draw_cases(40, 3)
    assert fuzz.draw_cases(40, 3) != fuzz.draw_cases(40, 4)
    assert fuzz.draw_cases(10, 3) == fuzz.draw_cases(40, 3)[:10]  # a prefix: N grows the run


def test_drawn_cases_are_valid_and_varied():
    drawn = fuzz.draw_cases(300, 0)
    for case in drawn:
        assert fuzz.check_case(case) is case
        spec = C.MODULES[case.module]
        assert case.module in fuzz.FUZZ_MODULES and case.variant in spec.variants
        assert case.axis_size in (2, 4, 8) and case.dtype in spec.dtypes
        assert set(spec.param_shapes(case)) and spec.input_shape(case)[0] == case.batch
    seen = lambda f: {f(c) for c in drawn}  # noqa: E731
    assert seen(lambda c: c.module) == set(fuzz.FUZZ_MODULES)
    assert seen(lambda c: c.axis_size) == {2, 4, 8} and seen(lambda c: c.dtype) == set(C.DTYPES)
    widths = seen(lambda c: c.in_features // c.axis_size)
    assert {3, 5, 6} <= widths  # non-power-of-two multiples of the axis size
    assert seen(lambda c: c.option("rso")) >= {0, 1}
    assert len(seen(lambda c: c.option("microbatches"))) > 5


def test_every_matrix_case_passes_the_same_validation():
    for case in C.default_matrix():
        fuzz.check_case(case)


def test_json_round_trip_and_reproducer():
    for case in fuzz.draw_cases(50, 1) + C.default_matrix()[:5]:
        text = fuzz.case_to_json(case)
        assert "\n" not in text and fuzz.case_from_json(text) == case
        assert fuzz.reproducer(case) == f"python -m parity --case '{text}'"


@pytest.mark.parametrize("edit, message", [
    ({"module": "conv"}, "module='conv'"),
    ({"variant": "gathr"}, "variant='gathr'"),
    ({"axis_size": 3}, "axis_size=3"),
    ({"axis_size": "4"}, "axis_size='4'"),
    ({"dtype": "float16"}, "dtype='float16'"),
    ({"in_features": 30}, "in_features=30 is not divisible by axis_size=4"),
    ({"batch": 0}, "batch=0"),
    ({"extra": [["rso", 1]]}, "extra="),
    ({"colour": 1}, "case field 'colour'"),
    ({"tolerance": "big"}, "tolerance='big'"),
])
def test_bad_case_json_names_the_field(edit, message):
    fields = json.loads(fuzz.case_to_json(C.Case("tpasync", "gather-uni", 4)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        fuzz.case_from_json(json.dumps({**fields, **edit}))


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
    ('{"module": "tpdense"}', "case field 'variant': missing"),
    ('{"module": "pipeline", "variant": "mlp", "axis_size": 2, "batch": 7, "in_features": 16, '
     '"out_features": 16, "extra": [["microbatches", 5]]}', "batch=7 is not divisible"),
    ('{"module": "pipeline_circular", "variant": "mlp", "axis_size": 4, "batch": 4, '
     '"in_features": 8, "out_features": 8, "extra": [["microbatches", 2], ["repeats", 2]]}',
     "needs num_microbatches >= num_stages"),
])
def test_bad_case_json_is_a_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        fuzz.case_from_json(text)


def test_cli_rejects_bad_fuzz_and_case_arguments(capsys):
    from parity import cli

    assert cli.main(["--fuzz", "0"]) == 2
    assert "--fuzz=0: expected a positive int" in capsys.readouterr().err
    assert cli.main(["--case", '{"module": "conv", "variant": "x", "axis_size": 2}']) == 2
    assert "module='conv'" in capsys.readouterr().err
    assert cli.main(["--fuzz", "3", "--seed", "5", "--list"]) == 0
    assert capsys.readouterr().out.split() == [c.id for c in fuzz.draw_cases(3, 5)]
    case = fuzz.draw_cases(1, 7)[0]
    assert cli.main(["--case", fuzz.case_to_json(case), "--list"]) == 0
    assert capsys.readouterr().out.split() == [case.id]


def test_fixed_seed_fuzz_passes(monkeypatch):
    """CI's fuzz run: ``python -m parity --fuzz 30 --seed 0`` through the API, plus every
    fuzzed case that once failed (``fuzz.REGRESSIONS``).

    As the CLI does, it runs in a pool of fresh worker processes (``--jobs``, at least 2) with
    XLA's CPU codegen at level 0 (``--xla-opt-level``, set before those runtimes start; this
    process's runtimes may already run at the default level): 112 s of CPU for the 30 cases
    at level 0 against 159 s at the default, measured here.
    """
    from parity import runner

    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_backend_optimization_level=0".strip())
    chosen = fuzz.chosen_cases(CI_CASES, CI_SEED, list(fuzz.REGRESSIONS))
    reports = runner.run_cases(chosen, jobs=max(2, runner.default_jobs()))
    failed = [(c.id, r.reasons, fuzz.reproducer(c)) for c, r in zip(chosen, reports)
              if not r.passed]
    assert not failed, failed
