"""The backend interface of the parity harness, defined once (imports neither JAX nor torch).

A backend is a module (``parity.jax_backend``, ``parity.torch_backend``) that implements
:class:`Backend`: ``prepare()`` sets its runtime up, ``build(case, data)`` compiles the case's
forward+backward into a :class:`Program`, and ``run(case, data)`` returns a
:class:`BackendResult`: forward outputs, gradients of ``sum(y * cotangent)`` keyed ``x`` and by
parameter path, and the compiled HLO text of the forward+backward program and of the forward
alone (the collectives :mod:`parity.compare` matches).

Dependencies point one way: ``cases``/``hlo`` <- ``backend`` <- {``jax_backend``,
``torch_backend``, ``worker``, ``compare``} <- ``runner`` <- ``cli``. This module finds the backend
modules by name (:data:`BACKEND_MODULES`), so it never imports them.

Example::

    from parity import backend, cases
    b = backend.load_backend("jax")
    case = cases.Case("tpdense", "gather", 4)
    res = backend.run_backend(b, case, cases.make_data(case))
    res.outputs["y"].shape  # (8, 32)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from dataclasses import dataclass, field
from typing import ContextManager, Protocol, runtime_checkable

import numpy as np

from .cases import Case

__all__ = ["BackendResult", "Program", "Backend", "BACKEND_MODULES", "load_backend",
           "run_backend", "setup_devices"]

BACKEND_MODULES = {"jax": "parity.jax_backend", "torch": "parity.torch_backend"}


@dataclass
class BackendResult:
    """What one backend produced for a case (arrays as float32 NumPy)."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    hlo_text: str = ""
    fwd_hlo_text: str = ""
    seconds: float = 0.0
    error: str | None = None


@runtime_checkable
class Program(Protocol):
    """A case's compiled forward+backward on one backend (also what ``bench`` times)."""

    @property
    def hlo_text(self) -> str:
        """Compiled, partitioned HLO text of forward+backward."""

    @property
    def fwd_hlo_text(self) -> str:
        """Compiled, partitioned HLO text of the forward alone."""

    def step(self):
        """Run forward+backward once and wait for the devices."""

    def result(self) -> BackendResult:
        """Run once; outputs, gradients (JAX global layout) and both HLO texts."""


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides (module-level functions)."""

    def prepare(self) -> None:
        """Set the runtime up (before any device array exists); idempotent."""

    def build(self, case: Case, data: dict) -> Program:
        """Compile ``case`` with the weights, input and cotangent in ``data``."""

    def run(self, case: Case, data: dict) -> BackendResult:
        """``build(case, data).result()``."""


def setup_devices(n: int) -> None:
    """Set the environment for ``n`` virtual CPU devices on both backends (before any import)."""
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    if os.environ["PJRT_DEVICE"] == "CPU":
        os.environ["CPU_NUM_DEVICES"] = str(n)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")  # read once by torch_xla


def load_backend(name: str) -> Backend:
    """Import and prepare the backend ``name`` ('jax' or 'torch'; load JAX first when both)."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"backend={name!r}: expected one of {sorted(BACKEND_MODULES)}")
    module = importlib.import_module(BACKEND_MODULES[name])
    module.prepare()
    return module


def run_backend(backend: Backend, case: Case, data: dict,
                patch: ContextManager | None = None) -> BackendResult:
    """``backend.run(case, data)`` timed, with any exception reported in ``error`` (never
    swallowed silently); ``patch`` is entered around the run (planted defects use it).
    Gradients named in ``data["drop_grads"]`` are removed from the result."""
    t0 = time.perf_counter()
    try:
        with patch if patch is not None else contextlib.nullcontext():
            res = backend.run(case, data)
        for k in data.get("drop_grads", {}):
            res.grads.pop(k, None)
    except Exception as exc:  # noqa: BLE001 - the case fails with the message
        res = BackendResult(error=f"{type(exc).__name__}: {exc}")
    res.seconds = time.perf_counter() - t0
    return res
