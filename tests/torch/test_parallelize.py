"""torch_impl.parallelize: move a plain ``nn.Module`` onto the TP layers with a plan.

The model under test (tests/torch/parallelize_helpers.py) runs on the CPU as the reference;
``parallelize_module(..., inplace=False)`` makes the tensor-parallel copy on the 8-device mesh
(dp = 8/tp): the Megatron plan at tp = 1 and 8, the ring plan at tp = 2, the sequence-parallel
plan at tp = 4 (every tp was measured once; the suite keeps a few to stay fast). Hugging Face
models and auto plans: tests/torch/test_plans.py. Errors: tests/torch/test_parallelize_errors.py.

Measured (float32, normwise relative error max|a - ref| / max|ref| against the CPU model, max
over tp = 1, 2, 4, 8 and the Megatron and ring plans): logits 3.2e-07, parameter gradients
7.1e-07; sequence-parallel plan (tp = 4): 1.9e-07 / 4.8e-07; the weights gathered after one SGD
step 6.4e-07. Asserted <= 1e-5. ``gather_state_dict`` of an untrained parallel model is
bit-identical to the original ``state_dict`` (torch.equal).

Communication (compiled, partitioned HLO, tp = 4; ``parity.hlo``):
- Megatron plan, MLP / attention alone: forward exactly ONE all-reduce; forward+backward only
  all-reduces (the input gradients of the column layers);
- ring plan: MLP / attention forward only collective-permutes over the tp rings, n-1 per
  layer: 2 (n-1) for the MLP, 4 (n-1) for the attention (q, k and v each run a ring over the
  same input; a fused qkv layer, as in jax_impl.gpt, needs one); backward also only permutes;
- never an all-gather whose result has the size of a weight matrix (no all-gather at all in the
  whole Megatron-plan model, forward and backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from parity import hlo
from tests.torch.parallelize_helpers import (
    B, D, HD, PLANS, S, TOL, Attention, Block, MLP, TinyLM, grad_errors, ids_and_cot,
    make_model, megatron_plan, parallel_grads, reference, rel, ring_plan, sequence_plan)


# ---------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("plan_name,tp", [("megatron", 1), ("megatron", 8), ("ring", 2)])
def test_parallel_model_matches_original(plan_name, tp, make_torch_mesh, xla_device):
    from torch_impl import mesh as tm
    from torch_impl.embedding import VocabParallelEmbed
    from torch_impl.linear import ColumnParallelLinear, RowParallelLinear
    from torch_impl.parallelize import parallelize_module

    model = make_model()
    before = copy.deepcopy(model.state_dict())
    ids, cot = ids_and_cot()
    ref_logits, ref_grads = reference(model, ids, cot)
    model.zero_grad(set_to_none=True)

    tp_model = parallelize_module(model, make_torch_mesh(model_axis_size=tp), PLANS[plan_name](),
                                  inplace=False)
    # the original is untouched (a copy was parallelized)
    assert isinstance(model.head, nn.Linear) and model.head.weight.device.type == "cpu"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # swapped types; every other module keeps its class
    attn = tp_model.blocks[0].attn
    assert isinstance(tp_model.embed, VocabParallelEmbed)
    assert isinstance(attn.q_proj, ColumnParallelLinear) and isinstance(attn.o_proj,
                                                                         RowParallelLinear)
    assert isinstance(tp_model.blocks[1].mlp.fc_out, RowParallelLinear)
    assert type(tp_model.blocks[0].mlp.act) is nn.GELU and type(tp_model.blocks[0]) is Block
    assert all(p.device.type == "xla" for p in tp_model.parameters())

    logits = tp_model(ids.to(xla_device))
    (logits * cot.to(xla_device)).sum().backward()
    tm.sync()
    assert rel(logits, ref_logits) <= TOL
    worst = grad_errors(parallel_grads(tp_model), ref_grads)
    assert max(worst.values()) <= TOL, {k: v for k, v in worst.items() if v > TOL}


def test_sequence_parallel_plan(make_torch_mesh, xla_device):
    from torch_impl import mesh as tm
    from torch_impl.norms import ParallelLayerNorm
    from torch_impl.parallelize import parallelize_module

    model = make_model()
    ids, cot = ids_and_cot()
    ref_logits, ref_grads = reference(model, ids, cot)
    tp_model = parallelize_module(model, make_torch_mesh(model_axis_size=4), sequence_plan(),
                                  inplace=False)
    assert isinstance(tp_model.blocks[0].ln_1, ParallelLayerNorm)
    assert tp_model.blocks[0].ln_1.sharding == "sequence"
    logits = tp_model(ids.to(xla_device))
    (logits * cot.to(xla_device)).sum().backward()
    tm.sync()
    assert rel(logits, ref_logits) <= TOL
    assert max(grad_errors(parallel_grads(tp_model), ref_grads).values()) <= TOL


def test_inplace_swaps_in_the_given_model(make_torch_mesh, xla_device):
    from torch_impl.linear import ColumnParallelLinear
    from torch_impl.parallelize import parallelize_module

    model = make_model()
    out = parallelize_module(model, make_torch_mesh(model_axis_size=2), {"head": "colwise"})
    assert out is model and isinstance(model.head, ColumnParallelLinear)
    assert type(model.blocks[0].attn.q_proj) is nn.Linear  # not in the plan: untouched


# ------------------------------------------------------------------------- state_dict round trip
def test_gather_state_dict_round_trip(make_torch_mesh, xla_device):
    from torch_impl import mesh as tm
    from torch_impl.parallelize import gather_state_dict, parallelize_module

    model = make_model()
    original = model.state_dict()
    tp_model = parallelize_module(model, make_torch_mesh(model_axis_size=4), ring_plan(),
                                  inplace=False)
    state = gather_state_dict(tp_model)
    assert list(state) == list(original)  # same keys in the same order as model.state_dict()
    for k, v in original.items():
        assert state[k].device.type == "cpu" and state[k].shape == v.shape
        assert torch.equal(state[k], v), k  # bit-exact
    fresh = TinyLM()
    fresh.load_state_dict(state, strict=True)
    ids, _ = ids_and_cot()
    assert torch.equal(fresh(ids), model(ids))

    # one SGD step on both: the gathered weights follow the CPU model's
    ids, cot = ids_and_cot(2)
    reference(model, ids, cot)
    tp_model.zero_grad(set_to_none=True)
    (tp_model(ids.to(xla_device)) * cot.to(xla_device)).sum().backward()
    for opt_model in (model, tp_model):
        with torch.no_grad():
            for p in opt_model.parameters():
                p.sub_(0.5 * p.grad)
    tm.sync()
    stepped = gather_state_dict(tp_model)
    for k, v in model.state_dict().items():
        assert rel(stepped[k], v) <= TOL, k


# ------------------------------------------------------------------------------- communication
def _module_hlo(module, mesh, plan, x, xla_device, backward):
    from torch_impl import mesh as tm
    from torch_impl.parallelize import parallelize_module

    tp = parallelize_module(module, mesh, plan, inplace=False)
    xd = x.to(xla_device).requires_grad_(backward)
    y = tp(xd)
    if not backward:
        text = tm.compiled_hlo([y])
    else:
        (y * torch.ones_like(y)).sum().backward()
        text = tm.compiled_hlo([y, xd.grad] + [p.grad for p in tp.parameters()])
    tm.sync()
    weight_bytes = {p.numel() * p.element_size() for p in tp.parameters() if p.dim() == 2}
    return hlo.collectives(text), weight_bytes


MLP_PLANS = {"megatron": {"fc_in": "colwise", "fc_out": "rowwise"},
             "ring": {"fc_in": "colwise_ring", "fc_out": "rowwise_ring"}}


def attn_plans():
    from torch_impl.parallelize import (AsyncColwiseParallel, AsyncRowwiseParallel,
                                        ColwiseParallel, RowwiseParallel)

    return {"megatron": {"[qkv]_proj": ColwiseParallel(head_dim=HD),
                         "o_proj": RowwiseParallel(head_dim=HD)},
            "ring": {"[qkv]_proj": AsyncColwiseParallel(head_dim=HD),
                     "o_proj": AsyncRowwiseParallel(head_dim=HD)}}


@pytest.mark.parametrize("plan_name", ["megatron", "ring"])
@pytest.mark.parametrize("which", ["mlp", "attention"])
def test_migrated_block_collectives(which, plan_name, make_torch_mesh, xla_device):
    n = 4
    mesh = make_torch_mesh(model_axis_size=n)
    torch.manual_seed(0)
    module = MLP() if which == "mlp" else Attention()
    plan = (MLP_PLANS if which == "mlp" else attn_plans())[plan_name]
    x = torch.randn(B, S, D)
    fwd, weight_bytes = _module_hlo(module, mesh, plan, x, xla_device, backward=False)
    both, _ = _module_hlo(module, mesh, plan, x, xla_device, backward=True)
    for op in fwd + both:  # never a weight-sized all-gather
        assert not (op.kind == "all-gather" and op.result_bytes in weight_bytes), op
    groups = "{{0,1,2,3},{4,5,6,7}}"
    if plan_name == "megatron":
        assert [(op.kind, op.replica_groups) for op in fwd] == [("all-reduce", groups)]
        assert {op.kind for op in both} == {"all-reduce"}
    else:
        rings = {tuple(sorted((4 * r + j, 4 * r + (j + s) % 4) for r in range(2) for j in range(4)))
                 for s in (1, -1)}
        assert {op.kind for op in fwd} == {"collective-permute"}
        # one ring of n-1 permutes per layer: MLP fc_in, fc_out; attention q, k, v, o (three
        # rings carry the same input: a fused qkv projection would need one)
        assert len(fwd) == (2 if which == "mlp" else 4) * (n - 1)
        assert all(op.pairs in rings for op in fwd)
        assert {op.kind for op in both} == {"collective-permute"}


def test_whole_megatron_model_has_no_all_gather(make_torch_mesh, xla_device):
    from torch_impl import mesh as tm
    from torch_impl.parallelize import parallelize_module

    tp_model = parallelize_module(make_model(), make_torch_mesh(model_axis_size=4),
                                  megatron_plan(), inplace=False)
    ids, cot = ids_and_cot()
    logits = tp_model(ids.to(xla_device))
    (logits * cot.to(xla_device)).sum().backward()
    ops = hlo.collectives(tm.compiled_hlo([logits] + [p.grad for p in tp_model.parameters()]))
    tm.sync()
    assert {op.kind for op in ops} == {"all-reduce"}
