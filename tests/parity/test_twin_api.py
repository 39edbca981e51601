"""Every public name of ``jax_impl.X`` has its twin in ``torch_impl.X``, with the same parameters.

The rule (project guide): twin modules have the same public names (``__all__``) in the same
order, and each function / class constructor the same parameter names in the same order. The
differences that follow from the frameworks are written once here:

- ``RENAMES``: a JAX random key / ``nnx.Rngs`` is a torch int ``seed`` / ``torch.Generator``.
- ``FLAX_FIELDS``: ``parent`` and ``name`` are constructor fields of every ``flax.linen``
  module class (ignored for classes only).
- ``mesh``: torch has no bound axis names, so torch functions take the mesh as a keyword-only
  argument (``docs/design.md``, "The stacked view"); where JAX takes one too (global-view
  functions) its position may differ, so ``mesh`` is left out of the order comparison.

Anything else is a deliberate exception listed below with its reason. An exception that is no
longer needed fails the test too, so the list stays true.

Checked to fail: adding a parameter ``extra`` to ``torch_impl.collectives.axis_index`` in a
scratch copy made ``test_twin_parameters[collectives]`` fail naming ``axis_index``; the
``test_checker_reports_*`` tests below keep the checker itself able to fail.
"""

from __future__ import annotations

import importlib.util
import inspect
import pkgutil

import pytest

RENAMES = {"rngs": "seed", "key": "generator"}
FLAX_FIELDS = {"parent", "name"}
MESH = "mesh"

# module -> reason: jax_impl modules whose torch_impl twin does not exist yet (skipped while the
# torch file is missing, checked as soon as it exists)
NO_TWIN: dict[str, str] = {}

# (module, name) -> reason: public JAX names without a torch twin of that name
MISSING: dict[tuple[str, str], str] = {
    ("mesh", "axis_size"): "a bound axis size exists only inside shard_map; torch reads it from "
                           "the mesh: torch_impl.collectives.axis_size(axis_name, mesh=...)",
}

# (module, name) -> (JAX parameters without a torch twin, reason)
JAX_ONLY: dict[tuple[str, str], tuple[set, str]] = {
    ("mesh", "create_mesh"): ({"devices"}, "torch_xla meshes must cover every device: no "
                                           "device list to choose from"),
    ("embedding", "default_embed_init"): ({"out_sharding"}, "JAX's initializer protocol (the "
                                          "sharding of the created array); torch initializes "
                                          "on the CPU and places afterwards"),
    ("tensor_parallel", "TPDense"): ({"dense_fn"}, "a linen module factory; torch builds its "
                                     "Dense from in_features/out_features"),
    ("tensor_parallel", "TPAsyncDense"): ({"dense_fn"}, "as TPDense"),
    **{("gpt", cls): ({"rngs"}, "torch GPT sub-modules draw their seeds from the shared ctx "
                      "(built eagerly by GPT); nnx passes Rngs to each")
       for cls in ("PositionEmbed", "CausalSelfAttention", "MLP", "Block")},
    ("optim", "apply_step"): ({"opt_state"}, "a torch optimizer holds its own state"),
}

# (module, name) -> (torch parameters without a JAX twin, reason)
TORCH_ONLY: dict[tuple[str, str], tuple[set, str]] = {
    ("linear_ring", "pick_block"): ({"axis_name"}, "the picked block is re-annotated as stacked "
                                    "over the axis; JAX's per-device slice needs no annotation"),
    ("linear_ring", "scale_and_bias"): ({"stacked"}, "in the stacked view a sharded bias is "
                                        "[n, o] and broadcasts differently from a replicated one; "
                                        "under shard_map both are per-device [o]"),
    ("array_utils", "unstack_params"): ({"axis"}, "torch tensors carry no axis names (JAX reads "
                                        "the stacked dim from nn.Partitioned names)"),
    ("tensor_parallel", "ModelParallelismWrapper"): ({"seed"}, "linen initializes lazily from an "
                                                     "rng at init(); torch builds eagerly"),
    ("tensor_parallel", "TPDense"): ({"in_features", "out_features", "seed", "dtype"},
                                     "linen infers shapes from the first input; torch builds the "
                                     "parameters eagerly and needs them"),
    ("tensor_parallel", "TPAsyncDense"): ({"in_features", "out_features", "seed", "dtype"},
                                          "as TPDense"),
    ("pipeline_parallel", "execute_pipeline"): ({"batch_axis_names", "loop", "feature_spec"},
                                                "shard_map splits the batch per device; the global "
                                                "view needs the data axes (and the sharding of the "
                                                "feature dims, e.g. tp), and the scan/unrolled "
                                                "choice works around a torch_xla scan limitation"),
    ("pipeline_parallel", "PipelineModule"): ({"batch_axis_names", "stage_name", "loop"},
                                              "as execute_pipeline; stage_name names the stacked "
                                              "stage (linen names it from the module tree)"),
    ("pipeline_circular", "execute_circular_pipeline"): ({"batch_axis_names", "loop",
                                                          "feature_spec"},
                                                         "as pipeline_parallel.execute_pipeline"),
    ("pipeline_circular", "CircularPipelineModule"): ({"batch_axis_names", "loop"},
                                                      "as pipeline_parallel.PipelineModule"),
    ("pipeline_circular", "rotate"): ({"spec"}, "as collectives.ring_permute (the loop keeps the "
                                      "state's data-parallel dims sharded)"),
    ("embedding", "VocabParallelEmbed"): ({"padding_idx"}, "nn.Embedding's padding_idx, so "
                                          "migrated torch models keep it; JAX has none"),
    ("embedding", "vocab_parallel_lookup"): ({"padding_idx"}, "as VocabParallelEmbed"),
    ("collectives", "ring_permute"): ({"spec"}, "the stacked view's sharding of the shifted "
                                      "tensor (the pipeline keeps its data-parallel dims "
                                      "sharded); per-device shard_map values need none"),
    ("data_parallel", "gather_array_with_mean_grads"): ({"names"}, "torch tensors carry no "
                                                        "partition names; default: read from "
                                                        "the sharding annotation"),
    ("optim", "clip_by_global_norm"): ({"grads"}, "optax returns a transformation; torch clips "
                                       "the given gradients"),
    ("optim", "make_optimizer"): ({"params"}, "a torch optimizer is built over its parameters"),
    ("optim", "apply_step"): ({"config"}, "torch applies the clipping of the config inside the "
                              "step (optax chains it into tx)"),
}

# module -> {JAX parameter name: torch parameter name} beyond RENAMES
MODULE_RENAMES: dict[str, dict[str, str]] = {
    "optim": {"tx": "optimizer", "opt_state": "optimizer"},
}


def _jax_modules() -> list[str]:
    import jax_impl

    return sorted(m.name for m in pkgutil.iter_modules(jax_impl.__path__))


def _pair(module: str):
    import jax  # noqa: F401  (imported before torch_xla, docs/design.md)

    if importlib.util.find_spec(f"torch_impl.{module}") is None:
        if module in NO_TWIN:
            pytest.skip(NO_TWIN[module])
        pytest.fail(f"jax_impl.{module} has no twin torch_impl.{module}")
    return (importlib.import_module(f"jax_impl.{module}"),
            importlib.import_module(f"torch_impl.{module}"))


def _public(mod) -> list[str]:
    names = getattr(mod, "__all__", None)
    return list(names) if names is not None else sorted(n for n in vars(mod) if n[0] != "_")


def _parameters(obj) -> list[inspect.Parameter] | None:
    target = obj.__init__ if inspect.isclass(obj) else obj
    if not callable(target):
        return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins, enums without a signature
        return None
    return [p for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL,)]


def parameter_mismatch(module: str, name: str, jax_obj, torch_obj, used: set) -> str | None:
    """Why the two signatures differ beyond the documented rules, or None."""
    pj, pt = _parameters(jax_obj), _parameters(torch_obj)
    if pj is None or pt is None:
        return None
    renames = {**RENAMES, **MODULE_RENAMES.get(module, {})}
    jax_only, _ = JAX_ONLY.get((module, name), (set(), ""))
    torch_only, _ = TORCH_ONLY.get((module, name), (set(), ""))
    want = []
    for p in pj:
        if p.name == MESH or (inspect.isclass(jax_obj) and p.name in FLAX_FIELDS):
            continue
        if p.name in jax_only:
            used.add(("jax", module, name, p.name))
            continue
        new = renames.get(p.name, p.name)
        if new != p.name:
            used.add(("rename", module, p.name))
        if new not in want:  # two JAX names may map to one torch object (tx, opt_state)
            want.append(new)
    have = []
    for p in pt:
        if p.name == MESH:
            continue
        if p.name in torch_only:
            used.add(("torch", module, name, p.name))
            continue
        have.append(p.name)
    if want != have:
        return f"{module}.{name}: JAX {want} vs torch {have}"
    return None


@pytest.mark.parametrize("module", _jax_modules())
def test_twin_module_has_every_public_name_in_order(module):
    jax_mod, torch_mod = _pair(module)
    jax_names = [n for n in _public(jax_mod) if (module, n) not in MISSING]
    torch_names = _public(torch_mod)
    missing = [n for n in jax_names if n not in torch_names]
    assert not missing, f"torch_impl.{module} lacks {missing}"
    assert [n for n in torch_names if n in jax_names] == jax_names, "same names, different order"
    for (mod, n), reason in MISSING.items():
        if mod == module:
            assert n in _public(jax_mod) and n not in torch_names, f"stale exception {n}: {reason}"


# module -> reason: known parameter differences not yet resolved by the module's owner
PARAMS_PENDING: dict[str, str] = {}


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=PARAMS_PENDING[m]))
    if m in PARAMS_PENDING else m for m in _jax_modules()])
def test_twin_parameters(module):
    jax_mod, torch_mod = _pair(module)
    used: set = set()
    bad = []
    for name in _public(jax_mod):
        if (module, name) in MISSING or not hasattr(torch_mod, name):
            continue
        why = parameter_mismatch(module, name, getattr(jax_mod, name), getattr(torch_mod, name),
                                 used)
        if why:
            bad.append(why)
    assert not bad, "\n".join(bad)
    for table, kind in ((JAX_ONLY, "jax"), (TORCH_ONLY, "torch")):
        for (mod, n), (params, reason) in table.items():
            if mod == module:
                stale = {p for p in params if (kind, mod, n, p) not in used}
                assert not stale, f"stale {kind}-only exception {mod}.{n} {stale}: {reason}"


def test_checker_reports_a_renamed_parameter():
    def jax_fn(x, axis_name):
        pass

    def torch_fn(x, axis, *, mesh):
        pass

    assert "JAX ['x', 'axis_name'] vs torch ['x', 'axis']" in parameter_mismatch(
        "collectives", "f", jax_fn, torch_fn, set())


def test_checker_reports_an_undocumented_extra_and_accepts_the_rules():
    def jax_fn(x, axis_name, rngs=None):
        pass

    def torch_ok(x, axis_name, seed=None, *, mesh):
        pass

    def torch_extra(x, axis_name, seed=None, extra=1, *, mesh):
        pass

    assert parameter_mismatch("collectives", "f", jax_fn, torch_ok, set()) is None
    assert "extra" in parameter_mismatch("collectives", "f", jax_fn, torch_extra, set())
