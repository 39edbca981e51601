"""A worked migration of a third-party model: Hugging Face ``LlamaForCausalLM`` onto the TP layers.

The model is built from a tiny ``LlamaConfig`` with random weights (no download): vocab 128,
hidden 64, 8 heads of 8 (8 key/value heads, so tp = 8 still splits whole kv heads), MLP 128,
2 layers, untied LM head, eager attention. The migration, a few lines of user code:

1. register ringpar's head-local attention kernel with transformers, with the eager kernel's
   mask function (without one, transformers passes no mask and attention is no longer causal),
   and select it on the copy (``set_attn_implementation("ringpar")``): HF's eager kernel calls
   ``torch.matmul`` on
   [B, H, S, hd] tensors, which folds B and H into one batch dim and makes the partitioner
   all-gather q, k and v (measured: 4 all-gathers of [B, H, S, hd] per layer at tp = 4);
2. ``parallelize_module(model, mesh, PLAN, inplace=False)`` with the Megatron plan below
   (vocab-parallel embedding, q/k/v and gate/up column-wise, o/down row-wise, LM head column-wise
   with its logits left sharded on the vocabulary) or the ring plan (async collective matmuls,
   feature-sharded residual stream and RMSNorms);
3. the loss is ringpar's vocab-parallel cross-entropy on the sharded logits, compared with the
   model's OWN loss (``model(ids, labels=labels).loss``, HF shifts the labels internally).

Asserted here: the Megatron plan at tp = 2 and the ring plan at tp = 4 (the auto plans of
tests/torch/test_plans.py cover more). Measured once (float32, normwise relative error
max|a - ref| / max|ref| against the unsharded CPU model, max over the Megatron plan at
tp = 1, 2, 4, 8 and the ring plan at tp = 2, 4, 8):
logits 3.3e-07, loss 9.8e-08, parameter gradients 9.4e-07. Asserted <= 1e-5.
``gather_state_dict`` returns the original state_dict bit for bit, and it loads into a fresh
``LlamaForCausalLM`` with ``strict=True``.

Communication of the migrated model (tp = 4, compiled and partitioned): the forward pass has
exactly 2 all-reduces per decoder layer (o_proj, down_proj) plus 1 for the embedding, and no
other collective; forward + backward (with the vocab-parallel loss): only all-reduces, never an
all-gather (so never of a weight).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # torch_impl.mesh.compiled_hlo

import pytest  # noqa: E402
import torch  # noqa: E402

from parity import hlo  # noqa: E402
from tests.torch.parallelize_helpers import parallel_grads, rel  # noqa: E402

import transformers  # noqa: E402  (installed in the venv: this test must run, never skip)

TOL = 1e-5
VOCAB, HIDDEN, HEADS, HEAD_DIM, LAYERS, B, S = 128, 64, 8, 8, 2, 2, 8


def llama(seed=0, kv_heads=HEADS):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
                         max_position_embeddings=32, tie_word_embeddings=False,
                         attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial RMSNorm weights (HF initializes them to ones)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def megatron_plan():
    from torch_impl.parallelize import ColwiseParallel, RowwiseParallel, VocabParallel

    return {"model.embed_tokens": VocabParallel(),
            "model.layers.*.self_attn.[qkv]_proj": ColwiseParallel(head_dim=HEAD_DIM),
            "model.layers.*.self_attn.o_proj": RowwiseParallel(head_dim=HEAD_DIM),
            "model.layers.*.mlp.gate_proj": "colwise",
            "model.layers.*.mlp.up_proj": "colwise",
            "model.layers.*.mlp.down_proj": "rowwise",
            "lm_head": ColwiseParallel()}


def ring_plan():
    from torch_impl.parallelize import (AsyncColwiseParallel, AsyncRowwiseParallel,
                                        SequenceParallel, VocabParallel)

    return {"model.embed_tokens": VocabParallel(output_sharded=True),
            "model.layers.*.*_layernorm": SequenceParallel(sharding="features"),
            "model.norm": SequenceParallel(sharding="features"),
            "model.layers.*.self_attn.[qkv]_proj": AsyncColwiseParallel(head_dim=HEAD_DIM),
            "model.layers.*.self_attn.o_proj": AsyncRowwiseParallel(head_dim=HEAD_DIM),
            "model.layers.*.mlp.gate_proj": "colwise_ring",
            "model.layers.*.mlp.up_proj": "colwise_ring",
            "model.layers.*.mlp.down_proj": "rowwise_ring",
            "lm_head": AsyncColwiseParallel()}


def migrate(model, mesh, plan):
    """The user's migration: head-local attention kernel + plan, on a copy of ``model``."""
    from torch_impl.parallelize import head_parallel_attention, parallelize_module

    transformers.AttentionInterface.register("ringpar", head_parallel_attention)
    transformers.AttentionMaskInterface.register(  # the causal mask of the eager kernel
        "ringpar", transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    tp_model = parallelize_module(model, mesh, plan, inplace=False)
    tp_model.set_attn_implementation("ringpar")
    return tp_model


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    return ids, labels


def shifted(labels):
    """HF's causal-LM target for every position: the next label, -100 at the end."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


def reference(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), out.loss.detach(), grads


def run_migrated(tp_model, mesh, ids, labels, device, hlo_text=False):
    from torch_impl import mesh as tm
    from torch_impl.losses import vocab_parallel_cross_entropy

    logits = tp_model(ids.to(device)).logits
    loss = vocab_parallel_cross_entropy(logits, shifted(labels).to(device), mesh=mesh)
    loss.backward()
    text = None
    if hlo_text:
        text = tm.compiled_hlo([logits, loss] + [p.grad for p in tp_model.parameters()])
    tm.sync()
    return logits, loss, text


@pytest.mark.parametrize("plan_name,tp", [("megatron", 2), ("ring", 4)])
def test_llama_migration_matches_original(plan_name, tp, make_torch_mesh, xla_device):
    from torch_impl.linear import ColumnParallelLinear, RowParallelLinear

    torch_mesh = make_torch_mesh(model_axis_size=tp)
    model = llama()
    ids, labels = batch()
    ref_logits, ref_loss, ref_grads = reference(model, ids, labels)
    tp_model = migrate(model, torch_mesh, {"megatron": megatron_plan, "ring": ring_plan}[
        plan_name]())
    attn = tp_model.model.layers[1].self_attn
    assert isinstance(attn.k_proj, ColumnParallelLinear)
    assert isinstance(attn.o_proj, RowParallelLinear)
    assert type(model.model.layers[1].self_attn.k_proj) is torch.nn.Linear  # original untouched
    assert model.config._attn_implementation == "eager"

    logits, loss, _ = run_migrated(tp_model, torch_mesh, ids, labels, xla_device)
    assert rel(logits, ref_logits) <= TOL
    assert rel(loss, ref_loss) <= TOL
    grads = parallel_grads(tp_model)
    assert set(grads) == set(ref_grads)
    worst = {k: rel(grads[k], ref_grads[k]) for k in ref_grads}
    assert max(worst.values()) <= TOL, {k: v for k, v in worst.items() if v > TOL}


def test_llama_gather_state_dict_round_trip(make_torch_mesh, xla_device):
    from torch_impl.parallelize import gather_state_dict

    model = llama()
    original = model.state_dict()
    tp_model = migrate(model, make_torch_mesh(model_axis_size=4), megatron_plan())
    state = gather_state_dict(tp_model)
    assert set(state) == set(original)
    for k, v in original.items():
        assert torch.equal(state[k], v), k
    fresh = llama(seed=123)
    fresh.load_state_dict(state, strict=True)
    ids, _ = batch()
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_llama_migrated_collectives(make_torch_mesh, xla_device):
    from torch_impl import mesh as tm

    mesh = make_torch_mesh(model_axis_size=4)
    model = llama()
    ids, labels = batch()
    tp_model = migrate(model, mesh, megatron_plan())
    with torch.no_grad():
        logits = tp_model(ids.to(xla_device)).logits
    fwd = hlo.collectives(tm.compiled_hlo([logits]))
    tm.sync()
    groups = "{{0,1,2,3},{4,5,6,7}}"
    assert [(op.kind, op.replica_groups) for op in fwd] == [("all-reduce", groups)] * (
        2 * LAYERS + 1)
    _, _, text = run_migrated(tp_model, mesh, ids, labels, xla_device, hlo_text=True)
    assert {op.kind for op in hlo.collectives(text)} == {"all-reduce"}


def test_llama_errors_name_the_module(make_torch_mesh, xla_device):
    from torch_impl.parallelize import ColwiseParallel, parallelize_module

    gqa = llama(kv_heads=4)  # 4 kv heads cannot be split 8 ways
    plan = dict(megatron_plan())
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj: 4 heads \(32 features"
                                         r" / head_dim=8\) are not divisible by the "
                                         r"tensor-parallel size 8"):
        parallelize_module(gqa, make_torch_mesh(model_axis_size=8), plan, inplace=False)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.act_fn: style ColwiseParallel"):
        parallelize_module(llama(), make_torch_mesh(model_axis_size=2),
                           {"model.layers.*.mlp.act_fn": ColwiseParallel()}, inplace=False)
    with pytest.raises(ValueError, match=r"plan entry 'model.layers.\*.mlp.c_fc' matches no "
                                         r"module"):
        parallelize_module(llama(), make_torch_mesh(model_axis_size=2),
                           {"model.layers.*.mlp.c_fc": "colwise"}, inplace=False)
