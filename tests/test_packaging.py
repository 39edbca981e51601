"""Packaging: the wheel's layout and extras, and import isolation between the two backends."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: makes the blocked frameworks un-importable (as if not installed),
# imports every module of one package, and fails if a blocked framework got imported anyway.
_ISOLATION = r"""
import importlib, importlib.abc, pathlib, pkgutil, sys
package, blocked = sys.argv[1], tuple(sys.argv[2].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is blocked in this test (not installed)")
        return None

sys.meta_path.insert(0, Block())
pkg = importlib.import_module(package)
names = [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
print("imported", names)
if leaked:
    print("LEAKED", leaked)
    sys.exit(1)
"""


@pytest.mark.parametrize("package, blocked", [
    ("jax_impl", "torch,torch_xla"),
    ("torch_impl", "jax,jaxlib,flax"),
])
def test_backend_imports_without_the_other_framework(package, blocked):
    res = subprocess.run([sys.executable, "-c", _ISOLATION, package, blocked], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"'{package}.mesh'" in res.stdout  # the backend's modules really were imported


def test_isolation_check_can_fail():
    """The checker itself reports a leak: jax_impl.mesh needs jax, so blocking jax must fail."""
    res = subprocess.run([sys.executable, "-c", _ISOLATION, "jax_impl", "jax"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0


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
    assert top == {"jax_impl", "torch_impl", "parity"}
    for module in ("jax_impl/configs.py", "jax_impl/mesh.py", "torch_impl/mesh.py",
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
