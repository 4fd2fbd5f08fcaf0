"""Gradient accumulation (``train.accumulate = N``) for every strategy that declares it.

Each accumulating strategy, on its main example's mesh, trains with N microbatches per step and must
equal ``single`` trained on the whole batches (to rounding: the sums run in another order), and its
loss must be traced on microbatches of B/N (or B_local/N) rows (so a strategy that ignored the setting fails).
"""

import dataclasses

import pytest
from test_equivalence import FIRST_OPTIMIZER, make_config, setup

import bpjax
from bpjax import data, strategies
from bpjax.step import Problem
from bpjax.testing import assert_trees_close, train_steps

N = 2
STEPS = 2
ACCUMULATING = sorted(name for name, d in strategies.REGISTRY.items() if d.accumulates)
# Each accumulating strategy's main example, and every example that runs real worker threads (their
# gradients come from programs of their own, bpjax/strategies/threaded.py).
CASES = [(name, 0) for name in ACCUMULATING] + [
    (name, i)
    for name in ACCUMULATING
    for i, e in enumerate(strategies.REGISTRY[name].examples)
    if e.settings.get("execution") == "threads"
]


@dataclasses.dataclass(frozen=True)
class Spy(Problem):
    """A Problem that records the rows of every batch its loss is traced on."""

    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def loss_fn(self, params, batch):
        self.seen.append(batch["x"].shape[0])
        return super().loss_fn(params, batch)


@pytest.fixture(scope="module")
def dataset():

    return data.load(make_config().data, seed=0)


@pytest.fixture(scope="module")
def whole_batches(dataset):
    out = {}
    for opt in sorted(set(FIRST_OPTIMIZER.values())):
        c, problem, batches = setup(dataset, opt)
        out[opt] = train_steps(strategies.make("single", problem, c.parallel), batches, STEPS)
    return out


def test_not_every_strategy_accumulates():
    # The capability is a declaration that the config reads (tests/test_bad_input.py): pipeline sums
    # its own microbatches and refuses.
    assert "pipeline" not in ACCUMULATING and "single" in ACCUMULATING


@pytest.mark.parametrize(("name", "i"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_microbatches_equal_one_big_batch(name, i, dataset, whole_batches):
    example = strategies.REGISTRY[name].examples[i]
    opt = FIRST_OPTIMIZER[name]
    c, problem, batches = setup(dataset, opt, example.mesh, example.settings)
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(Problem)}
    spy = Spy(**{**fields, "accumulate": N})
    strategy = strategies.make(name, spy, c.parallel)
    _, state, losses = train_steps(strategy, batches, STEPS)
    # A compiler-partitioned step traces the global batch, a shard_map one each device's share.
    b = c.train.batch_size
    micro = {b // N, b // strategy.data_parallel // N}
    assert spy.seen and set(spy.seen) <= micro, f"{name} traced its loss on {spy.seen} rows, not {micro}"
    _, expected, expected_losses = whole_batches[opt]
    assert_trees_close(losses, expected_losses, rtol=1e-4, atol=1e-5, what=f"{name} losses")
    assert_trees_close(state, expected, rtol=1e-4, atol=1e-5, what=f"{name} state")


def test_the_plan_counts_one_microbatchs_activations():
    plans = {}
    for n in (1, 4):
        c = make_config()
        c.parallel.strategy, c.parallel.mesh = "dp", {"data": 2}
        c.train.accumulate = n
        plans[n] = bpjax.prepare(c).plan
    assert plans[4].totals["act_bytes"] * 4 == plans[1].totals["act_bytes"] > 0
    assert plans[4].state_bytes == plans[1].state_bytes
