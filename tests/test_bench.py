"""bench.core logic that does not time anything: ring minimum and the targets report."""

from bench import core
from parity import cases as C


def test_ring_minimum_bytes():
    # gather: (n-1)/n of the gathered input [8, 32] f32; scatter: of the reduced output [8, 64]
    assert core.ring_minimum_bytes(C.Case("tpasync", "gather-uni", 4, batch=8, in_features=32,
                                          out_features=64)) == 3 * 8 * 32 * 4 // 4
    assert core.ring_minimum_bytes(C.Case("tpasync", "scatter-split", 4, batch=8, in_features=32,
                                          out_features=64)) == 3 * 8 * 64 * 4 // 4
    assert core.ring_minimum_bytes(C.Case("linear", "column-ag", 8, dtype="bfloat16", batch=2,
                                          in_features=16, out_features=8)) == 7 * 2 * 16 * 2 // 8
    assert core.ring_minimum_bytes(C.Case("linear", "row-rs", 2)) == 8 * 32 * 4 // 2
    assert core.ring_minimum_bytes(C.Case("tpdense", "gather", 1)) == 0


def _row(module, variant, n, jax_s, torch_s, jb, tb):
    return {"module": module, "variant": variant, "n": n, "jax_s": jax_s, "torch_s": torch_s,
            "torch_over_jax": torch_s / jax_s, "jax_tp_over_single": 1.0,
            "torch_tp_over_single": 1.2, "jax_bytes_over_min": jb, "torch_bytes_over_min": tb}


def test_markdown_reports_each_target_met_or_missed(tmp_path):
    meta = {"machine": "m", "cpus": 2, "devices": 8, "repeats": 3, "warmup": 1,
            "shape": [1, 2, 3], "date": "d"}
    good = [_row("tpasync", "gather-uni", 8, 1.0, 1.05, 1.0, 1.0)]
    path = tmp_path / "r.md"
    core.write_markdown(str(path), good, [], meta)
    text = path.read_text()
    assert "worst 1.05 (met)" in text and "both backends: met" in text
    bad = [_row("tpasync", "gather-uni", 8, 1.0, 2.0, 1.0, 1.5)]
    core.write_markdown(str(path), bad, [], meta)
    text = path.read_text()
    assert "worst 2.00 (MISSED)" in text and "both backends: MISSED" in text


def test_bad_devices_exit_2(capsys):
    assert core.main(["--devices", "3"]) == 2
    assert "--devices=3" in capsys.readouterr().err


def test_bad_shape_and_tp_exit_2_before_any_run(capsys):
    assert core.main(["--shape", "32,256"]) == 2
    assert "B,IN,OUT" in capsys.readouterr().err
    assert core.main(["--tp", "3"]) == 2
    assert "--tp=[3]" in capsys.readouterr().err
    assert core.main(["--tp", "8", "--shape", "32,100,256"]) == 2
    assert "--shape=32,100,256" in capsys.readouterr().err


def test_gpt_bench_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    """``--gpt --quick`` (tp=2; ring mode only, to keep it short) on a tiny GPT: both backends
    run, losses agree, the table has the row and the median / worst lines (times are not
    asserted)."""
    import json

    from bench import gpt_block

    monkeypatch.setattr(gpt_block, "SIZES", dict(vocab_size=64, max_seq_len=8, hidden_size=32,
                                                  num_heads=8, num_layers=1, mlp_hidden_size=64))
    monkeypatch.setattr(gpt_block, "MODES", ("ring",))
    assert core.main(["--gpt", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["n"], r["mode"]) for r in rows] == [(2, "ring")]
    assert all(r["loss_ok"] and r["jax_s"] > 0 and r["torch_cached_s"] > 0 for r in rows)
    text = (tmp_path / "results.md").read_text()
    assert "| 2 | ring |" in text and "torch/JAX cached: median" in text


def test_gpt_bench_flags_a_loss_difference():
    from bench import gpt_block

    row = {"n": 2, "mode": "plain", "jax_s": 0.01, "torch_cached_s": 0.01, "torch_s": 0.02,
           "torch_cached_over_jax": 1.0, "torch_lazy_over_jax": 2.0, "jax_first_s": 1.0,
           "torch_first_s": 1.0, "loss_rel_diff": 1e-3, "loss_ok": False}
    meta = {"devices": 8, "repeats": 3, "warmup": 1, "date": "d", "load_before": "1",
            "load_after": "1"}
    assert "1.0e-03 (OVER)" in gpt_block.markdown([row], meta)


# ------------------------------------------------------------------------- --compile (issue 14)
def test_compile_sweep_covers_every_method_tp_and_size():
    from bench import compile as cs

    cases = cs.sweep_cases()
    assert {(m, v) for m, v, *_ in cases} == set(cs.METHODS)
    assert {(m, v, n) for m, v, n, *_ in cases} == {(m, v, n) for m, v in cs.METHODS
                                                     for n in cs.AXIS_SIZES}
    for dim in (3, 4):  # in and out: >= 3 sizes, non-powers of two among them
        sizes = {c[dim] for c in cases}
        assert len(sizes) >= 3 and {96, 192, 384} <= sizes and min(sizes) == 64
        assert max(sizes) == 512
    assert all(c in cases for c in cs.ISSUE_CASES)
    assert all(fi % n == 0 and fo % n == 0 for _, _, n, fi, fo in cases)


def test_compile_timeout_is_a_cliff_not_a_skip():
    import sys

    from bench import compile as cs

    hang = [sys.executable, "-c", "import time; print('START', flush=True); time.sleep(60)"]
    res = cs.run_case("torch", ("linear", "column-ag", 4, 64, 256), timeout=0.5, command=hang)
    assert res["status"] == "timeout" and res["first_step_s"] == 0.5
    boom = [sys.executable, "-c", "raise SystemExit('no worker here')"]
    res = cs.run_case("jax", ("linear", "column-ag", 4, 64, 256), timeout=30, command=boom)
    assert res["status"] == "error" and "no worker here" in res["error"]


def _compile_row(variant, n, jax_s, torch_s, torch_status="ok"):
    return {"module": "linear", "variant": variant, "n": n, "in": 64, "out": 256,
            "jax_status": "ok", "jax_first_step_s": jax_s, "torch_status": torch_status,
            "torch_first_step_s": torch_s, "torch_second_step_s": 0.01,
            "torch_over_jax": torch_s / jax_s, "cliff": torch_status == "timeout"}


def test_compile_summary_and_markdown_report_cliffs():
    from bench import compile as cs

    rows = [_compile_row("column-ag", 4, 0.5, 60.0, "timeout"), _compile_row("row-rs", 2, 0.5, 0.6),
            _compile_row("row-rsbi", 8, 0.5, 0.75)]
    s = cs.summary(rows)
    assert s["median_ratio"] == 1.5 and s["worst_ratio"] == 120.0
    assert s["max_torch_first_s"] == 60.0 and s["cliffs"] == ["linear-column-ag tp=4 64->256"]
    meta = {"cases": 3, "devices": 8, "timeout": 60.0, "load_before": "1", "load_after": "2",
            "date": "d"}
    text = cs.markdown(rows, meta)
    assert ">60 (CLIFF)" in text and "cliffs (timeouts): 1" in text and "median 1.50" in text


def test_compile_quick_writes_table_json_and_plot(tmp_path):
    """``--compile --quick`` end to end: real workers, both backends (times are not asserted)."""
    import json

    assert core.main(["--compile", "--quick", "--out", str(tmp_path), "--timeout", "300"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    from bench import compile as cs

    assert len(data["rows"]) == len(cs.QUICK_CASES)
    for row in data["rows"]:
        for backend in cs.BACKENDS:
            assert row[f"{backend}_status"] in ("ok", "timeout"), row.get(f"{backend}_error")
    assert "torch/JAX first step" in (tmp_path / "results.md").read_text()
    # A torch layer's first step must not import JAX (torch_xla's xs.mark_sharding does, through
    # torchax: 3.5 s of the first step here; torch_impl.xla annotates without it).
    assert data["rows"][0]["torch_jax_loaded"] is False
    assert (tmp_path / "compile_first_step.png").stat().st_size > 0


def test_gpt_matrix_compare_reports_each_bar(tmp_path, capsys):
    """``bench.gpt_matrix --compare`` on synthetic runs: one case within every bar, one over."""
    import json

    import numpy as np

    from bench import gpt_matrix

    base, ok, bad = "1,1,1,1/sync", "1,1,1,8/sync", "2,2,1,2/async"
    losses = [4.0, 3.5]
    sig = [[["all-reduce"], 1]]

    def entry(ls, s=sig):
        return {"losses": ls, "signature": s, "param_bytes_per_device": 1, "param_bytes": 8}

    jax_runs = {base: entry(losses), ok: entry(losses), bad: entry(losses)}
    torch_runs = {ok: entry([4.0, 3.5 * (1 + 5e-6)]),
                  bad: entry([4.0, 3.5 * (1 + 5e-5)], [[["all-gather"], 1]])}
    (tmp_path / "jax.json").write_text(json.dumps(jax_runs))
    (tmp_path / "torch.json").write_text(json.dumps(torch_runs))
    w = np.ones(3, np.float32)
    np.savez(tmp_path / "jax.npz", **{f"{n}|w": w for n in jax_runs})
    np.savez(tmp_path / "torch.npz", **{f"{ok}|w": w, f"{bad}|w": w + 2e-4})
    rows = gpt_matrix.compare(tmp_path)
    out = capsys.readouterr().out
    assert rows[ok]["jax_vs_torch_loss_rel"] <= 1e-5 < rows[bad]["jax_vs_torch_loss_rel"]
    assert rows[ok]["signatures_equal"] and not rows[bad]["signatures_equal"]
    assert "jax_vs_torch_loss_rel      worst 5.00e-05 (2,2,1,2/async) bar 1e-05 OVER" in out
    assert "jax_vs_torch_param_abs     worst 2.00e-04 (2,2,1,2/async) bar 1e-04 OVER" in out
    assert "signatures equal in 1/2 cases; differ: 2,2,1,2/async" in out
