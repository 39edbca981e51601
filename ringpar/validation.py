"""Input checks shared by both backends: each raises ValueError naming the argument and value.

Example:
    >>> positive_int("features", 8)
    8
    >>> check_choice("mode", "gathr", ("gather", "scatter"))
    Traceback (most recent call last):
    ...
    ValueError: mode='gathr': expected one of ('gather', 'scatter')
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["positive_int", "check_choice", "check_divisible"]


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (bools refused), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (exact match), else ValueError listing them."""
    if value not in tuple(choices):
        raise ValueError(f"{name}={value!r}: expected one of {tuple(choices)}")
    return value


def check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> int:
    """``value`` if ``divisor`` divides it, else ValueError naming both numbers."""
    if value % divisor:
        raise ValueError(f"{name}={value} is not divisible by {divisor_name}={divisor}")
    return value
