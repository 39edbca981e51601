"""Plan styles of :func:`torch_impl.parallelize.parallelize_module`: what a matched module becomes.

Every option is checked when the style is built: a bool option takes only True / False, a string
option only its documented values (ValueError naming the style, the option and the value).

    ======================  =================  ===========================================
    style (string)          module types       replacement / communication
    ======================  =================  ===========================================
    ColwiseParallel         nn.Linear, Conv1D  ColumnParallelLinear PLAIN; output sharded on
    ("colwise")                                its features (default) or all-gathered.
                                               ``fused_qkv``: FusedQKVLinear (whole heads of
                                               q, k and v per device); ``replicate_kv``: kv
                                               heads < tp replicated (ReplicatedKVLinear);
                                               tied to a VocabParallel embedding:
                                               TiedVocabHead (one parameter)
    RowwiseParallel         nn.Linear, Conv1D  RowParallelLinear PLAIN: input consumed
    ("rowwise")                                sharded, one all-reduce (or reduce-scatter
                                               with ``output_sharded=True``)
    AsyncColwiseParallel    as colwise         ``all_gather_matmul`` ring (n-1 permutes)
    ("colwise_ring")
    AsyncRowwiseParallel    as rowwise         ``reduce_scatter_matmul`` ring (n-1 permutes;
    ("rowwise_ring")                           output sharded on features)
    SequenceParallel        LayerNorm/RMSNorm  ParallelLayerNorm / ParallelRMSNorm,
    ("sequence_parallel")                      ``sharding="sequence"`` or ``"features"``
    VocabParallel           nn.Embedding       VocabParallelEmbed (all-reduce / reduce-scatter)
    ("vocab_parallel")
    Replicate ("replicate") any module         kept, parameters replicated
    ======================  =================  ===========================================

Example::

    plan = {"**.attn.c_attn": ColwiseParallel(head_dim=64, fused_qkv="blocks"),
            "**.attn.c_proj": RowwiseParallel(head_dim=64)}
"""

from __future__ import annotations

import typing as tp

from torch import nn

from . import mesh as _mesh
from .embedding import VocabParallelEmbed
from .linear import (ColumnParallelLinear, MatrixMultiplyMethod, RowParallelLinear,
                     TensorParallelConfig)
from .norms import ParallelLayerNorm, ParallelRMSNorm, _norm_params
from .parallelize_layers import (IDENTITY, QKV_LAYOUTS, FusedQKVLinear, Layout,
                                 ReplicatedKVLinear, TiedVocabHead, as_linear, build_linear,
                                 is_conv1d, set_origin)

__all__ = ["ParallelStyle", "ColwiseParallel", "RowwiseParallel", "AsyncColwiseParallel",
           "AsyncRowwiseParallel", "SequenceParallel", "VocabParallel", "Replicate", "STYLES",
           "resolve_style"]


def _flag(style: str, name: str, value: tp.Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{style}({name}={value!r}): expected True or False")
    return value


def _choice(style: str, name: str, value: tp.Any, choices: tuple) -> tp.Any:
    if value not in choices or isinstance(value, bool):
        raise ValueError(f"{style}({name}={value!r}): expected one of {choices}")
    return value


def _head_dim(style: str, value: tp.Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{style}(head_dim={value!r}): expected None or a positive int")
    return value


class ParallelStyle:
    """Base class of the plan styles: ``apply(module, path, mesh, axis_name)`` returns the
    replacement module (or ``module`` itself) and raises ValueError naming ``path`` when the
    module does not fit."""

    accepts: tp.ClassVar[str] = "a module"

    def apply(self, module: nn.Module, path: str, mesh, axis_name: str) -> nn.Module:
        """Return the module that replaces ``module`` (at ``path``) in the parallel model."""
        raise NotImplementedError

    def _type_error(self, module: nn.Module, path: str) -> ValueError:
        return ValueError(f"{path or '<root>'}: style {self!r} expects {self.accepts}, got "
                          f"{type(module).__name__}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _heads(style, path, what: str, size: int, head_dim: int, n: int) -> int:
    if size % head_dim:
        raise ValueError(f"{path}: {size} {what} are not a whole number of heads of "
                         f"head_dim={head_dim} ({style!r})")
    return size // head_dim


def _divisible(style, path, name: str, size: int, n: int) -> None:
    if size % n:
        raise ValueError(f"{path}: {name}={size} is not divisible by the tensor-parallel size {n}"
                         f" ({style!r})")


class _LinearStyle(ParallelStyle):
    accepts = "an nn.Linear or a Conv1D"
    _method: tp.ClassVar[MatrixMultiplyMethod] = MatrixMultiplyMethod.PLAIN
    _direction: tp.ClassVar[str] = "column"

    def method(self) -> MatrixMultiplyMethod:
        """The matmul method of the replacement layer."""
        return self._method

    def _config(self, mesh, axis_name) -> TensorParallelConfig:
        return TensorParallelConfig(mesh=mesh, axis_name=axis_name, matmul_method=self.method(),
                                    reduce_scatter_output=self.output_sharded)

    def _sizes(self, module, path, n):
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise self._type_error(module, path)
        in_f, out_f, kernel, bias, transposed = as_linear(module)
        if self._direction == "row" or self.method().is_ring:
            _divisible(self, path, "in_features", in_f, n)
        return in_f, out_f, kernel, bias, transposed


class ColwiseParallel(_LinearStyle):
    """``nn.Linear`` / ``Conv1D`` -> :class:`ColumnParallelLinear` (split on the out features).

    Args:
        output_sharded: Keep the output sharded on its features (default True; what a row-wise
            layer, the heads of an attention or the vocab-parallel loss consume), else gather it.
        head_dim: The out features are heads of this size; their number must be divisible by tp
            (each device holds whole heads).
        fused_qkv: None, ``"blocks"`` (GPT-2 ``c_attn``: [q | k | v]) or ``"interleaved"``
            (GPT-NeoX: per head [q k v]): a fused projection whose q, k and v each have
            ``out / 3 / head_dim`` heads, split by whole heads of EACH (needs ``head_dim``).
        replicate_kv: Grouped-query key/value projection with fewer heads than tp (tp a multiple
            of them): replicate the heads to tp (the Megatron rule).

    Example: ``ColwiseParallel(head_dim=64, replicate_kv=True)``.
    """

    def __init__(self, *, output_sharded: bool = True, head_dim: int | None = None,
                 fused_qkv: str | None = None, replicate_kv: bool = False):
        name = type(self).__name__
        self.output_sharded = _flag(name, "output_sharded", output_sharded)
        self.head_dim = _head_dim(name, head_dim)
        self.fused_qkv = _choice(name, "fused_qkv", fused_qkv, (None,) + QKV_LAYOUTS)
        self.replicate_kv = _flag(name, "replicate_kv", replicate_kv)
        if self.fused_qkv is not None and self.head_dim is None:
            raise ValueError(f"{name}(fused_qkv={fused_qkv!r}) needs head_dim: the heads of q, k "
                             f"and v are split whole")
        if self.replicate_kv and (self.head_dim is None or self.fused_qkv is not None):
            raise ValueError(f"{name}(replicate_kv=True) needs head_dim and no fused_qkv")

    def apply(self, module, path, mesh, axis_name):
        """Return the column-parallel layer holding ``module``'s weights."""
        n = _mesh.check_axis(mesh, axis_name)
        in_f, out_f, kernel, bias, transposed = self._sizes(module, path, n)
        cfg = self._config(mesh, axis_name)
        if self.fused_qkv is not None:
            if out_f % 3:
                raise ValueError(f"{path}: out_features={out_f} is not 3 equal q, k, v blocks "
                                 f"({self!r})")
            heads = _heads(self, path, "features of each of q, k, v", out_f // 3,
                           self.head_dim, n)
            if heads % n:
                raise ValueError(f"{path}: {heads} heads of each of q, k and v are not divisible "
                                 f"by the tensor-parallel size {n} ({self!r})")
            if not self.output_sharded:
                raise ValueError(f"{path}: fused_qkv needs output_sharded=True ({self!r})")
            return FusedQKVLinear.from_module(module, cfg, layout=self.fused_qkv)
        if self.head_dim is not None:
            heads = _heads(self, path, "out features", out_f, self.head_dim, n)
            if heads % n and self.replicate_kv and n % heads == 0:
                if not self.output_sharded:
                    raise ValueError(f"{path}: replicate_kv needs output_sharded=True ({self!r})")
                return ReplicatedKVLinear.from_module(module, cfg, head_dim=self.head_dim)
            if heads % n:
                hint = ("; for key/value heads of grouped-query attention use "
                        "replicate_kv=True" if n % heads == 0 else "")
                raise ValueError(f"{path}: {heads} heads ({out_f} features / head_dim="
                                 f"{self.head_dim}) are not divisible by the tensor-parallel "
                                 f"size {n} ({self!r}){hint}")
        _divisible(self, path, "out_features", out_f, n)
        new = build_linear(ColumnParallelLinear, kernel, bias, cfg)
        return set_origin(new, Layout(transpose=transposed), weight="kernel", bias="bias")

    def apply_tied(self, module, path, mesh, axis_name, weight: nn.Parameter) -> nn.Module:
        """The head whose weight is tied to a vocab-parallel table ``weight``: a TiedVocabHead."""
        if not isinstance(module, nn.Linear) or self.head_dim is not None or self.fused_qkv:
            raise ValueError(f"{path}: its weight is tied to a vocab-parallel embedding: expected "
                             f"an nn.Linear with ColwiseParallel() (no head_dim/fused_qkv), got "
                             f"{type(module).__name__} with {self!r}")
        if self.method().is_ring:
            _divisible(self, path, "in_features", module.in_features,
                       _mesh.check_axis(mesh, axis_name))
        head = TiedVocabHead(weight, module.bias, self._config(mesh, axis_name))
        return set_origin(head, IDENTITY, weight="weight", bias="bias")


class RowwiseParallel(_LinearStyle):
    """``nn.Linear`` / ``Conv1D`` -> :class:`RowParallelLinear` (split on the in features).

    Args:
        output_sharded: Reduce-scatter the output onto its features instead of all-reducing it
            (replicated output, the default).
        head_dim: The IN features are heads of this size (an attention output projection); their
            number must be divisible by tp.
    """

    _direction = "row"

    def __init__(self, *, output_sharded: bool = False, head_dim: int | None = None):
        name = type(self).__name__
        self.output_sharded = _flag(name, "output_sharded", output_sharded)
        self.head_dim = _head_dim(name, head_dim)

    def apply(self, module, path, mesh, axis_name):
        """Return a RowParallelLinear holding ``module``'s weights."""
        n = _mesh.check_axis(mesh, axis_name)
        in_f, out_f, kernel, bias, transposed = self._sizes(module, path, n)
        if self.head_dim is not None:
            heads = _heads(self, path, "in features", in_f, self.head_dim, n)
            if heads % n:
                raise ValueError(f"{path}: {heads} heads ({in_f} features / head_dim="
                                 f"{self.head_dim}) are not divisible by the tensor-parallel "
                                 f"size {n} ({self!r})")
        if self.output_sharded or self.method().is_ring:
            _divisible(self, path, "out_features", out_f, n)
        new = build_linear(RowParallelLinear, kernel, bias, self._config(mesh, axis_name))
        return set_origin(new, Layout(transpose=transposed), weight="kernel", bias="bias")


class AsyncColwiseParallel(ColwiseParallel):
    """Column-wise with the ring ``all_gather_matmul`` (input consumed sharded on its features,
    gathered by n-1 collective-permutes overlapped with partial matmuls).

    Args: as :class:`ColwiseParallel`, plus ``bidirectional`` (ring both ways).
    """

    def __init__(self, *, output_sharded: bool = True, head_dim: int | None = None,
                 fused_qkv: str | None = None, replicate_kv: bool = False,
                 bidirectional: bool = False):
        super().__init__(output_sharded=output_sharded, head_dim=head_dim, fused_qkv=fused_qkv,
                         replicate_kv=replicate_kv)
        self.bidirectional = _flag(type(self).__name__, "bidirectional", bidirectional)

    def method(self) -> MatrixMultiplyMethod:
        """``all_gather_matmul[_bidirectional]``."""
        return (MatrixMultiplyMethod.ALL_GATHER_BIDIRECTIONAL if self.bidirectional
                else MatrixMultiplyMethod.ALL_GATHER)


class AsyncRowwiseParallel(RowwiseParallel):
    """Row-wise with the ring ``reduce_scatter_matmul`` (n-1 permutes; output sharded on its
    features by default: False adds an all-gather after the ring).

    Args: as :class:`RowwiseParallel` (``output_sharded`` defaults to True), ``bidirectional``.
    """

    def __init__(self, *, output_sharded: bool = True, head_dim: int | None = None,
                 bidirectional: bool = False):
        super().__init__(output_sharded=output_sharded, head_dim=head_dim)
        self.bidirectional = _flag(type(self).__name__, "bidirectional", bidirectional)

    def method(self) -> MatrixMultiplyMethod:
        """``reduce_scatter_matmul[_bidirectional]``."""
        return (MatrixMultiplyMethod.REDUCE_SCATTER_BIDIRECTIONAL if self.bidirectional
                else MatrixMultiplyMethod.REDUCE_SCATTER)


class SequenceParallel(ParallelStyle):
    """A LayerNorm / RMSNorm -> :class:`ParallelLayerNorm` / :class:`ParallelRMSNorm`.

    Args:
        sharding: ``"sequence"`` (default: tokens sharded on the sequence dim -2, no forward
            communication) or ``"features"`` (input sharded on the features; statistics
            all-reduced).
    """

    accepts = "an nn.LayerNorm, nn.RMSNorm or a '*RMSNorm' module (weight, variance_epsilon)"

    def __init__(self, *, sharding: str = "sequence"):
        self.sharding = _choice("SequenceParallel", "sharding", sharding,
                                ("sequence", "features"))

    def apply(self, module, path, mesh, axis_name):
        """Return a parallel norm holding ``module``'s parameters."""
        cls = ParallelLayerNorm if isinstance(module, nn.LayerNorm) else ParallelRMSNorm
        try:
            _norm_params(cls._kind, module)
        except ValueError as exc:
            raise self._type_error(module, path) from exc
        cfg = TensorParallelConfig(mesh=mesh, axis_name=axis_name)
        try:
            new = cls.from_module(module, cfg, sharding=self.sharding)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return set_origin(new, IDENTITY, weight="scale", bias="bias")


class VocabParallel(ParallelStyle):
    """``nn.Embedding`` -> :class:`VocabParallelEmbed` (the table split on the vocabulary).

    Args:
        output_sharded: Reduce-scatter the output on ``scatter_dim`` instead of all-reducing it.
        scatter_dim: -1 (features, for the ring layers) or -2 (the sequence: sequence parallel).
    """

    accepts = "an nn.Embedding"

    def __init__(self, *, output_sharded: bool = False, scatter_dim: int = -1):
        self.output_sharded = _flag("VocabParallel", "output_sharded", output_sharded)
        self.scatter_dim = _choice("VocabParallel", "scatter_dim", scatter_dim, (-1, -2))

    def apply(self, module, path, mesh, axis_name):
        """Return a VocabParallelEmbed holding ``module``'s table."""
        if not isinstance(module, nn.Embedding):
            raise self._type_error(module, path)
        n = _mesh.check_axis(mesh, axis_name)
        _divisible(self, path, "num_embeddings", module.num_embeddings, n)
        cfg = TensorParallelConfig(mesh=mesh, axis_name=axis_name,
                                   reduce_scatter_output=self.output_sharded)
        try:
            new = VocabParallelEmbed.from_embedding(module, cfg, scatter_dim=self.scatter_dim)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return set_origin(new, IDENTITY, weight="embedding")


class Replicate(ParallelStyle):
    """Keep the module (any type) as it is, its parameters replicated on every device."""

    accepts = "any module"

    def apply(self, module, path, mesh, axis_name):
        """Return ``module`` with its parameters on the XLA device, annotated as replicated."""
        module.to(_mesh.xla_device())
        for p in module.parameters():
            _mesh.mark_sharding(p, mesh, (None,) * p.dim())
        return module


STYLES: dict[str, tp.Callable[[], ParallelStyle]] = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_ring": AsyncColwiseParallel,
    "rowwise_ring": AsyncRowwiseParallel,
    "sequence_parallel": SequenceParallel,
    "vocab_parallel": VocabParallel,
    "replicate": Replicate,
}
"""Style names accepted in a plan, with the style each one builds (default arguments)."""


def resolve_style(pattern: str, style: tp.Any) -> ParallelStyle:
    """The style object of plan entry ``pattern``: ``style`` itself or the one its name builds."""
    if isinstance(style, ParallelStyle):
        return style
    if isinstance(style, str) and style in STYLES:
        return STYLES[style]()
    if isinstance(style, type) and issubclass(style, ParallelStyle):
        raise ValueError(f"plan[{pattern!r}]={style.__name__}: expected an instance, e.g. "
                         f"{style.__name__}()")
    raise ValueError(f"plan[{pattern!r}]={style!r}: expected a ParallelStyle or one of "
                     f"{sorted(STYLES)}")
