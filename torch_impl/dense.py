"""Twins of ``flax.linen.Dense`` and its default kernel initializer, for the torch layers.

torch-only (JAX uses flax's own): :class:`Dense` keeps Flax's parameter names and layout
(``kernel`` ``[in, out]``, ``bias`` ``[out]``), so ``state_dict`` keys and shapes equal the JAX
parameter paths; :func:`lecun_normal` draws like ``flax.linen.initializers.lecun_normal()``.
Also importable from :mod:`torch_impl.tensor_parallel`.

Example::

    dense = Dense(8, 4)                 # kernel [8, 4] drawn by lecun_normal(), bias zeros [4]
    y = dense(torch.randn(2, 8))        # [2, 4]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["Dense", "lecun_normal"]


def lecun_normal() -> Callable:
    """Twin of ``flax.linen.initializers.lecun_normal()``: truncated normal, variance 1/fan_in.

    The returned ``init(generator, shape, dtype=torch.float32)`` treats the second-to-last dim as
    fan-in (a kernel ``[in, out]``), draws from a normal truncated to 2 standard deviations and
    rescales so the variance is ``1 / fan_in``, as JAX's ``variance_scaling(1, 'fan_in',
    'truncated_normal')`` does. ``generator=None`` uses torch's global generator.
    """

    def init(generator: torch.Generator | None, shape: Sequence[int], dtype=torch.float32):
        shape = tuple(shape)
        fan_in = shape[-2] if len(shape) >= 2 else (shape[0] if shape else 1)
        std = math.sqrt(1.0 / max(fan_in, 1)) / 0.87962566103423978
        out = torch.empty(shape, dtype=torch.float32)
        nn.init.trunc_normal_(out, 0.0, std, -2.0 * std, 2.0 * std, generator=generator)
        return out.to(dtype)

    return init


def _zeros(generator, shape, dtype=torch.float32):
    return torch.zeros(tuple(shape), dtype=dtype)


class Dense(nn.Module):
    """Twin of ``flax.linen.Dense``: ``y = x @ kernel + bias`` with ``kernel`` ``[in, out]``.

    Parameters are named and laid out as in Flax (``kernel`` ``[in_features, features]``,
    ``bias`` ``[features]``), unlike ``torch.nn.Linear`` (``weight`` ``[out, in]``). They are
    created on CPU with ``kernel_init(generator, shape, dtype)`` (torch's global generator when
    ``generator`` is None).
    """

    def __init__(self, in_features: int, features: int, use_bias: bool = True,
                 kernel_init: Callable | None = None, bias_init: Callable = _zeros,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("features", features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        self.in_features, self.features, self.use_bias = in_features, features, bool(use_bias)
        kernel_init = lecun_normal() if kernel_init is None else kernel_init
        self.kernel = nn.Parameter(kernel_init(generator, (in_features, features), dtype))
        if self.use_bias:
            self.bias = nn.Parameter(bias_init(generator, (features,), dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.kernel)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, features={self.features}, use_bias={self.use_bias}"
