"""AdamW with global-norm clipping and a warmup + cosine schedule, on optax (twin of
``torch_impl.optim``).

The rule, the hyperparameters (:class:`ringpar.optim.OptimizerConfig`), the weight-decay rule and
the schedule table are neutral (:mod:`ringpar.optim`, :mod:`ringpar.schedule`); this module only
builds them from optax: ``optax.chain(optax.clip_by_global_norm(c), optax.adamw(schedule,
mask=...))``. It is functional: the parameters are any pytree (a ``{path: array}`` dict, an
``nnx.State``), the state is optax's, and :func:`apply_step` is meant to run inside the jitted
training step.

Parameter paths are the tree's keys joined by '.' (an ``nnx.State``'s trailing ``.value`` is
dropped), the same names ``torch_impl.optim`` reads from ``named_parameters()``.

Example:
    >>> import jax.numpy as jnp
    >>> from ringpar.optim import OptimizerConfig
    >>> cfg = OptimizerConfig(peak_lr=0.1, warmup_steps=0, total_steps=10)
    >>> params = {"w.kernel": jnp.ones((2, 2)), "w.bias": jnp.zeros(2)}
    >>> tx = make_optimizer(cfg)
    >>> state = tx.init(params)
    >>> grads = {"w.kernel": jnp.ones((2, 2)), "w.bias": jnp.ones(2)}
    >>> params, state, norm = apply_step(tx, params, grads, state)
    >>> round(float(norm), 4)
    2.4495
"""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ringpar.optim import OptimizerConfig, applies_weight_decay

__all__ = ["param_paths", "global_norm", "clip_by_global_norm", "learning_rate_schedule",
           "weight_decay_mask", "make_optimizer", "apply_step", "step_count", "export_state",
           "import_state"]


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_paths(params) -> list[str]:
    """'.'-joined path of every leaf of ``params``, in ``jax.tree`` leaf order."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [_key_name(k) for k in path]
        if len(names) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) \
                and names[-1] == "value":  # nnx.State leaf: the Variable's value
            names = names[:-1]
        out.append(".".join(names))
    return out


def global_norm(grads) -> jax.Array:
    """sqrt of the sum of squares of every leaf (float32 scalar): the logged ``grad_norm``."""
    return optax.tree.norm(grads)


def clip_by_global_norm(max_norm: float | None) -> optax.GradientTransformation:
    """Scale all updates by ``max_norm / norm`` when their global norm is >= ``max_norm``
    (``None``: no clipping)."""
    return optax.identity() if max_norm is None else optax.clip_by_global_norm(max_norm)


def learning_rate_schedule(config: OptimizerConfig) -> tp.Callable[[jax.Array], jax.Array]:
    """optax schedule ``count -> lr``: the neutral float32 table, indexed by the update count."""
    table = config.lr_table()

    def schedule(count):
        return jnp.asarray(table)[jnp.minimum(count, table.shape[0] - 1)]

    return schedule


def weight_decay_mask(params):
    """Tree of bools like ``params``: True where :func:`ringpar.optim.applies_weight_decay`."""
    leaves, treedef = jax.tree.flatten(params)
    del leaves
    return jax.tree.unflatten(treedef, [applies_weight_decay(p) for p in param_paths(params)])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm(clip_norm), adamw(schedule, b1, b2, eps, weight_decay,
    mask))`` from ``config``."""
    if not isinstance(config, OptimizerConfig):
        raise ValueError(f"config={config!r}: expected a ringpar.optim.OptimizerConfig")
    return optax.chain(
        clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=weight_decay_mask))


def apply_step(tx: optax.GradientTransformation, params, grads, opt_state):
    """One update (jittable): ``(new_params, new_opt_state, grad_norm)``; the norm is taken
    before clipping."""
    norm = global_norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, norm


def step_count(opt_state) -> int:
    """Updates taken so far (Adam's count; the schedule's count is the same number)."""
    counts = {int(v) for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")}
    if len(counts) != 1:
        raise ValueError(f"opt_state: expected one update count, found {sorted(counts)}")
    return counts.pop()


def export_state(opt_state, params) -> dict[str, np.ndarray]:
    """The neutral optimizer state (:mod:`ringpar.optim`): ``step``, ``mu.<path>``,
    ``nu.<path>`` as global numpy arrays."""
    paths = param_paths(params)
    out = {"step": np.asarray(step_count(opt_state), np.int64)}
    for name in ("mu", "nu"):
        leaves = jax.tree.leaves(optax.tree_utils.tree_get(opt_state, name))
        out.update({f"{name}.{p}": np.asarray(v, np.float32) for p, v in zip(paths, leaves)})
    return out


def import_state(tx: optax.GradientTransformation, params, flat: tp.Mapping[str, tp.Any]):
    """optax state of ``tx`` for ``params`` from the neutral ``flat`` state; the moments get each
    parameter's sharding. ValueError naming the key if one is missing or has the wrong shape."""
    paths, (leaves, treedef) = param_paths(params), jax.tree.flatten(params)
    if "step" not in flat:
        raise ValueError("optimizer state: missing 'step'")
    moments = {}
    for name in ("mu", "nu"):
        values = []
        for path, leaf in zip(paths, leaves):
            key = f"{name}.{path}"
            if key not in flat:
                raise ValueError(f"optimizer state: missing {key!r}")
            value = np.asarray(flat[key])
            if value.shape != tuple(leaf.shape):
                raise ValueError(f"optimizer state {key!r}: shape {value.shape}, expected "
                                 f"{tuple(leaf.shape)}")
            values.append(jax.device_put(jnp.asarray(value, leaf.dtype), leaf.sharding))
        moments[name] = jax.tree.unflatten(treedef, values)
    count = jnp.asarray(int(np.asarray(flat["step"])), jnp.int32)
    return optax.tree_utils.tree_set(tx.init(params), count=count, **moments)
