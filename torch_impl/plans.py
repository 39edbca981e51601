"""Ready plans for the Hugging Face models people have: :func:`auto_plan`.

``auto_plan(model, tp)`` recognises the architecture from ``model.config.model_type`` (or the
class name) and returns a Megatron-style plan (vocab-parallel embedding, column-parallel q/k/v and
MLP-in, row-parallel attention-out and MLP-out, the LM head column-parallel with its logits left
sharded on the vocabulary), or with ``ring=True`` the async ring variant of every linear layer.
It knows each model's layouts:

    ================  =========================================================================
    model_type        notes
    ================  =========================================================================
    gpt2              Conv1D layers; fused ``c_attn`` in [q | k | v] blocks; LM head tied to wte
    llama, mistral,   q/k/v/o and gate/up/down; grouped-query kv heads fewer than tp are
    qwen2             replicated to tp (Megatron rule); Qwen2's q/k/v biases
    bert, roberta     query/key/value, attention.output.dense, intermediate/output.dense; the
                      MLM decoder tied to word_embeddings (with its bias)
    gpt_neox          fused ``query_key_value`` interleaved per head; untied ``embed_out``
    ================  =========================================================================

The returned plan is an :class:`AutoPlan` (a dict of ``{pattern: style}``) whose ``prepare``
method :func:`~torch_impl.parallelize.parallelize_module` calls on the migrated model: it selects
the head-parallel attention kernel, registered here with transformers under the name
``"ringpar"`` together with the eager kernel's mask function (without a mask function
transformers passes NO mask and attention silently stops being causal).

A vocabulary not divisible by tp (GPT-2's 50257) leaves the embedding and LM head replicated
(a warning says so); heads not divisible by tp raise ValueError.

Example::

    plan = auto_plan(model, 4)            # {'**.h.*.attn.c_attn': ColwiseParallel(...), ...}
    tp_model = parallelize_module(model, mesh, plan, inplace=False)
"""

from __future__ import annotations

import typing as tp
import warnings

from torch import nn

from .styles import (AsyncColwiseParallel, AsyncRowwiseParallel, ColwiseParallel,
                     RowwiseParallel, VocabParallel)

__all__ = ["ARCHITECTURES", "AutoPlan", "auto_plan", "register_attention", "ATTENTION_NAME"]

ATTENTION_NAME = "ringpar"
ARCHITECTURES = ("gpt2", "llama", "mistral", "qwen2", "bert", "roberta", "gpt_neox")
_CLASS_PREFIX = {"GPT2": "gpt2", "Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2",
                 "Bert": "bert", "Roberta": "roberta", "GPTNeoX": "gpt_neox"}


class AutoPlan(dict):
    """A plan ``{pattern: style}`` plus ``prepare(model)``, run on the migrated model."""

    architecture: str = ""

    def prepare(self, model: nn.Module) -> None:
        """Select the head-parallel attention kernel (a Hugging Face model)."""
        setter = getattr(model, "set_attn_implementation", None)
        if callable(setter):
            register_attention()
            setter(ATTENTION_NAME)


def register_attention() -> str:
    """Register :func:`~torch_impl.parallelize.head_parallel_attention` with transformers as
    ``"ringpar"``, with the eager mask function (idempotent); returns the name."""
    import transformers

    from .parallelize import head_parallel_attention

    transformers.AttentionInterface.register(ATTENTION_NAME, head_parallel_attention)
    transformers.AttentionMaskInterface.register(
        ATTENTION_NAME, transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return ATTENTION_NAME


def architecture(model: nn.Module) -> str:
    """The architecture key of ``model``: its config's ``model_type`` or its class name."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind in ARCHITECTURES:
        return kind
    for prefix, key in sorted(_CLASS_PREFIX.items(), key=lambda kv: -len(kv[0])):
        if type(model).__name__.startswith(prefix):
            return key
    raise ValueError(f"model={type(model).__name__} (model_type={kind!r}): auto_plan knows "
                     f"{ARCHITECTURES}; pass a plan to parallelize_module")


def _cfg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _styles(ring: bool):
    if ring:
        return (lambda **kw: AsyncColwiseParallel(**kw),
                lambda **kw: AsyncRowwiseParallel(output_sharded=False, **kw))
    return (lambda **kw: ColwiseParallel(**kw), lambda **kw: RowwiseParallel(**kw))


def _decoder_plan(config, tp_size: int, ring: bool) -> dict:
    col, row = _styles(ring)
    heads = config.num_attention_heads
    hd = _cfg(config, "head_dim", default=config.hidden_size // heads)
    kv = _cfg(config, "num_key_value_heads", default=heads)
    rep = kv % tp_size != 0
    attn = "**.layers.*.self_attn"
    return {"**.embed_tokens": "vocab",
            f"{attn}.q_proj": col(head_dim=hd),
            f"{attn}.k_proj": col(head_dim=hd, replicate_kv=rep),
            f"{attn}.v_proj": col(head_dim=hd, replicate_kv=rep),
            f"{attn}.o_proj": row(head_dim=hd),
            "**.layers.*.mlp.gate_proj": col(), "**.layers.*.mlp.up_proj": col(),
            "**.layers.*.mlp.down_proj": row(), "lm_head": "head"}


def _gpt2_plan(config, tp_size: int, ring: bool) -> dict:
    col, row = _styles(ring)
    hd = config.n_embd // config.n_head
    return {"**.wte": "vocab",
            "**.h.*.attn.c_attn": col(head_dim=hd, fused_qkv="blocks"),
            "**.h.*.attn.c_proj": row(head_dim=hd),
            "**.h.*.mlp.c_fc": col(), "**.h.*.mlp.c_proj": row(), "lm_head": "head"}


def _bert_plan(config, tp_size: int, ring: bool) -> dict:
    col, row = _styles(ring)
    hd = config.hidden_size // config.num_attention_heads
    layer = "**.encoder.layer.*"
    return {"**.embeddings.word_embeddings": "vocab",
            f"{layer}.attention.self.[qkv]*": col(head_dim=hd),
            f"{layer}.attention.output.dense": row(head_dim=hd),
            f"{layer}.intermediate.dense": col(), f"{layer}.output.dense": row(),
            "**.predictions.decoder": "head"}


def _neox_plan(config, tp_size: int, ring: bool) -> dict:
    col, row = _styles(ring)
    hd = config.hidden_size // config.num_attention_heads
    return {"**.embed_in": "vocab",
            "**.layers.*.attention.query_key_value": col(head_dim=hd, fused_qkv="interleaved"),
            "**.layers.*.attention.dense": row(head_dim=hd),
            "**.layers.*.mlp.dense_h_to_4h": col(), "**.layers.*.mlp.dense_4h_to_h": row(),
            "embed_out": "head"}


_PLANS: dict[str, tp.Callable] = {"gpt2": _gpt2_plan, "llama": _decoder_plan,
                                  "mistral": _decoder_plan, "qwen2": _decoder_plan,
                                  "bert": _bert_plan, "roberta": _bert_plan,
                                  "gpt_neox": _neox_plan}


def auto_plan(model: nn.Module, tp: int, *, ring: bool = False) -> AutoPlan:
    """The plan that migrates ``model`` (a Hugging Face model of :data:`ARCHITECTURES`) onto
    ``tp`` devices.

    Args:
        model: The model (its module names decide which entries are kept: a base model without
            an LM head gets no head entry).
        tp: The tensor-parallel size (decides the kv-head replication and the vocabulary rule).
        ring: Use the async ring layers (``colwise_ring`` / ``rowwise_ring``) instead of the
            Megatron ones.

    Raises:
        ValueError: an unknown architecture, a bad ``tp`` or ``ring``, attention heads not
            divisible by ``tp``.

    Example::

        plan = auto_plan(llama, 8)   # 2 kv heads: k_proj/v_proj ColwiseParallel(replicate_kv=True)
    """
    from .parallelize import _match

    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r}: expected a positive int")
    if not isinstance(ring, bool):
        raise ValueError(f"ring={ring!r}: expected True or False")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}: expected a torch.nn.Module")
    arch = architecture(model)
    config = model.config
    heads = config.num_attention_heads
    if heads % tp:
        raise ValueError(f"{type(model).__name__}: num_attention_heads={heads} is not divisible "
                         f"by tp={tp}: no plan gives every device whole heads")
    raw = _PLANS[arch](config, tp, ring)
    vocab_ok = config.vocab_size % tp == 0
    if not vocab_ok:
        warnings.warn(f"auto_plan: vocab_size={config.vocab_size} is not divisible by tp={tp}; "
                      f"the embedding and LM head stay replicated", stacklevel=2)
    names = [n for n, _ in model.named_modules()]
    plan = AutoPlan()
    plan.architecture = arch
    for pattern, style in raw.items():
        if not _match(pattern, names):
            continue
        if style in ("vocab", "head"):
            if not vocab_ok:
                continue
            style = VocabParallel() if style == "vocab" else ColwiseParallel()
        plan[pattern] = style
    return plan

