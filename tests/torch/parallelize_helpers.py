"""The plain PyTorch model of the tests/torch/test_parallelize*.py files, its three plans, and
the reference / gradient helpers they share (``rel`` and ``parallel_grads`` also serve
tests/torch/test_hf_migration.py).

The model is an ordinary PyTorch decoder written without ringpar in mind (nn.Embedding,
nn.LayerNorm, q/k/v/o and MLP nn.Linear layers, GELU, dropout (p=0), an untied LM head); it
runs on the CPU as the reference. The plans: Megatron (colwise / rowwise, vocab-parallel
embedding), ring (the async ring styles, feature-sharded norms) and sequence-parallel.
"""

from __future__ import annotations

import torch
from torch import nn

TOL = 1e-5
V, D, H, F, L, B, S = 64, 32, 8, 64, 2, 2, 8
HD = D // H


# --------------------------------------------------------------------------- a plain model
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        # no key bias: its gradient is analytically zero (softmax ignores a constant added to
        # all of a query's scores), so any relative error on it would measure rounding noise
        self.q_proj, self.v_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D)

    def forward(self, x):
        from torch_impl.parallelize import head_parallel_attention

        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, H, HD).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        mask = torch.full((s, s), torch.finfo(x.dtype).min, device=x.device).triu(1)
        out, _ = head_parallel_attention(self, q, k, v, mask, HD ** -0.5)
        return self.o_proj(out.reshape(b, s, D))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc_in, self.act, self.fc_out = nn.Linear(D, F), nn.GELU(), nn.Linear(F, D)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(D), Attention()
        self.ln_2, self.mlp = nn.LayerNorm(D), MLP()

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.1 * torch.randn(S, D))
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_model(seed=0):
    torch.manual_seed(seed)
    model = TinyLM()
    with torch.no_grad():  # non-trivial norm parameters
        for name, p in model.named_parameters():
            if "ln_" in name or name.startswith("norm"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def megatron_plan():
    from torch_impl.parallelize import ColwiseParallel, RowwiseParallel, VocabParallel

    return {"embed": VocabParallel(),
            "blocks.*.attn.[qkv]_proj": ColwiseParallel(head_dim=HD),
            "blocks.*.attn.o_proj": RowwiseParallel(head_dim=HD),
            "blocks.*.mlp.fc_in": "colwise",
            "blocks.*.mlp.fc_out": "rowwise",
            "head": "colwise",
            "norm": "replicate"}


def ring_plan():
    from torch_impl.parallelize import (AsyncColwiseParallel, AsyncRowwiseParallel,
                                        SequenceParallel, VocabParallel)

    return {"embed": VocabParallel(output_sharded=True),
            "blocks.*.ln_*": SequenceParallel(sharding="features"),
            "norm": SequenceParallel(sharding="features"),
            "blocks.*.attn.[qkv]_proj": AsyncColwiseParallel(head_dim=HD),
            "blocks.*.attn.o_proj": AsyncRowwiseParallel(head_dim=HD),
            "blocks.*.mlp.fc_in": "colwise_ring",
            "blocks.*.mlp.fc_out": AsyncRowwiseParallel(bidirectional=True),
            "head": AsyncColwiseParallel(bidirectional=True)}


def sequence_plan():
    from torch_impl.parallelize import SequenceParallel, VocabParallel

    plan = megatron_plan()
    plan.update({"embed": VocabParallel(output_sharded=True, scatter_dim=-2),
                 "blocks.*.ln_*": SequenceParallel(), "norm": SequenceParallel()})
    return plan


PLANS = {"megatron": megatron_plan, "ring": ring_plan, "sequence": sequence_plan}


def rel(a, ref) -> float:
    a, ref = a.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a - ref).abs().max() / max(float(ref.abs().max()), 1e-30))


def grad_errors(grads, ref_grads) -> dict[str, float]:
    """Normwise relative error of every parameter's gradient."""
    assert set(grads) == set(ref_grads)
    return {k: rel(grads[k], ref) for k, ref in ref_grads.items()}


def ids_and_cot(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.randn(B, S, V, generator=g)


def reference(model, ids, cot):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    (logits * cot).sum().backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def parallel_grads(tp_model):
    """Gradients under the ORIGINAL parameter names and layouts (the public layouts)."""
    from torch_impl.parallelize_layers import origin_of

    out = {}
    for name, mod in tp_model.named_modules():
        origin = origin_of(mod)
        for pname, p in mod.named_parameters(recurse=False):
            g = p.grad.detach().cpu()
            if origin is not None:
                (oname, lay), = [(o, lay) for o, (n, lay) in origin.items() if n == pname]
                pname, g = oname, lay.to_original(g, is_bias=g.dim() == 1)
            out[f"{name}.{pname}" if name else pname] = g
    return out
