"""ringpar JAX/Flax reference implementation of tensor- and pipeline-parallel layers.

Twin package: :mod:`torch_impl` (the same module names; ``docs/design.md``).

Submodules are imported lazily, so ``import jax_impl`` is cheap and ``jax_impl.configs`` (which is
framework-neutral) can be used without JAX installed.
"""

import importlib

_SUBMODULES = ("configs", "mesh", "array_utils", "collectives", "tensor_parallel",
               "async_collectives", "linear",
               "linear_ring", "linear_specs", "pipeline_parallel",
               "pipeline_circular", "embedding", "losses", "norms", "gpt",
               "data_parallel", "model", "optim")

__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
