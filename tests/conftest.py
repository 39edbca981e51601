"""Test configuration: 8 virtual CPU devices for JAX and torch_xla, mesh fixtures.

The environment is set here, before any test module imports jax or torch_xla. Tests under
tests/jax get the ``jax`` marker, tests/torch the ``torch`` marker and tests/parity the ``parity``
marker, so ``pytest -m jax`` / ``-m torch`` run one backend and plain ``pytest`` runs all.
"""

from __future__ import annotations

import os
import pathlib

import pytest

NUM_DEVICES = 8
AXIS_SIZES = (1, 2, 4, 8)

_flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["PJRT_DEVICE"] = "CPU"
os.environ["CPU_NUM_DEVICES"] = str(NUM_DEVICES)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# torch_xla reads this once per process; with it, torch_impl.mesh.compiled_hlo returns the
# compiled, SPMD-partitioned program (the collectives the tests compare).
os.environ.setdefault("XLA_DUMP_POST_OPTIMIZATIONS", "1")

_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = pathlib.Path(str(item.fspath)).relative_to(_HERE).parts
        if parts and parts[0] in ("jax", "torch", "parity"):
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(params=AXIS_SIZES, ids=lambda n: f"n{n}")
def axis_size(request) -> int:
    """Model-axis size under test: 1, 2, 4 and 8."""
    return request.param


# ----------------------------------------------------------------------------------------- JAX
@pytest.fixture(scope="session")
def jax_devices():
    import jax

    devices = jax.devices()
    if len(devices) != NUM_DEVICES:
        raise RuntimeError(f"expected {NUM_DEVICES} JAX CPU devices, got {len(devices)}: jax was "
                           f"imported before tests/conftest.py set XLA_FLAGS")
    return devices


@pytest.fixture
def make_jax_mesh(jax_devices):
    """Factory: ``make_jax_mesh(model_axis_size=n, ...)`` -> jax Mesh over all 8 devices."""
    from jax_impl.configs import ParallelConfig
    from jax_impl.mesh import create_mesh

    def make(**sizes):
        return create_mesh(ParallelConfig(**sizes), jax_devices)

    return make


@pytest.fixture
def jax_mesh(make_jax_mesh, axis_size):
    """Mesh (dp, fsdp, pp, tp) = (8/n, 1, 1, n) for n in AXIS_SIZES."""
    return make_jax_mesh(model_axis_size=axis_size)


# ----------------------------------------------------------------------------------- torch_xla
@pytest.fixture(scope="session")
def xla_device():
    """Enable torch_xla SPMD (once per process) and return the XLA device."""
    try:  # docs/design.md: jax imported first when both runtimes share a process
        import jax  # noqa: F401
    except ImportError:
        pass
    import torch_xla
    import torch_xla.runtime as xr

    if not xr.is_spmd():
        xr.use_spmd()
    if xr.global_runtime_device_count() != NUM_DEVICES:
        raise RuntimeError(f"expected {NUM_DEVICES} torch_xla CPU devices, got "
                           f"{xr.global_runtime_device_count()}")
    return torch_xla.device()


@pytest.fixture
def make_torch_mesh(xla_device):
    """Factory: ``make_torch_mesh(model_axis_size=n, ...)`` -> torch_xla Mesh over all devices."""
    from torch_impl.configs import ParallelConfig
    from torch_impl.mesh import create_mesh

    def make(**sizes):
        return create_mesh(ParallelConfig(**sizes))

    return make


@pytest.fixture
def torch_mesh(make_torch_mesh, axis_size):
    """torch_xla twin of ``jax_mesh``: (dp, fsdp, pp, tp) = (8/n, 1, 1, n)."""
    return make_torch_mesh(model_axis_size=axis_size)
