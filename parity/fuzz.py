"""Fuzzed parity cases (issue 18): random valid cases drawn from a seed, and one-line reproducers.

Framework-neutral (imports neither JAX nor torch). :func:`draw_cases` draws ``n`` cases from
``numpy.random.default_rng(seed)``: module, variant, axis size (2/4/8 where the module allows
it), dtype, shape (per-device widths 1..6, so non-power-of-two multiples of the axis size) and
the module's options (``rso``; pipeline micro-batches m <= p + 1 and 1-2 rows per micro-batch;
circular repeats 2). Only what each module accepts is drawn; :func:`check_case` states those rules once
and both :func:`draw_cases` and :func:`case_from_json` go through it. Shapes stay tiny so a
case compiles in a couple of seconds. The GPT case is not drawn: its shape is the fixed
``GPT_CONFIG`` and it costs ~20 s a case (the matrix and tests/parity/test_gpt_twins.py cover
it). No module of the matrix has a dropout or a bias on/off option, so neither is drawn.

Example::

    cases = draw_cases(30, seed=0)
    reproducer(cases[0])   # "python -m parity --case '{\"module\": ...}'"
    case_from_json(case_to_json(cases[0])) == cases[0]
"""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np

from ringpar.pipeline_schedule import check_schedule
from ringpar.validation import check_choice, check_divisible, positive_int

from .cases import MODULES, Case

__all__ = ["FUZZ_MODULES", "REGRESSIONS", "draw_case", "draw_cases", "check_case",
           "chosen_cases", "case_to_json", "case_from_json", "reproducer"]

# Modules the fuzzer draws from (the GPT case has a fixed shape and costs ~20 s).
FUZZ_MODULES = ("tpdense", "tpasync", "linear", "pipeline", "pipeline_circular")
# Draw weights: the pipelines unroll m + p - 1 steps (r(m + p - 1) circular) and cost ~2x a TP
# case to compile, so they are drawn less often.
FUZZ_WEIGHTS = (0.2, 0.25, 0.25, 0.15, 0.15)
FUZZ_AXIS_SIZES = (2, 4, 8)
WIDTHS = (1, 2, 3, 4, 5, 6)  # per-device feature widths: features = n * width
BATCHES = (1, 2, 3, 4, 5, 8)
PIPELINE_FEATURES = (4, 6, 8, 12, 16)
PIPELINE_DEVICES = 8  # the pipeline cases' mesh (dp, fsdp, pp, tp) = (8/p, 1, p, 1)
_OPTIONS = {"linear": ("rso",), "pipeline": ("microbatches",),
            "pipeline_circular": ("microbatches", "repeats")}

# Fuzzed cases that once failed (json of the Case), rerun by tests/parity/test_fuzz.py.
REGRESSIONS: tuple[str, ...] = ()


def _pick(rng: np.random.Generator, values):
    return values[int(rng.integers(len(values)))]


def draw_case(rng: np.random.Generator) -> Case:
    """One random valid case (see the module docstring) from ``rng``."""
    module = FUZZ_MODULES[int(rng.choice(len(FUZZ_MODULES), p=FUZZ_WEIGHTS))]
    spec = MODULES[module]
    variant = _pick(rng, spec.variants)
    n = _pick(rng, tuple(a for a in spec.axis_sizes if a in FUZZ_AXIS_SIZES))
    dtype = _pick(rng, spec.dtypes)
    if module.startswith("pipeline"):
        feats = _pick(rng, PIPELINE_FEATURES)
        low = n if module == "pipeline_circular" else 1  # circular: m >= p
        m = int(rng.integers(low, n + 2))  # m <= p + 1 keeps the unrolled schedule short
        extra = (("microbatches", m),)
        if module == "pipeline_circular":
            extra += (("repeats", 2),)  # the matrix's r; r = 3 compiled 1.5x longer
        batch = (PIPELINE_DEVICES // n) * m * _pick(rng, (1, 2))
        fi = fo = feats
    else:
        batch = _pick(rng, BATCHES)
        fi, fo = n * _pick(rng, WIDTHS), n * _pick(rng, WIDTHS)
        extra = (("rso", int(rng.integers(2))),) if module == "linear" else ()
    return check_case(Case(module, variant, n, dtype, batch, fi, fo, extra,
                           spec.tolerances.get(dtype)))


def draw_cases(n: int, seed: int) -> list[Case]:
    """``n`` random valid cases, the same for the same ``seed``."""
    positive_int("n", n)
    rng = np.random.default_rng(seed)
    return [draw_case(rng) for _ in range(n)]


def check_case(case: Case) -> Case:
    """``case`` if both backends accept it, else ValueError naming the bad field."""
    spec = MODULES.get(case.module)
    if spec is None:
        raise ValueError(f"module={case.module!r}: expected one of {tuple(MODULES)}")
    check_choice("variant", case.variant, spec.variants)
    check_choice("axis_size", case.axis_size, spec.axis_sizes)
    check_choice("dtype", case.dtype, spec.dtypes)
    if case.tolerance is not None and (isinstance(case.tolerance, bool)
                                       or not isinstance(case.tolerance, (int, float))):
        raise ValueError(f"tolerance={case.tolerance!r}: expected a number or null")
    n = case.axis_size
    options = dict(case.extra)
    if case.module not in FUZZ_MODULES:  # e.g. the GPT cases: fixed shapes, their own options
        return case
    expected = sorted(_OPTIONS.get(case.module, ()))
    if sorted(options) != expected or len(options) != len(case.extra):
        raise ValueError(f"extra={case.extra!r}: expected the options {expected} of module "
                         f"{case.module!r}")
    if case.module.startswith("pipeline"):
        m = positive_int("microbatches", options["microbatches"])
        check_divisible("batch", positive_int("batch", case.batch), "(devices/p)*microbatches",
                        (PIPELINE_DEVICES // n) * m)
        positive_int("in_features", case.in_features)
        if case.out_features != case.in_features:
            raise ValueError(f"out_features={case.out_features}: expected in_features="
                             f"{case.in_features} (pipeline stages keep the shape)")
        check_schedule(n, m, options.get("repeats", 1))  # the schedule's own rule (m >= p)
    else:
        positive_int("batch", case.batch)
        check_divisible("in_features", positive_int("in_features", case.in_features),
                        "axis_size", n)
        check_divisible("out_features", positive_int("out_features", case.out_features),
                        "axis_size", n)
        if case.module == "linear":
            check_choice("rso", options["rso"], (0, 1))
    return case


def case_to_json(case: Case) -> str:
    """``case`` as one line of JSON (inverse: :func:`case_from_json`)."""
    d = {f.name: getattr(case, f.name) for f in fields(Case)}
    d["extra"] = [list(e) for e in case.extra]
    return json.dumps(d, separators=(",", ":"))


def case_from_json(text: str) -> Case:
    """The case a :func:`case_to_json` line describes; ValueError naming a bad field."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"case={text!r}: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"case={text!r}: expected a JSON object of Case fields")
    names = {f.name for f in fields(Case)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"case field {unknown[0]!r}: unknown (expected {sorted(names)})")
    for key in ("module", "variant", "axis_size"):
        if key not in d:
            raise ValueError(f"case field {key!r}: missing")
    for key in ("module", "variant", "dtype"):
        if key in d and not isinstance(d[key], str):
            raise ValueError(f"{key}={d[key]!r}: expected a string")
    for key in ("axis_size", "batch", "in_features", "out_features"):
        if key in d and (not isinstance(d[key], int) or isinstance(d[key], bool)):
            raise ValueError(f"{key}={d[key]!r}: expected an int")
    extra = d.get("extra", [])
    if not isinstance(extra, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in extra):
        raise ValueError(f"extra={extra!r}: expected a list of [name, value] pairs")
    d["extra"] = tuple(tuple(e) for e in extra)
    return check_case(Case(**d))


def reproducer(case: Case) -> str:
    """The one-line command that reruns exactly ``case``."""
    return f"python -m parity --case '{case_to_json(case)}'"


def chosen_cases(fuzz: int | None, seed: int, case_jsons: list[str] | None) -> list[Case] | None:
    """The cases ``python -m parity --fuzz N --seed S`` / ``--case JSON`` asks for (None: the
    matrix); ValueError on a bad count or case."""
    if fuzz is None and not case_jsons:
        return None
    chosen = [case_from_json(text) for text in case_jsons or ()]
    if fuzz is not None:
        if isinstance(fuzz, bool) or not isinstance(fuzz, int) or fuzz < 1:
            raise ValueError(f"--fuzz={fuzz!r}: expected a positive int")
        chosen += draw_cases(fuzz, seed)
    return chosen
