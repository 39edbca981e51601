"""Tests of torch_impl.cached_step: a step traced once and replayed gives the lazy step's values
and runs the lazy step's program (same collectives, so the parity signature is unchanged).

Values: the cached program is the very graph the lazy step compiles, so outputs and gradients
are asserted bitwise equal (measured: max difference 0.0).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # torch_xla reads it once

import pytest  # noqa: E402
import torch  # noqa: E402

from parity import cases as C  # noqa: E402
from parity import hlo  # noqa: E402
from torch_impl import mesh as M  # noqa: E402
from torch_impl.cached_step import CachedStep, cached_forward_backward  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def backend():
    from parity.runner import load_backend

    return load_backend("torch")


def _lazy(prog):
    y = prog.step()
    grads = [prog.x.grad] + [p.grad for p in prog.module.parameters()]
    return [t.detach().cpu().clone() for t in [y] + grads]


@pytest.mark.parametrize("module,variant,n", [("linear", "column-ag", 4),
                                              ("linear", "row-rsbi", 8),
                                              ("tpasync", "gather-bi", 4)])
def test_cached_step_matches_lazy_values_and_collectives(backend, module, variant, n):
    extra = (("rso", 1),) if module == "linear" else ()
    case = C.Case(module, variant, n, "float32", 8, 64, 128, extra)
    prog = backend.build(case, C.make_data(case))
    lazy_hlo = prog.hlo_text
    want = _lazy(prog)
    step = cached_forward_backward(prog.module, prog.x, prog.cot, keep_hlo=True)
    for _ in range(2):  # the second call reuses the program (nothing re-traced)
        y = step()
        got = [t.detach().cpu() for t in
               [y, prog.x.grad] + [p.grad for p in prog.module.parameters()]]
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert hlo.signature(step.cached.hlo_text) == hlo.signature(lazy_hlo)
    assert hlo.count(step.cached.hlo_text, "collective-permute") == \
        hlo.count(lazy_hlo, "collective-permute")


def test_cached_step_reads_current_argument_values():
    dev = M.xla_device()
    a = torch.ones(4, device=dev)
    b = torch.full((4,), 2.0, device=dev)
    step = CachedStep(lambda a, b: [a * b + 1], [a, b])
    assert step()[0].cpu().tolist() == [3.0] * 4
    a.mul_(3)  # in-place update between calls is seen
    M.sync(wait=True)
    assert step()[0].cpu().tolist() == [7.0] * 4
    c = torch.full((4,), 5.0, device=dev)
    assert step(c, b)[0].cpu().tolist() == [11.0] * 4  # or new tensors of the same signature


def test_cached_step_rejects_bad_arguments():
    dev = M.xla_device()
    a = torch.ones(4, device=dev)
    with pytest.raises(ValueError, match=r"args\[0\]"):
        CachedStep(lambda a: [a], [torch.ones(4)])  # CPU tensor
    with pytest.raises(ValueError, match="fn returned"):
        CachedStep(lambda a: a + 1, [a])
    step = CachedStep(lambda a: [a + 1], [a])
    with pytest.raises(ValueError, match="expected 1"):
        step(a, a)
    with pytest.raises(ValueError, match=r"args\[0\]=\(\(5,\)"):
        step(torch.ones(5, device=dev))


def test_cached_step_refuses_an_arg_the_graph_does_not_read():
    """fn reading a copy of an arg (made before the trace) would replay the copy's value forever:
    refused, naming the arg."""
    dev = M.xla_device()
    a = torch.ones(4, device=dev)
    b = torch.full((4,), 2.0, device=dev)
    copy = a * 1
    M.sync(wait=True)
    with pytest.raises(ValueError, match=r"args \[0\]: not inputs of the traced graph"):
        CachedStep(lambda a, b: [copy * b], [a, b])
    with pytest.raises(ValueError, match=r"args \[1\]"):
        CachedStep(lambda a, b: [a + 1], [a, b])  # b not read at all

