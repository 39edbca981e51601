"""Ring arithmetic shared by both backends: which device sends to which on a ring of n.

``jax.lax.ppermute`` takes these pairs directly; the torch stacked view's one-permute shift is
checked against them by the parity harness (the compiled ``source_target_pairs``).

Example:
    >>> ring_perm(3, shift_up=False)
    [(1, 0), (2, 1), (0, 2)]
"""

from __future__ import annotations

__all__ = ["ring_perm"]


def ring_perm(n: int, shift_up: bool = True) -> list[tuple[int, int]]:
    """The ``(source, target)`` pairs of a cyclic shift on a ring of ``n`` devices.

    ``shift_up``: device j sends to j+1 (mod n), so afterwards device j holds what j-1 had;
    otherwise j sends to j-1. ``n == 1`` gives ``[(0, 0)]``, which XLA drops.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: expected a positive int (the ring size)")
    if shift_up:
        return [(j, (j + 1) % n) for j in range(n)]
    return [((j + 1) % n, j) for j in range(n)]
