"""Shared by the gpt_block scripts (framework-neutral: imports neither jax nor torch).

Sets up the 8 virtual CPU devices for both runtimes (must run before jax / torch_xla start),
puts the repository on ``sys.path``, and defines the config, the toy task and the CLI.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from ringpar.devices import set_cpu_devices  # noqa: E402

# 8 CPU devices for both runtimes; must be set before jax / torch_xla start.
set_cpu_devices(8)

import numpy as np  # noqa: E402

BATCH, SEQ = 4, 16


def config_kwargs(args) -> dict:
    """GPTConfig keyword arguments (the same on both backends)."""
    return dict(vocab_size=64, max_seq_len=SEQ, hidden_size=32, num_heads=8, num_layers=2,
                mlp_hidden_size=64, norm=args.norm, tp_mode=args.mode,
                label_smoothing=args.label_smoothing)


def batch(step: int, vocab: int = 64):
    """Toy next-token task: each row counts up by a row-specific stride (mod V); the model has to
    infer the stride from the context. Targets are the next tokens, the last one ignored."""
    rng = np.random.default_rng(1000 + step)
    start = rng.integers(0, vocab, size=(BATCH, 1))
    stride = rng.integers(1, 4, size=(BATCH, 1))
    tokens = (start + stride * np.arange(SEQ)) % vocab
    targets = np.concatenate([tokens[:, 1:], np.full((BATCH, 1), -100)], axis=1)
    return tokens.astype(np.int64), targets.astype(np.int64)


def parser(description: str) -> argparse.ArgumentParser:
    """Common command line of the train scripts."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tp", type=int, default=4, help="tensor-parallel size (1, 2, 4, 8)")
    p.add_argument("--mode", default="plain", choices=("plain", "ring"))
    p.add_argument("--norm", default="layernorm", choices=("layernorm", "rmsnorm"))
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate")
    p.add_argument("--init", help="npz of initial weights {path: array}: read if it exists, "
                                  "else the model's own initialization is written there")
    p.add_argument("--save", help="write the losses and final weights to this npz")
    p.add_argument("--hlo", action="store_true", help="print the collectives of one step")
    return p


def load_or_write_init(path, flat_params):
    """Initial weights from ``path`` (npz) if it exists, else ``flat_params()`` written there."""
    if path and os.path.exists(path):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    flat = flat_params()
    if path:
        np.savez(path, **flat)
    return flat


def save(path, losses, flat):
    """Losses (key ``__losses__``) and final weights to ``path``."""
    if path:
        np.savez(path, __losses__=np.asarray(losses, np.float64), **flat)
