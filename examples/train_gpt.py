"""Train the 4-D-mesh GPT (dp, fsdp, pp, tp) on a byte-level corpus of the Python standard
library's own source, with JAX or torch_xla: the same model, optimizer, data and numbers.

    python examples/train_gpt.py --backend {jax,torch} --mesh DP,FSDP,PP,TP --steps N --seed S
        [--bf16] [--log FILE.json] [--plot FILE.png] [--save DIR] [--resume DIR]
        [--tp-async] [--fsdp-modules Block,Embed] [--remat Block] [model / optimizer sizes]

Runs on 8 virtual CPU devices. ``--steps N`` is the step the run ends at (a resumed run continues
from the checkpoint's step); the cosine schedule ends at ``--schedule-steps`` (default N).
Every input is checked before any framework is imported, let alone compiled: a mesh whose product
is not 8, axis sizes that do not divide heads / hidden / layers / batch, unknown module names in
``--fsdp-modules`` / ``--remat``, or a ``--resume`` checkpoint of another model shape or optimizer
stop the script with an argparse error naming the field (exit status 2), and a failed resume
leaves the checkpoint untouched.

Pieces: the training step ``jax_impl.trainer`` / ``torch_impl.trainer`` (model ``*.model``,
parameters converted through the mesh-independent reference layout of
``ringpar.gpt_model_config``, optimizer ``*.optim`` / ``ringpar.optim``), data ``ringpar.data``, checkpoints
``ringpar.checkpoint`` (reference-layout parameters and moments: any backend, any mesh),
progress bar ``ringpar.progress``. The log is ``{"steps": [{"step", "loss", "grad_norm",
"tokens_per_s"}, ...], ...}``; ``loss`` of step t is the loss of the parameters before update t.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ringpar import checkpoint as ckpt  # noqa: E402
from ringpar.configs import ModelConfig, ParallelConfig  # noqa: E402
from ringpar.data import VOCAB_SIZE, BatchSampler, load_corpus  # noqa: E402
from ringpar.gpt_model_config import (check_gpt, gpt_model_config,  # noqa: E402
                                      init_reference, reference_shapes)
from ringpar.optim import OptimizerConfig  # noqa: E402
from ringpar.progress import ProgressBar  # noqa: E402

NUM_DEVICES = 8
CORPUS_BYTES = 4 * 2**20
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_heads", "num_layers", "max_seq_len", "ffn")


# ------------------------------------------------------------------------------- arguments
def _mesh(text: str) -> tuple[int, int, int, int]:
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--mesh={text!r}: expected four positive ints "
                                         f"DP,FSDP,PP,TP, e.g. 2,2,1,2")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=("jax", "torch"))
    p.add_argument("--mesh", type=_mesh, default=(1, 2, 2, 2), help="DP,FSDP,PP,TP")
    p.add_argument("--steps", type=int, required=True, help="train until this global step")
    p.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 parameters)")
    p.add_argument("--log", help="write the per-step log (JSON) here")
    p.add_argument("--plot", help="write a PNG loss curve here")
    p.add_argument("--save", help="write a checkpoint directory here at the end")
    p.add_argument("--resume", help="resume from this checkpoint directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = p.add_argument_group("model and parallelism")
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--layers", type=int, default=4)
    m.add_argument("--mlp", type=int, default=0, help="MLP hidden size (0: 4 * hidden)")
    m.add_argument("--seq-len", type=int, default=64)
    m.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    m.add_argument("--microbatches", type=int, default=1, help="GPipe micro-batches")
    m.add_argument("--tp-async", action="store_true", help="ParallelConfig.tp_async_dense")
    m.add_argument("--fsdp-modules", type=_names, default=[], help="e.g. Embed,Block,Head")
    m.add_argument("--fsdp-min-weight-size", type=int, default=2**10)
    m.add_argument("--remat", type=_names, default=[], help="e.g. Block")
    o = p.add_argument_group("optimizer (AdamW, global-norm clip, warmup + cosine)")
    o.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    o.add_argument("--warmup", type=int, default=10)
    o.add_argument("--schedule-steps", type=int, default=None, help="cosine end (default --steps)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--clip", type=float, default=1.0)
    return p


@dataclasses.dataclass
class Run:
    """Everything validated, before any framework is imported."""

    args: argparse.Namespace
    model: ModelConfig
    optimizer: OptimizerConfig
    resume: ckpt.Checkpoint | None


def model_fields(model: ModelConfig) -> dict:
    """The model fields a checkpoint must match (they fix the parameter shapes)."""
    cfg = model.model_config
    return {name: getattr(cfg, name) for name in SHAPE_FIELDS}


def _configs(args) -> tuple[ModelConfig, OptimizerConfig]:
    dp, fsdp, pp, tp = args.mesh
    parallel = ParallelConfig(data_axis_size=dp, fsdp_axis_size=fsdp, pipeline_axis_size=pp,
                              model_axis_size=tp, tp_async_dense=args.tp_async,
                              fsdp_modules=args.fsdp_modules, remat=args.remat,
                              fsdp_min_weight_size=args.fsdp_min_weight_size)
    model = gpt_model_config(parallel, vocab_size=VOCAB_SIZE, hidden_size=args.hidden,
                             num_heads=args.heads, num_layers=args.layers,
                             max_seq_len=args.seq_len, mlp_hidden_size=args.mlp,
                             num_microbatches=args.microbatches,
                             dtype="bfloat16" if args.bf16 else "float32")
    check_gpt(model, NUM_DEVICES, batch_size=args.batch)
    optimizer = OptimizerConfig(peak_lr=args.lr, warmup_steps=args.warmup,
                                total_steps=args.schedule_steps or args.steps,
                                min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                                clip_norm=args.clip)
    return model, optimizer


def validate(argv=None) -> Run:
    """Parse and check every input (argparse error naming the field on failure); imports
    neither jax nor torch and compiles nothing."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mesh[0] * args.mesh[1] * args.mesh[2] * args.mesh[3] != NUM_DEVICES:
        parser.error(f"--mesh={','.join(map(str, args.mesh))}: the axis sizes multiply to "
                     f"{args.mesh[0] * args.mesh[1] * args.mesh[2] * args.mesh[3]}, expected the "
                     f"device count {NUM_DEVICES}")
    for flag in ("steps", "seed"):
        if getattr(args, flag) < (1 if flag == "steps" else 0):
            parser.error(f"--{flag}={getattr(args, flag)}: expected an int >= "
                         f"{1 if flag == 'steps' else 0}")
    for flag in ("save", "log", "plot"):
        path = getattr(args, flag)
        if path and flag == "save" and pathlib.Path(path).exists() \
                and not pathlib.Path(path).is_dir():
            parser.error(f"--save={path!r}: exists and is not a directory")
        if path and flag != "save" and pathlib.Path(path).is_dir():
            parser.error(f"--{flag}={path!r}: is a directory, expected a file name")
    try:
        model, optimizer = _configs(args)
        resume = None
        if args.resume:
            resume = ckpt.load_checkpoint(args.resume, model=model_fields(model),
                                          optimizer=dataclasses.asdict(optimizer))
            ckpt.check_param_shapes(resume.params, reference_shapes(model.model_config))
            if resume.step >= args.steps:
                raise ValueError(f"--steps={args.steps}: the checkpoint is at step "
                                 f"{resume.step}; expected a larger end step")
    except ValueError as exc:
        parser.error(str(exc))
    return Run(args, model, optimizer, resume)


# -------------------------------------------------------------------------------- backends
def trainer_class(backend: str):
    """``jax_impl.trainer.Trainer`` or ``torch_impl.trainer.Trainer`` (imported on demand)."""
    if backend == "jax":
        from jax_impl.trainer import Trainer
    else:
        from torch_impl.trainer import Trainer
    return Trainer


# ---------------------------------------------------------------------------------- training
def train(run: Run) -> dict:
    """Train (or continue) per ``run``; return the log."""
    from ringpar.devices import set_cpu_devices

    args = run.args
    set_cpu_devices(NUM_DEVICES)
    corpus = load_corpus(CORPUS_BYTES)
    sampler = BatchSampler(corpus, args.batch, args.seq_len, args.seed)
    if run.resume is not None:
        start, ref, opt_state = run.resume.step, run.resume.params, run.resume.opt_state
        sampler.set_state(run.resume.rng)
    else:
        start, ref, opt_state = 0, init_reference(run.model.model_config, args.seed), None
    trainer = trainer_class(args.backend)(run.model, run.optimizer, ref, opt_state)
    bar = None if args.no_progress else ProgressBar(args.steps)
    steps, t0 = [], time.perf_counter()
    for step in range(start, args.steps):
        tokens, targets = sampler.next_batch()
        tic = time.perf_counter()
        loss, norm = trainer.step(tokens, targets)
        rate = tokens.size / (time.perf_counter() - tic)
        steps.append({"step": step, "loss": loss, "grad_norm": norm, "tokens_per_s": rate})
        if bar:
            bar.update(step + 1, loss, rate)
    if bar:
        bar.close()
    log = {"steps": steps, "backend": args.backend, "mesh": list(args.mesh), "seed": args.seed,
           "bf16": args.bf16, "wall_s": time.perf_counter() - t0, "corpus": corpus.digest,
           "model": model_fields(run.model), "optimizer": dataclasses.asdict(run.optimizer)}
    if args.save:
        params, state = trainer.export()
        ckpt.save_checkpoint(args.save, step=args.steps, params=params, opt_state=state,
                             model=model_fields(run.model),
                             optimizer=dataclasses.asdict(run.optimizer),
                             rng=sampler.get_state(),
                             info={"backend": args.backend, "mesh": list(args.mesh),
                                   "corpus": corpus.digest})
    return log


def write_plot(log: dict, path: str) -> None:
    """PNG of the loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([s["step"] for s in log["steps"]], [s["loss"] for s in log["steps"]], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(f"train_gpt.py --backend {log['backend']} --mesh "
                 f"{','.join(map(str, log['mesh']))}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    """Validate, train, write the log / plot / checkpoint; return the log."""
    run = validate(argv)
    log = train(run)
    if run.args.log:
        pathlib.Path(run.args.log).write_text(json.dumps(log, indent=1))
    if run.args.plot:
        write_plot(log, run.args.plot)
    last = log["steps"][-1]
    print(f"{run.args.backend} mesh {run.args.mesh}: step {last['step']} loss {last['loss']:.4f}"
          f" ({log['wall_s']:.1f} s)", file=sys.stderr)
    return log


if __name__ == "__main__":
    main()
