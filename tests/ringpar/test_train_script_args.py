"""examples/train_gpt.py fails fast: every bad input is an argparse error naming the field, raised
by ``validate`` before jax or torch is imported (so before any compile). Imports neither."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from ringpar import checkpoint, optim
from ringpar.gpt_model_config import init_reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_gpt.py"
SMALL = ["--hidden", "32", "--heads", "4", "--layers", "2", "--seq-len", "16", "--batch", "8"]


def _script():
    name = "train_gpt_under_test"
    if name not in sys.modules:  # registered first: the script defines a dataclass
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        _script().validate(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--mesh", "2,2,2,2"], "--mesh=2,2,2,2: the axis sizes multiply to 16, expected the device "
                            "count 8"),
    (["--mesh", "2,2,x,2"], "--mesh='2,2,x,2': expected four positive ints"),
    (["--mesh", "1,1,1,8"], "num_heads=4 is not divisible by ParallelConfig.model_axis_size=8"),
    (["--mesh", "1,1,8,1"], "num_layers=2 is not divisible by ParallelConfig.pipeline_axis_size=8"),
    (["--mesh", "8,1,1,1", "--batch", "4"], "batch_size=4 is not divisible by data_axis_size"),
    (["--hidden", "30"], "hidden_size=30 is not divisible by num_heads=4"),
    (["--mesh", "1,1,1,8", "--heads", "8", "--hidden", "36"], "hidden_size=36"),
    (["--fsdp-modules", "Block,Blok"], "fsdp_modules=['Block', 'Blok'] names unknown module(s) "
                                       "['Blok']"),
    (["--remat", "Attention"], "remat=['Attention'] names unknown module(s)"),
    (["--steps", "0"], "--steps=0"),
    (["--lr", "-1"], "peak_lr=-1.0"),
    (["--backend", "tf"], "--backend: invalid choice"),
])
def test_bad_input_is_an_argparse_error_naming_the_field(capsys, extra, message):
    argv = ["--backend", "jax", "--steps", "3"] + SMALL + extra
    assert message in _error(capsys, argv)


def _write_checkpoint(path, hidden=32, steps=3):
    script = _script()
    run = script.validate(["--backend", "jax", "--steps", "8", "--mesh", "2,2,1,2"] + SMALL[:1] +
                          [str(hidden)] + SMALL[2:])
    ref = init_reference(run.model.model_config, 0)
    checkpoint.save_checkpoint(path, step=steps, params=ref, opt_state=optim.init_state(ref),
                               model=script.model_fields(run.model),
                               optimizer=dataclasses.asdict(run.optimizer), rng={})


def _digest(path: pathlib.Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


def test_resume_checks_the_checkpoint_and_leaves_it_untouched(tmp_path, capsys):
    ck = tmp_path / "ck"
    _write_checkpoint(ck)
    before = _digest(ck)
    base = ["--backend", "torch", "--mesh", "1,2,2,2", "--steps", "8", "--resume", str(ck)]
    run = _script().validate(base + SMALL)  # another backend and mesh: fine
    assert run.resume.step == 3 and set(run.resume.params) == set(init_reference(
        run.model.model_config, 0))
    err = _error(capsys, base + ["--hidden", "64"] + SMALL[2:])
    assert "model field hidden_size=32 in the checkpoint, but the run has hidden_size=64" in err
    err = _error(capsys, base + SMALL + ["--lr", "0.01"])
    assert "optimizer field peak_lr=0.003 in the checkpoint, but the run has peak_lr=0.01" in err
    err = _error(capsys, base[:-3] + ["2", "--resume", str(ck), "--schedule-steps", "8"] + SMALL)
    assert "--steps=2: the checkpoint is at step 3" in err
    err = _error(capsys, base[:-1] + [str(tmp_path / "nothing")] + SMALL)
    assert "not a directory" in err
    with np.load(ck / "params.npz") as data:  # a checkpoint of the right fields, wrong shapes
        params = {k: data[k] for k in data.files}
    params["wte"] = params["wte"][:, :16]
    np.savez(ck / "params.npz", **params)
    before = _digest(ck)
    err = _error(capsys, base + SMALL)
    assert "checkpoint param 'wte': shape (256, 16), expected (256, 32)" in err
    assert _digest(ck) == before


def test_validation_imports_no_framework(tmp_path):
    """In a fresh process: validating (good and bad inputs) leaves jax and torch unimported."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("tg", {str(SCRIPT)!r})
tg = sys.modules["tg"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(tg)
tg.validate(["--backend", "torch", "--steps", "3"] + {SMALL!r})
try:
    tg.validate(["--backend", "jax", "--steps", "3", "--mesh", "1,1,1,1"] + {SMALL!r})
except SystemExit as e:
    assert e.code == 2
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "torch", "flax", "optax"))
print("FRAMEWORKS", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert "FRAMEWORKS []" in out.stdout, out.stdout + out.stderr
    assert "multiply to 1, expected the device count 8" in out.stderr
