"""Every ```python block of README.md runs, each in a fresh interpreter.

Fresh, because a quick-start sets the device environment before it imports jax / torch_xla, as a
new user's script would. The environment gives 8 virtual CPU devices either way (the blocks call
``ringpar.devices.set_cpu_devices(8)`` themselves too). A block that should not run can be
fenced as ```text instead.

Checked to fail: a block ending in ``assert False`` (``test_runner_reports_a_failing_block``),
and, by hand, quickstart 2 with ``assert losses[2] > losses[0]`` failed with its traceback.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md",)
_BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return [m.group(1) for m in _BLOCK.finditer(text)]


def _cases():
    out = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.exists():
            continue
        for i, code in enumerate(python_blocks(path.read_text())):
            out.append(pytest.param(code, id=f"{doc}#{i + 1}"))
    return out


def run_block(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_quickstarts_exist():
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 3


@pytest.mark.parametrize("code", _cases())
def test_python_block_runs(code):
    res = run_block(code)
    assert res.returncode == 0, f"block failed:\n{code}\n--- stdout\n{res.stdout}\n--- stderr\n" \
                                f"{res.stderr[-4000:]}"


def test_extraction():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python title\ny = 2\n```\n"
    assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_runner_reports_a_failing_block():
    res = run_block("import ringpar\nassert False, 'planted'\n", timeout=60)
    assert res.returncode != 0 and "planted" in res.stderr
