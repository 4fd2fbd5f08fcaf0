"""async: the staleness semantics pinned on a linear model by hand, determinism, bounded delays."""

import jax
import numpy as np
import pytest

from bpjax import config as cfg_lib
from bpjax import data, strategies
from bpjax.errors import UserError
from bpjax.step import make_problem
from bpjax.strategies.async_sgd import delays
from bpjax.testing import assert_trees_close, train_steps

D, WORKERS, BATCH, STEPS, LR = 3, 2, 4, 6, 0.1


def linear_setup(**parallel):
    """A linear model (one layer, no activation): y = x . w + b, mean squared error, plain SGD."""
    c = cfg_lib.default()
    c.data.name = "synthetic_regression"
    c.train.loss = "mse"
    c.model.hidden = ()
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.0
    c.optimizer.learning_rate = LR
    c.parallel.strategy = "async"
    c.parallel.mesh = {"data": WORKERS}
    for k, v in parallel.items():
        c.parallel[k] = v
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, D)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3).astype(np.float32)
    problem = make_problem(c, D, 1)
    return c, problem, data.Batches(x, y, BATCH, seed=0)


def hand_computed(problem, batches, tau: int):
    """w_{t+1} = w_t - lr * mean_w grad(w_{max(t - tau, 0)}; worker w's half of batch t), by hand."""
    p0 = jax.device_get(problem.init(jax.random.key(0)).params["layer_0"])
    versions = [(np.float64(p0["kernel"]), np.float64(p0["bias"]))]
    for t in range(STEPS):
        b = batches.batch(t)
        grads = []
        for w in range(WORKERS):
            x = b["x"][w * BATCH // WORKERS : (w + 1) * BATCH // WORKERS].astype(np.float64)
            y = b["y"][w * BATCH // WORKERS : (w + 1) * BATCH // WORKERS].astype(np.float64)
            kernel, bias = versions[max(t - tau, 0)]
            r = x @ kernel + bias - y  # residuals [n, 1]
            grads.append((2 / len(x) * x.T @ r, 2 / len(x) * r.sum(0)))
        gk = np.mean([g[0] for g in grads], 0)
        gb = np.mean([g[1] for g in grads], 0)
        kernel, bias = versions[-1]
        versions.append((kernel - LR * gk, bias - LR * gb))
    kernel, bias = versions[-1]
    return {"layer_0": {"bias": bias.astype(np.float32), "kernel": kernel.astype(np.float32)}}


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_update_at_step_t_uses_the_gradient_at_step_t_minus_tau(tau):
    c, problem, batches = linear_setup(staleness=tau)
    _, final, _ = train_steps(strategies.make("async", problem, c.parallel), batches, STEPS)
    assert_trees_close(final.params, hand_computed(problem, batches, tau), rtol=1e-5, atol=1e-6)


def test_staleness_matters():
    """tau=2 is not tau=0: the hand-computed check cannot pass by ignoring the delay."""
    c, problem, batches = linear_setup()
    expected = hand_computed(problem, batches, 2)
    _, fresh, _ = train_steps(strategies.make("async", problem, c.parallel), batches, STEPS)
    with pytest.raises(AssertionError):
        assert_trees_close(fresh.params, expected, rtol=1e-5, atol=1e-6)


def test_random_delays_are_bounded_seeded_and_vary():
    taus = np.array([[int(delays(t, w, 3, True)) for w in range(8)] for t in range(20)])
    assert taus.min() == 0 and taus.max() == 3
    again = np.array([[int(delays(t, w, 3, True)) for w in range(8)] for t in range(20)])
    np.testing.assert_array_equal(taus, again)
    assert int(delays(5, 1, 3, False)) == 3


def test_random_staleness_runs_are_bit_identical():
    c, problem, batches = linear_setup(staleness=3, random_staleness=True)
    runs = [train_steps(strategies.make("async", problem, c.parallel), batches, STEPS) for _ in range(2)]
    assert_trees_close(runs[0], runs[1], rtol=0, atol=0, what="two async runs")


def test_unbounded_staleness_is_refused_in_the_simulation():
    c, problem, _ = linear_setup(staleness=-1)
    with pytest.raises(
        UserError, match=r"parallel.staleness=-1 \(unbounded\) needs parallel.execution=threads"
    ):
        strategies.make("async", problem, c.parallel)
