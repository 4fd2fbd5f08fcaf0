"""Pipeline schedules as plain data: which action each device runs at each tick.

A schedule for S devices (pipeline stages), M microbatches and v chunks per device is a `Table`: for
every device and tick one action on one microbatch, or idle. The net is cut into C = S*v contiguous
chunks (virtual stages); chunk c lives on device c % S, so with v = 1 chunk c is stage c, and with
v >= 2 device d holds chunks d, d+S, d+2S, ... (Megatron's interleaving). The actions:

  F   forward of microbatch m through chunk c: needs F(m, c-1) at an earlier tick (its output moves to
      this device by a ``ppermute`` at the end of that tick); stores the chunk's activations
  BW  combined backward (gpipe, 1f1b, interleaved): needs F(m, c) and BW(m, c+1) at earlier ticks (the
      cotangent moves back by a ``ppermute``); gives the input cotangent and the weight gradient, and
      frees the activations
  B   input-gradient half of the backward (zero_bubble): needs F(m, c) and B(m, c+1) earlier; gives
      the input cotangent and keeps the cotangents of the chunk's layers for W
  W   weight-gradient half (zero_bubble): needs B(m, c) earlier; gives the weight gradient and frees
      the activations

Every (microbatch, chunk) gets exactly one F and one BW, or one F, one B and one W. Ticks are
lockstep: one SPMD program (`bpjax.strategies.pipeline`) runs one action per device per tick, then
moves activations c -> c+1 and cotangents c -> c-1 with ``ppermute``. A device stores a microbatch's
activations from the tick they arrive (or its F, for chunk 0) to the tick of its last backward action,
in a buffer slot; `Table.slot` assigns the slots (lowest free first), and the peak number of slots in
use is what the device's activation memory scales with: M for gpipe, at most S for 1f1b.

The schedules (`ticks` gives their length in closed form, `idle` their idle share):

  gpipe        all M forwards, then all M backwards (GPipe): 2(M+S-1) ticks, idle (S-1)/(M+S-1), M
               microbatches held.
  1f1b         PipeDream-Flush (Megatron's 1F1B): device d runs min(S-1-d, M) warm-up forwards, then
               one forward and one backward in turn, then the remaining backwards. The ticks and idle
               share of gpipe, but at most S microbatches held (min(S, M)).
  interleaved  Megatron's interleaved 1F1B over v >= 2 chunks per device (`interleaved`). A tick is a
               chunk's work (1/v of a stage's), so the S-1 ticks of bubble each way shrink by v:
               2(Mv+S-1) ticks for M >= S, idle (S-1)/(Mv+S-1); more held than 1f1b (counted in
               chunks, each 1/v of a stage's activations).
  zero_bubble  ZB-H1 (Qi et al. 2023), the backward split into B and W (`zero_bubble`): each device
               follows 1f1b's order of F's and B's, and runs its oldest pending W whenever the next F
               or B is not ready, so the W's fill the bubble: 3M+S-1 ticks for M >= S, idle
               (S-1)/(3M+S-1), a third of 1f1b's share of the same work; at most S held.

Idle shares are counted in cells (device x tick). A BW is about twice the work of an F, B or W, and a
lockstep tick lasts as long as its slowest action, so `Table.lockstep_time` gives the time in units of
one stage's forward of one microbatch and `Table.idle_time_fraction` the idle share of that time (1f1b
pairs F's with BW's in the same ticks: more idle time than gpipe, for the same idle cells).

>>> print(build("1f1b", 2, 3))
1f1b S=2 M=3: 8 ticks, idle 0.25, peak 2 microbatches held
d0  F0  F1  .   BW0 F2  BW1 .   BW2
d1  .   F0  BW0 F1  BW1 F2  BW2 .
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

IDLE, FORWARD, INPUT_GRAD, WEIGHT_GRAD, BACKWARD = 0, 1, 2, 3, 4
SYMBOLS = {IDLE: ".", FORWARD: "F", INPUT_GRAD: "B", WEIGHT_GRAD: "W", BACKWARD: "BW"}
# Work of each action in units of one forward through a chunk (a W or B is one matmul per layer, like F).
COSTS = {IDLE: 0.0, FORWARD: 1.0, INPUT_GRAD: 1.0, WEIGHT_GRAD: 1.0, BACKWARD: 2.0}
NAMES = ("gpipe", "1f1b", "interleaved", "zero_bubble")
SPLIT = {"zero_bubble"}  # the schedules whose backward is B + W

Op = tuple[int, int, int]  # (kind, microbatch, chunk)


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
    """A schedule: ``[S, T]`` arrays, row = device, column = tick.

    ``kind``: the action (`IDLE`, `FORWARD`, `INPUT_GRAD`, `WEIGHT_GRAD`, `BACKWARD`); ``micro``: its
    microbatch (-1 idle); ``chunk``: its chunk c (virtual stage, on device c % S; -1 idle); ``slot``:
    the device's buffer slot holding that microbatch's activations for that chunk (-1 idle);
    ``recv_forward`` / ``recv_backward``: the slot into which the activation / cotangent arriving at
    the end of the tick goes (-1: nothing arrives). ``num_slots``: the most slots a device uses.
    """

    name: str
    stages: int
    microbatches: int
    virtual_stages: int
    kind: np.ndarray
    micro: np.ndarray
    chunk: np.ndarray
    slot: np.ndarray
    recv_forward: np.ndarray
    recv_backward: np.ndarray
    num_slots: int

    @property
    def ticks(self) -> int:
        return self.kind.shape[1]

    @property
    def chunks(self) -> int:
        return self.stages * self.virtual_stages

    @property
    def split(self) -> bool:
        """Whether the backward is split into B and W."""
        return bool(np.any(self.kind == WEIGHT_GRAD))

    @property
    def idle_fraction(self) -> float:
        """Share of device-ticks idle."""
        return float(np.mean(self.kind == IDLE))

    def occupancy(self) -> np.ndarray:
        """``[C, 2T]``: how many microbatches' activations of each chunk its device stores at each
        half-tick (2t: during the action of tick t; 2t+1: after the arrivals at its end)."""
        half = np.zeros((self.chunks, 2 * self.ticks), np.int32)
        for _, _, c, start, end in _intervals(self.stages, _done(self), self.split):
            half[c, start : end + 1] += 1
        return half

    def held(self) -> np.ndarray:
        """``[S, T]``: how many microbatch-chunks' activations each device stores in each tick (the more
        of: during its action, and after the arrivals at its end); its maximum is ``num_slots``."""
        per_device = self.occupancy().reshape(self.virtual_stages, self.stages, -1).sum(axis=0)
        return per_device.reshape(self.stages, self.ticks, 2).max(axis=2)

    @property
    def peak_held(self) -> int:
        """The most microbatch-chunks whose activations one device holds at once (= ``num_slots``)."""
        return self.num_slots

    def grid(self) -> np.ndarray:
        """``[S, T]`` microbatch per tick, -1 idle: what `bpjax.viz.plot_timeline` draws (it does not
        tell F, B, W and BW apart, nor chunks)."""
        return self.micro.copy()

    def lockstep_time(self) -> float:
        """Time of the table in units of one stage's forward of one microbatch: each tick lasts as long
        as its slowest action (`COSTS`; chunk actions are 1/v of a stage's)."""
        cost = np.vectorize(COSTS.get)(self.kind) / self.virtual_stages
        return float(cost.max(axis=0).sum())

    @property
    def idle_time_fraction(self) -> float:
        """Idle share of `lockstep_time` (every device waits for the tick's slowest action)."""
        work = float((np.vectorize(COSTS.get)(self.kind) / self.virtual_stages).sum())
        return 1.0 - work / (self.stages * self.lockstep_time())

    def summary(self) -> str:
        v = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        held = "microbatch-chunks" if self.virtual_stages > 1 else "microbatches"
        return (
            f"{self.name} S={self.stages} M={self.microbatches}{v}: {self.ticks} ticks, idle "
            f"{self.idle_fraction:.2f}, peak {self.num_slots} {held} held"
        )

    def __str__(self) -> str:
        cells = [[self._cell(d, t) for t in range(self.ticks)] for d in range(self.stages)]
        width = max(len(c) for row in cells for c in row)
        lines = [self.summary()]
        lines += [f"d{d}  " + " ".join(c.ljust(width) for c in row).rstrip() for d, row in enumerate(cells)]
        return "\n".join(lines)

    def _cell(self, d: int, t: int) -> str:
        kind = int(self.kind[d, t])
        if kind == IDLE:
            return "."
        text = f"{SYMBOLS[kind]}{self.micro[d, t]}"
        if self.virtual_stages > 1:
            text += f".{self.chunk[d, t] // self.stages}"  # the device's own chunk index j
        return text


# ---------------------------------------------------------------------------------- the simulator


def _ready(op: Op, done: dict[Op, int], last_chunk: int, split: bool) -> bool:
    """Whether ``op``'s inputs were produced at earlier ticks (``done`` holds only earlier ticks)."""
    kind, m, c = op
    if kind == FORWARD:
        return c == 0 or (FORWARD, m, c - 1) in done
    if kind == WEIGHT_GRAD:
        return (INPUT_GRAD, m, c) in done
    back = INPUT_GRAD if split else BACKWARD
    return (FORWARD, m, c) in done and (c == last_chunk or (back, m, c + 1) in done)


def _simulate(
    name: str, S: int, M: int, v: int, split: bool, choose: Callable[[int, dict[Op, int]], Op | None]
) -> Table:
    """Run ``choose(device, done) -> op or None`` tick by tick in lockstep until every op is done."""
    total = M * S * v * (3 if split else 2)
    done: dict[Op, int] = {}
    placed: dict[Op, int] = {}  # op -> device
    t = 0
    while len(done) < total:
        chosen = [choose(d, done) for d in range(S)]
        if all(op is None for op in chosen):
            raise RuntimeError(f"{name} S={S} M={M} v={v} deadlocks at tick {t}")
        for d, op in enumerate(chosen):
            if op is not None:
                assert op not in done and op[2] % S == d, (op, d)
                done[op], placed[op] = t, d
        t += 1
    kind = np.zeros((S, t), np.int8)
    micro = np.full((S, t), -1, np.int32)
    chunk = np.full((S, t), -1, np.int32)
    for op, tick in done.items():
        d = placed[op]
        kind[d, tick], micro[d, tick], chunk[d, tick] = op
    return _with_slots(name, S, M, v, split, kind, micro, chunk, done)


def _done(table: Table) -> dict[Op, int]:
    return {
        (int(k), int(m), int(c)): t
        for d in range(table.stages)
        for t, (k, m, c) in enumerate(zip(table.kind[d], table.micro[d], table.chunk[d], strict=True))
        if k != IDLE
    }


def _intervals(S: int, done: dict[Op, int], split: bool) -> list[tuple[int, int, int, int, int]]:
    """``(device, microbatch, chunk, start, end)`` of every stored microbatch-chunk, in half-ticks (2t:
    the action of tick t, 2t+1: the arrivals at its end): from its arrival (its F for chunk 0) to its
    last backward action, sorted by start."""
    release = WEIGHT_GRAD if split else BACKWARD
    out = []
    for (kind, m, c), t in done.items():
        if kind == FORWARD:
            start = 2 * done[(FORWARD, m, c - 1)] + 1 if c > 0 else 2 * t
            out.append((c % S, m, c, start, 2 * done[(release, m, c)]))
    return sorted(out, key=lambda iv: (iv[3], iv[0], iv[2], iv[1]))


def _with_slots(name, S, M, v, split, kind, micro, chunk, done) -> Table:
    """Assign buffer slots (the lowest free one, in order of arrival) and the arrivals' slots."""
    slot_of: dict[tuple[int, int], int] = {}
    ends: list[list[int]] = [[] for _ in range(S)]  # per device, per slot: the half-tick it frees
    for d, m, c, start, end in _intervals(S, done, split):
        free = [i for i, e in enumerate(ends[d]) if e < start]
        i = free[0] if free else len(ends[d])
        if free:
            ends[d][i] = end
        else:
            ends[d].append(end)
        slot_of[(m, c)] = i
    T = kind.shape[1]
    slot = np.full((S, T), -1, np.int32)
    recv_f = np.full((S, T), -1, np.int32)
    recv_b = np.full((S, T), -1, np.int32)
    back = INPUT_GRAD if split else BACKWARD
    C = S * v
    for (k, m, c), t in done.items():
        slot[c % S, t] = slot_of[(m, c)]
        if k == FORWARD and c < C - 1:
            assert recv_f[(c + 1) % S, t] < 0
            recv_f[(c + 1) % S, t] = slot_of[(m, c + 1)]
        if k == back and c > 0:
            assert recv_b[(c - 1) % S, t] < 0
            recv_b[(c - 1) % S, t] = slot_of[(m, c - 1)]
    num_slots = max((len(e) for e in ends), default=0)
    return Table(name, S, M, v, kind, micro, chunk, slot, recv_f, recv_b, num_slots)


def _in_order(orders: Sequence[Sequence[Op]], last_chunk: int, split: bool):
    """A chooser that runs each device's ops in the given order, each as soon as it is ready."""
    pos = [0] * len(orders)

    def choose(d: int, done: dict[Op, int]) -> Op | None:
        if pos[d] < len(orders[d]) and _ready(orders[d][pos[d]], done, last_chunk, split):
            pos[d] += 1
            return orders[d][pos[d] - 1]
        return None

    return choose


# ------------------------------------------------------------------------------------ the schedules


def gpipe(S: int, M: int) -> Table:
    """GPipe: every forward, then every backward (in microbatch order).

    >>> print(gpipe(2, 3))
    gpipe S=2 M=3: 8 ticks, idle 0.25, peak 3 microbatches held
    d0  F0  F1  F2  .   .   BW0 BW1 BW2
    d1  .   F0  F1  F2  BW0 BW1 BW2 .
    """
    _check(S, M, 1)
    orders = [[(FORWARD, m, d) for m in range(M)] + [(BACKWARD, m, d) for m in range(M)] for d in range(S)]
    return _simulate("gpipe", S, M, 1, False, _in_order(orders, S - 1, False))


def one_f_one_b(S: int, M: int) -> Table:
    """1F1B (PipeDream-Flush): min(S-1-d, M) warm-up forwards on device d, then one forward and one
    backward in turn, then the remaining backwards.

    >>> print(one_f_one_b(3, 4))
    1f1b S=3 M=4: 12 ticks, idle 0.33, peak 3 microbatches held
    d0  F0  F1  F2  .   .   BW0 F3  BW1 .   BW2 .   BW3
    d1  .   F0  F1  .   BW0 F2  BW1 F3  BW2 .   BW3 .
    d2  .   .   F0  BW0 F1  BW1 F2  BW2 F3  BW3 .   .
    """
    _check(S, M, 1)
    orders = _one_f_one_b_orders(S, M)
    return _simulate("1f1b", S, M, 1, False, _in_order(orders, S - 1, False))


def _one_f_one_b_orders(S: int, M: int) -> list[list[Op]]:
    orders = []
    for d in range(S):
        w = min(S - 1 - d, M)
        order = [(FORWARD, m, d) for m in range(w)]
        for i in range(M - w):
            order += [(FORWARD, w + i, d), (BACKWARD, i, d)]
        order += [(BACKWARD, m, d) for m in range(M - w, M)]
        orders.append(order)
    return orders


def interleaved(S: int, M: int, v: int) -> Table:
    """Megatron's interleaved 1F1B: device d holds chunks d, d+S, ..., d+(v-1)S.

    Microbatches go in groups of S (the last group takes the remainder, so it has S to 2S-1, or all M
    when M < S); each group runs forward through the device's chunks in order and backward through
    them in reverse. Device d runs (S-d-1)*2 + (v-1)*g warm-up forwards (g: the last group's size, at
    most Mv), then one forward and one backward in turn. This reaches 2(Mv+S-1) ticks for every
    M >= S (Megatron asks M to be a multiple of S; the larger last group lifts that) and 2(Sv+M-1) for
    M < S, when one microbatch's trip through the Sv chunks is the critical path. Cells show
    ``F{m}.{j}``: microbatch m through the device's chunk j (chunk c = jS+d).

    >>> print(interleaved(2, 2, 2))
    interleaved S=2 M=2 v=2: 10 ticks, idle 0.20, peak 4 microbatch-chunks held
    d0  F0.0  F1.0  F0.1  F1.1  .     BW0.1 .     BW1.1 BW0.0 BW1.0
    d1  .     F0.0  F1.0  F0.1  BW0.1 F1.1  BW1.1 BW0.0 BW1.0 .
    """
    _check(S, M, v)
    last_group = M - (max(M // S, 1) - 1) * S
    orders = []
    for d in range(S):
        fwd, bwd = _virtual_order(S, M, v, d, False), _virtual_order(S, M, v, d, True)
        w = min((S - d - 1) * 2 + (v - 1) * last_group, len(fwd))
        order = [(FORWARD, m, c) for m, c in fwd[:w]]
        for i in range(len(fwd) - w):
            order += [(FORWARD, *fwd[w + i]), (BACKWARD, *bwd[i])]
        order += [(BACKWARD, m, c) for m, c in bwd[len(fwd) - w :]]
        orders.append(order)
    return _simulate("interleaved", S, M, v, False, _in_order(orders, S * v - 1, False))


def _virtual_order(S: int, M: int, v: int, d: int, backward: bool) -> list[tuple[int, int]]:
    """Device d's (microbatch, chunk) pairs in Megatron's order: groups of S microbatches (the last
    one takes the remainder), each group through the device's chunks (in reverse for the backward)."""
    starts = list(range(0, M, S))
    if len(starts) > 1 and M % S:
        starts.pop()  # the remainder joins the last full group
    out = []
    for first, end in zip(starts, [*starts[1:], M], strict=True):
        for j in reversed(range(v)) if backward else range(v):
            out += [(m, j * S + d) for m in range(first, end)]
    return out


def zero_bubble(S: int, M: int) -> Table:
    """ZB-H1: 1F1B's order of F's and B's, each as soon as it is ready (an F only while fewer than S
    microbatches are held); when the next one is not ready, or would exceed S, the oldest pending W.

    >>> print(zero_bubble(2, 3))
    zero_bubble S=2 M=3: 10 ticks, idle 0.10, peak 2 microbatches held
    d0  F0 F1 .  B0 W0 F2 B1 W1 B2 W2
    d1  .  F0 B0 F1 B1 W0 F2 B2 W1 W2
    """
    _check(S, M, 1)
    orders = [
        [(INPUT_GRAD if k == BACKWARD else k, m, c) for k, m, c in o] for o in _one_f_one_b_orders(S, M)
    ]
    pos, forwards, weights = [0] * S, [0] * S, [0] * S

    def choose(d: int, done: dict[Op, int]) -> Op | None:
        if pos[d] < len(orders[d]):
            op = orders[d][pos[d]]
            if (op[0] != FORWARD or forwards[d] - weights[d] < S) and _ready(op, done, S - 1, True):
                pos[d] += 1
                forwards[d] += op[0] == FORWARD
                return op
        if weights[d] < pos[d] - forwards[d]:  # B's done so far, in microbatch order
            weights[d] += 1
            return (WEIGHT_GRAD, weights[d] - 1, d)
        return None

    return _simulate("zero_bubble", S, M, 1, True, choose)


def build(name: str, stages: int, microbatches: int, virtual_stages: int = 1) -> Table:
    """The table of schedule ``name`` (one of `NAMES`); ``virtual_stages`` only for interleaved."""
    if name not in NAMES:
        raise ValueError(f"unknown schedule {name!r}; one of {', '.join(NAMES)}")
    if name == "interleaved":
        return interleaved(stages, microbatches, virtual_stages)
    if virtual_stages != 1:
        raise ValueError(f"{name} runs one chunk per device, not virtual_stages={virtual_stages}")
    return {"gpipe": gpipe, "1f1b": one_f_one_b, "zero_bubble": zero_bubble}[name](stages, microbatches)


def ticks(name: str, S: int, M: int, v: int = 1) -> int:
    """The length of `build`'s table in closed form (checked against the tables by the tests).

    >>> [ticks(name, 4, 8, 2 if name == "interleaved" else 1) for name in NAMES]
    [22, 22, 38, 27]
    """
    if name == "zero_bubble":  # for M < S one microbatch's F, B chain and last W are the critical path
        return max(3 * M + S - 1, 2 * (S + M) - 1)
    if name == "interleaved":  # for M < S one microbatch's trip through the Sv chunks is
        return 2 * max(M * v + S - 1, S * v + M - 1)
    return 2 * (M + S - 1)


def idle(name: str, S: int, M: int, v: int = 1) -> float:
    """The idle share of `build`'s table: (S-1)/(M+S-1) for gpipe and 1f1b, (S-1)/(Mv+S-1) for
    interleaved and (S-1)/(3M+S-1) for zero_bubble when M >= S (busy cells over `ticks` in general).

    >>> round(idle("1f1b", 4, 8), 3), round(idle("interleaved", 4, 8, 2), 3), round(idle("zero_bubble", 4, 8), 3)
    (0.273, 0.158, 0.111)
    """
    busy = M * v * (3 if name in SPLIT else 2)
    return 1 - busy / ticks(name, S, M, v)


def _check(S: int, M: int, v: int) -> None:
    if S < 1 or M < 1 or v < 1:
        raise ValueError(f"a schedule needs S, M, v >= 1, got S={S} M={M} v={v}")
