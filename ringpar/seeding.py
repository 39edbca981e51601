"""Seeds: one rule for what a layer's ``seed`` argument accepts, on both backends.

A torch layer takes ``seed: int | None`` where JAX takes an rng key; ``None`` means "draw one from
the framework's global generator", which the backend passes in as ``draw``.

Example:
    >>> resolve_seed(7, draw=lambda: 0)
    7
    >>> resolve_seed(None, draw=lambda: 123)
    123
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["check_seed", "resolve_seed", "fold_in"]

_MASK64 = (1 << 64) - 1


def check_seed(seed: Any) -> int | None:
    """``seed`` if it is an int (bools refused) or None, else ValueError."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r}: expected an int or None")
    return seed


def resolve_seed(seed: Any, draw: Callable[[], int]) -> int:
    """``seed`` checked, or ``draw()`` when it is None."""
    seed = check_seed(seed)
    return int(draw()) if seed is None else seed


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def fold_in(seed: int, index: int) -> int:
    """A new 63-bit seed from ``seed`` and ``index`` (deterministic, well mixed: splitmix64).

    The torch backend's counterpart of ``jax.random.fold_in`` for integer seeds.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: expected an int")
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) >> 1
