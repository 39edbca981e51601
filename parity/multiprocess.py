"""JAX across several processes: ``python -m parity --processes N``.

The parity CLI (this module's :func:`run_cases`) starts N JAX worker processes
(``python -m parity.multiprocess``), each owning ``devices / N`` virtual CPU devices, joined by
``jax.distributed`` with a coordinator on a free local port and CPU collectives over gloo. Every
process builds the same global mesh over all ``devices`` devices and runs the same cases; the
outputs and gradients are gathered across processes (``parity.jax_backend.to_numpy``) and
process 0 writes them, with the compiled HLO, as ``.npz``/``.json`` files
(:func:`parity.worker.save_result`). Meanwhile the parent runs the torch side in-process on one
``devices``-device mesh, as the single-process run does, then compares both exactly as the
single-process run does (:func:`parity.compare.compare`).

No hangs: a worker that exits with an error, or a group that finishes no case for
``case_timeout`` seconds, gets every worker killed and a RuntimeError naming the process, the
case it was on and the tail of its log. Workers also exit if the parent dies.

Mesh layout: devices are numbered process by process (process 0 holds devices 0..3 of 8), and
the model axis is the mesh's last, fastest-varying axis, so a ring of 8 devices crosses the
process boundary while rings of 2 or 4 stay inside one process (replicated over the data axis,
which spans the processes).

Example::

    python -m parity --processes 2 -k "n8-float32"
    # or, in Python:
    from parity import cases, multiprocess
    reports = multiprocess.run_cases(cases.select(cases.default_matrix(), "tpasync n8"))
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time

from . import worker
from .backend import BackendResult, load_backend, run_backend, setup_devices
from .cases import Case, make_data
from .compare import CaseReport, compare

__all__ = ["COORDINATOR_HOST", "CASE_TIMEOUT", "free_port", "check_processes",
           "worker_command", "JaxProcesses", "run_torch", "run_both", "run_cases", "main"]

COORDINATOR_HOST = "127.0.0.1"
# Seconds the worker group may go without finishing a case (the first one includes importing
# JAX, joining the group and compiling; the slowest, a GPT case, took 80 s on 2 cores at load 11).
CASE_TIMEOUT = 300.0
_LOG_TAIL = 15  # lines of a worker's log quoted in an error


def free_port(host: str = COORDINATOR_HOST) -> int:
    """A TCP port on ``host`` that is free now (the OS picks it; it is released on return).

    Example::

        port = free_port()  # e.g. 41873
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_processes(processes, devices) -> int:
    """Validate ``--processes`` against ``--devices``: a positive int dividing the device count.

    Raises:
        ValueError: naming the value and what was expected.

    Example::

        check_processes(2, 8)  # 2
        check_processes(3, 8)  # ValueError: processes=3: expected 1 or a divisor of devices=8
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes={processes!r}: expected a positive int")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices={devices!r}: expected a positive int")
    if devices % processes:
        raise ValueError(f"processes={processes}: expected 1 or a divisor of devices={devices} "
                         f"(each process owns devices / processes devices)")
    return processes


def worker_command(process_id: int, processes: int, port: int, devices: int, cases_path: str,
                   out_dir: str) -> list[str]:
    """The command line of JAX worker ``process_id`` of ``processes`` (``devices`` in all)."""
    return [sys.executable, "-m", "parity.multiprocess", "--process-id", str(process_id),
            "--processes", str(processes), "--coordinator", f"{COORDINATOR_HOST}:{port}",
            "--devices", str(devices), "--cases", cases_path, "--out", out_dir]


class JaxProcesses:
    """The JAX worker group of one run: start, follow, collect, and kill on any failure.

    Use as a context manager (leaving it kills what still runs)::

        with JaxProcesses(cases, devices=8, processes=2, work_dir=tmp) as group:
            results = group.results()  # {case id: BackendResult}
    """

    def __init__(self, cases: list[Case], devices: int, processes: int, work_dir: str,
                 case_timeout: float = CASE_TIMEOUT):
        check_processes(processes, devices)
        if not case_timeout > 0:
            raise ValueError(f"case_timeout={case_timeout!r}: expected a positive number")
        self.cases, self.devices, self.processes = list(cases), devices, processes
        self.case_timeout = case_timeout
        self.out_dir = os.path.join(work_dir, "jax")
        self.logs = [os.path.join(work_dir, f"jax-process{i}.log") for i in range(processes)]
        self.cases_path = os.path.join(work_dir, "cases.json")
        with open(self.cases_path, "w") as f:
            json.dump([worker.case_to_fields(c) for c in self.cases], f)
        self.procs: list[subprocess.Popen] = []
        self.done: list[str] = []  # case ids process 0 finished, appended by the reader thread
        self._new: queue.Queue = queue.Queue()  # the same ids, then None at its stdout's end
        self._last_done = 0.0  # when the last case finished (or the group started)

    def __enter__(self) -> "JaxProcesses":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def start(self) -> None:
        """Start every worker; process 0's stdout (``done <case id>`` lines) is read by a thread."""
        port = free_port()
        self._last_done = time.monotonic()
        for i in range(self.processes):
            cmd = worker_command(i, self.processes, port, self.devices, self.cases_path,
                                 self.out_dir)
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    cmd, stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL, stderr=log,
                    stdin=subprocess.DEVNULL, text=True))
        threading.Thread(target=self._read, args=(self.procs[0].stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        # Progress is stamped here, as it happens: the parent may be busy with torch meanwhile.
        for line in stream:
            if line.startswith("done "):
                self._last_done = time.monotonic()
                self.done.append(line[5:].strip())
                self._new.put(self.done[-1])
        self._new.put(None)

    def kill(self) -> None:
        """Kill every worker still running (and reap it)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
                pass

    def results(self, progress=None) -> dict[str, BackendResult]:
        """Wait for the group (``progress(case_id)`` per finished case); {case id: result}.

        Raises RuntimeError (after killing every worker) if a worker fails or the group makes
        no progress for ``case_timeout`` seconds."""
        while True:
            try:
                case_id = self._new.get(timeout=0.2)
            except queue.Empty:
                case_id = ""
            if case_id is None:  # process 0 closed its stdout: it exited (or was killed)
                break
            if case_id and progress:
                progress(case_id)
            self._check()
        self._wait_all()
        return {c.id: worker.load_result(self.out_dir, c) for c in self.cases}

    def _all_exited(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def _check(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() not in (None, 0):
                self._fail(f"JAX process {i} exited with {proc.returncode}")
        running = self.procs[0].poll() is None
        if running and time.monotonic() - self._last_done > self.case_timeout:
            self._fail(f"the JAX processes finished no case for {self.case_timeout:g} s")

    def _wait_all(self) -> None:
        """Process 0 closed its stdout: every worker must now exit, with 0."""
        deadline = time.monotonic() + self.case_timeout
        while not self._all_exited():
            if time.monotonic() > deadline:
                self._fail("a JAX process did not exit after process 0 finished")
            time.sleep(0.1)
        self._check()
        if len(self.done) < len(self.cases):
            self._fail("JAX process 0 stopped early")

    def _fail(self, what: str) -> None:
        self.kill()
        done = len(self.done)
        current = self.cases[done].id if done < len(self.cases) else "-"
        tails = []
        for i, path in enumerate(self.logs):
            with open(path, errors="replace") as f:
                lines = [ln.rstrip() for ln in f if "[Gloo]" not in ln]
            tails.append(f"--- process {i} log ({path}), last lines:\n" +
                         "\n".join(lines[-_LOG_TAIL:]))
        raise RuntimeError(f"{what}; {done}/{len(self.cases)} cases done, at case {current}; "
                           f"killed all {self.processes} JAX processes.\n" + "\n".join(tails))


def run_torch(cases: list[Case], progress=None) -> dict[str, BackendResult]:
    """The torch side in this process, one case at a time: {case id: result}."""
    torch_backend = load_backend("torch")
    out = {}
    for case in cases:
        out[case.id] = run_backend(torch_backend, case, make_data(case))
        if progress:
            progress(case.id)
    return out


def run_both(cases: list[Case], devices: int = 8, processes: int = 2, progress=None,
             case_timeout: float = CASE_TIMEOUT) -> tuple[dict, dict]:
    """``(jax_results, torch_results)``, each {case id: BackendResult}: JAX in ``processes``
    processes, torch in this process (at the same time: separate processes, separate cores).

    ``progress(done, total, label)`` is called as each side finishes a case.
    """
    check_processes(processes, devices)
    setup_devices(devices)  # the torch side here; the workers set their own share
    total, count = 2 * len(cases), [0]

    def tick(side):
        def show(case_id):
            count[0] += 1
            if progress:
                progress(count[0], total, f"{side}: {case_id}")
        return show

    with tempfile.TemporaryDirectory(prefix="parity-mp-") as tmp:
        with JaxProcesses(cases, devices, processes, tmp, case_timeout) as group:
            torch_results = run_torch(cases, tick("torch"))
            jax_results = group.results(tick("jax"))
    return jax_results, torch_results


def run_cases(cases: list[Case], devices: int = 8, processes: int = 2, progress=None,
              case_timeout: float = CASE_TIMEOUT) -> list[CaseReport]:
    """Run ``cases`` with JAX in ``processes`` processes and torch here; reports in order
    (compared exactly as in the single-process run)."""
    jax_results, torch_results = run_both(cases, devices, processes, progress, case_timeout)
    return [compare(c, jax_results[c.id], torch_results[c.id]) for c in cases]


# ------------------------------------------------------------------------------ the worker
def _exit_with_parent() -> None:
    """Exit this worker if the process that started it dies (never left waiting on a peer)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _join(coordinator: str, processes: int, process_id: int):
    """Import JAX on this process's share of devices and join the group (before any array)."""
    import jax

    # The default CPU client has no cross-process collectives; gloo has them.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=processes, process_id=process_id,
                               initialization_timeout=120)
    return jax


def main(argv=None) -> int:
    """JAX worker ``--process-id`` of ``--processes``: run every case, process 0 saves them."""
    p = argparse.ArgumentParser(prog="python -m parity.multiprocess")
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--processes", type=int, required=True)
    p.add_argument("--coordinator", required=True, help="host:port of process 0's coordinator")
    p.add_argument("--devices", type=int, required=True, help="devices over all processes")
    p.add_argument("--cases", required=True, help="JSON list of Case fields")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    check_processes(args.processes, args.devices)
    if not 0 <= args.process_id < args.processes:
        raise ValueError(f"process_id={args.process_id}: expected 0..{args.processes - 1}")

    _exit_with_parent()
    setup_devices(args.devices // args.processes)
    jax = _join(args.coordinator, args.processes, args.process_id)
    with open(args.cases) as f:
        cases = [worker.case_from_fields(c) for c in json.load(f)]
    backend = load_backend("jax")
    for case in cases:
        res = run_backend(backend, case, make_data(case))
        if args.process_id == 0:
            worker.save_result(args.out, case, res)
            print(f"done {case.id}", flush=True)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
