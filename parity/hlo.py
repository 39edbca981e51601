"""Read the communication of a compiled XLA program from its HLO text (framework-neutral).

Both JAX (``jax.jit(f).lower(...).compile().as_text()``) and torch_xla (``--xla_dump_to`` files
``*after_optimizations.txt``) print collectives the same way, e.g.::

    %cp = f32[2,4]{1,0} collective-permute(f32[2,4]{1,0} %x), channel_id=3,
          source_target_pairs={{0,1},{1,2},{2,3},{3,0}}

This module extracts the collectives in program order as :class:`Collective` records. Channel ids
are ignored, so two programs compare equal when they do the same communication.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

__all__ = ["COLLECTIVE_KINDS", "Collective", "canonical_groups", "collectives", "signature",
           "count", "ring_pairs", "instruction_count", "communication_bytes", "dot_flops"]


COLLECTIVE_KINDS = (
    "collective-permute", "all-gather", "all-reduce", "reduce-scatter", "all-to-all",
    "collective-broadcast",
)
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

# "%name = <result type> <kind>(<operands>)" (async forms: "<kind>-start(" ... "<kind>-done(").
_INSTR = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<rtype>.+?)\s+"
    r"(?P<kind>" + "|".join(re.escape(k) for k in COLLECTIVE_KINDS) + r")(?P<start>-start)?\("
)
_PAIRS = re.compile(r"source_target_pairs=\{(?P<body>(?:\{\d+,\d+\},?)*)\}")
_GROUPS = re.compile(r"replica_groups=(?P<v>\{(?:\{[\d,]*\},?)*\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)")
_SHAPE = re.compile(r"(?P<dt>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


@dataclass(frozen=True)
class Collective:
    """One collective op: its kind, sorted permute pairs (or ()), replica groups text, result bytes.

    ``replica_groups`` is sorted within and across groups (what the devices are);
    ``ordered_groups`` keeps each group's device order (the order an all-gather concatenates
    in and a reduce-scatter hands blocks out), with only the list of groups sorted.
    """

    kind: str
    pairs: tuple[tuple[int, int], ...] = ()
    replica_groups: str = ""
    result_bytes: int = 0
    ordered_groups: str = ""

    @property
    def group_size(self) -> int:
        """Devices per replica group (2 for a permute pair; 0 if the groups are not printed)."""
        if self.pairs:
            return 2
        first = re.search(r"\{([\d,]+)\}", self.replica_groups)
        return len(first.group(1).split(",")) if first else 0

    @property
    def operand_bytes(self) -> int:
        """Bytes of the op's operand on one device (all-gather: result / group; reduce-scatter:
        result x group; the others: the result size)."""
        g = self.group_size or 1
        if self.kind == "all-gather":
            return self.result_bytes // g
        if self.kind == "reduce-scatter":
            return self.result_bytes * g
        return self.result_bytes

    def key(self) -> tuple:
        """Comparison key: kind, pairs and replica groups (sizes and channel ids excluded)."""
        return (self.kind, self.pairs, self.replica_groups)

    def exact_key(self) -> tuple:
        """Exact comparison key: kind, pairs, replica groups in device order, result bytes."""
        return (self.kind, self.pairs, self.ordered_groups, self.result_bytes)


def _bytes_of(type_text: str) -> int:
    total = 0
    for m in _SHAPE.finditer(type_text):
        dt = m.group("dt")
        if dt not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, m.group("dims").split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dt]
    return total


def canonical_groups(text: str, keep_order: bool = False) -> str:
    """Replica groups in one explicit, sorted form: ``{{0,1},{2,3}}``.

    XLA prints groups either explicitly (``{{0,4},{1,5}}``) or in iota form (``[2,4]<=[8]``,
    ``[4,2]<=[2,4]T(1,0)``); the two front ends may choose differently for the same groups.
    With ``keep_order`` each group keeps its device order (``{{1,0},{2,3}}`` stays so); only
    the list of groups is sorted, since which group comes first has no meaning.
    """
    if not text:
        return ""
    iota = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if iota:
        shape = [int(v) for v in iota.group(1).split(",")]
        dims = [int(v) for v in iota.group(2).split(",")]
        total = 1
        for d in dims:
            total *= d
        ids = list(range(total))
        if iota.group(3):
            perm = [int(v) for v in iota.group(3).split(",")]
            ids = _transpose(ids, dims, perm)
        size = shape[-1]
        groups = [ids[i:i + size] for i in range(0, len(ids), size)]
    else:
        groups = [[int(v) for v in g.split(",") if v] for g in re.findall(r"\{([\d,]*)\}", text)]
    groups = sorted(g if keep_order else sorted(g) for g in groups)
    return "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in groups) + "}"


def _transpose(ids: list[int], dims: list[int], perm: list[int]) -> list[int]:
    """Row-major ``ids`` of shape ``dims`` transposed by ``perm``, flattened row-major."""
    strides = [1] * len(dims)
    for i in range(len(dims) - 2, -1, -1):
        strides[i] = strides[i + 1] * dims[i + 1]
    new_dims = [dims[p] for p in perm]
    out = []
    index = [0] * len(new_dims)
    for _ in range(len(ids)):
        out.append(ids[sum(index[k] * strides[perm[k]] for k in range(len(perm)))])
        for k in range(len(new_dims) - 1, -1, -1):
            index[k] += 1
            if index[k] < new_dims[k]:
                break
            index[k] = 0
    return out


def _trivial(groups: str, pairs) -> bool:
    """True for a collective that moves no data: every replica group has one device, or every
    permute pair sends a device to itself."""
    if pairs:
        return all(a == b for a, b in pairs)
    if not groups:
        return False
    return all(len(g.split(",")) == 1 for g in re.findall(r"\{([\d,]+)\}", groups))


def collectives(hlo_text: str, include_trivial: bool = False) -> list[Collective]:
    """All collectives of an HLO module text, in program order (async start/done counted once).

    Collectives over groups of one device (e.g. ``replica_groups={{0},{1}}``, which XLA may keep
    for a reduction over an axis of size 1) move no data and are left out unless
    ``include_trivial``.
    """
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        pairs_m = _PAIRS.search(line)
        pairs = ()
        if pairs_m:
            pairs = tuple(sorted(tuple(int(v) for v in p.split(","))
                                 for p in re.findall(r"\{(\d+,\d+)\}", pairs_m.group("body"))))
        groups_m = _GROUPS.search(line)
        groups = canonical_groups(groups_m.group("v")) if groups_m else ""
        ordered = canonical_groups(groups_m.group("v"), keep_order=True) if groups_m else ""
        if not include_trivial and _trivial(groups, pairs):
            continue
        rtype = m.group("rtype")
        if m.group("start"):  # async start returns a tuple (operand, result, ...): count result only
            shapes = _SHAPE.findall(rtype)
            rtype = "{}[{}]".format(*shapes[-1]) if shapes else rtype
        out.append(Collective(kind=m.group("kind"), pairs=pairs,
                              replica_groups=groups, result_bytes=_bytes_of(rtype),
                              ordered_groups=ordered))
    return out


def signature(hlo_text_or_ops, merge_all_reduces: bool = False, exact: bool = False) -> Counter:
    """Multiset of (kind, pairs, replica_groups) of a program: what 'same communication' means.

    With ``exact`` the keys are :meth:`Collective.exact_key`: replica groups keep their device
    order and each op's result bytes count, so a reordered group or a resized op differs.

    With ``merge_all_reduces`` all-reduces over the same groups are merged: XLA's all-reduce
    combiner merges independent reductions (e.g. of a kernel's and a bias's gradients) into one
    tuple op or not by heuristics that differ between front ends, while the data and the groups
    are the same. Without ``exact`` they count once (presence); with ``exact`` they become one
    key per group set carrying the total bytes reduced over it, which the combiner preserves.

    Example::

        signature(text, exact=True, merge_all_reduces=True)
        # Counter({('collective-permute', ((0, 1), (1, 0)), '', 256): 2,
        #          ('all-reduce', (), '{{0,1}}', 1088): 1})
    """
    ops = collectives(hlo_text_or_ops) if isinstance(hlo_text_or_ops, str) else hlo_text_or_ops
    if exact:
        sig = Counter(op.exact_key() for op in ops if not (merge_all_reduces
                                                          and op.kind == "all-reduce"))
        if merge_all_reduces:
            totals = Counter()
            for op in ops:
                if op.kind == "all-reduce":
                    totals[op.ordered_groups] += op.result_bytes
            sig.update({("all-reduce", (), g, b): 1 for g, b in totals.items()})
        return sig
    sig = Counter(op.key() for op in ops)
    if merge_all_reduces:
        for key in sig:
            if key[0] == "all-reduce":
                sig[key] = 1
    return sig


def count(hlo_text: str, kind: str) -> int:
    """Number of collectives of ``kind`` (e.g. ``'collective-permute'``) in the program."""
    if kind not in COLLECTIVE_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {COLLECTIVE_KINDS}")
    return sum(op.kind == kind for op in collectives(hlo_text))


def ring_pairs(groups: list[list[int]], shift_up: bool = True) -> tuple[tuple[int, int], ...]:
    """The source_target_pairs of a cyclic shift within each device group, sorted.

    ``groups`` lists the device ids of each ring in ring order (e.g. ``[[0, 1, 2, 3]]``); with
    ``shift_up`` device ``g[j]`` sends to ``g[j+1]`` (and the last to the first).
    """
    pairs = []
    for g in groups:
        n = len(g)
        for j in range(n):
            src, dst = (g[j], g[(j + 1) % n]) if shift_up else (g[(j + 1) % n], g[j])
            pairs.append((src, dst))
    return tuple(sorted(pairs))


def instruction_count(hlo_text: str) -> int:
    """Number of HLO instructions (lines of the form ``%x = ...``) in the module text."""
    return sum(1 for line in hlo_text.splitlines()
               if re.match(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*\S", line) and "HloModule" not in line)


def communication_bytes(hlo_text: str) -> int:
    """Sum of collective operand sizes in bytes (per device) over the program."""
    return sum(op.operand_bytes for op in collectives(hlo_text))


# ------------------------------------------------------------------------------ dot FLOPs
_COMP_HEAD = re.compile(r"^(?P<entry>ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\((?P<params>.*)\)\s*->.*\{\s*$")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<type>\S+?)(?:\{[\d,]*\})?\s+(?P<op>[\w\-]+)\(")
_ARRAY = re.compile(r"^(?P<dt>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


def _dims(type_text: str) -> list[int] | None:
    m = _ARRAY.match(type_text)
    return [int(d) for d in m.group("dims").split(",") if d] if m else None


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    comps, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        head = _COMP_HEAD.match(line)
        if head:
            current = head.group("name")
            comps[current] = [line]
            if head.group("entry"):
                entry = current
        elif current is not None:
            comps[current].append(line)
            if line.strip() == "}":
                current = None
    return comps, entry


def dot_flops(hlo_text: str) -> int:
    """FLOPs of the ``dot`` instructions the program executes per device: 2 * result size *
    contracted size per dot, through fusions and calls, and times the known trip count of every
    ``while`` loop (XLA's cost analysis counts a loop body once). ValueError if a loop's trip
    count is not known."""
    comps, entry = _computations(hlo_text)
    if entry is None:
        raise ValueError("hlo_text has no ENTRY computation")
    memo: dict[str, int] = {}

    def flops(name: str) -> int:
        if name in memo:
            return memo[name]
        lines = comps[name]
        shapes = {}
        for p in re.finditer(r"([\w.\-]+):\s*([a-z]+\d*\[[\d,]*\])", lines[0]):
            shapes[p.group(1)] = _dims(p.group(2))
        total = 0
        for line in lines[1:]:
            d = _DEF.match(line)
            if d:
                shapes[d.group("name")] = _dims(d.group("type"))
            if d and d.group("op") == "dot":
                args = line[line.index("dot(") + 4:]
                typed = re.match(r"\s*([a-z]+\d*\[[\d,]*\])(?:\{[\d,]*\})?\s+%", args)
                lhs = _dims(typed.group(1)) if typed else shapes.get(
                    re.match(r"\s*%([\w.\-]+)", args).group(1))
                contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
                k = 1
                for i in (int(v) for v in contract.group(1).split(",") if v):
                    k *= lhs[i]
                out = 1
                for v in shapes[d.group("name")] or []:
                    out *= v
                total += 2 * out * k
            for callee in re.findall(r"calls=%([\w.\-]+)", line):
                total += flops(callee)
            if re.search(r"\scall\(", line):
                total += sum(flops(c) for c in re.findall(r"to_apply=%([\w.\-]+)", line))
            if re.search(r"\swhile\(", line):
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
                if not trips:
                    raise ValueError(f"a while loop calling {body} has no known trip count")
                total += int(trips.group(1)) * flops(body)
        memo[name] = total
        return total

    return flops(entry)
