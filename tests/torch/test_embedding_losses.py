"""torch_impl.losses / embedding / norms on torch_xla SPMD, mesh (dp, fsdp, pp, tp) = (8/n,1,1,n).

References are torch's own CPU modules: ``F.cross_entropy(label_smoothing, ignore_index)``,
``nn.Embedding`` (also with ``padding_idx``), ``nn.LayerNorm``, ``nn.RMSNorm``; the layers are
built from them with ``from_embedding`` / ``from_module`` (exact weights). Measured (float32, max
over n = 1, 2, 4, 8; relative error = max|a - ref| / max|ref|):
    cross-entropy loss 0 (bitwise equal), logits gradient 2.0e-07 (reductions, ignore_index,
    'none': 1.3e-07);
    embedding output and table gradient: exact (0), the padding row's gradient 0 as in torch;
    norms: outputs 3.0e-07, input gradients 1.9e-07, scale/bias gradients 2.1e-07.
Asserted <= 1e-5.

Communication (compiled, partitioned forward + backward): cross-entropy 2 all-reduces;
embedding 1 all-reduce or 1 reduce-scatter (+ 1 all-gather of the output cotangent backward);
sequence norm: only the all-reduce of the parameter gradients; feature norm: only all-reduces.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # torch_impl.mesh.compiled_hlo

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from parity import hlo  # noqa: E402

TOL = 1e-5
V, D, B, S = 64, 16, 2, 8


def rel(a, ref) -> float:
    a = a.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float((a - ref).abs().max() / max(float(ref.abs().max()), 1e-30))


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(B, S, V, generator=g)
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[0, :3] = -100
    return logits, targets


def sharded(t, mesh, spec, device):
    from torch_impl import mesh as tm

    t = t.to(device)
    tm.mark_sharding(t, mesh, spec)
    return t


# ------------------------------------------------------------------------------ cross-entropy
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_vocab_parallel_cross_entropy(torch_mesh, axis_size, xla_device, eps):
    from torch_impl import mesh as tm
    from torch_impl.losses import vocab_parallel_cross_entropy

    logits, targets = data()
    ref_x = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_x.reshape(-1, V), targets.reshape(-1), label_smoothing=eps)
    ref.backward()
    x = sharded(logits, torch_mesh, (None, None, "tp"), xla_device).requires_grad_()
    loss = vocab_parallel_cross_entropy(x, targets.to(xla_device), mesh=torch_mesh,
                                        label_smoothing=eps)
    loss.backward()
    ops = hlo.collectives(tm.compiled_hlo([loss, x.grad]))
    assert rel(loss, ref) <= TOL
    assert rel(x.grad, ref_x.grad) <= TOL
    if axis_size == 1:
        assert ops == []
    else:
        assert [op.kind for op in ops] == ["all-reduce", "all-reduce"]


def test_cross_entropy_reductions_and_global_mean(make_torch_mesh, xla_device):
    from torch_impl.losses import (VocabParallelCrossEntropy, cross_entropy,
                                   vocab_parallel_cross_entropy)

    mesh = make_torch_mesh(model_axis_size=4)
    logits, targets = data(1)
    targets[0, :] = -100
    targets[1, :2] = -100
    lg, tg = logits.to(xla_device), targets.to(xla_device)
    none = vocab_parallel_cross_entropy(lg, tg, mesh=mesh, reduction="none").cpu()
    ref_none = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="none")
    assert rel(none.reshape(-1), ref_none) <= TOL
    total = vocab_parallel_cross_entropy(lg, tg, mesh=mesh, reduction="sum").cpu()
    mean = vocab_parallel_cross_entropy(lg, tg, mesh=mesh).cpu()
    assert rel(mean, total / 6) <= TOL  # global count of valid tokens (6), not a mean of rows
    assert rel(mean, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))) <= TOL
    assert float(vocab_parallel_cross_entropy(lg, torch.full_like(tg, -100), mesh=mesh)) == 0.0
    smooth = VocabParallelCrossEntropy(mesh, ignore_index=5, label_smoothing=0.3)
    tg5 = torch.where(targets == -100, 5, targets)
    ref = F.cross_entropy(logits.reshape(-1, V), tg5.reshape(-1), ignore_index=5,
                          label_smoothing=0.3)
    assert rel(smooth(lg, tg5.to(xla_device)), ref) <= TOL
    assert rel(cross_entropy(logits, tg5, 0.3, 5), ref) <= TOL  # unsharded twin, on the CPU


def test_cross_entropy_errors(make_torch_mesh, xla_device):
    from torch_impl.losses import vocab_parallel_cross_entropy

    mesh = make_torch_mesh(model_axis_size=8)
    logits, targets = data()
    lg, tg = logits.to(xla_device), targets.to(xla_device)
    with pytest.raises(ValueError, match="label_smoothing"):
        vocab_parallel_cross_entropy(lg, tg, mesh=mesh, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="ignore_index"):
        vocab_parallel_cross_entropy(lg, tg, mesh=mesh, ignore_index=None)
    with pytest.raises(ValueError, match="targets.shape"):
        vocab_parallel_cross_entropy(lg, tg[:, :3], mesh=mesh)
    with pytest.raises(ValueError, match="integer"):
        vocab_parallel_cross_entropy(lg, tg.float(), mesh=mesh)
    with pytest.raises(ValueError, match="divisible"):
        vocab_parallel_cross_entropy(lg[..., :60], tg, mesh=mesh)
    with pytest.raises(ValueError, match="XLA device"):
        vocab_parallel_cross_entropy(logits, tg, mesh=mesh)


# ------------------------------------------------------------------------------ embedding
@pytest.mark.parametrize("rso,scatter_dim", [(False, -1), (True, -1), (True, -2)],
                         ids=["replicated", "scatter-features", "scatter-sequence"])
def test_vocab_parallel_embed(torch_mesh, axis_size, xla_device, rso, scatter_dim):
    from torch_impl import mesh as tm
    from torch_impl.embedding import VocabParallelEmbed
    from torch_impl.linear import TensorParallelConfig, get_sharding

    torch.manual_seed(3)
    ref = nn.Embedding(V, D, padding_idx=2)
    ids = torch.randint(0, V, (B, S))
    ids[0, 0] = 2
    cot = torch.randn(B, S, D)
    ref(ids).mul(cot).sum().backward()
    cfg = TensorParallelConfig(mesh=torch_mesh, reduce_scatter_output=rso)
    emb = VocabParallelEmbed.from_embedding(ref, cfg, scatter_dim=scatter_dim)
    assert list(dict(emb.named_parameters())) == ["embedding"]
    assert torch.equal(emb.embedding.cpu(), ref.weight.detach())
    if axis_size > 1:
        assert get_sharding(emb.embedding, mesh=torch_mesh) == ("tp", None)
    spec = [None, None, None]
    if rso:
        spec[scatter_dim] = "tp"
    y = emb(ids.to(xla_device))
    (y * sharded(cot, torch_mesh, tuple(spec), xla_device)).sum().backward()
    ops = hlo.collectives(tm.compiled_hlo([y, emb.embedding.grad]))
    assert rel(y, ref(ids)) == 0.0
    assert rel(emb.embedding.grad, ref.weight.grad) <= TOL  # padding row: no gradient, as ref
    assert float(emb.embedding.grad[2].abs().max().cpu()) == 0.0
    if axis_size == 1:
        assert ops == []
    elif rso:  # one reduce-scatter; backward at most an all-gather of the output cotangent
        assert [op.kind for op in ops if op.kind != "all-gather"] == ["reduce-scatter"]
        assert all(op.result_bytes == B * S * D * 4 for op in ops if op.kind == "all-gather")
    else:
        assert [op.kind for op in ops] == ["all-reduce"]


def test_embed_errors(make_torch_mesh, xla_device):
    from torch_impl.embedding import VocabParallelEmbed
    from torch_impl.linear import TensorParallelConfig

    mesh = make_torch_mesh(model_axis_size=8)
    with pytest.raises(ValueError, match="num_embeddings=60"):
        VocabParallelEmbed(60, D, parallel_config=TensorParallelConfig(mesh=mesh))
    with pytest.raises(ValueError, match="max_norm"):
        VocabParallelEmbed.from_embedding(nn.Embedding(V, D, max_norm=1.0),
                                          TensorParallelConfig(mesh=mesh))
    with pytest.raises(ValueError, match="nn.Embedding"):
        VocabParallelEmbed.from_embedding(nn.Linear(V, D), TensorParallelConfig(mesh=mesh))
    emb = VocabParallelEmbed(V, D, parallel_config=TensorParallelConfig(
        mesh=mesh, reduce_scatter_output=True), scatter_dim=-2)
    with pytest.raises(ValueError, match="scatter_dim"):
        emb(torch.zeros(2, 6, dtype=torch.int64, device=xla_device))
    with pytest.raises(ValueError, match="integer"):
        emb(torch.zeros(2, 8, device=xla_device))


# ----------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("sharding", ["none", "sequence", "features"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_parallel_norms(torch_mesh, axis_size, xla_device, sharding, kind):
    from torch_impl import mesh as tm
    from torch_impl.linear import TensorParallelConfig
    from torch_impl.norms import ParallelLayerNorm, ParallelRMSNorm

    torch.manual_seed(4)
    ref = nn.LayerNorm(D) if kind == "layer" else nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    x0, cot = torch.randn(B, S, D) + 2.0, torch.randn(B, S, D)
    xr = x0.clone().requires_grad_()
    (ref(xr) * cot).sum().backward()
    cls = ParallelLayerNorm if kind == "layer" else ParallelRMSNorm
    norm = cls.from_module(ref, TensorParallelConfig(mesh=torch_mesh), sharding=sharding)
    x = x0.to(xla_device).requires_grad_()
    y = norm(x)
    (y * cot.to(xla_device)).sum().backward()
    grads = [p.grad for p in norm.parameters()]
    ops = hlo.collectives(tm.compiled_hlo([y, x.grad] + grads))
    assert rel(y, ref(x0)) <= TOL
    assert rel(x.grad, xr.grad) <= TOL
    for g, p in zip(grads, ref.parameters()):
        assert rel(g, p.grad) <= TOL
    kinds = {op.kind for op in ops}
    assert kinds == (set() if axis_size == 1 or sharding == "none" else {"all-reduce"})


def test_from_module_hf_style_rmsnorm(make_torch_mesh, xla_device):
    """A '*RMSNorm' with ``weight`` and ``variance_epsilon`` (the Hugging Face convention)."""
    from torch_impl.linear import TensorParallelConfig
    from torch_impl.norms import ParallelRMSNorm

    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(D))
            self.variance_epsilon = 1e-5

        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))

    ref = MyRMSNorm()
    norm = ParallelRMSNorm.from_module(ref, TensorParallelConfig(mesh=make_torch_mesh(
        model_axis_size=4)), sharding="sequence")
    assert norm.epsilon == 1e-5 and norm.bias is None
    x = torch.randn(B, S, D)
    assert rel(norm(x.to(xla_device)), ref(x)) <= TOL


def test_norm_errors(make_torch_mesh, xla_device):
    from torch_impl.linear import TensorParallelConfig
    from torch_impl.norms import ParallelLayerNorm, ParallelRMSNorm

    cfg = TensorParallelConfig(mesh=make_torch_mesh(model_axis_size=8))
    with pytest.raises(ValueError, match="sharding='rows'"):
        ParallelLayerNorm(D, parallel_config=cfg, sharding="rows")
    with pytest.raises(ValueError, match="num_features=12"):
        ParallelRMSNorm(12, parallel_config=cfg, sharding="features")
    with pytest.raises(ValueError, match="LayerNorm"):
        ParallelLayerNorm.from_module(nn.Linear(D, D), cfg)
    with pytest.raises(ValueError, match="last dim"):
        ParallelLayerNorm.from_module(nn.LayerNorm((S, D)), cfg)
    norm = ParallelLayerNorm(D, parallel_config=cfg, sharding="sequence")
    with pytest.raises(ValueError, match="seq divisible"):
        norm(torch.zeros(2, 6, D, device=xla_device))
