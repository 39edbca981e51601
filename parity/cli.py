"""Command-line interface of the parity harness (``python -m parity``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["build_parser", "main"]

DTYPES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m parity``."""
    p = argparse.ArgumentParser(
        prog="python -m parity",
        description="Run the ringpar parity matrix: the same TP/PP cases on JAX and torch_xla on "
                    "the same mesh, comparing outputs, gradients and compiled collectives.")
    p.add_argument("--devices", type=int, default=8,
                   help="number of virtual CPU devices per backend (default 8)")
    p.add_argument("-k", dest="filter", default=None,
                   help="only run cases whose id contains this substring")
    p.add_argument("--dtype", choices=DTYPES, action="append", default=None,
                   help="restrict to a dtype (repeatable; default all)")
    p.add_argument("--isolate", action="store_true",
                   help="run each backend in its own process, exchanging .npz files (needed on TPU)")
    p.add_argument("--processes", type=int, default=1,
                   help="run JAX across this many processes joined by jax.distributed (1 or a "
                        "divisor of --devices; each owns devices/processes CPU devices), torch in "
                        "this process (parity.multiprocess; not with --isolate or --jobs)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes: in-process mode runs whole cases in this many "
                        "processes (default: one per core, at most 4); with --isolate, 2 or more "
                        "runs the two backend processes at the same time (default 1: TPU-safe)")
    p.add_argument("--xla-opt-level", type=int, default=0, choices=(0, 1, 2, 3),
                   help="LLVM optimization level of XLA's CPU code generation for both backends "
                        "(default 0: the cases are tiny, so compiling dominates; the optimized, "
                        "partitioned HLO the harness compares is the same at every level). "
                        "Ignored when XLA_FLAGS already sets --xla_backend_optimization_level")
    p.add_argument("--json", dest="json_path", default=None, help="write a JSON report here")
    p.add_argument("--markdown", dest="markdown_path", default=None,
                   help="write a markdown report here")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--fuzz", type=int, metavar="N", default=None,
                   help="run N random valid cases drawn from --seed instead of the matrix "
                        "(parity.fuzz); each failure prints its --case reproducer")
    p.add_argument("--seed", type=int, default=0, help="seed of --fuzz (default 0)")
    p.add_argument("--case", dest="case_json", action="append", default=None, metavar="JSON",
                   help="run exactly this case (the JSON a failure's reproducer prints; "
                        "repeatable)")
    p.add_argument("--self-test", action="store_true",
                   help="plant every defect of parity.defects in a case that exposes it, print "
                        "which were caught and the catch rate (exit 1 below 100%%)")
    return p


def _progress_printer(stream=sys.stderr):
    """A progress bar on a terminal; a line every 10% (and the first case) otherwise."""
    tty = stream.isatty()
    state = {"last": -1, "t0": time.perf_counter()}

    def show(done: int, total: int, label: str) -> None:
        elapsed = time.perf_counter() - state["t0"]
        width = 30
        filled = int(width * done / max(total, 1))
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {elapsed:5.0f}s {label}"
        if tty:
            stream.write("\r" + bar[:150].ljust(150) + ("\n" if done == total else ""))
            stream.flush()
        else:
            decile = 10 * done // max(total, 1)
            if decile != state["last"] or done == total:
                state["last"] = decile
                stream.write(bar + "\n")
                stream.flush()

    return show


def _set_codegen_level(level: int) -> None:
    """Add ``--xla_backend_optimization_level`` to XLA_FLAGS (read by both runtimes and
    inherited by worker processes) unless the user set it."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level={level}".strip()


class _UsageError(Exception):
    """Arguments that parse but do not fit together: ``main`` prints the usage line and this
    message to stderr and exits 2, as argparse does for arguments it rejects itself."""


def _check_counts(args: argparse.Namespace) -> None:
    """--devices, --jobs and --processes, before any case is built."""
    if args.devices < 1:
        raise _UsageError(f"--devices={args.devices}: expected a positive int")
    if args.jobs is not None and args.jobs < 1:
        raise _UsageError(f"--jobs={args.jobs}: expected a positive int")
    if args.processes != 1:
        from .multiprocess import check_processes

        try:
            check_processes(args.processes, args.devices)
        except ValueError as exc:
            raise _UsageError(f"--{exc}") from exc
        if args.isolate or args.jobs is not None:
            raise _UsageError(f"--processes={args.processes} runs JAX in its own processes "
                              f"already: drop --isolate/--jobs")


def _select_cases(args: argparse.Namespace) -> list:
    """The cases to run: the matrix (or --fuzz / --case), filtered by -k and --dtype, less those
    whose axis size does not divide --devices (said on stderr)."""
    from . import cases as cases_mod
    from . import fuzz

    try:
        chosen = fuzz.chosen_cases(args.fuzz, args.seed, args.case_json)
    except ValueError as exc:
        raise _UsageError(str(exc)) from exc
    if args.self_test and args.devices != 8:
        raise _UsageError(f"--self-test needs --devices=8 (its cases), got {args.devices}")
    selected = cases_mod.select(chosen if chosen is not None else cases_mod.default_matrix(),
                                args.filter, args.dtype)
    runnable = [c for c in selected if args.devices % c.axis_size == 0]
    if not runnable:
        what = f"-k {args.filter!r}" if args.filter else "the matrix"
        raise _UsageError(f"no case of {what} (dtype {args.dtype or 'any'}) runs on "
                          f"--devices={args.devices} (axis sizes must divide the device count)")
    if len(runnable) < len(selected):
        print(f"python -m parity: skipping {len(selected) - len(runnable)} cases whose axis size "
              f"does not divide --devices={args.devices}", file=sys.stderr)
    return runnable


def _run_cases(args: argparse.Namespace, runnable: list, jobs: int) -> tuple[list, float]:
    """Run the cases in the mode the arguments ask for; their reports and the seconds taken."""
    from . import runner

    mode = "isolated processes" if args.isolate else "in-process"
    if args.processes > 1:
        mode, jobs = f"JAX in {args.processes} processes, torch in-process", 1
    print(f"python -m parity: {len(runnable)} cases on {args.devices} devices ({mode}, "
          f"{jobs} job{'s' if jobs > 1 else ''})", file=sys.stderr)
    t0 = time.perf_counter()
    if args.processes > 1:
        from . import multiprocess

        reports = multiprocess.run_cases(runnable, args.devices, args.processes,
                                         progress=_progress_printer())
    else:
        reports = runner.run_cases(runnable, isolate=args.isolate, devices=args.devices,
                                   jobs=jobs, progress=_progress_printer())
    return reports, time.perf_counter() - t0


def _write_reports(args: argparse.Namespace, runnable: list, reports: list,
                   seconds: float) -> None:
    """The table and summary on stdout, a reproducer per failed case, and the --json /
    --markdown files."""
    from . import fuzz, report

    print(report.table(reports))
    print(report.summary(reports, seconds))
    for case, rep in zip(runnable, reports):
        if not rep.passed:
            print(f"reproduce {case.id}: {fuzz.reproducer(case)}")
    if args.json_path:
        report.write_json(args.json_path, reports, seconds, args.devices, args.isolate)
    if args.markdown_path:
        report.write_markdown(args.markdown_path, reports, seconds, args.devices, args.isolate)


def _run(args: argparse.Namespace, runnable: list) -> int:
    """Set up the devices and the codegen level, then run --self-test or the selected cases."""
    from . import runner

    jobs = args.jobs or (1 if args.isolate else runner.default_jobs())
    runner.setup_devices(args.devices)
    _set_codegen_level(args.xla_opt_level)
    if args.self_test:
        from . import selftest

        return selftest.main()
    reports, seconds = _run_cases(args, runnable, jobs)
    _write_reports(args, runnable, reports, seconds)
    return 0 if all(r.passed for r in reports) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point. Returns 0 when every case matches, 1 on a mismatch, 2 on bad arguments.

    Example::

        main(["-k", "tpdense-gather-n2", "--list"])  # prints the two case ids, returns 0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    try:
        _check_counts(args)
        runnable = _select_cases(args)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"python -m parity: error: {exc}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(c.id for c in runnable))
        return 0
    return _run(args, runnable)
