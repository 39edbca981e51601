"""Configuration classes for the torch backend: the framework-neutral ``jax_impl.configs``.

``jax_impl.configs`` imports neither JAX nor torch, so both backends share one ParallelConfig.
"""

from jax_impl.configs import (  # noqa: F401  (re-export)
    ConfigDict,
    ModelConfig,
    ParallelConfig,
    SubModelConfig,
    mesh_axis_names,
    mesh_axis_sizes,
)

__all__ = ["ConfigDict", "ParallelConfig", "ModelConfig", "SubModelConfig", "mesh_axis_names",
           "mesh_axis_sizes"]
