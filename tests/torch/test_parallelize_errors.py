"""torch_impl.parallelize errors and options: plan patterns (``*`` one name component, ``**``
any number), style options that take only their documented values, and the confusing inputs that
now raise a ValueError naming the argument or plan entry (mesh None / not a mesh, a bad axis
name, a style class instead of an instance, ``inplace='no'``, the root module, a plan that is
not a mapping, a converter variant typo 'gathr' that fell back to scatter, CPU inputs,
unexpected state_dict keys). The model and plans: tests/torch/parallelize_helpers.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.torch.parallelize_helpers import D, V, make_model


# ----------------------------------------------------------------------------------- errors
def test_plan_errors_name_the_module(make_torch_mesh, xla_device):
    from torch_impl.parallelize import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                        VocabParallel, parallelize_module)

    mesh = make_torch_mesh(model_axis_size=4)

    def fails(plan, match, model=None):
        with pytest.raises(ValueError, match=match):
            parallelize_module(model or make_model(), mesh, plan, inplace=False)

    fails({"blocks.*.mlp.fc_middle": "colwise"}, r"plan entry 'blocks.\*.mlp.fc_middle' matches "
          r"no module of TinyLM .*nearest module names: 'blocks.\*.mlp.fc_in'")
    fails({"embed": "colwise"}, r"embed: style ColwiseParallel.* expects an nn.Linear or a "
          r"Conv1D, got Embedding")
    fails({"head": VocabParallel()}, r"head: style VocabParallel.* expects an nn.Embedding")
    fails({"blocks.0.mlp.fc_in": SequenceParallel()}, r"blocks.0.mlp.fc_in: style "
          r"SequenceParallel.* expects an nn.LayerNorm")
    fails({"blocks.*.attn.q_proj": ColwiseParallel(head_dim=16)},
          r"blocks.0.attn.q_proj: 2 heads .* not divisible by the tensor-parallel size 4")
    fails({"blocks.*.attn.q_proj": ColwiseParallel(head_dim=5)},
          r"blocks.0.attn.q_proj: 32 out features are not a whole number of heads")
    fails({"blocks.*.mlp.*": "colwise", "blocks.1.mlp.fc_out": "rowwise"},
          r"blocks.1.mlp.fc_out: matched by two plan entries")
    fails({"blocks.0.mlp": "replicate", "blocks.0.mlp.fc_in": "colwise"},
          r"blocks.0.mlp.fc_in: inside blocks.0.mlp")
    fails({"head": "columnwise"}, r"plan\['head'\]='columnwise': expected a ParallelStyle")

    odd = make_model()
    odd.blocks[0].mlp.fc_in = nn.Linear(D, 30)
    odd.blocks[0].mlp.fc_out = nn.Linear(30, D)
    fails({"blocks.*.mlp.fc_in": "colwise"}, r"blocks.0.mlp.fc_in: out_features=30 .* not "
          r"divisible by the tensor-parallel size 4", odd)
    fails({"blocks.*.mlp.fc_out": RowwiseParallel()}, r"blocks.0.mlp.fc_out: in_features=30",
          odd)
    odd_vocab = make_model()
    odd_vocab.embed = nn.Embedding(66, D)
    fails({"embed": "vocab_parallel"}, r"embed: num_embeddings=66 is not divisible", odd_vocab)

    tied = make_model()
    tied.head.weight = tied.embed.weight
    fails({"head": "colwise"}, r"head: parameter 'weight' is shared with \['embed.weight'\]",
          tied)


def test_plan_patterns():
    from torch_impl.parallelize import pattern_regex

    def hits(pattern, name):
        return bool(pattern_regex(pattern).fullmatch(name))

    assert hits("blocks.*.mlp", "blocks.0.mlp") and not hits("blocks.*.mlp", "blocks.0.1.mlp")
    assert not hits("blocks.*", "blocks.0.mlp")  # '*' is ONE component (was fnmatch: any)
    assert hits("**.mlp", "mlp") and hits("**.mlp", "a.b.mlp") and not hits("**.mlp", "a.mlpx")
    assert hits("blocks.**.fc_in", "blocks.0.mlp.fc_in") and hits("blocks.**", "blocks.0")
    assert hits("blocks.**.fc_in", "blocks.fc_in") and hits("**", "any.thing")
    assert hits("b.*.attn.[qkv]_proj", "b.1.attn.k_proj")
    assert not hits("b.*.attn.[qkv]_proj", "b.1.attn.o_proj")
    assert hits("b.*.ln_?", "b.0.ln_1") and not hits("b.*.ln_?", "b.0.ln_12")


def test_style_options_accept_only_documented_values():
    from torch_impl.parallelize import (AsyncColwiseParallel, AsyncRowwiseParallel,
                                        ColwiseParallel, RowwiseParallel, SequenceParallel,
                                        VocabParallel)

    bad = [(lambda: ColwiseParallel(output_sharded="no"),  # was silently True
            r"ColwiseParallel\(output_sharded='no'\): expected True or False"),
           (lambda: RowwiseParallel(output_sharded=0), r"RowwiseParallel\(output_sharded=0\)"),
           (lambda: AsyncColwiseParallel(bidirectional="yes"), r"bidirectional='yes'"),
           (lambda: AsyncRowwiseParallel(bidirectional=None), r"bidirectional=None"),
           (lambda: ColwiseParallel(head_dim="8"),
            r"ColwiseParallel\(head_dim='8'\): expected None or a positive"),
           (lambda: ColwiseParallel(head_dim=8, fused_qkv="qkv"),
            r"fused_qkv='qkv'\): expected one of \(None, 'blocks', 'interleaved'\)"),
           (lambda: ColwiseParallel(fused_qkv="blocks"), r"fused_qkv='blocks'\) needs head_dim"),
           (lambda: ColwiseParallel(replicate_kv=True), r"replicate_kv=True\) needs head_dim"),
           (lambda: SequenceParallel(sharding="seq"),
            r"SequenceParallel\(sharding='seq'\): expected one of"),
           (lambda: VocabParallel(scatter_dim=2),
            r"VocabParallel\(scatter_dim=2\): expected one of \(-1, -2\)"),
           (lambda: VocabParallel(output_sharded="True"), r"output_sharded='True'")]
    for make, match in bad:
        with pytest.raises(ValueError, match=match):
            make()


def test_confusing_inputs_are_value_errors(make_torch_mesh, xla_device):
    """Inputs that gave raw torch_xla / Attribute / Key errors or silent wrong answers."""
    import numpy as np

    from ringpar import convert
    from torch_impl.parallelize import (ColwiseParallel, gather_state_dict, load_state_dict,
                                        parallelize_module)

    mesh = make_torch_mesh(model_axis_size=2)
    model = make_model()
    cases = [
        (lambda: parallelize_module(model, None, {"head": "colwise"}),
         r"mesh=NoneType: expected a torch_xla mesh"),
        (lambda: parallelize_module(model, "tp=2", {"head": "colwise"}), r"mesh=str"),
        (lambda: parallelize_module(model, mesh, {"head": "colwise"}, axis_name=3),
         r"axis_name=3: expected a mesh axis name"),
        (lambda: parallelize_module(model, mesh, {"head": "colwise"}, axis_name="model"),
         r"axis_name='model' is not an axis of the mesh"),
        (lambda: parallelize_module(model, mesh, {"head": ColwiseParallel}),
         r"plan\['head'\]=ColwiseParallel: expected an instance"),
        (lambda: parallelize_module(model, mesh, {"head": "colwise"}, inplace="no"),
         r"inplace='no': expected True or False"),
        (lambda: parallelize_module(model, mesh, {"": "colwise"}),
         r"plan entry '': the root module cannot be replaced"),
        (lambda: parallelize_module(model, mesh, ["head"]), r"plan=\['head'\]: expected None"),
        (lambda: gather_state_dict({"head.weight": 1}), r"model=dict"),
        (lambda: parallelize_module(model, mesh),  # no plan: auto_plan knows HF models only
         r"model=TinyLM \(model_type=None\): auto_plan knows \('gpt2'"),
        (lambda: convert.to_dense("tpdense", "gathr", 2, {"module.sharded.kernel": np.zeros(
            (2, 4, 2)), "module.sharded.bias": np.zeros((2, 2))}),  # fell back to scatter
         r"variant='gathr': expected one of \('none', 'gather', 'scatter'\)"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    tp_model = parallelize_module(model, mesh, {"head": "colwise"}, inplace=False)
    with pytest.raises(ValueError, match=r"is on device cpu, expected the XLA device"):
        tp_model.head(torch.zeros(1, D))
    with pytest.raises(ValueError, match=r"unexpected keys \['head.kernel'\]"):
        load_state_dict(tp_model, {**model.state_dict(), "head.kernel": torch.zeros(D, V)})
    load_state_dict(tp_model, make_model(seed=4).state_dict())  # an ordinary checkpoint loads
    assert torch.equal(gather_state_dict(tp_model)["head.weight"],
                       make_model(seed=4).head.weight)
