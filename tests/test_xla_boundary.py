"""torch_xla sits behind one boundary module: only ``torch_impl/xla.py`` may touch torch_xla.

A source scan (no import, no torch needed): every ``torch_impl`` file is parsed and any
``import torch_xla...`` / ``from torch_xla... import`` / ``importlib.import_module("torch_xla...")``
or use of the ``torch.ops.xla`` op namespace (registered by torch_xla) outside ``xla.py`` is
reported with its file and line.

How the check was shown to fail: ``test_scan_reports_a_planted_import`` runs the same scanner on
a scratch package with one violation of each kind and asserts that each is reported; while
torch_impl/linear.py still imported torch_xla (2026-12-03), ``test_only_xla_py_touches_torch_xla``
failed listing ``torch_impl/linear.py:...`` lines.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUNDARY = "xla.py"


def _is_torch_xla(name: str | None) -> bool:
    return bool(name) and (name == "torch_xla" or name.startswith("torch_xla."))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def torch_xla_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for every torch_xla import or ``torch.ops.xla`` use in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if _is_torch_xla(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_torch_xla(node.module):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and _dotted(node.func).endswith("import_module"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                    _is_torch_xla(arg.value):
                found.append((node.lineno, f"import_module({arg.value!r})"))
        elif isinstance(node, ast.Attribute) and _dotted(node) == "torch.ops.xla":
            found.append((node.lineno, "torch.ops.xla"))
    return sorted(found)


def scan(package: pathlib.Path, boundary: str = BOUNDARY) -> list[str]:
    """``file:line: what`` for every torch_xla use in ``package`` outside ``boundary``."""
    out = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).as_posix() == boundary:
            continue
        for line, what in torch_xla_uses(path.read_text()):
            out.append(f"{path.relative_to(package.parent).as_posix()}:{line}: {what}")
    return out


def test_only_xla_py_touches_torch_xla():
    bad = scan(ROOT / "torch_impl")
    assert not bad, "torch_xla used outside torch_impl/xla.py:\n" + "\n".join(bad)


def test_the_boundary_module_is_where_torch_xla_is_used():
    """The scan looks at the right things: xla.py itself has imports of both kinds it finds
    (its ``torch.ops.xla`` detection is checked on the planted file below: xla.py no longer calls
    torch_xla's ops, see ``xla._sharded_copy``)."""
    uses = torch_xla_uses((ROOT / "torch_impl" / BOUNDARY).read_text())
    assert any(w.startswith("import torch_xla") for _, w in uses)
    assert any(w.startswith("from torch_xla") for _, w in uses)


def test_scan_reports_a_planted_import(tmp_path):
    pkg = tmp_path / "torch_impl"
    pkg.mkdir()
    (pkg / "xla.py").write_text("import torch_xla\n")
    (pkg / "clean.py").write_text("import torch\nimport torch_xla_not_it\nx = torch.ops.aten\n")
    (pkg / "bad.py").write_text(
        "import torch\n"
        "def f():\n"
        "    import torch_xla.runtime as xr\n"
        "    from torch_xla.distributed import spmd\n"
        "    importlib.import_module('torch_xla.core.xla_model')\n"
        "    return torch.ops.xla.aot_mark_sharding\n")
    assert scan(pkg) == [
        "torch_impl/bad.py:3: import torch_xla.runtime",
        "torch_impl/bad.py:4: from torch_xla.distributed import ...",
        "torch_impl/bad.py:5: import_module('torch_xla.core.xla_model')",
        "torch_impl/bad.py:6: torch.ops.xla",
    ]


@pytest.mark.parametrize("source", ["import torch_xla as tx\n", "from torch_xla import runtime\n"])
def test_scan_one_line(source):
    assert len(torch_xla_uses(source)) == 1
