"""Sizes, options and the parameter table of the GPT decoder, shared by both backends.

``jax_impl.gpt`` and ``torch_impl.gpt`` build the same model from one :class:`GPTConfig`;
:func:`gpt_param_shapes` is the one place that states its parameter paths and global shapes.

Example:
    >>> from ringpar.gpt_config import GPTConfig, gpt_param_shapes
    >>> gpt_param_shapes(GPTConfig(num_layers=1))["lm_head.kernel"]
    (64, 128)
"""

from __future__ import annotations

import dataclasses

__all__ = ["TP_MODES", "NORMS", "TransformerSizes", "GPTConfig", "gpt_param_shapes"]

TP_MODES = ("plain", "ring")
NORMS = ("layernorm", "rmsnorm")


# ----------------------------------------------------------------------------------- config
class TransformerSizes:
    """The sizes derived from ``hidden_size``, ``num_heads`` and ``mlp_hidden_size``: shared by
    :class:`GPTConfig` and ``ringpar.gpt_model_config.GPTModelConfig`` (a mixin, no fields)."""

    hidden_size: int
    num_heads: int
    mlp_hidden_size: int | None

    @property
    def ffn(self) -> int:
        """F, the MLP hidden size (default 4 D)."""
        return self.mlp_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        """hd = D / H."""
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class GPTConfig(TransformerSizes):
    """Sizes and options of the GPT decoder (framework-neutral; shared by both backends).

    Attributes:
        vocab_size: V (divisible by tp).
        max_seq_len: Rows of the position embedding (longest sequence).
        hidden_size: D (divisible by num_heads and by tp).
        num_heads: H (divisible by tp).
        num_layers: Number of blocks.
        mlp_hidden_size: F (default 4 D; divisible by tp).
        norm: "layernorm" or "rmsnorm".
        norm_eps: Epsilon of the norms.
        use_bias: Biases on the linear layers (the LM head never has one).
        tp_mode: "plain" or "ring" (see the ``jax_impl.gpt`` docstring).
        bidirectional: Ring mode: run the rings both ways (``*_bidirectional`` methods).
        label_smoothing, ignore_index: Options of the loss.
    """

    vocab_size: int = 128
    max_seq_len: int = 16
    hidden_size: int = 64
    num_heads: int = 8
    num_layers: int = 2
    mlp_hidden_size: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    use_bias: bool = True
    tp_mode: str = "plain"
    bidirectional: bool = False
    label_smoothing: float = 0.0
    ignore_index: int = -100

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_seq_len", "hidden_size", "num_heads", "num_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        if self.mlp_hidden_size is not None and (
                isinstance(self.mlp_hidden_size, bool) or not isinstance(self.mlp_hidden_size, int)
                or self.mlp_hidden_size < 1):
            raise ValueError(f"mlp_hidden_size={self.mlp_hidden_size!r}: expected None or a "
                             f"positive int")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size}: expected a multiple of "
                             f"num_heads={self.num_heads}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r}: expected one of {NORMS}")
        if self.tp_mode not in TP_MODES:
            raise ValueError(f"tp_mode={self.tp_mode!r}: expected one of {TP_MODES}")

    def check_tp(self, n: int) -> None:
        """ValueError (naming the module path) unless every split size is divisible by ``n``."""
        checks = [("wte", "vocab_size", self.vocab_size),
                  ("blocks.*.attn", "num_heads", self.num_heads),
                  ("blocks.*.attn", "hidden_size", self.hidden_size),
                  ("blocks.*.mlp", "mlp_hidden_size", self.ffn)]
        for path, name, value in checks:
            if value % n:
                raise ValueError(f"{path}: {name}={value} is not divisible by the tensor-parallel "
                                 f"size {n}")


def gpt_param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """{parameter path: global shape} of :class:`GPT` (the same dict on both backends)."""
    d, f, v = config.hidden_size, config.ffn, config.vocab_size
    norm = {"scale": (d,)} if config.norm == "rmsnorm" else {"scale": (d,), "bias": (d,)}

    def linear(i, o):
        return {"kernel": (i, o), "bias": (o,)} if config.use_bias else {"kernel": (i, o)}

    tree = {"wte.embedding": (v, d), "wpe.embedding": (config.max_seq_len, d)}
    for i in range(config.num_layers):
        b = f"blocks.{i}"
        parts = {"ln_1": norm, "attn.qkv": linear(d, 3 * d), "attn.proj": linear(d, d),
                 "ln_2": norm, "mlp.fc": linear(d, f), "mlp.proj": linear(f, d)}
        for mod, params in parts.items():
            for name, shape in params.items():
                tree[f"{b}.{mod}.{name}"] = shape
    for name, shape in norm.items():
        tree[f"ln_f.{name}"] = shape
    tree["lm_head.kernel"] = (d, v)
    return tree
