"""Real asynchrony (``parallel.execution=threads``): every run's trace replays bit for bit, the SSP bound
holds in every recorded order, stragglers do less of the work when nobody waits for them, and a resumed
run's trace replays too. (One worker thread equals ``single``: the registry-wide equivalence test.)"""

from __future__ import annotations

import collections
import json

import ml_collections
import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax.errors import UserError
from bpjax.metrics import read_jsonl
from bpjax.strategies.threaded import EVENTS, check_trace, read_trace
from bpjax.testing import assert_trees_close
from bpjax.train import run

TIMING = ("samples_per_second", "train_seconds")


def config(steps=48, k=24, **parallel):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 600
    c.data.num_features = 16
    c.model.hidden = (24,)
    c.optimizer.learning_rate = 3e-3
    c.train.batch_size = 32
    c.train.steps, c.train.steps_per_call = steps, k
    c.train.log_every, c.train.eval_every = k, steps
    c.train.progress = "off"
    c.parallel.mesh = {"data": 4}
    for key, value in parallel.items():
        c.parallel[key] = value
    return c


def replay_of(c, trace, **changes):
    r = ml_collections.ConfigDict(c.to_dict())
    r.parallel.execution, r.parallel.stragglers, r.parallel.replay = "simulated", {}, str(trace)
    r.parallel.staleness = 0
    for key, value in changes.items():
        r.train[key] = value
    return r


def rows(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(workdir / "metrics.jsonl")]


@pytest.mark.parametrize(
    ("strategy", "settings"),
    [
        ("async", {"staleness": 2, "stragglers": {1: 3.0}}),
        ("param_server", {"staleness": -1, "n_fetch": 3}),
    ],
)
def test_a_threads_run_replays_bit_identically(tmp_path, strategy, settings):
    c = config(strategy=strategy, execution="threads", **settings)
    real = run(c, tmp_path / "real")
    trace = read_jsonl(tmp_path / "real" / EVENTS)
    assert trace[0]["bpjax_events"] == 1 and trace[0]["workers"] == 4
    updates = trace[1:]
    assert [u["step"] for u in updates] == list(range(1, 49))
    assert all(0 <= u["read"] < u["step"] and u["staleness"] == u["step"] - 1 - u["read"] for u in updates)
    assert sorted(u["batch"] for u in updates) == list(range(48))  # every batch once
    assert len({u["worker"] for u in updates}) > 1  # the work was shared

    replayed = run(replay_of(c, tmp_path / "real" / EVENTS), tmp_path / "replay")
    assert_trees_close(replayed.state, real.state, rtol=0, atol=0, what="replay")
    assert rows(tmp_path / "replay") == rows(tmp_path / "real")  # losses, eval, mean staleness: the same
    assert read_jsonl(tmp_path / "replay" / EVENTS)[1:] == updates


def test_replay_is_not_trivially_equal(tmp_path):
    """The replay check can fail: a trace whose reads are changed gives other parameters."""
    c = config(strategy="async", execution="threads", staleness=3)
    real = run(c, tmp_path / "real")
    lines = (tmp_path / "real" / EVENTS).read_text().splitlines()

    edited = [lines[0]] + [json.dumps(json.loads(x) | {"read": json.loads(x)["step"] - 1}) for x in lines[1:]]
    (tmp_path / "fresh.jsonl").write_text("\n".join(edited) + "\n")
    other = run(replay_of(c, tmp_path / "fresh.jsonl"))
    if any(json.loads(x)["staleness"] for x in lines[1:]):
        with pytest.raises(AssertionError):
            assert_trees_close(other.state.params, real.state.params, rtol=0, atol=0)


def applied_before(updates):
    """For each update, (its worker, how many it had finished, every worker's count when applied)."""
    done = collections.Counter()
    out = []
    for u in updates:
        out.append((u["worker"], done[u["worker"]], dict(done)))
        done[u["worker"]] += 1
    return out


def ssp_violations(updates, workers, s):
    """Updates whose worker started more than s batches ahead of some other worker: at the apply of
    worker w's (k+1)-th update, each worker must have finished at least k - s (clocks only grow)."""
    return [
        (w, k, counts)
        for w, k, counts in applied_before(updates)
        if min(counts.get(v, 0) for v in range(workers)) < k - s
    ]


@pytest.mark.parametrize("s", [0, 1])
def test_the_ssp_bound_holds(tmp_path, s):
    c = config(steps=64, k=64, strategy="async", execution="threads", staleness=s, stragglers={0: 6.0})
    run(c, tmp_path)
    updates = read_jsonl(tmp_path / EVENTS)[1:]
    assert ssp_violations(updates, 4, s) == []
    counts = collections.Counter(u["worker"] for u in updates)
    assert max(counts.values()) - min(counts.values()) <= s + 1


def test_unbounded_workers_leave_a_straggler_behind(tmp_path):
    """The check above can fail: with no bound, the fast workers run ahead of a slow one."""
    c = config(steps=64, k=64, strategy="async", execution="threads", staleness=-1, stragglers={0: 8.0})
    run(c, tmp_path)
    updates = read_jsonl(tmp_path / EVENTS)[1:]
    counts = collections.Counter(u["worker"] for u in updates)
    assert counts[0] < min(counts[w] for w in (1, 2, 3)), counts
    assert ssp_violations(updates, 4, 0)


def test_a_resumed_threads_run_replays(tmp_path):
    """A resume cuts the trace back to its checkpoint and goes on; the whole trace still replays."""
    c = config(strategy="async", execution="threads", staleness=1)
    c.checkpoint.every = 24
    run(c, tmp_path / "real")
    longer = config(steps=72, strategy="async", execution="threads", staleness=1)
    longer.checkpoint.every = 24
    resumed = run(longer, tmp_path / "real", resume=True)
    updates = read_jsonl(tmp_path / "real" / EVENTS)
    assert "bpjax_events" in updates[0] and [u["step"] for u in updates[1:]] == list(range(1, 73))
    replayed = run(replay_of(longer, tmp_path / "real"))  # a run's workdir names its trace
    assert_trees_close(replayed.state, resumed.state, rtol=0, atol=0, what="replay of a resumed run")
    assert [r["train_loss"] for r in replayed.history] == [r["train_loss"] for r in rows(tmp_path / "real")]


def test_a_replay_must_match_the_config_and_cover_the_steps(tmp_path):
    c = config(strategy="async", execution="threads")
    run(c, tmp_path)
    trace = read_trace(tmp_path / EVENTS)
    check_trace(trace, replay_of(c, tmp_path / EVENTS))
    with pytest.raises(UserError, match=r"recorded with train.batch_size=32, this run has 64"):
        check_trace(trace, replay_of(c, tmp_path / EVENTS, batch_size=64))
    with pytest.raises(UserError, match=r"holds 48 updates; set train.steps <= 48"):
        check_trace(trace, replay_of(c, tmp_path / EVENTS, steps=96))
    with pytest.raises(UserError, match=r"recorded with train.steps_per_call=24"):
        check_trace(trace, replay_of(c, tmp_path / EVENTS, steps_per_call=12, log_every=12))
    assert np.isfinite(read_jsonl(tmp_path / "metrics.jsonl")[-1]["staleness_per_step"])
