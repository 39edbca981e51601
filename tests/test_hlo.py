"""parity.hlo: reading collectives out of HLO text (framework-neutral)."""

from collections import Counter

import pytest

from parity import hlo

# Lines in the format both XLA front ends print (shapes, layouts, metadata trimmed).
_TEXT = """
HloModule m, entry_computation_layout={(f32[2,4]{1,0})->f32[2,4]{1,0}}

ENTRY %main (p: f32[2,4]) -> f32[2,4] {
  %p = f32[2,4]{1,0} parameter(0)
  %cp.1 = f32[2,4]{1,0} collective-permute(f32[2,4]{1,0} %p), channel_id=1, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}, metadata={op_name="x"}
  %cp.2 = f32[2,4]{1,0} collective-permute(f32[2,4]{1,0} %cp.1), channel_id=7, source_target_pairs={{1,0},{2,1},{3,2},{0,3}}
  %ag = bf16[2,16]{1,0} all-gather(bf16[2,4]{1,0} %x), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={1}, use_global_device_ids=true
  %ar-start = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %y), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%add
  %ar-done = f32[8]{0} all-reduce-done((f32[8]{0}, f32[8]{0}) %ar-start)
  ROOT %rs = f32[2,1]{1,0} reduce-scatter(f32[2,4]{1,0} %cp.2), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={1}, to_apply=%add
}
"""


def test_collectives_in_program_order_with_pairs_and_bytes():
    ops = hlo.collectives(_TEXT)
    assert [op.kind for op in ops] == ["collective-permute", "collective-permute", "all-gather",
                                       "all-reduce", "reduce-scatter"]
    assert ops[0].pairs == ((0, 1), (1, 2), (2, 3), (3, 0))
    assert ops[1].pairs == ((0, 3), (1, 0), (2, 1), (3, 2))  # sorted
    assert ops[2].replica_groups == "{{0,1,2,3}}"
    assert ops[3].replica_groups == "{{0,1,2,3},{4,5,6,7}}"  # iota form made explicit
    assert [op.result_bytes for op in ops] == [32, 32, 64, 32, 8]
    assert [op.group_size for op in ops] == [2, 2, 4, 4, 4]
    # operand bytes: all-gather sends its [2,4] bf16 input (16 B), reduce-scatter its [2,4] f32
    assert [op.operand_bytes for op in ops] == [32, 32, 16, 32, 32]
    assert hlo.communication_bytes(_TEXT) == 144


def test_signature_ignores_channel_ids_but_not_pairs():
    renumbered = _TEXT.replace("channel_id=1,", "channel_id=99,")
    assert hlo.signature(renumbered) == hlo.signature(_TEXT)
    reversed_ring = _TEXT.replace("{{0,1},{1,2},{2,3},{3,0}}", "{{1,0},{2,1},{3,2},{0,3}}")
    assert hlo.signature(reversed_ring) != hlo.signature(_TEXT)
    assert hlo.signature(_TEXT)[("collective-permute", ((0, 1), (1, 2), (2, 3), (3, 0)), "")] == 1


def test_count_and_ring_pairs():
    assert hlo.count(_TEXT, "collective-permute") == 2
    assert hlo.count(_TEXT, "all-to-all") == 0
    with pytest.raises(ValueError, match="kind='permute'"):
        hlo.count(_TEXT, "permute")
    assert hlo.ring_pairs([[0, 1, 2, 3]]) == ((0, 1), (1, 2), (2, 3), (3, 0))
    assert hlo.ring_pairs([[0, 1], [2, 3]], shift_up=False) == ((0, 1), (1, 0), (2, 3), (3, 2))
    assert Counter(op.pairs for op in hlo.collectives(_TEXT))[hlo.ring_pairs([[0, 1, 2, 3]])] == 1


def test_instruction_count():
    assert hlo.instruction_count(_TEXT) == 7


def test_collectives_over_single_device_groups_move_no_data_and_are_skipped():
    text = _TEXT + """
  %ar1 = f32[8]{0} all-reduce(f32[8]{0} %z), channel_id=5, replica_groups={{0},{1},{2},{3}}, to_apply=%add
  %ar2 = f32[8]{0} all-reduce(f32[8]{0} %z), channel_id=6, replica_groups=[4,1]<=[4], to_apply=%add
  %cp3 = f32[8]{0} collective-permute(f32[8]{0} %z), channel_id=8, source_target_pairs={{0,0},{1,1}}
"""
    assert len(hlo.collectives(text)) == len(hlo.collectives(_TEXT)) == 5
    assert len(hlo.collectives(text, include_trivial=True)) == 8
    assert hlo.signature(text) == hlo.signature(_TEXT)


@pytest.mark.parametrize("text, groups", [
    ("[2,4]<=[8]", "{{0,1,2,3},{4,5,6,7}}"),
    ("[4,2]<=[2,4]T(1,0)", "{{0,4},{1,5},{2,6},{3,7}}"),
    ("{{4,0},{1,5},{2,6},{7,3}}", "{{0,4},{1,5},{2,6},{3,7}}"),
    ("[8,1]<=[8]", "{{0},{1},{2},{3},{4},{5},{6},{7}}"),
])
def test_canonical_groups(text, groups):
    assert hlo.canonical_groups(text) == groups


def test_signature_can_merge_all_reduces_over_the_same_groups():
    extra = _TEXT.replace("ROOT %rs", "%ar2 = f32[8]{0} all-reduce(f32[8]{0} %y), channel_id=9, "
                          "replica_groups=[2,4]<=[8], to_apply=%add\n  ROOT %rs")
    assert hlo.signature(extra) != hlo.signature(_TEXT)
    assert hlo.signature(extra, merge_all_reduces=True) == hlo.signature(_TEXT, merge_all_reduces=True)
    other_groups = extra.replace("channel_id=9, replica_groups=[2,4]<=[8]",
                                 "channel_id=9, replica_groups={{0,4},{1,5},{2,6},{3,7}}")
    assert hlo.signature(other_groups, merge_all_reduces=True) != hlo.signature(_TEXT, merge_all_reduces=True)


_LOOP = """
HloModule loop

%fused (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], f32[4,8], f32[8,2])) -> (s32[], f32[4,8], f32[8,2]) {
  %a = f32[4,8]{1,0} get-tuple-element((s32[], f32[4,8], f32[8,2]) %t), index=1
  %b = f32[8,2]{1,0} get-tuple-element((s32[], f32[4,8], f32[8,2]) %t), index=2
  %f = f32[4,2]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
  ROOT %r = (s32[], f32[4,8], f32[8,2]) tuple(%i, %a, %b)
}

ENTRY %main (x: f32[4,8], w: f32[8,2]) -> f32[2,2] {
  %w2 = (s32[], f32[4,8], f32[8,2]) while((s32[], f32[4,8], f32[8,2]) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %e = f32[2,2]{1,0} dot(f32[2,8]{1,0} %y, f32[8,2]{1,0} %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_dot_flops_multiplies_loop_bodies_by_their_trip_count():
    # loop: 3 trips x (2 * 4*2 outputs * 8 contracted) = 384; entry dot: 2 * 2*2 * 8 = 64
    assert hlo.dot_flops(_LOOP) == 3 * 2 * 4 * 2 * 8 + 2 * 2 * 2 * 8
    with pytest.raises(ValueError, match="no known trip count"):
        hlo.dot_flops(_LOOP.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""))
    with pytest.raises(ValueError, match="no ENTRY"):
        hlo.dot_flops(_LOOP.replace("ENTRY ", ""))


def test_ordered_groups_keep_each_groups_device_order():
    assert hlo.canonical_groups("{{5,4},{1,0}}", keep_order=True) == "{{1,0},{5,4}}"
    assert hlo.canonical_groups("{{5,4},{1,0}}") == "{{0,1},{4,5}}"
    assert hlo.canonical_groups("[4,2]<=[2,4]T(1,0)", keep_order=True) == "{{0,4},{1,5},{2,6},{3,7}}"
    reordered = _TEXT.replace("replica_groups={{0,1,2,3}}, dimensions={1}, use_global",
                              "replica_groups={{1,0,2,3}}, dimensions={1}, use_global")
    ag = [op for op in hlo.collectives(reordered) if op.kind == "all-gather"][0]
    assert ag.ordered_groups == "{{1,0,2,3}}" and ag.replica_groups == "{{0,1,2,3}}"


def test_exact_signature_sees_group_order_and_bytes():
    sig = hlo.signature(_TEXT, exact=True)
    assert sig[("all-gather", (), "{{0,1,2,3}}", 64)] == 1
    reordered = _TEXT.replace("replica_groups={{0,1,2,3}}, dimensions={1}, use_global",
                              "replica_groups={{1,0,2,3}}, dimensions={1}, use_global")
    assert hlo.signature(reordered) == hlo.signature(_TEXT)  # the loose form sorts it away
    assert hlo.signature(reordered, exact=True) != sig
    bigger = _TEXT.replace("%ag = bf16[2,16]", "%ag = bf16[2,32]")
    assert hlo.signature(bigger) == hlo.signature(_TEXT)
    assert hlo.signature(bigger, exact=True) != sig


def test_exact_merged_all_reduces_compare_total_bytes_per_group_set():
    extra = _TEXT.replace("ROOT %rs", "%ar2 = f32[4]{0} all-reduce(f32[4]{0} %y), channel_id=9, "
                          "replica_groups=[2,4]<=[8], to_apply=%add\n  ROOT %rs")
    merged = hlo.signature(extra, merge_all_reduces=True, exact=True)
    assert merged[("all-reduce", (), "{{0,1,2,3},{4,5,6,7}}", 32 + 16)] == 1
    combined = _TEXT.replace("%ar-start = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %y)",
                             "%ar-start = (f32[8]{0}, f32[4]{0}) all-reduce(f32[8]{0} %y, f32[4]{0} %z)")
    assert hlo.signature(combined, merge_all_reduces=True, exact=True) == merged
    assert hlo.signature(extra, merge_all_reduces=True, exact=True) != hlo.signature(
        _TEXT, merge_all_reduces=True, exact=True)
