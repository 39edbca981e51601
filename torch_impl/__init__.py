"""ringpar PyTorch/torch_xla SPMD implementation of tensor- and pipeline-parallel layers.

Submodules are imported lazily, so ``import jax_impl`` is cheap and ``torch_impl.configs`` (which is
framework-neutral) can be used without torch installed.
"""

import importlib

_SUBMODULES = ("configs", "mesh", "array_utils", "collectives", "tensor_parallel",
               "async_collectives", "dense", "linear",
               "linear_ring", "linear_specs", "pipeline_parallel",
               "pipeline_circular", "pipeline_loop", "embedding", "losses", "norms", "gpt",
               "parallelize", "data_parallel", "parallelize_layers", "styles",
               "plans", "model", "optim", "cached_step", "scan_random", "xla")

__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
