"""Which dimension of a parameter FSDP shards, and which module names a config may list.

Framework-neutral (imports neither JAX nor PyTorch): ``jax_impl.data_parallel`` and
``torch_impl.data_parallel`` both call :func:`fsdp_shard_dim`, so the two backends shard every
parameter on the same dimension.

The rule (the semantics of xlstm-jax ``shard_params``):

- a parameter with ``size <= min_weight_size`` elements stays replicated;
- a parameter already partitioned over the FSDP axis is left as it is;
- otherwise it is sharded on its largest dimension that (a) is not already partitioned over
  another mesh axis and (b) is divisible by the FSDP axis size; ties go to the LAST such
  dimension (xlstm-jax walks the dims by ``argsort(shape)[::-1]``);
- if no dimension qualifies (the axis size divides nothing free), it stays replicated.

Example:
    >>> fsdp_shard_dim((64, 256), axis_size=4, min_weight_size=0)
    1
    >>> fsdp_shard_dim((4, 64, 256), 4, 0, names=("tp", None, None))  # dim 0 taken by tp
    2
    >>> fsdp_shard_dim((6, 10), 4, 0) is None  # 4 divides neither dim: replicated
    True
    >>> fsdp_shard_dim((64, 256), 4, min_weight_size=2**18) is None  # too small
    True
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

__all__ = ["fsdp_shard_dim", "sharded_names", "check_module_names", "check_module_name"]


def fsdp_shard_dim(shape: Sequence[int], axis_size: int, min_weight_size: int,
                   names: Sequence[Any] | None = None, axis_name: str | None = None) -> int | None:
    """Dimension of a parameter of ``shape`` to shard over an FSDP axis of ``axis_size``, or None.

    Args:
        shape: The parameter's shape as the sharding code sees it (per device in JAX, global in
            torch: the same numbers, because FSDP shards a dim no other axis shards).
        axis_size: Size of the FSDP axis (>= 1; size 1 still picks a dim, as xlstm-jax does).
        min_weight_size: Parameters with at most this many elements stay replicated.
        names: Partition names per dim (None = free), e.g. ``("tp", None, None)``; a dim with a
            name is never chosen. Default: all free.
        axis_name: The FSDP axis name; if it already appears in ``names``, returns None (the
            parameter is already sharded and is left unchanged).

    Returns:
        The dim index, or None when the parameter stays replicated (too small, already sharded,
        or no free dim divisible by ``axis_size``).
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(axis_size, bool) or not isinstance(axis_size, int) or axis_size < 1:
        raise ValueError(f"axis_size={axis_size!r}: expected a positive int")
    if isinstance(min_weight_size, bool) or not isinstance(min_weight_size, int):
        raise ValueError(f"min_weight_size={min_weight_size!r}: expected an int")
    names = tuple(names) if names is not None else (None,) * len(shape)
    if len(names) != len(shape):
        raise ValueError(f"names={names!r} has {len(names)} entries for a parameter of shape "
                         f"{shape}")
    if axis_name is not None and axis_name in names:
        return None
    if math.prod(shape) <= min_weight_size:
        return None
    free = [i for i in range(len(shape)) if names[i] is None and shape[i] % axis_size == 0]
    if not free:
        return None
    # Largest size first; among equal sizes the highest index (reversed stable argsort).
    return max(free, key=lambda i: (shape[i], i))


def sharded_names(names: Sequence[Any] | None, ndim: int, dim: int, axis_name: str) -> tuple:
    """``names`` (default all None) with ``axis_name`` placed at ``dim``: the new partition spec."""
    names = tuple(names) if names is not None else (None,) * ndim
    return names[:dim] + (axis_name,) + names[dim + 1:]


def check_module_name(name: Any) -> str:
    """``name`` if it is a non-empty str (the argument ``name`` of ``prepare_module``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a non-empty module name string")
    return name


def check_module_names(config: Any, known_names: Collection[str]) -> None:
    """ValueError if ``config.fsdp_modules`` or ``config.remat`` has a name not in ``known_names``.

    A model calls this once, before building (so before any compile), with the names it passes
    to ``prepare_module``. The message names the field, the unknown names and the known ones.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> check_module_names(NS(fsdp_modules=["Block"], remat=[]), {"Block", "Embed"})
        >>> check_module_names(NS(fsdp_modules=["Blok"], remat=[]), {"Block"})
        Traceback (most recent call last):
        ...
        ValueError: ParallelConfig.fsdp_modules=['Blok'] names unknown module(s) ['Blok']: ...
    """
    known = sorted(set(known_names))
    for field in ("fsdp_modules", "remat"):
        value = getattr(config, field, None)
        if value is None:
            continue
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
            raise ValueError(f"ParallelConfig.{field}={value!r}: expected a list of module names")
        unknown = sorted({v for v in value if v not in known}, key=str)
        if unknown:
            raise ValueError(f"ParallelConfig.{field}={list(value)!r} names unknown module(s) "
                             f"{unknown}: expected names from {known}")
