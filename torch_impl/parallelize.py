"""Move an existing ``nn.Module`` onto the tensor-parallel layers with a declarative plan.

Example (a Hugging Face Llama decoder; ``mesh`` from :func:`torch_impl.mesh.create_mesh`)::

    from torch_impl.parallelize import (parallelize_module, gather_state_dict, ColwiseParallel,
                                        RowwiseParallel, VocabParallel, SequenceParallel)
    plan = {
        "model.embed_tokens": VocabParallel(),
        "model.layers.*.self_attn.[qkv]_proj": ColwiseParallel(head_dim=16),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(head_dim=16),
        "model.layers.*.mlp.gate_proj": "colwise",
        "model.layers.*.mlp.up_proj": "colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "lm_head": ColwiseParallel(),           # logits stay sharded on the vocabulary
    }
    tp_model = parallelize_module(model, mesh, plan, inplace=False)
    logits = tp_model(ids.to(xla_device())).logits
    state = gather_state_dict(tp_model)         # ordinary state_dict: model.load_state_dict(state)

How it works (the ergonomics of PyTorch's DTensor ``parallelize_module``; the mechanism is the
global view of torch_xla SPMD, DESIGN.md): each plan entry maps a module name, or an
``fnmatch`` glob over the names of ``model.named_modules()``, to a style. Every matched module is
REPLACED by a tensor-parallel layer holding exactly its weights (``nn.Linear`` ->
:class:`~torch_impl.linear.ColumnParallelLinear` / ``RowParallelLinear`` with ``kernel =
weight.T``; ``nn.Embedding`` -> :class:`~torch_impl.embedding.VocabParallelEmbed`; a LayerNorm /
RMSNorm -> :class:`~torch_impl.norms.ParallelLayerNorm` / ``ParallelRMSNorm``). Every other module
keeps its class and code; its parameters and buffers move to the XLA device (replicated). Since
the new layers take and return ordinary global tensors, the model's own forward code (reshapes
into heads, rotary embeddings, residual adds) runs unchanged; the layers annotate their outputs'
shardings and the SPMD partitioner propagates them, e.g. a column-parallel ``q_proj`` output
sharded on its features is sharded on the heads after the model's ``view(B, S, H, hd)``.

Styles (a style object, or its name as a string):

    ======================  =================  ===========================================
    style (string)          module types       replacement / communication
    ======================  =================  ===========================================
    ColwiseParallel         nn.Linear          ColumnParallelLinear PLAIN; output sharded on
    ("colwise")                                its features (default) or all-gathered
    RowwiseParallel         nn.Linear          RowParallelLinear PLAIN: input consumed
    ("rowwise")                                sharded, one all-reduce (or reduce-scatter
                                               with ``output_sharded=True``)
    AsyncColwiseParallel    nn.Linear          ColumnParallelLinear ``all_gather_matmul``
    ("colwise_ring")                           (n-1 collective-permutes; input sharded on
                                               its features)
    AsyncRowwiseParallel    nn.Linear          RowParallelLinear ``reduce_scatter_matmul``
    ("rowwise_ring")                           (n-1 permutes; output sharded on features)
    SequenceParallel        nn.LayerNorm,      ParallelLayerNorm / ParallelRMSNorm with
    ("sequence_parallel")   nn.RMSNorm,        ``sharding="sequence"`` (or ``"features"``):
                            ``*RMSNorm``       tokens sharded on the sequence, no forward
                                               communication
    VocabParallel           nn.Embedding       VocabParallelEmbed (table split on the
    ("vocab_parallel")                         vocabulary; all-reduce, or reduce-scatter)
    Replicate               any module         kept as is, parameters replicated (states the
    ("replicate")                              intent in the plan)
    ======================  =================  ===========================================

Errors (ValueError naming the module path): a plan entry matching no module; a module matched
by two entries; a style that does not fit the module's type; features (or, with ``head_dim``,
heads) not divisible by the tp size; a swapped parameter shared with another module (tied
weights).

:func:`gather_state_dict` is the reverse: an ordinary ``state_dict`` on the CPU with the keys,
layouts and values of the original model (``weight = kernel.T`` ...), loadable with
``load_state_dict(strict=True)``; the round trip is bit-exact.

Attention kernels: the model's own attention code runs on the global tensors. Head-sharded
``[B, H, S, hd]`` tensors stay head-local through elementwise ops and reshapes that keep B and H
apart, but ``torch.matmul`` of 4-D tensors folds B and H into ONE batch dim before XLA sees it;
with H sharded that merged dim is not a block layout, and the partitioner all-gathers q, k and v
(measured on a migrated HF Llama: 4 all-gathers of [B, H, S, hd] per layer). Use
:func:`head_parallel_attention` (einsums, which torch_xla lowers to one dot with B and H as
separate batch dims) as the model's attention kernel, e.g. for Hugging Face models::

    transformers.AttentionInterface.register("ringpar", head_parallel_attention)
    transformers.AttentionMaskInterface.register(
        "ringpar", transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    tp_model.set_attn_implementation("ringpar")

(the second line matters: for an attention name with no mask function registered, transformers
passes NO mask, and the attention silently stops being causal.)

Public API: ``ParallelStyle``, ``ColwiseParallel``, ``RowwiseParallel``, ``AsyncColwiseParallel``,
``AsyncRowwiseParallel``, ``SequenceParallel``, ``VocabParallel``, ``Replicate``, ``STYLES``,
``parallelize_module``, ``gather_state_dict``, ``head_parallel_attention``.
"""

from __future__ import annotations

import copy
import fnmatch
import typing as tp

import torch
from torch import nn

from . import mesh as _mesh
from .embedding import VocabParallelEmbed
from .linear import (ColumnParallelLinear, MatrixMultiplyMethod, RowParallelLinear,
                     TensorParallelConfig)
from .norms import ParallelLayerNorm, ParallelRMSNorm, _norm_params

__all__ = ["ParallelStyle", "ColwiseParallel", "RowwiseParallel", "AsyncColwiseParallel",
           "AsyncRowwiseParallel", "SequenceParallel", "VocabParallel", "Replicate", "STYLES",
           "parallelize_module", "gather_state_dict", "head_parallel_attention"]

_ORIGIN = "_ringpar_origin"  # attribute on a swapped module: {original name: (new name, op)}


# ----------------------------------------------------------------------------------- styles
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


def _linear_check(style, module, path, n, *, need_in: bool, need_out: bool, head_dim):
    if not isinstance(module, nn.Linear):
        raise style._type_error(module, path)
    for need, name, size in ((need_in, "in_features", module.in_features),
                             (need_out, "out_features", module.out_features)):
        if need and size % n:
            raise ValueError(f"{path}: {name}={size} of {type(module).__name__} is not divisible "
                             f"by the tensor-parallel size {n} ({style!r})")
    if head_dim is not None:
        size = module.out_features if isinstance(style, ColwiseParallel) else module.in_features
        if size % head_dim:
            raise ValueError(f"{path}: {size} features are not a whole number of heads of "
                             f"head_dim={head_dim}")
        heads = size // head_dim
        if heads % n:
            raise ValueError(f"{path}: {heads} heads ({size} features / head_dim={head_dim}) are "
                             f"not divisible by the tensor-parallel size {n} ({style!r})")


def _head_dim(value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"head_dim={value!r}: expected None or a positive int")
    return value


class ColwiseParallel(ParallelStyle):
    """``nn.Linear`` -> :class:`ColumnParallelLinear` (weight split on the out features).

    Args:
        output_sharded: Keep the output sharded on its features (default; what a following
            row-wise layer, the heads of an attention, or the vocab-parallel loss consume), else
            all-gather it (replicated output).
        head_dim: If given, the out features are heads of this size and their NUMBER must be
            divisible by tp (ValueError otherwise): each device then holds whole heads.
        bidirectional: Ring variants only (:class:`AsyncColwiseParallel`).
    """

    accepts = "an nn.Linear"
    _method: tp.ClassVar[MatrixMultiplyMethod] = MatrixMultiplyMethod.PLAIN

    def __init__(self, *, output_sharded: bool = True, head_dim: int | None = None):
        self.output_sharded = bool(output_sharded)
        self.head_dim = _head_dim(head_dim)

    def method(self) -> MatrixMultiplyMethod:
        """The matmul method of the replacement layer."""
        return self._method

    def apply(self, module, path, mesh, axis_name):
        """Return a ColumnParallelLinear holding ``module``'s weights."""
        n = _mesh.check_axis(mesh, axis_name)
        method = self.method()
        _linear_check(self, module, path, n, need_in=method.is_ring, need_out=True,
                      head_dim=self.head_dim)
        cfg = TensorParallelConfig(mesh=mesh, axis_name=axis_name, matmul_method=method,
                                   reduce_scatter_output=self.output_sharded)
        new = ColumnParallelLinear.from_linear(module, cfg)
        setattr(new, _ORIGIN, {"weight": ("kernel", "t"), "bias": ("bias", None)})
        return new


class RowwiseParallel(ParallelStyle):
    """``nn.Linear`` -> :class:`RowParallelLinear` (weight split on the in features).

    Args:
        output_sharded: Reduce-scatter the output onto its features instead of all-reducing it
            (replicated output, the default).
        head_dim: If given, the IN features are heads of this size (e.g. an attention output
            projection) and their number must be divisible by tp.
    """

    accepts = "an nn.Linear"
    _method: tp.ClassVar[MatrixMultiplyMethod] = MatrixMultiplyMethod.PLAIN

    def __init__(self, *, output_sharded: bool = False, head_dim: int | None = None):
        self.output_sharded = bool(output_sharded)
        self.head_dim = _head_dim(head_dim)

    def method(self) -> MatrixMultiplyMethod:
        """The matmul method of the replacement layer."""
        return self._method

    def apply(self, module, path, mesh, axis_name):
        """Return a RowParallelLinear holding ``module``'s weights."""
        n = _mesh.check_axis(mesh, axis_name)
        method = self.method()
        _linear_check(self, module, path, n, need_in=True,
                      need_out=self.output_sharded or method.is_ring, head_dim=self.head_dim)
        cfg = TensorParallelConfig(mesh=mesh, axis_name=axis_name, matmul_method=method,
                                   reduce_scatter_output=self.output_sharded)
        new = RowParallelLinear.from_linear(module, cfg)
        setattr(new, _ORIGIN, {"weight": ("kernel", "t"), "bias": ("bias", None)})
        return new


class AsyncColwiseParallel(ColwiseParallel):
    """Column-wise with the ring ``all_gather_matmul``: the input is consumed sharded on its
    features and gathered by n-1 collective-permutes overlapped with partial matmuls.

    Args: as :class:`ColwiseParallel`, plus ``bidirectional`` (ring both ways, about half the
    latency).
    """

    def __init__(self, *, output_sharded: bool = True, head_dim: int | None = None,
                 bidirectional: bool = False):
        super().__init__(output_sharded=output_sharded, head_dim=head_dim)
        self.bidirectional = bool(bidirectional)

    def method(self) -> MatrixMultiplyMethod:
        """``all_gather_matmul[_bidirectional]``."""
        return (MatrixMultiplyMethod.ALL_GATHER_BIDIRECTIONAL if self.bidirectional
                else MatrixMultiplyMethod.ALL_GATHER)


class AsyncRowwiseParallel(RowwiseParallel):
    """Row-wise with the ring ``reduce_scatter_matmul``: partial sums travel n-1
    collective-permutes; the output is sharded on its features by default.

    Args: as :class:`RowwiseParallel` (``output_sharded`` defaults to True here: False adds an
    all-gather after the ring), plus ``bidirectional``.
    """

    def __init__(self, *, output_sharded: bool = True, head_dim: int | None = None,
                 bidirectional: bool = False):
        super().__init__(output_sharded=output_sharded, head_dim=head_dim)
        self.bidirectional = bool(bidirectional)

    def method(self) -> MatrixMultiplyMethod:
        """``reduce_scatter_matmul[_bidirectional]``."""
        return (MatrixMultiplyMethod.REDUCE_SCATTER_BIDIRECTIONAL if self.bidirectional
                else MatrixMultiplyMethod.REDUCE_SCATTER)


class SequenceParallel(ParallelStyle):
    """A LayerNorm / RMSNorm -> :class:`ParallelLayerNorm` / :class:`ParallelRMSNorm`.

    Args:
        sharding: "sequence" (default: input and output sharded on the sequence dim -2, scale /
            bias replicated, their gradients all-reduced) or "features" (input sharded on the
            features, as after an :class:`AsyncRowwiseParallel`; statistics all-reduced).
    """

    accepts = "an nn.LayerNorm, nn.RMSNorm or a '*RMSNorm' module (weight, variance_epsilon)"

    def __init__(self, *, sharding: str = "sequence"):
        if sharding not in ("sequence", "features"):
            raise ValueError(f"sharding={sharding!r}: expected 'sequence' or 'features'")
        self.sharding = sharding

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
        setattr(new, _ORIGIN, {"weight": ("scale", None), "bias": ("bias", None)})
        return new


class VocabParallel(ParallelStyle):
    """``nn.Embedding`` -> :class:`VocabParallelEmbed` (the table split on the vocabulary).

    Args:
        output_sharded: Reduce-scatter the output on ``scatter_dim`` instead of all-reducing it.
        scatter_dim: -1 (features, for the ring layers) or -2 (the sequence: sequence parallel).
    """

    accepts = "an nn.Embedding"

    def __init__(self, *, output_sharded: bool = False, scatter_dim: int = -1):
        self.output_sharded, self.scatter_dim = bool(output_sharded), scatter_dim

    def apply(self, module, path, mesh, axis_name):
        """Return a VocabParallelEmbed holding ``module``'s table."""
        if not isinstance(module, nn.Embedding):
            raise self._type_error(module, path)
        n = _mesh.check_axis(mesh, axis_name)
        if module.num_embeddings % n:
            raise ValueError(f"{path}: num_embeddings={module.num_embeddings} is not divisible by "
                             f"the tensor-parallel size {n} ({self!r})")
        cfg = TensorParallelConfig(mesh=mesh, axis_name=axis_name,
                                   reduce_scatter_output=self.output_sharded)
        try:
            new = VocabParallelEmbed.from_embedding(module, cfg, scatter_dim=self.scatter_dim)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        setattr(new, _ORIGIN, {"weight": ("embedding", None)})
        return new


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


def _resolve_style(pattern: str, style: tp.Any) -> ParallelStyle:
    if isinstance(style, ParallelStyle):
        return style
    if isinstance(style, str) and style in STYLES:
        return STYLES[style]()
    raise ValueError(f"plan[{pattern!r}]={style!r}: expected a ParallelStyle or one of "
                     f"{sorted(STYLES)}")


# ---------------------------------------------------------------------------------- drivers
def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def parallelize_module(model: nn.Module, mesh, plan: tp.Mapping[str, tp.Any], *,
                       axis_name: str = "tp", inplace: bool = True) -> nn.Module:
    """Swap the modules named by ``plan`` for tensor-parallel layers over ``mesh``'s ``axis_name``.

    Args:
        model: Any ``nn.Module`` (its parameters on the CPU or the XLA device).
        mesh: A torch_xla mesh (``torch_impl.mesh.create_mesh``) with ``axis_name``.
        plan: ``{module name or fnmatch glob: style}``: a :class:`ParallelStyle` or a name in
            :data:`STYLES`. Names are those of ``model.named_modules()`` (e.g.
            ``"model.layers.*.mlp.up_proj"``; ``*`` also matches dots).
        axis_name: The tensor-parallel mesh axis.
        inplace: Modify ``model`` (default) or a deep copy of it (``model`` is then untouched).

    Returns:
        The parallel model: matched modules replaced (holding exactly the original weights),
        every other module unchanged in code, all parameters and buffers on the XLA device.

    Raises:
        ValueError (naming the module path or plan entry): an entry matching nothing, a module
        matched by two entries, a style that does not fit the module type, sizes not divisible
        by the tp size, a swapped parameter shared with another module; a mesh without
        ``axis_name`` or SPMD not enabled.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}: expected a torch.nn.Module")
    if not isinstance(plan, tp.Mapping) or not plan:
        raise ValueError(f"plan={plan!r}: expected a non-empty mapping {{module name or glob: "
                         f"style}}")
    _mesh.require_spmd()
    _mesh.check_axis(mesh, axis_name)
    styles = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str):
            raise ValueError(f"plan key {pattern!r}: expected a module name or glob (str)")
        styles[pattern] = _resolve_style(pattern, style)
    if not inplace:
        model = copy.deepcopy(model)

    modules = dict(model.named_modules())
    assigned: dict[str, str] = {}
    for pattern in styles:
        hits = [name for name in modules if name and fnmatch.fnmatchcase(name, pattern)]
        if pattern == "" and "" in modules:
            hits = [""]
        if not hits:
            raise ValueError(f"plan entry {pattern!r} matches no module of {type(model).__name__}"
                             f" (module names look like {_examples(modules)})")
        for name in hits:
            if name in assigned:
                raise ValueError(f"{name}: matched by two plan entries, {assigned[name]!r} and "
                                 f"{pattern!r}: expected exactly one style per module")
            assigned[name] = pattern
    nested = [(a, b) for a in assigned for b in assigned if b != a and b.startswith(a + ".")]
    if nested:
        a, b = nested[0]
        raise ValueError(f"{b}: inside {a}, which the plan also names: expected plan entries on "
                         f"disjoint modules")

    _check_tied(model, assigned, styles)
    for name, pattern in assigned.items():
        style = styles[pattern]
        new = style.apply(modules[name], name, mesh, axis_name)
        if new is not modules[name]:
            if name == "":
                raise ValueError(f"plan entry {pattern!r}: the root module cannot be replaced")
            _set_child(model, name, new)
    model.to(_mesh.xla_device())  # the untouched modules: replicated on the XLA device
    return model


def _examples(modules) -> str:
    names = [n for n in modules if n][:4]
    return ", ".join(repr(n) for n in names) + (", ..." if len(modules) > 5 else "")


def _check_tied(model: nn.Module, assigned: dict, styles: dict) -> None:
    """ValueError if a parameter of a module to be swapped is also used by another module."""
    owners: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    for name in assigned:
        if isinstance(styles[assigned[name]], Replicate):
            continue
        module = model.get_submodule(name) if name else model
        for p_name, p in module.named_parameters(recurse=False):
            users = owners.get(id(p), [])
            if len(users) > 1:
                raise ValueError(f"{name}: parameter {p_name!r} is shared with "
                                 f"{[u for u in users if u != f'{name}.{p_name}']} (tied weights):"
                                 f" swapping it would untie them; untie them first or leave "
                                 f"{name!r} out of the plan")


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the ORIGINAL model, from a model made by :func:`parallelize_module`.

    Swapped layers are converted back to the original names and layouts (``kernel`` [in, out]
    -> ``weight`` [out, in]; ``embedding`` / ``scale`` -> ``weight``); every other entry of
    ``model.state_dict()`` is copied. All tensors are gathered to contiguous CPU tensors, so the
    result loads into the original (unsharded, CPU) model with ``load_state_dict(strict=True)``;
    values are bit-exact.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}: expected a torch.nn.Module")
    swapped = {name: m for name, m in model.named_modules() if hasattr(m, _ORIGIN)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        module = swapped.get(prefix)
        if module is not None:
            origin = getattr(module, _ORIGIN)
            matches = [o for o, (new, _) in origin.items() if new == leaf]
            if not matches:
                raise ValueError(f"{key}: entry of a swapped {type(module).__name__} with no "
                                 f"original name (expected one of "
                                 f"{[n for n, _ in origin.values()]})")
            transform = origin[matches[0]][1]
            key = f"{prefix}.{matches[0]}" if prefix else matches[0]
            value = value.t() if transform == "t" else value
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


# ------------------------------------------------------------------------------ attention
def head_parallel_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor, attention_mask: torch.Tensor | None,
                            scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention whose matmuls keep batch and heads apart (head-sharded stays local).

    The signature of Hugging Face's attention interface (``eager_attention_forward``):
    ``query`` ``[B, H, S, hd]``, ``key`` / ``value`` ``[B, Hkv, S, hd]`` (grouped-query
    attention: each kv head serves H/Hkv consecutive query heads), an additive
    ``attention_mask`` broadcastable to ``[B, H, S, S]`` (a boolean mask: True = attend) or
    None (no masking at all: register the eager mask function, see the module docstring),
    ``scaling`` (the factor on
    q.k), ``dropout`` (applied when ``module.training``). Returns ``(output [B, S, H, hd],
    probabilities [B, H, S, S])``, the numbers of the eager kernel; softmax in float32.

    Raises:
        ValueError: H not a multiple of Hkv, or mismatched shapes.
    """
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}: expected [B, H, S, hd] and two equal [B, Hkv, S, "
                         f"hd]")
    b, h, _, d = query.shape
    kvh = key.shape[1]
    if h % kvh:
        raise ValueError(f"query heads {h}: expected a multiple of the key/value heads {kvh}")
    if h != kvh:  # kv head j serves query heads j*rep .. (j+1)*rep-1 (HF's repeat_kv)
        rep = h // kvh
        key = key[:, :, None].expand(b, kvh, rep, key.shape[2], d).reshape(b, h, key.shape[2], d)
        value = value[:, :, None].expand(b, kvh, rep, value.shape[2], d).reshape(
            b, h, value.shape[2], d)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scaling
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.einsum("bhqk,bhkd->bhqd", probs, value)
    return out.transpose(1, 2).contiguous(), probs
