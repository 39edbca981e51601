"""Weights between the backends and between axis sizes (framework-neutral core).

**JAX <-> torch.** For every ringpar module the torch ``state_dict`` keys are the JAX parameter
paths joined by '.', with the same shapes and layouts (stacked device dim first where JAX has
``nn.Partitioned``), so converting is a rename plus an array copy:
:func:`flatten_params` / :func:`unflatten_params` move between a nested JAX tree and the flat dict,
:func:`jax_to_torch` / :func:`torch_to_jax` go all the way (each imports only its target
framework). The one documented layout transform is for plain ``torch.nn.Linear`` weights, which are
``[out, in]`` where every ringpar layer stores ``kernel`` ``[in, out]``:
:func:`linear_weight_to_kernel` / :func:`kernel_to_linear_weight`.

**Re-sharding.** :func:`to_dense` turns a TP layer's parameters at axis size n into the dense
``kernel [F, O]`` and ``bias [O]`` of the global function ``y = x @ kernel + bias`` (input
``[B, F]`` and output ``[B, O]`` with features sharded over the axis, as in the parity harnesss cases);
:func:`from_dense` goes back for any axis size; :func:`reshard` composes them, so weights saved
at tp=2 give the same function at tp=4. Defined for TPDense gather/scatter, TPAsyncDense
gather (uni/bi) and scatter (uni/split), any layer at n == 1, and ParallelLinear (whose
parameters are global already). Not defined for mode "none" at n > 1, whose replicated
per-device kernel is a block-diagonal global matrix that another n cannot express.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["flatten_params", "unflatten_params", "jax_to_torch", "torch_to_jax",
           "linear_weight_to_kernel", "kernel_to_linear_weight", "to_dense", "from_dense",
           "reshard"]


def _leaf_value(v: Any):
    """A boxed leaf (flax ``nn.Partitioned``, nnx ``Variable``) -> its array; arrays unchanged."""
    if hasattr(v, "names") and hasattr(v, "value"):
        return v.value
    if hasattr(v, "get_value") and callable(v.get_value):
        return v.get_value()
    return v


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested parameter tree (dicts, flax FrozenDicts, Partitioned leaves) -> {'a.b.c': array}."""
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "items") and not hasattr(value, "names"):
            out.update(flatten_params(value, path))
        else:
            out[path] = np.asarray(_leaf_value(value))
    return out


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """{'a.b.c': array} -> nested dicts (the JAX parameter tree without Partitioned boxes)."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} passes through the leaf {p!r}")
        if leaf in node:
            raise ValueError(f"path {path!r} appears twice")
        node[leaf] = value
    return tree


def jax_to_torch(tree: Mapping, dtype=None) -> dict:
    """A JAX parameter tree -> a torch ``state_dict`` (CPU tensors, keys joined by '.')."""
    import torch

    out = {}
    for k, v in flatten_params(tree).items():
        t = torch.from_numpy(np.array(v, dtype=np.float32 if v.dtype.name == "bfloat16" else v.dtype))
        out[k] = t.to(dtype) if dtype is not None else (t.to(torch.bfloat16)
                                                         if v.dtype.name == "bfloat16" else t)
    return out


def torch_to_jax(state_dict: Mapping) -> dict:
    """A torch ``state_dict`` -> the nested JAX parameter tree (jax arrays, unboxed)."""
    import jax.numpy as jnp

    flat = {}
    for k, t in state_dict.items():
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            flat[k] = jnp.asarray(t.float().numpy(), dtype=jnp.bfloat16)
        else:
            flat[k] = jnp.asarray(t.numpy())
    return unflatten_params(flat)


def linear_weight_to_kernel(weight) -> np.ndarray:
    """``torch.nn.Linear.weight`` ``[out, in]`` -> ringpar ``kernel`` ``[in, out]``."""
    return np.ascontiguousarray(np.asarray(weight).T)


def kernel_to_linear_weight(kernel) -> np.ndarray:
    """ringpar ``kernel`` ``[in, out]`` -> ``torch.nn.Linear.weight`` ``[out, in]``."""
    return np.ascontiguousarray(np.asarray(kernel).T)


# -------------------------------------------------------------------------------- re-sharding
def _blocks(a: np.ndarray, n: int, axis: int) -> list[np.ndarray]:
    if a.shape[axis] % n:
        raise ValueError(f"dimension {axis} of size {a.shape[axis]} is not divisible by n={n}")
    return np.split(a, n, axis=axis)


def _check(module: str, variant: str, n: int) -> str:
    if module not in ("tpdense", "tpasync", "linear"):
        raise ValueError(f"module={module!r}: expected 'tpdense', 'tpasync' or 'linear'")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive int")
    known = {"tpdense": ("none", "gather", "scatter"),  # a typo must not fall back to scatter
             "tpasync": ("gather-uni", "gather-bi", "scatter-uni", "scatter-split"),
             "linear": ("column-plain", "column-ag", "column-agbi", "row-plain", "row-rs",
                        "row-rsbi")}[module]
    if variant not in known:
        raise ValueError(f"variant={variant!r}: expected one of {known} for module={module!r}")
    mode = variant.split("-")[0]
    if module != "linear" and n > 1 and mode == "none":
        raise ValueError("variant='none' at n > 1 has a block-diagonal global kernel: it cannot "
                         "be re-sharded to another axis size")
    return mode


def to_dense(module: str, variant: str, n: int, params: Mapping[str, np.ndarray]) -> dict:
    """The global ``{'kernel': [F, O], 'bias': [O]}`` of a layer's flat parameters at size n."""
    mode = _check(module, variant, n)
    p = {k: np.asarray(v) for k, v in params.items()}
    if module == "linear":
        return {"kernel": p["kernel"], "bias": p["bias"]}
    if n == 1:
        prefix = "Dense_0" if module == "tpdense" else "shard_0"
        return {"kernel": p[f"{prefix}.kernel"], "bias": p[f"{prefix}.bias"]}
    if module == "tpdense":
        k, b = p["module.sharded.kernel"], p["module.sharded.bias"]
        if mode == "gather":  # device d: y[:, out block d] = x @ k[d] + b[d]
            return {"kernel": np.concatenate(list(k), axis=1), "bias": np.concatenate(list(b))}
        # scatter: y = sum_d x[:, in block d] @ k[d] + b[d], then reduce-scattered
        return {"kernel": np.concatenate(list(k), axis=0), "bias": b.sum(axis=0)}
    kernels = [p[f"shard_{i}.sharded.kernel"] for i in range(n)]  # each [n, F/n, O/n]
    fi, fo = kernels[0].shape[1], kernels[0].shape[2]
    w = np.zeros((n * fi, n * fo), kernels[0].dtype)
    bias = np.zeros(n * fo, kernels[0].dtype)
    b0 = p["shard_0.sharded.bias"]
    for i, k in enumerate(kernels):
        for e in range(n):
            for (lo, hi), dst in _destinations(mode, variant, n, i, e, fo):
                src_in = (e - i) % n if mode == "gather" else e
                out_blk = e if mode == "gather" else dst
                w[src_in * fi:(src_in + 1) * fi, out_blk * fo + lo:out_blk * fo + hi] = k[e][:, lo:hi]
                if i == 0:
                    bias[out_blk * fo + lo:out_blk * fo + hi] = b0[e][lo:hi]
    return {"kernel": w, "bias": bias}


def _destinations(mode, variant, n, i, e, fo):
    """[(feature range of shard i's output on device e, output block it lands in)]."""
    if mode == "gather":  # device e computes its own output block from x of device e - i
        return [((0, fo), e)]
    if variant.endswith("split"):  # first fo//2 features go up the ring, the rest down
        return [((0, fo // 2), (e - 1 - i) % n), ((fo // 2, fo), (e + 1 + i) % n)]
    return [((0, fo), (e - 1 - i) % n)]


def from_dense(module: str, variant: str, n: int, dense: Mapping[str, np.ndarray]) -> dict:
    """Flat parameters at axis size n computing the global ``x @ kernel + bias``."""
    mode = _check(module, variant, n)
    w, b = np.asarray(dense["kernel"]), np.asarray(dense["bias"])
    if module == "linear":
        return {"kernel": w, "bias": b}
    if n == 1:
        prefix = "Dense_0" if module == "tpdense" else "shard_0"
        return {f"{prefix}.kernel": w, f"{prefix}.bias": b}
    if module == "tpdense":
        if mode == "gather":
            return {"module.sharded.kernel": np.stack(_blocks(w, n, 1)),
                    "module.sharded.bias": np.stack(_blocks(b, n, 0))}
        bias = np.zeros((n,) + b.shape, b.dtype)
        bias[0] = b  # the devices' biases are summed: put it all on device 0
        return {"module.sharded.kernel": np.stack(_blocks(w, n, 0)), "module.sharded.bias": bias}
    fi, fo = w.shape[0] // n, w.shape[1] // n
    _blocks(w, n, 0), _blocks(w, n, 1)  # divisibility check with a clear message
    out = {f"shard_{i}.sharded.kernel": np.zeros((n, fi, fo), w.dtype) for i in range(n)}
    b0 = np.zeros((n, fo), w.dtype)
    for i in range(n):
        for e in range(n):
            for (lo, hi), dst in _destinations(mode, variant, n, i, e, fo):
                src_in = (e - i) % n if mode == "gather" else e
                out_blk = e if mode == "gather" else dst
                out[f"shard_{i}.sharded.kernel"][e][:, lo:hi] = \
                    w[src_in * fi:(src_in + 1) * fi, out_blk * fo + lo:out_blk * fo + hi]
                if i == 0:
                    b0[e][lo:hi] = b[out_blk * fo + lo:out_blk * fo + hi]
    out["shard_0.sharded.bias"] = b0
    return out


def reshard(module: str, variant: str, params: Mapping[str, np.ndarray], n_from: int,
            n_to: int) -> dict:
    """Parameters saved at axis size ``n_from`` -> parameters at ``n_to``, same global function."""
    return from_dense(module, variant, n_to, to_dense(module, variant, n_from, params))
