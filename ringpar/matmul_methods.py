"""Framework-neutral matmul-method table of the ParallelLinear family (imports neither JAX nor
torch): ``jax_impl.linear`` and ``torch_impl.linear`` share this one enum, so a method value means
the same communication on both backends.
"""

from __future__ import annotations

import enum
import typing as tp

__all__ = ["MatrixMultiplyMethod", "resolve_method"]


@enum.unique
class MatrixMultiplyMethod(str, enum.Enum):
    """How a tensor-parallel matmul communicates (table: the jax_impl.linear docstring)."""

    PLAIN = "plain"
    """Plain XLA collectives: all_gather (column), psum / psum_scatter (row). Both directions."""
    ALL_GATHER = "all_gather_matmul"
    """Column only: ring all-gather of the input features overlapped with partial matmuls."""
    ALL_GATHER_BIDIRECTIONAL = "all_gather_matmul_bidirectional"
    """Column only: as ALL_GATHER with chunks sent both ways round the ring."""
    REDUCE_SCATTER = "reduce_scatter_matmul"
    """Row only: ring reduce-scatter of the output overlapped with partial matmuls."""
    REDUCE_SCATTER_BIDIRECTIONAL = "reduce_scatter_matmul_bidirectional"
    """Row only: as REDUCE_SCATTER with one accumulator going each way round the ring."""

    @property
    def directions(self) -> tuple[str, ...]:
        """Layer directions ('column', 'row') the method applies to."""
        return _METHOD_DIRECTIONS[self]

    @property
    def bidirectional(self) -> bool:
        """Whether the ring runs both ways."""
        return self in (MatrixMultiplyMethod.ALL_GATHER_BIDIRECTIONAL,
                        MatrixMultiplyMethod.REDUCE_SCATTER_BIDIRECTIONAL)

    @property
    def is_ring(self) -> bool:
        """Whether the method is a ring collective matmul (ppermutes) rather than PLAIN."""
        return self is not MatrixMultiplyMethod.PLAIN


_METHOD_DIRECTIONS = {
    MatrixMultiplyMethod.PLAIN: ("column", "row"),
    MatrixMultiplyMethod.ALL_GATHER: ("column",),
    MatrixMultiplyMethod.ALL_GATHER_BIDIRECTIONAL: ("column",),
    MatrixMultiplyMethod.REDUCE_SCATTER: ("row",),
    MatrixMultiplyMethod.REDUCE_SCATTER_BIDIRECTIONAL: ("row",),
}


def resolve_method(method: tp.Any) -> MatrixMultiplyMethod | None:
    """None, a MatrixMultiplyMethod, or its value/name as a string (any case) -> enum or None."""
    if method is None or isinstance(method, MatrixMultiplyMethod):
        return method
    if isinstance(method, str):
        key = method.strip().lower()
        for m in MatrixMultiplyMethod:
            if key in (m.value, m.name.lower()):
                return m
    raise ValueError(f"matmul_method={method!r}: expected None, a MatrixMultiplyMethod or one of "
                     f"{[m.value for m in MatrixMultiplyMethod]}")
