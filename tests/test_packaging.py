"""Packaging: the wheel's layout and extras, and the import boundaries between the rooms.

Rooms (docs/design.md): ``ringpar`` (framework-neutral) <- ``jax_impl`` | ``torch_impl``. Each
boundary is checked in a fresh interpreter two ways: with the forbidden frameworks blocked (as if
not installed: the package must still import) and with them installed but watched (importing
every module must not load them, not even behind a try/except).

How the checks were shown to fail (kept as tests, so they stay able to fail):
``test_boundary_check_fails_on_a_planted_import`` copies the three packages to a scratch
directory, plants one module with a forbidden import in each package in turn (``import torch``
in ringpar and jax_impl, ``import jax`` in torch_impl) and asserts that both checks fail and name
the leaked framework. Also by hand (2026-12-03), in a scratch copy: ``import torch`` appended to
ringpar/validation.py made the watch check exit 1 with ``LEAKED [..., 'torch', ...] by
ringpar.data`` (the first module that imports validation).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: with mode "block", makes the blocked frameworks un-importable (as
# if not installed); with mode "watch", leaves them importable. Then imports every module of one
# package (subpackages included) and fails if a blocked framework got imported anyway.
_ISOLATION = r"""
import importlib, importlib.abc, pathlib, pkgutil, sys
package, blocked, mode = sys.argv[1], tuple(sys.argv[2].split(",")), sys.argv[3]

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is blocked in this test (not installed)")
        return None

if mode == "block":
    sys.meta_path.insert(0, Block())
pkg = importlib.import_module(package)
names = [package] + [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".")]
def leaked():
    return sorted(m for m in sys.modules if m.split(".")[0] in blocked)

print("imported", names)
for name in names:  # sorted: a planted "_..." module comes right after the package itself
    importlib.import_module(name)
    if leaked():  # stop at the first module that loads a blocked framework, and name it
        print("LEAKED", leaked(), "by", name)
        sys.exit(1)
"""


# package -> (frameworks it must not load, a module that proves the package was really imported)
BOUNDARIES = {
    "ringpar": ("jax,jaxlib,flax,torch,torch_xla", "ringpar.configs"),
    "jax_impl": ("torch,torch_xla", "jax_impl.mesh"),
    "torch_impl": ("jax,jaxlib,flax", "torch_impl.mesh"),
}


def _check_imports(package: str, blocked: str, mode: str, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", _ISOLATION, package, blocked, mode], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(cwd)})


@pytest.mark.parametrize("package", list(BOUNDARIES))
def test_package_imports_without_the_forbidden_frameworks(package):
    """Every module of ``package`` imports with the forbidden frameworks not installed."""
    blocked, probe = BOUNDARIES[package]
    res = _check_imports(package, blocked, "block")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"'{probe}'" in res.stdout  # the package's modules really were imported


@pytest.mark.parametrize("package", list(BOUNDARIES))
def test_package_loads_no_forbidden_framework(package):
    """With every framework installed, importing all of ``package`` loads none it must not."""
    blocked, probe = BOUNDARIES[package]
    res = _check_imports(package, blocked, "watch")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"'{probe}'" in res.stdout


def test_isolation_check_can_fail():
    """The checker itself reports a leak: jax_impl.mesh needs jax, so blocking jax must fail."""
    res = _check_imports("jax_impl", "jax", "block")
    assert res.returncode != 0


@pytest.mark.parametrize("package, planted", [
    ("ringpar", "torch"), ("jax_impl", "torch"), ("torch_impl", "jax")])
def test_boundary_check_fails_on_a_planted_import(tmp_path, package, planted):
    """Break the rule on purpose in a scratch copy: both checks must fail and name the leak."""
    for name in BOUNDARIES:
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / package / "_planted_violation.py").write_text(f"import {planted}\n")
    blocked = BOUNDARIES[package][0]
    for mode, needle in (("watch", "LEAKED"), ("block", "blocked in this test")):
        res = _check_imports(package, blocked, mode, cwd=tmp_path)
        assert res.returncode != 0, (mode, res.stdout + res.stderr)
        assert needle in res.stdout + res.stderr and planted in res.stdout + res.stderr


def test_wheel_layout_and_extras(tmp_path):
    uv = shutil.which("uv") or str(pathlib.Path(sys.executable).parent / "uv")
    res = subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = tmp_path.glob("ringpar-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ringpar", "jax_impl", "torch_impl", "parity"}
    for module in ("ringpar/configs.py", "ringpar/convert.py", "jax_impl/configs.py", "jax_impl/mesh.py", "torch_impl/mesh.py",
                   "parity/hlo.py", "parity/__main__.py"):
        assert module in names
    assert not any(n.startswith("tests/") for n in names)
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    extras = {line.split(": ", 1)[1] for line in metadata.splitlines()
              if line.startswith("Provides-Extra:")}
    assert extras == {"jax", "torch", "test", "all"}

    def reqs(extra):
        return {line.split(":", 1)[1].split(";")[0].strip().replace(" ", "")
                for line in requires if f'extra == "{extra}"' in line}

    assert reqs("jax") == {"jax==0.10.2", "jaxlib==0.10.2", "flax<0.13,>=0.12"}
    assert reqs("torch") == {"torch==2.9.0", "torch_xla==2.9.0"}


def test_lock_pins_the_measured_versions():
    lock = (ROOT / "ci" / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lock if "==" in line and not line.startswith(" "))
    assert pins["jax"] == pins["jaxlib"] == "0.10.2"
    assert pins["flax"].startswith("0.12.")
    assert pins["torch"] == "2.9.0" and pins["torch-xla"] == "2.9.0"
