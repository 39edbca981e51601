"""Move an existing ``nn.Module`` onto the tensor-parallel layers with a declarative plan.

Example (a Hugging Face model; ``mesh`` from :func:`torch_impl.mesh.create_mesh`)::

    from torch_impl.parallelize import parallelize_module, gather_state_dict, load_state_dict
    tp_model = parallelize_module(model, mesh, inplace=False)   # plan: plans.auto_plan
    logits = tp_model(ids.to(xla_device())).logits              # sharded on the vocabulary
    state = gather_state_dict(tp_model)    # ordinary state_dict: model.load_state_dict(state)
    load_state_dict(tp_model, checkpoint)  # an ordinary (unsharded) state_dict, back in

or with a hand-written plan (module names, ``*`` = one name component, ``**`` = any number)::

    plan = {"**.embed_tokens": VocabParallel(),
            "**.layers.*.self_attn.[qkv]_proj": ColwiseParallel(head_dim=16),
            "**.layers.*.self_attn.o_proj": RowwiseParallel(head_dim=16),
            "**.mlp.gate_proj": "colwise", "**.mlp.up_proj": "colwise",
            "**.mlp.down_proj": "rowwise", "lm_head": ColwiseParallel()}
    tp_model = parallelize_module(model, mesh, plan, inplace=False)

How it works (the ergonomics of PyTorch's DTensor ``parallelize_module``; the mechanism is the
global view of torch_xla SPMD, docs/design.md): every module matched by a plan entry is REPLACED by a
tensor-parallel layer holding exactly its weights (the styles of :mod:`torch_impl.styles`:
``nn.Linear`` / HF ``Conv1D`` -> column / row parallel linear, fused q|k|v by whole heads,
grouped-query kv heads replicated to tp, ``nn.Embedding`` -> vocab-parallel, norms -> sequence-
or feature-parallel; an LM head tied to a vocab-parallel embedding stays tied: one parameter).
Every other module keeps its class and code, its parameters and buffers move to the XLA device
(replicated). The new layers take and return ordinary global tensors, so the model's own forward
code (reshapes into heads, rotary embeddings, residual adds, q/k/v splits) runs unchanged.

Names: :func:`name_map` gives ``{original parameter name: parallel name}``; the layouts differ
only by a transpose (``kernel = weight.T``) and, for a fused q|k|v in [q | k | v] blocks, a
permutation of the out features. :func:`gather_state_dict` and :func:`load_state_dict` convert
whole state dicts both ways (bit-exact).

Errors (ValueError naming the plan entry or module path, before anything is compiled): an entry
matching no module (with the nearest module names), a module matched by two entries, a style
that does not fit the module type, sizes or heads not divisible by tp, a bad option value
(only the documented values are accepted), a swapped parameter shared with another module
(except the tied embedding / LM head pair and identical-layout biases).

Attention kernels: ``torch.matmul`` of 4-D [B, H, S, hd] tensors folds B and H into one batch dim
and makes the partitioner all-gather head-sharded q, k and v; :func:`head_parallel_attention`
(einsums) keeps them apart. :func:`torch_impl.plans.auto_plan` registers it with transformers
(with the eager kernel's mask function) and the migrated model uses it.

Public API: the styles (re-exported from :mod:`torch_impl.styles`), ``parallelize_module``,
``name_map``, ``gather_state_dict``, ``load_state_dict``, ``head_parallel_attention``.
"""

from __future__ import annotations

import copy
import difflib
import re
import typing as tp

import torch
from torch import nn

from . import mesh as _mesh
from . import xla
from .parallelize_layers import origin_of
from .styles import (STYLES, AsyncColwiseParallel, AsyncRowwiseParallel, ColwiseParallel,
                     ParallelStyle, Replicate, RowwiseParallel, SequenceParallel, VocabParallel,
                     resolve_style)

__all__ = ["ParallelStyle", "ColwiseParallel", "RowwiseParallel", "AsyncColwiseParallel",
           "AsyncRowwiseParallel", "SequenceParallel", "VocabParallel", "Replicate", "STYLES",
           "parallelize_module", "name_map", "gather_state_dict", "load_state_dict",
           "head_parallel_attention", "pattern_regex"]


# -------------------------------------------------------------------------------- patterns
def _component_regex(comp: str) -> str:
    """One name component of a pattern: ``*`` / ``?`` / ``[...]`` never cross a dot."""
    out, i = [], 0
    while i < len(comp):
        c = comp[i]
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[" and "]" in comp[i + 1:]:
            j = comp.index("]", i + 1)
            body = comp[i + 1:j]
            neg = body.startswith("!")
            out.append("[" + ("^" if neg else "") + re.escape(body[neg:]) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def pattern_regex(pattern: str) -> re.Pattern:
    """Compiled regex of a plan pattern: ``*`` matches within one dot-separated name component,
    ``**`` (a whole component) any number of components, zero included.

    >>> bool(pattern_regex("**.mlp.*").fullmatch("model.layers.0.mlp.up"))
    True
    >>> bool(pattern_regex("layers.*.mlp").fullmatch("layers.0.1.mlp"))
    False
    """
    comps = pattern.split(".")
    if comps == ["**"]:
        return re.compile(".*")
    out = ""
    for i, comp in enumerate(comps):
        if comp == "**":
            out += r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*"
            continue
        sep = "" if i == 0 or (i == 1 and comps[0] == "**") else r"\."
        out += sep + _component_regex(comp)
    return re.compile(out)


def _match(pattern: str, names: tp.Iterable[str]) -> list[str]:
    rx = pattern_regex(pattern)
    return [n for n in names if n and rx.fullmatch(n)]


def _nearest(pattern: str, names: list[str]) -> str:
    plain = [n for n in names if n]
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", pattern)
    shapes = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in plain})
    close = difflib.get_close_matches(generic, shapes, n=5, cutoff=0.0)
    return ", ".join(repr(n) for n in close)


# ---------------------------------------------------------------------------------- drivers
def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _check_args(model, mesh, plan, axis_name, inplace) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}: expected a torch.nn.Module")
    if not isinstance(inplace, bool):
        raise ValueError(f"inplace={inplace!r}: expected True or False")
    if not isinstance(axis_name, str):
        raise ValueError(f"axis_name={axis_name!r}: expected a mesh axis name (str)")
    _mesh.require_spmd()
    if not xla.is_mesh(mesh):
        raise ValueError(f"mesh={type(mesh).__name__}: expected a torch_xla mesh "
                         f"(torch_impl.mesh.create_mesh)")
    _mesh.check_axis(mesh, axis_name, "axis_name")
    if plan is not None and (not isinstance(plan, tp.Mapping) or not plan):
        raise ValueError(f"plan={plan!r}: expected None (auto_plan) or a non-empty mapping "
                         f"{{module name or pattern: style}}")


def _assign(model: nn.Module, styles: dict) -> dict[str, str]:
    """{module name: plan pattern}; ValueError for unmatched, doubly matched or nested names."""
    names = [n for n, _ in model.named_modules()]
    assigned: dict[str, str] = {}
    for pattern in styles:
        hits = [""] if pattern == "" else _match(pattern, names)
        if not hits:
            raise ValueError(f"plan entry {pattern!r} matches no module of "
                             f"{type(model).__name__} ('*' matches one name component, '**' any "
                             f"number); nearest module names: {_nearest(pattern, names)}")
        for name in hits:
            if name in assigned:
                raise ValueError(f"{name}: matched by two plan entries, {assigned[name]!r} and "
                                 f"{pattern!r}: expected exactly one style per module")
            assigned[name] = pattern
    for a in assigned:
        for b in assigned:
            if b != a and b.startswith(a + ".") or (a == "" and b):
                raise ValueError(f"{b}: inside {a or '<root>'}, which the plan also names: "
                                 f"expected plan entries on disjoint modules")
    return assigned


def _owners(model: nn.Module) -> dict[int, list[tuple[str, str]]]:
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((mod_name, p_name))
    return owners


def _build(model, assigned, styles, mesh, axis_name) -> dict[str, nn.Module]:
    """The replacement of every assigned module (embeddings first: a tied head needs them)."""
    owners = _owners(model)
    order = sorted(assigned, key=lambda n: not isinstance(styles[assigned[n]], VocabParallel))
    new: dict[str, nn.Module] = {}
    tables: dict[int, nn.Parameter] = {}  # original embedding weight -> vocab-parallel table
    for name in order:
        style, module = styles[assigned[name]], model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if (isinstance(style, ColwiseParallel) and isinstance(weight, torch.Tensor)
                and id(weight) in tables):
            new[name] = style.apply_tied(module, name, mesh, axis_name, tables[id(weight)])
            continue
        new[name] = style.apply(module, name, mesh, axis_name)
        if isinstance(style, VocabParallel):
            tables[id(module.weight)] = new[name].embedding
    _check_tied(model, new, owners)
    return new


def _inside(name: str, swapped: tp.Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in swapped if s)


def _check_tied(model, new: dict, owners) -> None:
    """ValueError if a swapped parameter is shared outside its module in a changed layout."""
    for name, repl in new.items():
        origin = origin_of(repl)
        if origin is None:
            continue
        module = model.get_submodule(name)
        for p_name, p in module.named_parameters(recurse=False):
            others = [f"{m}.{n}" if m else n for m, n in owners.get(id(p), [])
                      if not (m == name and n == p_name)]
            if not others or _tied_ok(repl, p_name):
                continue
            layout = origin[p_name][1]
            if layout.transpose or layout.perm is not None:
                raise ValueError(f"{name}: parameter {p_name!r} is shared with {others} (tied "
                                 f"weights) and the plan changes its layout: swapping it would "
                                 f"untie them; untie them first, leave {name!r} out of the plan, "
                                 f"or (an LM head tied to its embedding) give the embedding "
                                 f"VocabParallel and the head ColwiseParallel")


def _tied_ok(repl: nn.Module, p_name: str) -> bool:
    from .parallelize_layers import TiedVocabHead

    return isinstance(repl, TiedVocabHead) and p_name == "weight"


def _retie(model, new: dict, originals: dict, owners) -> None:
    """Point every other user of a swapped same-layout parameter at its new Parameter."""
    for name, repl in new.items():
        origin = origin_of(repl)
        if origin is None:
            continue
        module = originals[name]
        for p_name, p in module.named_parameters(recurse=False):
            new_p = getattr(repl, origin[p_name][0])
            for m, n in owners.get(id(p), []):
                if not _inside(m, new):
                    setattr(model.get_submodule(m) if m else model, n, new_p)


def parallelize_module(model: nn.Module, mesh, plan: tp.Mapping[str, tp.Any] | None = None, *,
                       axis_name: str = "tp", inplace: bool = True) -> nn.Module:
    """Swap the modules named by ``plan`` for tensor-parallel layers over ``mesh``'s ``axis_name``.

    Args:
        model: Any ``nn.Module`` (its parameters on the CPU or the XLA device).
        mesh: A torch_xla mesh (``torch_impl.mesh.create_mesh``) with ``axis_name``.
        plan: ``{module name or pattern: style}`` (a :class:`ParallelStyle` or a name in
            :data:`STYLES`); in a pattern ``*`` matches one name component, ``**`` any number,
            ``[qkv]`` one of the characters. None: :func:`torch_impl.plans.auto_plan` of the
            model (Hugging Face GPT-2, Llama, Mistral, Qwen2, BERT, RoBERTa, GPT-NeoX).
        axis_name: The tensor-parallel mesh axis.
        inplace: Modify ``model`` (default) or a deep copy of it (``model`` is then untouched).

    Returns:
        The parallel model: matched modules replaced (holding exactly the original weights),
        every other module unchanged in code, all parameters and buffers on the XLA device.
        A plan with a ``prepare(model)`` method (an auto plan) has it called on the result
        (e.g. selecting the head-parallel attention kernel).

    Raises:
        ValueError (naming the plan entry or module path): see the module docstring.

    Example::

        tp_model = parallelize_module(model, mesh, {"**.mlp.up": "colwise",
                                                    "**.mlp.down": "rowwise"}, inplace=False)
    """
    _check_args(model, mesh, plan, axis_name, inplace)
    if plan is None:
        from .plans import auto_plan

        plan = auto_plan(model, _mesh.check_axis(mesh, axis_name))
    styles = {}
    for pattern, style in plan.items():
        if not isinstance(pattern, str):
            raise ValueError(f"plan key {pattern!r}: expected a module name or pattern (str)")
        styles[pattern] = resolve_style(pattern, style)
    if not inplace:
        model = copy.deepcopy(model)
    assigned = _assign(model, styles)
    if "" in assigned and not isinstance(styles[assigned[""]], Replicate):
        raise ValueError(f"plan entry {assigned['']!r}: the root module cannot be replaced")
    owners = _owners(model)
    new = _build(model, assigned, styles, mesh, axis_name)
    originals = {name: model.get_submodule(name) for name in new}
    for name, repl in new.items():
        if repl is not model.get_submodule(name):
            _set_child(model, name, repl)
    _retie(model, new, originals, owners)
    model.to(_mesh.xla_device())  # the untouched modules: replicated on the XLA device
    prepare = getattr(plan, "prepare", None)
    if callable(prepare):
        prepare(model)
    return model


# ------------------------------------------------------------------------------ state dicts
def name_map(model: nn.Module) -> dict[str, str]:
    """``{original state_dict key: parallel state_dict key}`` of a model made by
    :func:`parallelize_module` (identical keys for modules that were not swapped).

    Example: ``name_map(tp_gpt2)["transformer.h.0.attn.c_attn.weight"]`` is
    ``"transformer.h.0.attn.c_attn.kernel"``.
    """
    return {orig: par for par, (orig, _) in _key_layouts(model).items()}


def _key_layouts(model: nn.Module) -> dict[str, tuple[str, tp.Any]]:
    """{parallel key: (original key, Layout or None)} over ``model.state_dict()``."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}: expected a torch.nn.Module")
    swapped = {name: origin_of(m) for name, m in model.named_modules() if origin_of(m)}
    out = {}
    for key in model.state_dict():
        prefix, _, leaf = key.rpartition(".")
        origin = swapped.get(prefix)
        if origin is None:
            out[key] = (key, None)
            continue
        matches = [(o, lay) for o, (n, lay) in origin.items() if n == leaf]
        if not matches:
            kind = type(model.get_submodule(prefix)).__name__
            raise ValueError(f"{key}: entry of a swapped {kind} with no original name (expected "
                             f"one of {[n for n, _ in origin.values()]})")
        orig, lay = matches[0]
        out[key] = (f"{prefix}.{orig}" if prefix else orig, lay)
    return out


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of the ORIGINAL model, from a model made by :func:`parallelize_module`.

    Swapped layers are converted back to the original names and layouts (``kernel`` [in, out] ->
    ``weight`` [out, in], fused q|k|v un-permuted, ``embedding`` / ``scale`` -> ``weight``);
    every other entry is copied. Contiguous CPU tensors, bit-exact: the result loads into the
    original (unsharded) model with ``load_state_dict(strict=True)``.
    """
    layouts = _key_layouts(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        orig, lay = layouts[key]
        value = value.detach().to("cpu")
        if lay is not None:
            value = lay.to_original(value, is_bias=value.dim() == 1)
        out[orig] = value.contiguous().clone()
    return out


def load_state_dict(model: nn.Module, state_dict: tp.Mapping[str, torch.Tensor], *,
                    strict: bool = True):
    """Load an ORDINARY (unsharded, original-named) ``state_dict`` into a migrated model.

    Keys are mapped with :func:`name_map`, values converted to the parallel layouts and copied
    into the sharded parameters (their shardings are kept). A key missing for one of several
    tied entries (e.g. ``lm_head.weight`` of a checkpoint that stores only the embedding) is
    taken from the others. Returns ``model.load_state_dict``'s result.

    Raises:
        ValueError: ``strict`` and keys missing or unexpected (listed), or a shape mismatch.
    """
    if not isinstance(state_dict, tp.Mapping):
        raise ValueError(f"state_dict={type(state_dict).__name__}: expected a mapping")
    if not isinstance(strict, bool):
        raise ValueError(f"strict={strict!r}: expected True or False")
    layouts = _key_layouts(model)
    current = model.state_dict()
    groups: dict[int, list[str]] = {}  # keys of one (tied) parameter
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            groups.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    tied = {key: keys for keys in groups.values() for key in keys}
    converted, missing = {}, []
    for key, (orig, lay) in layouts.items():
        src = orig if orig in state_dict else next(
            (layouts[k][0] for k in tied.get(key, ()) if layouts[k][0] in state_dict), None)
        if src is None:
            missing.append(orig)
            continue
        value = torch.as_tensor(state_dict[src])
        if lay is not None:
            value = lay.to_parallel(value, is_bias=value.dim() == 1)
        if tuple(value.shape) != tuple(current[key].shape):
            raise ValueError(f"state_dict[{src!r}]: shape {tuple(state_dict[src].shape)} does not "
                             f"match the model's (parallel {key!r}: {tuple(current[key].shape)})")
        converted[key] = value
    unexpected = sorted(set(state_dict) - {orig for orig, _ in layouts.values()})
    if strict and (missing or unexpected):
        raise ValueError(f"state_dict: missing keys {missing}, unexpected keys {unexpected} "
                         f"(expected the original model's keys; strict=True)")
    return model.load_state_dict(converted, strict=False)


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
