"""Fresh random numbers on every step of a ``torch_xla`` scan loop (dropout in the pipeline).

Measured with torch_xla 2.9 under SPMD: inside ``torch_xla.experimental.scan`` every random op
(dropout's ``bernoulli``) draws the SAME numbers on every iteration: scan's own per-iteration
seeding does not recognise the SPMD rng seed. JAX's pipeline splits its ``dropout`` rng per step.
To match that, the pipeline passes one int64 seed per step through the loop (a scan input) and
runs each step's stage under :class:`StepRandomness`, a dispatch mode that computes every
``bernoulli`` from a counter-based hash of (that seed, the call's ordinal in the step, the element
index). The mode sits below ``vmap`` in the dispatcher, so it sees the physical tensor with the
stacked stage and data-shard dims: each stage, data shard, micro-batch and step gets its own mask.

Other random ops (``rand``, ``randn``, ``normal_``, ...) would silently repeat, so the mode refuses
them with a ValueError that names the op.

Example::

    seeds = step_seeds(steps, device)               # outside the loop: [steps] int64
    def body(carry, seed):
        with StepRandomness(seed):
            h = stage(carry)                        # nn.Dropout draws fresh masks per step
        ...
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["step_seeds", "hash_uniform", "StepRandomness"]

_MASK = 0xFFFFFFFF
_SEED_MAX = 2 ** 31 - 1


def step_seeds(steps: int, device) -> torch.Tensor:
    """``[steps]`` int64 seeds drawn from the device's generator (advances it like dropout)."""
    return torch.randint(0, _SEED_MAX, (steps,), dtype=torch.int64, device=device)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 values in [0, 2**32) (products wrap, masked back)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def hash_uniform(seed: torch.Tensor, shape, call: int, dtype=torch.float32) -> torch.Tensor:
    """Uniform [0, 1) numbers of ``shape``: a hash of (``seed``, ``call``, element index)."""
    n = 1
    for s in shape:
        n *= int(s)
    idx = torch.arange(n, dtype=torch.int64, device=seed.device)
    key = _mix((seed.to(torch.int64) * 0x632BE5AB + call * 0x9E3779B1 + 0x7F4A7C15) & _MASK)
    bits = _mix((idx * 0x9E3779B1 + key) & _MASK)
    # The top 24 bits: exactly representable in float32.
    return ((bits >> 8).to(torch.float32) * (1.0 / (1 << 24))).to(dtype).reshape(tuple(shape))


class StepRandomness(TorchDispatchMode):
    """Within the ``with`` block, ``bernoulli`` draws from ``seed``; other random ops raise.

    Args:
        seed: int64 scalar tensor, the seed of this step (traced: a scan input).
    """

    def __init__(self, seed: torch.Tensor):
        super().__init__()
        self.seed = seed
        self.calls = 0  # distinct masks for several dropout layers in one step

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        if func.overloadpacket is torch.ops.aten.bernoulli and func._overloadname in ("p",
                                                                                      "default"):
            x = args[0]
            p = kwargs.get("p", args[1] if len(args) > 1 else None)
            if func._overloadname == "default":  # bernoulli(probabilities)
                p = x
            self.calls += 1
            u = hash_uniform(self.seed, x.shape, self.calls, torch.float32)
            p = p.to(torch.float32) if isinstance(p, torch.Tensor) else float(p)
            return (u < p).to(x.dtype)
        if func.overloadpacket is torch.ops.aten.bernoulli_:  # (self, p): in place
            x, p = args[0], kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            self.calls += 1
            u = hash_uniform(self.seed, x.shape, self.calls, torch.float32)
            p = p.to(torch.float32) if isinstance(p, torch.Tensor) else float(p)
            return x.copy_((u < p).to(x.dtype))
        if func is torch.ops.aten.native_dropout.default:  # (input, p, train) -> (out, mask)
            x, p, train = args[0], float(args[1]), args[2]
            if not train or p == 0.0:
                return x.clone(), torch.ones_like(x, dtype=torch.bool)
            self.calls += 1
            keep = hash_uniform(self.seed, x.shape, self.calls, torch.float32) >= p
            return x * keep.to(x.dtype) * (1.0 / (1.0 - p)), keep
        raise ValueError(
            f"random op {func} inside the scan pipeline: it would draw the same numbers on every "
            f"step (torch_xla scan); only dropout / bernoulli is supported there, or use "
            f"loop='unrolled'")
