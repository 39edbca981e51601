"""Training checkpoints in a neutral format: either backend writes them, either reads them back.

A checkpoint is a directory:

- ``params.npz``: ``{path: global parameter}`` (gathered, the same names on both backends),
- ``optimizer.npz``: the neutral optimizer state of :mod:`ringpar.optim` (``step``, ``mu.*``,
  ``nu.*``),
- ``meta.json``: ``{"format", "step", "model": {...}, "optimizer": {...}, "rng": {...},
  "info": {...}}``: the model config that fixes the parameter shapes, the optimizer's
  hyperparameters, the data sampler's generator state, and free-form information (backend, mesh,
  corpus digest, ...).

Nothing in it depends on the mesh, so a run saved on one backend and mesh resumes on the other
backend and any mesh the model allows.

Saving is atomic: everything is written to a temporary sibling directory which then replaces
``directory`` by renames, so a crash leaves either the old or the new checkpoint, never a mix.
Loading only reads: a resume that fails validation (:func:`load_checkpoint` raises ValueError
naming the mismatched field) leaves the directory untouched.

Example:
    >>> import tempfile, numpy as np
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> save_checkpoint(d, step=3, params={"w": np.ones(2, np.float32)},
    ...                 opt_state={"step": np.asarray(3)}, model={"hidden_size": 8}, rng={})
    >>> ckpt = load_checkpoint(d, model={"hidden_size": 8})
    >>> ckpt.step, ckpt.params["w"].tolist()
    (3, [1.0, 1.0])
    >>> load_checkpoint(d, model={"hidden_size": 16})
    Traceback (most recent call last):
    ...
    ValueError: checkpoint ...: model field hidden_size=8 in the checkpoint, but the run has ...=16
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import typing as tp

import numpy as np

__all__ = ["FORMAT", "Checkpoint", "save_checkpoint", "load_checkpoint", "check_param_shapes",
           "map_moments"]

FORMAT = "ringpar-checkpoint-v1"
_FILES = ("params.npz", "optimizer.npz", "meta.json")


@dataclasses.dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    step: int
    params: dict[str, np.ndarray]
    opt_state: dict[str, np.ndarray]
    model: dict
    optimizer: dict
    rng: dict
    info: dict


def save_checkpoint(directory, *, step: int, params: tp.Mapping[str, tp.Any],
                    opt_state: tp.Mapping[str, tp.Any], model: dict, rng: dict,
                    optimizer: dict | None = None, info: dict | None = None) -> None:
    """Write a checkpoint to ``directory`` atomically (replacing one that is there).

    Args:
        directory: Target directory (created with its parents).
        step: Training steps completed.
        params: ``{path: array}`` of global (gathered) parameters, numpy-convertible.
        opt_state: The neutral optimizer state.
        model: JSON data of the model config (what fixes the parameter shapes).
        rng: JSON data of the random state (the batch sampler's generator).
        optimizer: JSON data of the optimizer's hyperparameters (checked on resume).
        info: Other JSON data (backend, mesh, corpus digest, ...).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: expected an int >= 0")
    target = pathlib.Path(directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"directory={str(target)!r}: exists and is not a directory")
    meta = {"format": FORMAT, "step": step, "model": model, "optimizer": optimizer or {},
            "rng": rng, "info": info or {}}
    text = json.dumps(meta, indent=1, sort_keys=True)  # fails before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        np.savez(tmp / "params.npz", **{k: np.asarray(v) for k, v in params.items()})
        np.savez(tmp / "optimizer.npz", **{k: np.asarray(v) for k, v in opt_state.items()})
        (tmp / "meta.json").write_text(text)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: pathlib.Path, target: pathlib.Path) -> None:
    """Put ``new`` at ``target``: rename any old one aside, rename ``new`` in, delete the old.

    (Linux cannot rename a directory over a non-empty one, hence the two renames.)
    """
    old = None
    if target.exists():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory, *, model: dict | None = None,
                    optimizer: dict | None = None) -> Checkpoint:
    """Read a checkpoint (read-only) and check it belongs to a run of ``model``.

    Args:
        directory: A directory written by :func:`save_checkpoint`.
        model: The current run's model config (JSON data); every field must equal the saved one.
        optimizer: The current run's optimizer hyperparameters (JSON data), checked the same way.

    Raises:
        ValueError: naming the directory and the missing file or the mismatched model field.
    """
    path = pathlib.Path(directory)
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r}: not a directory")
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r}: missing {missing}")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint {str(path)!r}: meta.json is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r}: format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    for section, current in (("model", model), ("optimizer", optimizer)):
        if current is not None:
            _check_section(path, section, meta.get(section) or {}, current)
    with np.load(path / "params.npz") as data:
        params = {k: data[k] for k in data.files}
    with np.load(path / "optimizer.npz") as data:
        opt_state = {k: data[k] for k in data.files}
    return Checkpoint(step=int(meta["step"]), params=params, opt_state=opt_state,
                      model=meta.get("model") or {}, optimizer=meta.get("optimizer") or {},
                      rng=meta.get("rng") or {},
                      info=meta.get("info") or {})


def _check_section(path: pathlib.Path, section: str, saved: dict, current: dict) -> None:
    """ValueError listing every field of ``section`` that differs (the run's field order)."""
    diffs = []
    for key in list(current) + [k for k in saved if k not in current]:
        if key not in saved or key not in current or saved[key] != current[key]:
            have = f"{key}={saved[key]!r}" if key in saved else f"no {key}"
            want = f"{key}={current[key]!r}" if key in current else f"no {key}"
            diffs.append(f"{section} field {have} in the checkpoint, but the run has {want}")
    if diffs:
        raise ValueError(f"checkpoint {str(path)!r}: " + "; ".join(diffs))


def check_param_shapes(params: tp.Mapping[str, np.ndarray],
                       shapes: tp.Mapping[str, tuple]) -> None:
    """ValueError naming the path unless ``params`` has exactly the keys and shapes of
    ``shapes`` ({path: shape}, e.g. from ``ringpar.gpt_config.gpt_param_shapes``)."""
    missing, unexpected = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"checkpoint params: missing {missing}, unexpected {unexpected}")
    for key, shape in shapes.items():
        if tuple(np.shape(params[key])) != tuple(shape):
            raise ValueError(f"checkpoint param {key!r}: shape {tuple(np.shape(params[key]))}, "
                             f"expected {tuple(shape)}")


def map_moments(state: tp.Mapping[str, tp.Any],
                fn: tp.Callable[[dict], dict]) -> dict[str, tp.Any]:
    """Apply ``fn`` ({path: array} -> {path: array}) to the ``mu.*`` and the ``nu.*`` entries of
    a neutral optimizer state; ``step`` is kept.

    The moments are elementwise, so the conversion that maps a model's parameters between layouts
    (e.g. ``ringpar.gpt_model_config.from_layout``: mesh layout -> mesh-independent reference)
    maps them too: that is how a checkpoint stays mesh-independent.

    Example:
        >>> upper = lambda d: {k.upper(): v for k, v in d.items()}
        >>> map_moments({"step": 1, "mu.a": 1, "nu.a": 2}, upper)
        {'step': 1, 'mu.A': 1, 'nu.A': 2}
    """
    out = {"step": state["step"]}
    for name in ("mu", "nu"):
        prefix = f"{name}."
        moments = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        out.update({prefix + k: v for k, v in fn(moments).items()})
    return out
