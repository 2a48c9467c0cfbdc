"""The communication a compiled program does, read from its optimised HLO text.

`collectives(compiled.as_text())` lists every collective of one device's program (all-gather,
reduce-scatter, all-reduce, all-to-all, ragged all-to-all, collective-permute; their async `-start`
forms counted once, `-done` and the TPU's in-flight copies never) with the bytes it moves per device
and how many times it runs: a collective inside a while loop's body runs once per iteration, so each
computation's multiplicity is the sum over its call sites of the caller's multiplicity times the loop's
trip count (the GPU compiler states `known_trip_count`; the TPU compiler's loops end on
`counter < constant`, read from the condition). `cost_analysis()` has no such figures, and counts a loop body once.

Bytes a device sends in one execution, for the ring algorithms the libraries use on groups of n (B the
op's output bytes on one device): all-gather B (n-1)/n; reduce-scatter B (n-1); all-reduce 2 B (n-1)/n;
all-to-all B (n-1)/n (ragged: B the smaller of its operand and output buffers, as if the rows spread
evenly); collective-permute B when the device sends to another. A ring runs at the slowest link it
crosses, so `seconds` charges a collective whose groups stay inside a node (GPUs: an NVLink domain;
TPUs: the slice's ICI) at the link's one-direction bandwidth and one that crosses nodes at the
network's.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")
_OPCODE = re.compile(r"\s(" + "|".join(sorted(KINDS, key=len, reverse=True)) + r")(-start)?\(")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1,
                "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?(%[^\s(]+)\s*\(.*\{\s*$")
# A TPU async collective fusion repeats its collective (same channel) in the fusions that run while it is
# in flight, marked with no flags of their own; the start fusion's copy is the one counted.
_CONTINUATION = '"async_collective_fusion_config":{"flag_start":"-1"'
_CALLEES = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                      r"(\{[^}]*\}|%[^\s,)]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    output_bytes: float  # the op's output on one device (all outputs of a combined op)
    group_size: int
    groups: tuple[tuple[int, ...], ...]  # device ids of each group (a permute: its source-target pairs)
    runs: int  # executions per step (loop trip counts multiplied in)

    @property
    def sent_bytes(self) -> float:
        """Bytes one device sends in one execution (module docstring)."""
        b, n = self.output_bytes, self.group_size
        if self.kind == "collective-permute":
            return b if any(src != dst for src, dst in self.groups) else 0.0
        if n <= 1:
            return 0.0
        return {"all-gather": b * (n - 1) / n, "reduce-scatter": b * (n - 1), "all-reduce": 2 * b * (n - 1) / n,
                "all-to-all": b * (n - 1) / n, "ragged-all-to-all": b * (n - 1) / n}[self.kind]

    def crosses(self, devices_per_node: int) -> bool:
        """Whether a group spans devices of more than one node (ids // devices_per_node)."""
        return any(len({d // devices_per_node for d in g}) > 1 for g in self.groups)


# ---- HLO text -----------------------------------------------------------------------------------
def computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines; the entry computation is also under "ENTRY"."""
    comps, name = {}, None
    for line in text.splitlines():
        if name is None:
            m = _HEADER.match(line)
            if m:
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    comps["ENTRY"] = comps[name]
        elif line.strip() == "}":
            name = None
        else:
            comps[name].append(line)
    return comps


def _strip(s: str) -> str:
    return re.sub(r"/\*.*?\*/", "", re.sub(r"\{[^{}]*\}", "", re.sub(r"\{[^{}]*\}", "", s)))


def _split_tuple(s: str) -> list[str]:
    """"(a, (b, c))" -> ["a", "(b, c)"]; an array type -> [itself]."""
    s = s.strip()
    if not s.startswith("("):
        return [s]
    parts, depth, start, dims = [], 0, 1, 0
    for i, ch in enumerate(s):
        if ch in "[]":
            dims += 1 if ch == "[" else -1
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(s[start:i])
        elif ch == "," and depth == 1 and not dims:
            parts.append(s[start:i])
            start = i + 1
    return [p.strip() for p in parts if p.strip()]


def type_bytes(s: str) -> float:
    return sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(s))


def _output_type(kind: str, start: bool, result: str) -> str:
    """The outputs of an op whose result type is `result`: an async start of a gather, scatter, all-to-all
    or permute returns (operands, outputs[, context]); an all-reduce start returns its outputs."""
    result = _strip(result)
    if start and kind != "all-reduce":
        parts = _split_tuple(result)
        return parts[1] if len(parts) > 1 else parts[0]
    return result


def _iota_groups(spec: str) -> np.ndarray:
    """"[G,S]<=[d0,d1,...]T(p...)" -> G x S device ids."""
    m = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", spec)
    shape = [int(x) for x in m.group(1).split(",")]
    dims = [int(x) for x in m.group(2).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(shape)


def replica_groups(line: str, num_devices: int) -> tuple[tuple[int, ...], ...]:
    """The device groups of a collective's `replica_groups` in any of the compilers' spellings:
    {{0,1},{2,3}}; [2,2]<=[4] (iota, optionally transposed); mesh['a'=2,'b'=4][, device_ids=(...)] {'b'}
    (groups vary the named axes, the others fixed); {} or none: every device."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(([^)]*\)?)\))?\s*\{([^}]*)\}", line)
    if m:
        axes = [(a.strip().strip("'").split("'=")[0], int(a.split("=")[1])) for a in m.group(1).split(",")]
        names, sizes = [a for a, _ in axes], [s for _, s in axes]
        if m.group(2) and m.group(2).startswith("["):
            ids = _mesh_ids(m.group(2), sizes)
        elif m.group(2):
            ids = np.array([int(x) for x in re.findall(r"\d+", m.group(2))]).reshape(sizes)
        else:
            ids = np.arange(math.prod(sizes)).reshape(sizes)
        chosen = [names.index(a.strip().strip("'")) for a in m.group(3).split(",") if a.strip()]
        rest = [i for i in range(len(names)) if i not in chosen]
        grouped = ids.transpose(rest + chosen).reshape(-1, math.prod(sizes[i] for i in chosen) if chosen else 1)
        return tuple(tuple(int(x) for x in g) for g in grouped)
    m = re.search(r"replica_groups=(\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", line)
    if m:
        return tuple(tuple(int(x) for x in g) for g in _iota_groups(m.group(1)))
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if m and m.group(1):
        return tuple(tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
    return (tuple(range(num_devices)),)


def _mesh_ids(spec: str, sizes: list[int]) -> np.ndarray:
    """device_ids=([8,2]T(1,0)): an iota of that shape, transposed, laid over the mesh's shape."""
    shape = [int(x) for x in re.match(r"\[([\d,]+)\]", spec).group(1).split(",")]
    ids = np.arange(math.prod(shape)).reshape(shape)
    t = re.search(r"T\(([\d,]+)\)", spec)
    if t:
        ids = ids.transpose([int(x) for x in t.group(1).split(",")])
    return ids.reshape(sizes)


def _permute_pairs(line: str) -> tuple[tuple[int, ...], ...]:
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    return tuple(tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1))) if m else ()


def _trip_count(line: str, comps: dict[str, list[str]]) -> int | None:
    """A while loop's iterations: the compiler's known_trip_count, else `counter < constant` in its
    condition (the counter starting at 0, as a scan's does); None when neither is there."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=(%[^\s,)]+)", line)
    body = comps.get(cond.group(1), []) if cond else []
    constants = {}
    for ins in body:
        c = re.match(r"\s*(%[^\s=]+)\s*=\s*s(?:32|64)\[\][^ ]*\s+constant\((\d+)\)", ins)
        if c:
            constants[c.group(1)] = int(c.group(2))
    for ins in body:
        if ins.lstrip().startswith("ROOT") and "compare(" in ins and "direction=LT" in ins:
            args = re.search(r"compare\(([^)]*)\)", ins).group(1).split(",")
            bound = constants.get(args[-1].strip())
            if bound is not None:
                return bound
    return None


def multiplicities(comps: dict[str, list[str]]) -> tuple[dict[str, int], int]:
    """How many times each computation runs per execution of the entry, and how many while loops had no
    trip count found (counted once). The second half of a TPU async collective fusion
    (`%async-collective-done...`) repeats the collective of its start and is not followed."""
    edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
    unknown = 0
    for name, lines in comps.items():
        if name == "ENTRY":
            continue
        for ins in lines:
            if re.match(r"\s*(ROOT\s+)?%async-collective-done", ins):
                continue
            trips = 1
            if " while(" in ins:
                trips = _trip_count(ins, comps)
                if trips is None:
                    unknown, trips = unknown + 1, 1
            for key, target in _CALLEES.findall(ins):
                for callee in re.findall(r"%[^\s,}]+", target):
                    edges[name].append((callee, trips if key == "body" else 1))
    runs: dict[str, int] = defaultdict(int)
    entry = next((n for n, lines in comps.items() if n != "ENTRY" and lines is comps.get("ENTRY")), None)
    order = _topological(entry, edges)
    runs[entry] = 1
    for name in order:
        for callee, trips in edges.get(name, ()):
            runs[callee] += runs[name] * trips
    return dict(runs), unknown


def _topological(entry: str | None, edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    seen, order = set(), []

    def visit(n):
        stack = [(n, iter(edges.get(n, ())))]
        seen.add(n)
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                order.append(node)
            elif nxt[0] not in seen:
                seen.add(nxt[0])
                stack.append((nxt[0], iter(edges.get(nxt[0], ()))))

    if entry is not None:
        visit(entry)
    return order[::-1]


def collectives(text: str, num_devices: int) -> tuple[list[Collective], int]:
    """Every collective of the program with its runs per step, and the count of loops whose trip count
    was not found (module docstring)."""
    comps = computations(text)
    runs, unknown = multiplicities(comps)
    found = []
    for name, lines in comps.items():
        if name == "ENTRY" or not runs.get(name):
            continue
        types = {}
        for ins in lines:
            head, eq, rest = ins.partition(" = ")
            if not eq:
                continue
            target = head.split()[-1]
            m = _OPCODE.search(" " + rest)
            types[target] = rest[:m.start()] if m else rest.split(" ", 1)[0] if not rest.startswith("(") else ""
            if m is None or _CONTINUATION in ins:
                continue
            kind, start = m.group(1), bool(m.group(2))
            out = _output_type(kind, start, rest[:m.start()])
            if kind == "ragged-all-to-all":
                # Operand and output are buffers sized for the worst case (all rows to one peer): a device
                # sends at most its operand and its peers receive at most their outputs. With the rows
                # spread evenly, the smaller of the two travels.
                first = re.match(r"\s*(%[^\s,)]+)", rest[m.end() - 1:])
                operand = types.get(first.group(1), out) if first else out
                out = min(out, operand, key=type_bytes)
            groups = _permute_pairs(ins) if kind == "collective-permute" else replica_groups(ins, num_devices)
            size = 2 if kind == "collective-permute" else len(groups[0])
            found.append(Collective(kind, type_bytes(out), size, groups, runs[name]))
    return found, unknown


@dataclasses.dataclass(frozen=True)
class Links:
    """One device's one-direction bandwidths, bytes/s: inside a node (ICI, NVLink) and between nodes."""

    link: float
    network: float
    devices_per_node: int  # a TPU slice is one node


def communication(found: list[Collective], links: Links) -> dict:
    """Bytes one device sends per step, by kind, and the seconds they take on the links (serial: the
    overlap with compute is left to the caller)."""
    by_kind: dict[str, float] = defaultdict(float)
    seconds, network_bytes = 0.0, 0.0
    for c in found:
        sent = c.sent_bytes * c.runs
        by_kind[c.kind] += sent
        if c.crosses(links.devices_per_node) and links.network:
            network_bytes += sent
            seconds += sent / links.network
        elif links.link:
            seconds += sent / links.link
    return {"bytes": sum(by_kind.values()), "by_kind": dict(by_kind), "network_bytes": network_bytes,
            "seconds": seconds, "collectives": len(found), "runs": sum(c.runs for c in found)}
