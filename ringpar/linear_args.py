"""Constructor-argument rules of ``ParallelLinear`` shared by both backends (no framework).

``jax_impl.linear`` and ``torch_impl.linear`` check their sizes, scale, tensor-parallel
divisibility and ``TensorParallelConfig`` options here, so both raise the same ValueError for the
same bad argument.

Example:
    >>> resolve_out_features([64, 32, 32])
    ((64, 32, 32), 3, 128)
    >>> resolve_scale("fan_in", in_features=16, out_total=128)
    0.25
    >>> check_tp_sizes("row", "plain", in_features=10, out_features=8, axis_name="tp",
    ...                axis_size=4, reduce_scatter_output=False, layer="RowParallelLinear")
    Traceback (most recent call last):
    ...
    ValueError: in_features=10: expected a multiple of the 'tp' axis size 4 (row-parallel, plain)
"""

from __future__ import annotations

import typing as tp

from .matmul_methods import MatrixMultiplyMethod, resolve_method
from .validation import positive_int

__all__ = ["resolve_out_features", "resolve_scale", "check_tp_sizes", "mesh_request",
           "check_axis_name", "check_reduce_options"]

_SCALE_ERROR = "scale={!r}: expected a float, 'fan_in' or 'fan_out'"


def resolve_out_features(out_features: tp.Any) -> tuple[int | tuple[int, ...], int, int]:
    """(out_features as stored, number of merged projections, total out features).

    ``out_features`` is a positive int, or a non-empty sequence of positive ints (the sizes of
    merged projections, stored as a tuple); anything else raises ValueError.
    """
    if isinstance(out_features, tp.Sequence) and not isinstance(out_features, str):
        if len(out_features) == 0:
            raise ValueError(f"out_features={out_features!r}: expected a positive int or a "
                             f"non-empty sequence of positive ints")
        for f in out_features:
            positive_int("out_features", f)
        out_features = tuple(out_features)
        return out_features, len(out_features), sum(out_features)
    out_features = positive_int("out_features", out_features)
    return out_features, 1, out_features


def resolve_scale(scale: tp.Any, *, in_features: int, out_total: int) -> float:
    """The output multiplier: a number as a float, ``'fan_in'`` -> in_features ** -0.5,
    ``'fan_out'`` -> out_total ** -0.5; anything else (bools included) raises ValueError."""
    if isinstance(scale, str):
        if scale == "fan_in":
            return in_features ** -0.5
        if scale == "fan_out":
            return out_total ** -0.5
        raise ValueError(_SCALE_ERROR.format(scale))
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return float(scale)
    raise ValueError(_SCALE_ERROR.format(scale))


def check_tp_sizes(direction: str, method: MatrixMultiplyMethod | str, *, in_features: int,
                   out_features: int | tuple[int, ...], axis_name: str, axis_size: int,
                   reduce_scatter_output: bool, layer: str) -> None:
    """ValueError unless ``method`` applies to a ``direction``-parallel layer and the dims it
    splits over the tp axis divide by ``axis_size``.

    A row layer (or a ring method) splits the kernel on in_features; a column layer, a
    reduce-scattered output or a ring method splits the output on its last dim. ``layer`` names
    the layer class in the message.
    """
    method = resolve_method(method)
    if direction not in method.directions:
        raise ValueError(
            f"matmul_method={method.value!r} does not apply to a {direction}-parallel "
            f"layer ({layer}): expected one of "
            f"{[m.value for m in MatrixMultiplyMethod if direction in m.directions]}")
    out_total = sum(out_features) if isinstance(out_features, tuple) else out_features
    need_in = direction == "row" or method.is_ring
    need_out = direction == "column" or reduce_scatter_output or method.is_ring
    where = f"({direction}-parallel, {method.value})"
    if need_in and in_features % axis_size:
        raise ValueError(f"in_features={in_features}: expected a multiple of the "
                         f"{axis_name!r} axis size {axis_size} {where}")
    if need_out and out_total % axis_size:
        raise ValueError(f"out_features={out_features!r} (total {out_total}): expected a "
                         f"multiple of the {axis_name!r} axis size {axis_size} {where}")


# ------------------------------------------------------------------- TensorParallelConfig rules
def mesh_request(method: MatrixMultiplyMethod | None, reduce_scatter_output: bool) -> str | None:
    """What asks for a mesh when ``mesh=None`` (the backend then takes its context / global
    mesh): ``"matmul_method='...'"``, ``"reduce_scatter_output=True"``, or None if nothing does
    (an inactive config: a plain Linear).

    >>> mesh_request(None, False) is None, mesh_request(None, True)
    (True, 'reduce_scatter_output=True')
    """
    if method is not None:
        return f"matmul_method={resolve_method(method).value!r}"
    return "reduce_scatter_output=True" if reduce_scatter_output else None


def check_axis_name(axis_name: tp.Any) -> str:
    """``axis_name`` if it is a str (whether the mesh has it is the backend's check)."""
    if not isinstance(axis_name, str):
        raise ValueError(f"axis_name={axis_name!r}: expected a mesh axis name (str)")
    return axis_name


def check_reduce_options(reduce_output: bool, reduce_scatter_output: bool) -> None:
    """ValueError if both are set: the output is either replicated or split on its last dim."""
    if reduce_output and reduce_scatter_output:
        raise ValueError("reduce_output=True with reduce_scatter_output=True: expected at most "
                         "one (a replicated output or one sharded on the out features)")
