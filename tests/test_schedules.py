"""The pipeline schedule tables (`bpjax.strategies.schedules`) on their own, as plain data.

Every table is replayed here with a model of the SPMD program that runs it: one action per device per
tick, then activations move to the next chunk's device and cotangents to the previous one, into the
buffer slots the table names. The replay checks that every (microbatch, chunk) gets exactly one F and
one BW (or one F, one B and one W), that each action finds its inputs where the table says, at an
earlier tick, that no slot is overwritten while it holds a microbatch, and counts the microbatches a
device holds. No JAX: these tests cost milliseconds.
"""

import doctest

import numpy as np
import pytest

from bpjax.strategies import schedules
from bpjax.strategies.schedules import BACKWARD, FORWARD, IDLE, INPUT_GRAD, NAMES, WEIGHT_GRAD

SIZES = [(S, M) for S in range(1, 9) for M in sorted({1, 2, 3, 5, S, 2 * S, 2 * S + 1, 3 * S + 2})]
CASES = [
    (name, S, M, v) for name in NAMES for S, M in SIZES for v in ((2, 3) if name == "interleaved" else (1,))
]


def replay(table: schedules.Table) -> np.ndarray:
    """Run ``table`` on a model of the engine; returns ``[S]``: the most microbatch-chunks each device
    stores at once (during an action, or after the arrivals at the end of a tick)."""
    S, M, C, T = table.stages, table.microbatches, table.chunks, table.ticks
    split = table.name in schedules.SPLIT
    back = INPUT_GRAD if split else BACKWARD
    release = WEIGHT_GRAD if split else BACKWARD
    assert table.kind.shape == table.micro.shape == table.chunk.shape == table.slot.shape == (S, T)
    store = [{} for _ in range(S)]  # per device: slot -> [microbatch, chunk, cotangent arrived, B done]
    done: dict[tuple[int, int, int], int] = {}  # (kind, m, c) -> tick
    peak = np.zeros(S, np.int64)
    for t in range(T):
        for d in range(S):
            kind, m, c, slot = (int(a[d, t]) for a in (table.kind, table.micro, table.chunk, table.slot))
            if kind == IDLE:
                assert m == c == slot == -1, (d, t)
                continue
            assert 0 <= m < M and 0 <= c < C and c % S == d, f"chunk {c} of {C} on device {d}"
            assert (kind, m, c) not in done, f"{(kind, m, c)} twice"
            assert kind in ((FORWARD, INPUT_GRAD, WEIGHT_GRAD) if split else (FORWARD, BACKWARD))
            if kind == FORWARD:
                if c == 0:
                    assert slot not in store[d], f"F{m} of chunk 0 overwrites slot {slot} on d{d}"
                    store[d][slot] = [m, c, False, False]
                else:
                    assert done.get((FORWARD, m, c - 1), T) < t, f"F{m}/{c} before F{m}/{c - 1}"
                    assert store[d].get(slot, [None, None])[:2] == [m, c], f"F{m}/{c}: input not in slot"
            else:
                held = store[d].get(slot)
                assert held is not None and held[:2] == [m, c], f"{kind} {m}/{c}: no activations"
                assert done.get((FORWARD, m, c), T) < t
                if kind == back:
                    if c < C - 1:
                        assert done.get((back, m, c + 1), T) < t and held[2], f"B{m}/{c} before its cotangent"
                    held[3] = True
                else:  # W
                    assert held[3] and done.get((INPUT_GRAD, m, c), T) < t, f"W{m}/{c} before B"
            done[(kind, m, c)] = t
            peak[d] = max(peak[d], len(store[d]))
            if kind == release:
                del store[d][slot]
        for d in range(S):  # the arrivals at the end of tick t, from the ppermutes
            prev, nxt = (d - 1) % S, (d + 1) % S
            sent_f = table.kind[prev, t] == FORWARD and table.chunk[prev, t] < C - 1
            sent_b = table.kind[nxt, t] == back and table.chunk[nxt, t] > 0
            slot = int(table.recv_forward[d, t])
            assert (slot >= 0) == bool(sent_f), f"tick {t} d{d}: recv_forward {slot}, sent {sent_f}"
            if slot >= 0:
                m, c = int(table.micro[prev, t]), int(table.chunk[prev, t]) + 1
                assert slot not in store[d], f"activation {m}/{c} overwrites slot {slot} on d{d}"
                store[d][slot] = [m, c, False, False]
            slot = int(table.recv_backward[d, t])
            assert (slot >= 0) == bool(sent_b), f"tick {t} d{d}: recv_backward {slot}, sent {sent_b}"
            if slot >= 0:
                m, c = int(table.micro[nxt, t]), int(table.chunk[nxt, t]) - 1
                assert store[d][slot][:2] == [m, c], f"cotangent {m}/{c} into the wrong slot"
                store[d][slot][2] = True
            peak[d] = max(peak[d], len(store[d]))
    ops = 3 if split else 2
    assert len(done) == M * C * ops, "an action is missing"
    assert all(not s for s in store), "activations left after the step"
    return peak


@pytest.mark.parametrize("name", NAMES)
def test_tables_replay(name):
    for n, S, M, v in CASES:
        if n != name:
            continue
        table = schedules.build(name, S, M, v)
        peak = replay(table)
        assert table.num_slots == peak.max() == table.held().max(), (S, M, v)
        np.testing.assert_array_equal(table.held().max(axis=1), peak)
        assert table.ticks == schedules.ticks(name, S, M, v), (S, M, v)
        assert table.idle_fraction == pytest.approx(schedules.idle(name, S, M, v)), (S, M, v)
        grid = table.grid()
        assert grid.shape == (S, table.ticks) and np.array_equal(grid < 0, table.kind == IDLE)


def test_memory_bounds():
    """gpipe holds all M microbatches on the first stage; 1f1b and zero_bubble at most S (and M)."""
    for S, M in SIZES:
        assert schedules.gpipe(S, M).held()[0].max() == M
        assert schedules.one_f_one_b(S, M).num_slots == min(S, M), (S, M)
        assert schedules.zero_bubble(S, M).num_slots <= min(S, M), (S, M)
        # interleaved: Megatron's warm-up keeps more, counted in chunks (1/v of a stage each)
        assert schedules.interleaved(S, M, 2).num_slots <= 2 * M


def test_idle_fractions():
    """The bubble formulas: (S-1)/(M+S-1) for gpipe and 1f1b, shrunk by v for interleaved, to
    (S-1)/(3M+S-1) for zero_bubble, for every M >= S."""
    for S, M in SIZES:
        if M < S:
            continue
        for name, v, busy in (
            ("gpipe", 1, M),
            ("1f1b", 1, M),
            ("interleaved", 2, 2 * M),
            ("interleaved", 3, 3 * M),
        ):
            assert schedules.build(name, S, M, v).idle_fraction == pytest.approx((S - 1) / (busy + S - 1))
        assert schedules.zero_bubble(S, M).idle_fraction == pytest.approx((S - 1) / (3 * M + S - 1))
        if S > 1:
            assert schedules.zero_bubble(S, M).idle_fraction < schedules.interleaved(S, M, 2).idle_fraction
            assert schedules.interleaved(S, M, 2).idle_fraction < schedules.one_f_one_b(S, M).idle_fraction


def test_lockstep_time():
    """Time in units of one stage's forward: gpipe 3(M+S-1) (ticks of F, then of BW); zero_bubble's
    ticks all take one unit; 1f1b pairs F's with BW's in lockstep ticks, so it takes longer than gpipe."""
    for S, M in SIZES:
        assert schedules.gpipe(S, M).lockstep_time() == 3 * (M + S - 1)
        zb = schedules.zero_bubble(S, M)
        assert zb.lockstep_time() == zb.ticks and zb.idle_time_fraction == pytest.approx(zb.idle_fraction)
        assert schedules.one_f_one_b(S, M).lockstep_time() >= 3 * (M + S - 1)


def test_gpipe_table_is_the_gpipe_schedule():
    """The forward half of the gpipe table is `pipeline.schedule`, today's GPipe grid."""
    from bpjax.strategies.pipeline import schedule

    for S, M in SIZES:
        table = schedules.gpipe(S, M)
        forward = np.where(table.kind == FORWARD, table.micro, -1)[:, : M + S - 1]
        np.testing.assert_array_equal(forward, schedule(S, M))


def test_doctests():
    result = doctest.testmod(schedules)
    assert result.attempted >= 7 and result.failed == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        schedules.build("pipedream", 2, 2)
    with pytest.raises(ValueError, match="virtual_stages=2"):
        schedules.build("1f1b", 2, 2, 2)
    with pytest.raises(ValueError, match="S, M, v >= 1"):
        schedules.build("gpipe", 2, 0)
