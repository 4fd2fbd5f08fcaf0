"""The input pipeline (bpjax.feed): batches drawn on the device are the host's, bit for bit.

For strategies whose batch layouts differ (one device; pmap's leading device axis; dp cut by features;
fsdp; a pipeline's replicated batch) and a call size K=3 that crosses an epoch boundary, the batches a
device feed gathers equal the host's and carry the same shardings; the prefetching host feed returns
the same batches in and out of order; and whole runs with ``train.device_data`` on and off are identical.
"""

import jax
import numpy as np
import pytest
from test_equivalence import make_config

from bpjax import data, strategies
from bpjax import feed as feed_lib
from bpjax.feed import Feed
from bpjax.step import make_problem
from bpjax.strategies.base import to_host
from bpjax.train import run

LAYOUTS = [
    ("single", {}, {}),
    ("pmap", {"data": 8}, {}),
    ("dp", {"feature": 8}, {"partition": "feature"}),
    ("fsdp", {"data": 4}, {}),
    ("pipeline", {"stage": 2}, {}),
]


@pytest.fixture(scope="module")
def dataset():
    return data.load(make_config().data, seed=0)


def feeds(dataset, name, mesh, settings, k=3):
    c = make_config()
    c.parallel.strategy = name
    c.parallel.mesh = dict(mesh)
    for key, value in settings.items():
        c.parallel[key] = value
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    strategy = strategies.make(name, problem, c.parallel)
    batches = lambda: data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)  # noqa: E731
    rows = strategy.batch_rows(c.train.batch_size)
    return Feed(batches(), strategy, k, rows, "on"), Feed(batches(), strategy, k, rows, "off")


@pytest.mark.parametrize(("name", "mesh", "settings"), LAYOUTS, ids=[n for n, *_ in LAYOUTS])
def test_device_batches_are_the_host_batches(dataset, name, mesh, settings):
    on, off = feeds(dataset, name, mesh, settings)
    assert on.on_device and not off.on_device
    per_epoch = on.batches.steps_per_epoch
    assert per_epoch % 3, "K=3 must cross an epoch boundary inside a call"
    calls = [0, 1, per_epoch // 3, per_epoch // 3 + 1, 5]  # the first sets the device feed up
    try:
        for call in calls:
            got, expected = on.batch(call), off.host_batch(call)
            for key in ("x", "y"):
                assert got[key].sharding.is_equivalent_to(expected[key].sharding, got[key].ndim), (name, key)
                a, e = to_host(got[key]), to_host(expected[key])
                assert a.dtype == e.dtype and a.shape == e.shape and np.array_equal(a, e), (name, call, key)
    finally:
        on.close()
        off.close()


def test_a_jump_between_calls_sends_the_right_rows(dataset, monkeypatch):
    """On the device, calls out of order (a resume, a test) still get their own batches."""
    monkeypatch.setattr(feed_lib, "CHUNK_CALLS", 2)
    outs = {}
    for mode in ("on", "off"):
        on, off = feeds(dataset, "single", {}, {}, k=1)
        feed = on if mode == "on" else off
        strategy = feed.strategy
        step, first = feed.compile(strategy.step, strategy.init(jax.random.key(0)), 4)
        state = strategy.init(jax.random.key(0))
        losses = []
        for call in [4, 5, 6, 0, 1, 9, 2]:
            state, metrics = step(state, feed(call))
            losses.append(float(to_host(metrics)["loss"][0]))
        outs[mode] = losses
        on.close()
        off.close()
    assert outs["on"] == outs["off"]


def test_prefetch_returns_each_calls_batches(dataset):
    _, off = feeds(dataset, "single", {}, {})
    fresh = lambda call: to_host(off.host_batch(call))  # noqa: E731
    try:
        for call in [0, 1, 2, 7, 8, 3]:  # consecutive calls hit the prefetched batch; the others do not
            got = to_host(off(call))
            assert all(np.array_equal(got[key], fresh(call)[key]) for key in ("x", "y")), call
    finally:
        off.close()


@pytest.mark.parametrize("name", ["dp", "pmap"])
def test_runs_are_identical_with_data_on_the_device(name, monkeypatch):
    # On the device the gather and the step are one compiled program (Feed.compile); pmap's step is a
    # jax.pmap inside it. Blocks of 3 calls' row numbers: the run's 4 calls cross a block boundary.
    monkeypatch.setattr(feed_lib, "CHUNK_CALLS", 3)
    results = {}
    for mode in ("on", "off"):
        c = make_config()
        c.parallel.strategy, c.parallel.mesh = name, {"data": 4}
        c.train.steps, c.train.steps_per_call, c.train.log_every, c.train.eval_every = 12, 3, 3, 0
        c.train.progress, c.train.device_data = "off", mode
        results[mode] = run(c)
    on, off = results["on"], results["off"]
    assert on.summary["device_data"] and not off.summary["device_data"]
    assert [r["train_loss"] for r in on.history] == [r["train_loss"] for r in off.history]
    for a, e in zip(jax.tree.leaves(on.state), jax.tree.leaves(off.state), strict=True):
        assert np.array_equal(a, e)


def test_a_host_driven_step_takes_host_batches(dataset, capsys):
    # A strategy whose shard_batch keeps numpy arrays runs its step from the host: nothing to fuse into.
    on, _ = feeds(dataset, "single", {}, {})
    host_driven = on.strategy._replace(shard_batch=lambda batch: jax.tree.map(np.asarray, batch))
    feed = Feed(on.batches, host_driven, 1, slice(None), "on")
    assert on.on_device and not feed.on_device
    assert capsys.readouterr().err == (
        "warning: train.device_data=on: single's host-driven step takes its batches from the host; "
        "set train.device_data=auto\n"
    )
    assert isinstance(feed(0)["x"], np.ndarray)
    feed.close()
    on.close()
