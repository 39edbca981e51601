"""The environment for N virtual CPU devices on both runtimes, set before either is imported.

JAX reads ``XLA_FLAGS=--xla_force_host_platform_device_count=N``; torch_xla reads
``PJRT_DEVICE=CPU`` and ``CPU_NUM_DEVICES=N``. Both read them once, at start-up, so call
:func:`set_cpu_devices` before ``import jax`` / ``import torch_xla``.

Example:
    >>> import os
    >>> set_cpu_devices(8)
    >>> os.environ["CPU_NUM_DEVICES"]
    '8'
"""

from __future__ import annotations

import os

from .validation import positive_int

__all__ = ["set_cpu_devices"]

_COUNT_FLAG = "--xla_force_host_platform_device_count="


def set_cpu_devices(n: int, *, dump_post_optimizations: bool = True) -> None:
    """Set the environment so JAX and torch_xla each see ``n`` virtual CPU devices.

    Replaces any device-count flag already in ``XLA_FLAGS`` and keeps the other flags. A
    ``PJRT_DEVICE`` other than CPU (a TPU host) is left alone. ``dump_post_optimizations`` sets
    ``XLA_DUMP_POST_OPTIMIZATIONS=1``, which torch_xla reads once per process: with it the HLO it
    returns is the compiled, partitioned program (the collectives ringpar compares).
    """
    positive_int("n", n)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_COUNT_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"{_COUNT_FLAG}{n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if os.environ["PJRT_DEVICE"] == "CPU":
        os.environ["CPU_NUM_DEVICES"] = str(n)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if dump_post_optimizations:
        os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")
