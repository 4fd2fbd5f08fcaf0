"""The ``pipeline`` strategy: stage assignment, the GPipe schedule, and a heterogeneous net against ``single``.

The net is 40-512-256-128-10 (free widths, so stages hold parameters of different shapes and the
packed buffers are padded); it is trained over 2 and 4 stages with 1 and 4 microbatches and compared
with the one-device reference: the initial state bit for bit, then the losses, parameters and
optimizer state after 6 steps.
"""

import itertools

import jax
import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax import data, strategies
from bpjax.errors import UserError
from bpjax.step import make_problem
from bpjax.strategies import pipeline
from bpjax.strategies.pipeline import assign_stages, bubble_fraction, schedule
from bpjax.testing import assert_trees_close, train_steps

STEPS = 6
RTOL, ATOL = 1e-5, 1e-6
NET = [(40, 512), (512, 256), (256, 128), (128, 10)]  # (in, out) per layer


def make_config(optimizer="adam", stage=2, microbatches=1, **changes):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 400
    c.data.num_features = 40
    c.model.hidden = (512, 256, 128)
    c.optimizer.name = optimizer
    c.optimizer.learning_rate = 1e-3 if optimizer.startswith("adam") else 0.05
    c.train.batch_size = 32
    c.parallel.mesh = {"stage": stage}
    c.parallel.microbatches = microbatches
    for key, value in changes.items():
        cfg_lib.set_value(c, key, value)
    return c


@pytest.fixture(scope="module")
def dataset():
    return data.load(make_config().data, seed=0)


def run(dataset, strategy_name, c, k=1):
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    batches = data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)
    strategy = strategies.make(strategy_name, problem, c.parallel)
    return strategy, train_steps(strategy, batches, STEPS, k=k)


@pytest.fixture(scope="module")
def references(dataset):
    return {opt: run(dataset, "single", make_config(opt))[1] for opt in ("adam", "momentum")}


def assert_matches(result, expected, what):
    init, final, losses = result
    ref_init, ref_final, ref_losses = expected
    assert_trees_close(init, ref_init, rtol=0, atol=0, what=f"{what} init")
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, err_msg=f"{what} losses")
    assert_trees_close(final.params, ref_final.params, RTOL, ATOL, what=f"{what} params")
    assert_trees_close(final.opt_state, ref_final.opt_state, RTOL, ATOL, what=f"{what} opt_state")
    assert int(final.step) == STEPS


# ------------------------------------------------------------------------------------- stages


def test_assign_stages_balances_kernel_flops():
    assert assign_stages(NET, 1) == [[0, 1, 2, 3]]
    assert assign_stages(NET, 2) == [[0, 1], [2, 3]]  # 151552 vs 34048 FLOPs beats 20480 vs 165120
    assert assign_stages(NET, 3) == [[0], [1], [2, 3]]
    assert assign_stages(NET, 4) == [[0], [1], [2], [3]]


def test_assign_stages_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 8))
        widths = rng.integers(1, 300, n + 1).tolist()
        layers = list(itertools.pairwise(widths))
        flops = [i * o for i, o in layers]
        for s in range(1, n + 1):
            got = assign_stages(layers, s)
            assert sorted(sum(got, [])) == list(range(n)) and all(got)
            best = min(
                max(sum(flops[a:b]) for a, b in itertools.pairwise((0, *cuts, n)))
                for cuts in itertools.combinations(range(1, n), s - 1)
            )
            assert max(sum(flops[i] for i in st) for st in got) == best


def test_assign_stages_explicit():
    assert assign_stages(NET, 2, (3,)) == [[0, 1, 2], [3]]
    assert assign_stages(NET, 3, (1, 3)) == [[0], [1, 2], [3]]


@pytest.mark.parametrize(
    ("num_stages", "explicit", "match"),
    [
        (5, (), "set parallel.mesh.stage to at most 4"),
        (3, (2,), r"makes 2 stages but parallel.mesh.stage=3; give 2 first-layer indices"),
        (3, (2, 2), "strictly increasing layer indices in 1..3"),
        (2, (0,), "strictly increasing"),
        (2, (4,), "strictly increasing"),
    ],
)
def test_assign_stages_errors(num_stages, explicit, match):
    with pytest.raises(UserError, match=match):
        assign_stages(NET, num_stages, explicit)


# ----------------------------------------------------------------------------------- schedule


def test_schedule_is_gpipe():
    np.testing.assert_array_equal(schedule(3, 2), [[0, 1, -1, -1], [-1, 0, 1, -1], [-1, -1, 0, 1]])
    for s, m in itertools.product(range(1, 6), range(1, 9)):
        table = schedule(s, m)
        assert table.shape == (s, m + s - 1)
        for stage, row in enumerate(table):
            # Every microbatch once, in order, starting at tick `stage` (one tick after the previous stage).
            np.testing.assert_array_equal(row[row >= 0], np.arange(m))
            assert np.argmax(row >= 0) == stage
        assert bubble_fraction(s, m) == pytest.approx((s - 1) / (m + s - 1))


# ---------------------------------------------------------------------------- against single


# With M > 1 the gradient is a mean of microbatch means, summed in another order than the reference's.
# Adam (eps=1e-8) divides each gradient by its own size, so where a gradient is ~1e-9 (a cancellation
# at fp32 rounding level, 1e-7 of the largest), that reordering moves the update by ~1% of the learning
# rate: a plain microbatched loop on one device does exactly the same. The M > 1 cases therefore use
# momentum, whose update is linear in the gradient; M = 1 sums as the reference does and uses Adam.
@pytest.mark.parametrize(
    ("stage", "microbatches", "optimizer"),
    [(2, 1, "adam"), (4, 1, "adam"), (2, 4, "momentum"), (4, 4, "momentum")],
)
def test_heterogeneous_net_matches_single(stage, microbatches, optimizer, dataset, references):
    c = make_config(optimizer, stage=stage, microbatches=microbatches)
    strategy, result = run(dataset, "pipeline", c)
    assert strategy.num_devices == stage and strategy.data_parallel == 1
    assert_matches(result, references[optimizer], f"pipeline S={stage} M={microbatches} {optimizer}")


def test_padding_stays_zero(dataset):
    """Padded entries of the packed buffers get exactly zero gradient, so they and Adam's moments stay 0."""
    c = make_config(stage=4, microbatches=2)
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    strategy = strategies.make("pipeline", problem, c.parallel)
    batches = data.Batches(dataset.x_train, dataset.y_train, c.train.batch_size, c.seed)
    state = strategy.init(jax.random.key(0))
    for s in range(3):
        state, _ = strategy.step(state, strategy.shard_batch(batches.stack(s, 1)))
    sizes = [i * o + o for i, o in NET]  # one layer per stage
    for packed in (state.params, state.opt_state[0].mu, state.opt_state[0].nu):
        packed = np.asarray(packed)
        assert packed.shape == (4, max(sizes))
        for row, size in zip(packed, sizes, strict=True):
            assert np.all(row[size:] == 0) and np.any(row[:size] != 0)


def test_fused_steps(dataset, references):
    """K=3 steps per call (a scan over steps around the scan over ticks) give the reference too."""
    _, result = run(dataset, "pipeline", make_config("momentum", stage=4, microbatches=2), k=3)
    assert_matches(result, references["momentum"], "pipeline K=3")


def test_clipping_matches_single(dataset):
    """Global-norm clipping: the norm of the packed gradients spans all stages (padding adds zero)."""
    c = make_config("momentum", stage=2, microbatches=2, **{"optimizer.clip_norm": 0.05})
    _, expected = run(dataset, "single", c)
    _, result = run(dataset, "pipeline", c)
    assert_matches(result, expected, "pipeline clip_norm")


def test_regression_targets_match_single():
    """mse with y[B, T]: the last stage splits targets into microbatches like inputs."""
    c = make_config("sgd", stage=3, microbatches=4, **{"data.name": "synthetic_regression"})
    c.data.num_targets = 3
    c.train.loss = "mse"
    dataset = data.load(c.data, seed=0)
    _, expected = run(dataset, "single", c)
    _, result = run(dataset, "pipeline", c)
    assert_matches(result, expected, "pipeline mse")


# -------------------------------------------------------------------------------------- errors


def test_batch_not_divisible_by_microbatches(dataset):
    c = make_config(stage=2, microbatches=5)
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    strategy = strategies.make("pipeline", problem, c.parallel)
    batch = data.Batches(dataset.x_train, dataset.y_train, 32, 0).stack(0, 1)
    with pytest.raises(UserError, match=r"train.batch_size=32 is not divisible by parallel.microbatches=5; "):
        strategy.shard_batch(batch)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"parallel.mesh.stage": 8}, "set parallel.mesh.stage to at most 4"),
        ({"parallel.stages": (1, 2)}, "give 1 first-layer indices"),
        ({"optimizer.name": "lamb"}, "use optimizer.name=sgd, momentum"),
        ({"parallel.mesh.data": 2}, "remove parallel.mesh.data=2 or set it to 1"),
    ],
)
def test_errors_before_compiling(changes, match, dataset):
    c = make_config(**changes)
    problem = make_problem(c, dataset.num_features, dataset.num_outputs)
    with pytest.raises(UserError, match=match):
        strategies.make("pipeline", problem, c.parallel)


def test_measure_bubble_runs():
    c = make_config(stage=2)
    c.model.hidden = (16, 8)
    problem = make_problem(c, 12, 4)
    rows = pipeline.measure_bubble(problem, c.parallel, microbatch_size=4, microbatches=(1, 2), repeats=1)
    assert [r["microbatches"] for r in rows] == [1, 2]
    assert [r["formula_bubble"] for r in rows] == [1 / 2, 1 / 3]
    assert all(r["seconds"] > 0 for r in rows)
