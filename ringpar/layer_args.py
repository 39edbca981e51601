"""Argument rules of the norm, embedding and loss layers that both backends share.

``jax_impl`` and ``torch_impl`` call these before building anything, so a bad argument raises
the same ValueError on both (the ParallelLinear rules are in :mod:`ringpar.linear_args`).

Example:
    >>> check_norm_args(8, 1e-5, "features")
    (8, 1e-05)
    >>> check_loss_options(0.1, -100, "sum")
    >>> check_norm_args(8, 1e-5, "rows")
    Traceback (most recent call last):
    ...
    ValueError: sharding='rows': expected one of ('none', 'sequence', 'features')
"""

from __future__ import annotations

import typing as tp

from .matmul_methods import MatrixMultiplyMethod
from .validation import check_choice, positive_int

__all__ = ["SHARDINGS", "REDUCTIONS", "check_norm_args", "check_feature_split",
           "check_vocab_split", "check_loss_options"]

SHARDINGS = ("none", "sequence", "features")  # what a ParallelLayerNorm / RMSNorm may shard
REDUCTIONS = ("mean", "sum", "none")  # the cross-entropy reductions


def check_norm_args(num_features: tp.Any, epsilon: tp.Any, sharding: tp.Any) -> tuple[int, float]:
    """``(num_features, float(epsilon))`` of a norm layer after checking them and ``sharding``."""
    positive_int("num_features", num_features)
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or epsilon < 0:
        raise ValueError(f"epsilon={epsilon!r}: expected a float >= 0")
    check_choice("sharding", sharding, SHARDINGS)
    return num_features, float(epsilon)


def check_feature_split(num_features: int, axis_name: str, axis_size: int) -> None:
    """A feature-sharded norm (``sharding='features'``) splits ``num_features`` over the axis."""
    if num_features % axis_size:
        raise ValueError(f"num_features={num_features}: expected a multiple of the "
                         f"{axis_name!r} axis size {axis_size} (sharding='features')")


def check_vocab_split(num_embeddings: int, method: MatrixMultiplyMethod, axis_name: str,
                      axis_size: int) -> None:
    """A vocab-parallel embedding splits its rows over the axis and has no ring matmul method."""
    if method.is_ring:
        raise ValueError(f"parallel_config.matmul_method={method.value!r}: an embedding lookup "
                         f"has no ring variant; expected None or 'plain'")
    if num_embeddings % axis_size:
        raise ValueError(f"num_embeddings={num_embeddings}: expected a multiple of the "
                         f"{axis_name!r} axis size {axis_size} (vocab-parallel embedding)")


def check_loss_options(label_smoothing: tp.Any, ignore_index: tp.Any, reduction: tp.Any) -> None:
    """The options of a cross-entropy: smoothing in [0, 1], an int ignore index, a reduction."""
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or \
            not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing!r}: expected a float in [0, 1]")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index={ignore_index!r}: expected an int")
    check_choice("reduction", reduction, REDUCTIONS)
