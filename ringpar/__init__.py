"""ringpar's framework-neutral core: it imports neither JAX nor PyTorch.

Both backends (``jax_impl``, ``torch_impl``) and the parity harness read their shared facts from
here, so each fact is written once: configs, matmul methods, ring arithmetic, validation rules,
seeds, the CPU virtual-device environment, the GPT's parameter table, partition-spec algebra,
the linear layers' argument rules, and the weight converter.
Submodules are imported lazily.

Example:
    >>> import ringpar
    >>> ringpar.rings.ring_perm(4)
    [(0, 1), (1, 2), (2, 3), (3, 0)]
"""

import importlib

_SUBMODULES = ("configs", "matmul_methods", "rings", "validation", "seeding", "devices",
               "gpt_config", "gpt_model_config", "convert", "fsdp_layout", "pipeline_schedule",
               "schedule", "optim", "data", "checkpoint", "progress", "partition_specs",
               "linear_args")


__all__ = list(_SUBMODULES)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
