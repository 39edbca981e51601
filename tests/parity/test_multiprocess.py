"""``python -m parity --processes 2``: JAX across 2 processes x 4 CPU devices (parity.multiprocess).

The integration tests run one TP ring case and one pipeline case, both on all 8 devices so that
the ring / the stage chain crosses the process boundary, with JAX in two ``jax.distributed``
worker processes and torch in this process. They check that each case passes the harness and
that the multi-process JAX run has the collective signature and the numbers of the
single-process JAX run (this process, 8 devices). The helper tests need no JAX worker.
"""

from __future__ import annotations

import signal
import socket
import sys
import time

import numpy as np
import pytest

from parity import cases, cli, multiprocess
from parity.compare import compare, signature

# Cross-process: the model axis spans all 8 devices, 4 in each process.
CASE_IDS = ("tpasync-gather-bi-n8-float32-b8x32x32",
            "pipeline-mlp-n8-float32-b2x16x16-microbatches1")


def _case(case_id: str) -> cases.Case:
    (case,) = [c for c in cases.default_matrix() if c.id == case_id]
    return case


# ------------------------------------------------------------------------------- helpers
def test_free_port_is_bindable():
    port = multiprocess.free_port()
    assert 1024 <= port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((multiprocess.COORDINATOR_HOST, port))


@pytest.mark.parametrize("processes,devices", [(1, 8), (2, 8), (4, 8), (8, 8), (3, 3)])
def test_check_processes_accepts_divisors(processes, devices):
    assert multiprocess.check_processes(processes, devices) == processes


@pytest.mark.parametrize("processes,devices,match", [
    (3, 8, "processes=3: expected 1 or a divisor of devices=8"),
    (16, 8, "processes=16: expected 1 or a divisor of devices=8"),
    (0, 8, "processes=0: expected a positive int"),
    (-2, 8, "processes=-2: expected a positive int"),
    (2.0, 8, "processes=2.0: expected a positive int"),
    (True, 8, "processes=True: expected a positive int"),
    (2, 0, "devices=0: expected a positive int"),
])
def test_check_processes_rejects(processes, devices, match):
    with pytest.raises(ValueError, match=match):
        multiprocess.check_processes(processes, devices)


def test_worker_command_names_its_share():
    cmd = multiprocess.worker_command(1, 2, 4567, 8, "/t/cases.json", "/t/jax")
    assert cmd[:3] == [sys.executable, "-m", "parity.multiprocess"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args == {"--process-id": "1", "--processes": "2", "--coordinator": "127.0.0.1:4567",
                    "--devices": "8", "--cases": "/t/cases.json", "--out": "/t/jax"}


@pytest.mark.parametrize("argv,message", [
    (["--processes", "3"], "--processes=3: expected 1 or a divisor of devices=8"),
    (["--processes", "0"], "--processes=0: expected a positive int"),
    (["--processes", "4", "--devices", "2"], "--processes=4: expected 1 or a divisor of devices=2"),
    (["--processes", "2", "--isolate"], "drop --isolate/--jobs"),
    (["--processes", "2", "--jobs", "2"], "drop --isolate/--jobs"),
])
def test_cli_rejects_bad_processes(argv, message, capsys):
    assert cli.main(argv + ["--list"]) == 2
    assert message in capsys.readouterr().err


def test_cli_processes_lists_cases(capsys):
    assert cli.main(["--processes", "2", "--list", "-k", "tpasync-gather-bi-n8-float32"]) == 0
    assert capsys.readouterr().out.split() == [CASE_IDS[0]]


def test_case_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="case_timeout=0"):
        multiprocess.JaxProcesses([], 8, 2, str(tmp_path), case_timeout=0)


# ---------------------------------------------------------------- no hangs (fake workers)
def _fake_workers(monkeypatch, scripts):
    """Make JaxProcesses start ``python -c scripts[i]`` as worker i."""
    def command(process_id, *args):
        return [sys.executable, "-c", scripts[process_id]]
    monkeypatch.setattr(multiprocess, "worker_command", command)


def test_a_failing_worker_kills_the_group(monkeypatch, tmp_path):
    # Process 0 waits for ever (as in a collective whose peer died); process 1 fails.
    _fake_workers(monkeypatch, ["import time; time.sleep(600)",
                                "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    group = multiprocess.JaxProcesses([_case(CASE_IDS[0])], 8, 2, str(tmp_path))
    with group, pytest.raises(RuntimeError) as info:
        group.results()
    message = str(info.value)
    assert "JAX process 1 exited with 3" in message
    assert f"0/1 cases done, at case {CASE_IDS[0]}" in message
    assert "boom" in message  # the failing worker's log tail
    assert group.procs[0].returncode == -signal.SIGKILL  # killed, not waited for


def test_a_silent_group_times_out(monkeypatch, tmp_path):
    _fake_workers(monkeypatch, ["import time; time.sleep(600)"] * 2)
    group = multiprocess.JaxProcesses([_case(CASE_IDS[0])], 8, 2, str(tmp_path),
                                      case_timeout=1.0)
    with group, pytest.raises(RuntimeError, match="finished no case for 1 s"):
        group.results()
    assert [p.returncode for p in group.procs] == [-signal.SIGKILL] * 2


def test_a_group_that_finished_while_the_parent_was_busy_is_fine(monkeypatch, tmp_path):
    # The parent runs torch meanwhile: progress is timed when it happens, not when read.
    _fake_workers(monkeypatch, [f"print('done {CASE_IDS[0]}')", "pass"])
    group = multiprocess.JaxProcesses([_case(CASE_IDS[0])], 8, 2, str(tmp_path),
                                      case_timeout=0.5)
    with group:
        time.sleep(1.5)
        (result,) = group.results().values()
    assert "no result file" in result.error  # the fake worker wrote none
    assert group.done == [CASE_IDS[0]]


def test_a_worker_stopping_early_is_an_error(monkeypatch, tmp_path):
    _fake_workers(monkeypatch, ["pass", "pass"])
    group = multiprocess.JaxProcesses([_case(CASE_IDS[0])], 8, 2, str(tmp_path))
    with group, pytest.raises(RuntimeError, match="JAX process 0 stopped early"):
        group.results()


# ------------------------------------------------------------------- 2 real JAX processes
@pytest.fixture(scope="module")
def runs():
    """Multi-process JAX + in-process torch results, and single-process JAX results."""
    from parity import jax_backend

    selected = [_case(i) for i in CASE_IDS]
    multi, torch_results = multiprocess.run_both(selected, devices=8, processes=2)
    single = {c.id: jax_backend.run(c, cases.make_data(c)) for c in selected}
    return selected, multi, torch_results, single


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_case_passes_with_two_jax_processes(runs, case_id):
    selected, multi, torch_results, _ = runs
    case = _case(case_id)
    assert multi[case_id].error is None
    report = compare(case, multi[case_id], torch_results[case_id])
    assert report.passed, report.reasons
    assert report.num_collectives > 0


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_signatures_equal_single_process(runs, case_id):
    _, multi, _, single = runs
    case = _case(case_id)
    for attr in ("hlo_text", "fwd_hlo_text"):
        sig_multi = signature(case, getattr(multi[case_id], attr))
        assert sig_multi, attr
        assert sig_multi == signature(case, getattr(single[case_id], attr)), attr


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_numbers_equal_single_process(runs, case_id):
    _, multi, _, single = runs
    for what in ("outputs", "grads"):
        got, ref = getattr(multi[case_id], what), getattr(single[case_id], what)
        assert sorted(got) == sorted(ref)
        for key in ref:
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{what} {key}")
