"""Configuration classes of the torch backend: the framework-neutral :mod:`ringpar.configs`.

Deliberate twin of ``jax_impl.configs`` (kept line-for-line parallel on purpose): both re-export
the same classes, so one ParallelConfig drives both backends (seed: xlstm-jax
``models.configs``).

Example:
    >>> from torch_impl.configs import ParallelConfig
    >>> ParallelConfig(model_axis_size=4).model_axis_name
    'tp'
"""

from ringpar.configs import (  # noqa: F401  (re-export)
    ConfigDict,
    ModelConfig,
    ParallelConfig,
    SubModelConfig,
    mesh_axis_names,
    mesh_axis_sizes,
)

__all__ = ["ConfigDict", "ParallelConfig", "ModelConfig", "SubModelConfig", "mesh_axis_names",
           "mesh_axis_sizes"]
