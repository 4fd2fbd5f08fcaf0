"""Collectives read off a compiled program's HLO text, for checking `bpjax.plan` against the compiler."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s*=\s*(.+?)\s+(" + "|".join(_KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([0-9,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}


@dataclass(frozen=True)
class CompiledCollective:
    kind: str
    array_bytes: int  # per-device array: all-gather output, reduce-scatter input, others their operand
    group: int  # devices taking part together (1 if unknown)
    line: str


def _bytes(shape_text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _group(line: str) -> int:
    if m := _MESH_GROUPS.search(line):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes[n]) for n in names) if names else 1
    if m := _IOTA_GROUPS.search(line):
        return int(m.group(1).split(",")[-1])
    if m := _LIST_GROUPS.search(line):
        return len([d for d in m.group(1).split(",") if d])
    return 1


def collectives(hlo_text: str) -> list[CompiledCollective]:
    """Every collective in an HLO module's text (async ``-start`` forms counted once, ``-done`` not)."""
    out = []
    for line in hlo_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        shape, kind = m.group(1), m.group(2)
        if m.group(3):  # async start: the result tuple holds the operand and the result; take the result
            arrays = _ARRAY.findall(shape)
            shape = "{}[{}]".format(*arrays[-1]) if arrays else shape
        size, group = _bytes(shape), _group(line)
        if kind == "reduce-scatter":
            size *= group
        out.append(CompiledCollective(kind, size, group, line.strip()))
    return out


def total_bytes(items) -> int:
    return int(np.sum([c.array_bytes for c in items])) if items else 0
