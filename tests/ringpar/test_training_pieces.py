"""Neutral pieces of the training run: schedule, optimizer rule, byte corpus, checkpoints,
progress bar. Imports neither jax nor torch."""

from __future__ import annotations

import doctest
import hashlib
import importlib
import io
import math
import pathlib

import numpy as np
import pytest

from ringpar import checkpoint, data, optim, progress, schedule


@pytest.mark.parametrize("name", ["ringpar.schedule", "ringpar.optim", "ringpar.data",
                                  "ringpar.checkpoint", "ringpar.progress"])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------- schedule
def test_schedule_warmup_then_cosine():
    kw = dict(peak_lr=2.0, warmup_steps=4, total_steps=12, min_lr_ratio=0.25)
    lrs = [schedule.warmup_cosine(s, **kw) for s in range(16)]
    assert lrs[:4] == [0.5, 1.0, 1.5, 2.0]  # linear warmup, first step already moves
    assert lrs[4] == 2.0
    assert lrs[8] == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a > b for a, b in zip(lrs[4:12], lrs[5:13]))  # cosine strictly decreasing
    assert lrs[12:] == [0.5] * 4  # held at the end value after total_steps
    table = schedule.schedule_table(**kw)
    assert table.dtype == np.float32 and table.shape == (13,)
    np.testing.assert_allclose(table, lrs[:13], rtol=1e-7)


@pytest.mark.parametrize("kw, field", [
    (dict(peak_lr=0.0), "peak_lr"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=0), "total_steps"), (dict(min_lr_ratio=1.5), "min_lr_ratio")])
def test_schedule_bad_arguments(kw, field):
    args = dict(peak_lr=1.0, warmup_steps=1, total_steps=4, min_lr_ratio=0.0) | kw
    with pytest.raises(ValueError, match=field):
        schedule.warmup_cosine(0, **args)


@pytest.mark.parametrize("kw, field", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(clip_norm=0.0), "clip_norm"),
    (dict(peak_lr=-1.0), "peak_lr")])
def test_optimizer_config_bad_fields(kw, field):
    with pytest.raises(ValueError, match=field):
        optim.OptimizerConfig(**kw)


# ------------------------------------------------------------------------ optimizer reference
def test_reference_step_rules():
    cfg = optim.OptimizerConfig(peak_lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5,
                                clip_norm=None)
    params = {"a.kernel": np.full(3, 2.0), "a.bias": np.full(3, 2.0)}
    # zero gradient: only the decoupled weight decay moves the kernel; the bias is not decayed
    zero = {k: np.zeros(3) for k in params}
    new, state, norm = optim.reference_step(params, zero, optim.init_state(params), cfg)
    assert norm == 0.0 and int(state["step"]) == 1
    np.testing.assert_allclose(new["a.kernel"], 2.0 - 0.1 * 0.5 * 2.0)
    np.testing.assert_allclose(new["a.bias"], 2.0)
    # first Adam step moves each coordinate by ~lr * sign(g) (bias-corrected m/sqrt(v) = +-1)
    grads = {k: np.array([3.0, -0.5, 1e-3]) for k in params}
    new, _, norm = optim.reference_step(params, grads, optim.init_state(params), cfg)
    assert norm == pytest.approx(math.sqrt(2 * (9 + 0.25 + 1e-6)))
    np.testing.assert_allclose(new["a.bias"] - 2.0, [-0.1, 0.1, -0.1], rtol=1e-4)


def test_reference_step_clip():
    cfg = optim.OptimizerConfig(peak_lr=0.1, warmup_steps=0, total_steps=10, clip_norm=1.0,
                                weight_decay=0.0)
    params = {"w": np.zeros(2)}
    grads = {"w": np.array([3.0, 4.0])}  # norm 5 -> clipped to [0.6, 0.8]
    _, state, norm = optim.reference_step(params, grads, optim.init_state(params), cfg)
    assert norm == 5.0
    np.testing.assert_allclose(state["mu.w"], 0.1 * np.array([0.6, 0.8]))
    small = {"w": np.array([0.3, 0.4])}  # norm 0.5 < 1: untouched
    _, state, _ = optim.reference_step(params, small, optim.init_state(params), cfg)
    np.testing.assert_allclose(state["mu.w"], 0.1 * np.array([0.3, 0.4]))


# -------------------------------------------------------------------------------------- data
def test_corpus_is_deterministic_stdlib_source():
    files = data.stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    a, b = data.load_corpus(max_bytes=200_000), data.load_corpus(max_bytes=200_000)
    assert a.digest == b.digest and a.tokens.dtype == np.uint8 and len(a.tokens) == 200_000
    first = files[0].read_bytes()
    assert bytes(a.tokens[:len(first)]) == first  # sorted order, file contents verbatim
    assert a.tokens[len(first)] == 0  # NUL separator


def test_batch_sampler_seeded_and_resumable():
    corpus = data.load_corpus(max_bytes=50_000)
    s1 = data.BatchSampler(corpus, batch_size=4, seq_len=32, seed=7)
    s1.next_batch()
    state = s1.get_state()
    want = [s1.next_batch() for _ in range(3)]
    s2 = data.BatchSampler(corpus, batch_size=4, seq_len=32, seed=99)
    s2.set_state(state)
    for (t1, y1), (t2, y2) in zip(want, (s2.next_batch() for _ in range(3))):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(y1, y2)
    tokens, targets = want[0]
    assert tokens.shape == targets.shape == (4, 32) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])
    other = data.BatchSampler(corpus, batch_size=4, seq_len=32, seed=8).next_batch()[0]
    assert not np.array_equal(other, data.BatchSampler(corpus, 4, 32, 7).next_batch()[0])


@pytest.mark.parametrize("kw, field", [(dict(batch_size=0), "batch_size"),
                                       (dict(seq_len=10**9), "seq_len"), (dict(seed=-1), "seed")])
def test_batch_sampler_bad_arguments(kw, field):
    corpus = data.load_corpus(max_bytes=10_000)
    with pytest.raises(ValueError, match=field):
        data.BatchSampler(corpus, **(dict(batch_size=2, seq_len=8, seed=0) | kw))
    with pytest.raises(ValueError, match="state"):
        data.BatchSampler(corpus, 2, 8, 0).set_state({"bit_generator": "MT19937"})


# ------------------------------------------------------------------------------- checkpoints
def _tree_digest(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _save(path, step=5, hidden=16, value=1.0):
    params = {"wte.embedding": np.full((8, hidden), value, np.float32),
              "ln_f.bias": np.zeros(hidden, np.float32)}
    opt = optim.init_state(params) | {"step": np.asarray(step)}
    rng = data.BatchSampler(data.load_corpus(max_bytes=1000), 2, 8, 3).get_state()
    checkpoint.save_checkpoint(path, step=step, params=params, opt_state=opt,
                               model={"hidden_size": hidden, "num_layers": 2}, rng=rng,
                               info={"backend": "test"})
    return params, rng


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    target = tmp_path / "ck"
    params, rng = _save(target)
    ck = checkpoint.load_checkpoint(target, model={"hidden_size": 16, "num_layers": 2})
    assert ck.step == 5 and ck.rng == rng and ck.info == {"backend": "test"}
    for k, v in params.items():
        np.testing.assert_array_equal(ck.params[k], v)
    assert int(ck.opt_state["step"]) == 5 and set(ck.opt_state) == {
        "step", "mu.wte.embedding", "nu.wte.embedding", "mu.ln_f.bias", "nu.ln_f.bias"}
    _save(target, step=9, value=2.0)  # replace: no leftovers beside it
    assert checkpoint.load_checkpoint(target).step == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    checkpoint.check_param_shapes(ck.params, {k: v.shape for k, v in params.items()})


def test_failed_resume_names_field_and_leaves_directory_untouched(tmp_path):
    target = tmp_path / "ck"
    _save(target)
    before = _tree_digest(target)
    with pytest.raises(ValueError, match="hidden_size=16 in the checkpoint.*hidden_size=32"):
        checkpoint.load_checkpoint(target, model={"hidden_size": 32, "num_layers": 2})
    with pytest.raises(ValueError, match="no num_heads"):
        checkpoint.load_checkpoint(target, model={"hidden_size": 16, "num_layers": 2,
                                                  "num_heads": 4})
    ck = checkpoint.load_checkpoint(target)
    with pytest.raises(ValueError, match="'ln_f.bias': shape"):
        checkpoint.check_param_shapes(ck.params, {"wte.embedding": (8, 16), "ln_f.bias": (4,)})
    with pytest.raises(ValueError, match="missing"):
        checkpoint.load_checkpoint(tmp_path)
    assert _tree_digest(target) == before


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    target = tmp_path / "ck"
    _save(target)
    before = _tree_digest(target)
    with pytest.raises(TypeError):  # not JSON: refused before anything is written
        checkpoint.save_checkpoint(target, step=1, params={}, opt_state={}, model={"x": object()},
                                   rng={})
    with pytest.raises(ValueError, match="step"):
        checkpoint.save_checkpoint(target, step=-1, params={}, opt_state={}, model={}, rng={})
    assert _tree_digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# ---------------------------------------------------------------------------------- progress
def test_progress_bar_lines():
    out = io.StringIO()
    bar = progress.ProgressBar(total=40, stream=out)
    for step in range(1, 41):
        bar.update(step, loss=1.5, tokens_per_s=12345.6)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and "40/40" in lines[-1] and "loss 1.5000" in lines[-1]
    assert "12,346 tok/s" in lines[-1]
    with pytest.raises(ValueError, match="total"):
        progress.ProgressBar(total=0)


def test_neutral_modules_import_no_framework():
    for name in ("schedule", "optim", "data", "checkpoint", "progress"):
        src = pathlib.Path(importlib.import_module(f"ringpar.{name}").__file__).read_text()
        assert "import jax" not in src and "import torch" not in src


def test_optimizer_section_checked_and_moments_mapped(tmp_path):
    params = {"w": np.ones(2, np.float32)}
    checkpoint.save_checkpoint(tmp_path / "ck", step=1, params=params,
                               opt_state=optim.init_state(params), model={}, rng={},
                               optimizer={"peak_lr": 0.1, "warmup_steps": 2})
    with pytest.raises(ValueError, match="optimizer field peak_lr=0.1 in the checkpoint, but the "
                                         "run has peak_lr=0.2; optimizer field warmup_steps=2"):
        checkpoint.load_checkpoint(tmp_path / "ck",
                                   optimizer={"peak_lr": 0.2, "warmup_steps": 3})
    state = checkpoint.load_checkpoint(tmp_path / "ck").opt_state
    mapped = checkpoint.map_moments(state, lambda m: {k + "2": v * 0 + 7 for k, v in m.items()})
    assert sorted(mapped) == ["mu.w2", "nu.w2", "step"]
    assert mapped["mu.w2"].tolist() == [7.0, 7.0] and int(mapped["step"]) == 0
