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
