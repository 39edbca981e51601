"""The 4-D-mesh GPT in the parity main job's default matrix (no compile: the cases as data).

The main job (``python -m parity``) runs these cases on both backends; tests/parity/
test_model_twins.py runs the same model in the suite.
"""

from __future__ import annotations

import math

from parity import cases
from ringpar.gpt_model_config import reference_shapes

# The meshes (dp, fsdp, pp, tp) issue 15 names.
ISSUE_MESHES = {(8, 1, 1, 1), (1, 8, 1, 1), (1, 1, 1, 8), (1, 1, 2, 4), (2, 2, 1, 2),
                (1, 2, 2, 2), (2, 1, 2, 2)}


def _gpt4d_cases():
    return [c for c in cases.default_matrix() if c.module == "gpt4d"]


def _mesh(case):
    return (case.option("dp"), case.option("fsdp"), case.option("pp"), case.axis_size)


def test_default_matrix_holds_at_least_four_issue_meshes():
    meshes = {_mesh(c) for c in _gpt4d_cases()}
    assert len(meshes) >= 4 and meshes <= ISSUE_MESHES, meshes
    assert all(math.prod(m) == 8 for m in meshes)
    assert len({c.id for c in _gpt4d_cases()}) == len(_gpt4d_cases())


def test_case_config_follows_the_case():
    for case in _gpt4d_cases():
        par = cases.gpt4d_case_config(case).parallel
        assert (par.data_axis_size, par.fsdp_axis_size, par.pipeline_axis_size,
                par.model_axis_size) == _mesh(case)
        assert par.tp_async_dense == (case.variant == "async")
        assert bool(par.fsdp_modules) == (case.option("fsdp") > 1)


def test_data_has_the_reference_parameters_and_valid_tokens():
    case = _gpt4d_cases()[0]
    data = cases.make_data(case)
    cfg = cases.gpt4d_case_config(case).model_config
    assert {k: v.shape for k, v in data["params"].items()} == reference_shapes(cfg)
    tokens, targets = cases.gpt4d_tokens(case, data)
    assert tokens.shape == targets.shape == (case.batch, cfg.max_seq_len)
    assert 0 <= tokens.min() and max(tokens.max(), targets.max()) < cfg.vocab_size
    assert len(set(tokens.ravel().tolist())) > cfg.vocab_size // 2  # not a constant batch
