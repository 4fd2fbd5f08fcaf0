"""param_server against an independent one-device simulation of Downpour's push/fetch schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bpjax
from bpjax import config as cfg_lib
from bpjax import strategies
from bpjax.errors import UserError
from bpjax.step import make_problem
from bpjax.testing import assert_trees_close, train_steps

W, STEPS = 4, 7


def simulate(problem, batches, n_push, n_fetch):
    state = problem.init(jax.random.key(0))
    params, opt, cache = state.params, state.opt_state, state.params
    accum = [jax.tree.map(jnp.zeros_like, params) for _ in range(W)]
    grad = jax.jit(jax.grad(problem.loss_fn))
    for t in range(STEPS):
        b = batches.batch(t)
        for w in range(W):
            shard = {k: v[w * 16 : (w + 1) * 16] for k, v in b.items()}
            accum[w] = jax.tree.map(jnp.add, accum[w], grad(cache, shard))
        if (t + 1) % n_push == 0:
            mean = jax.tree.map(lambda *a: sum(a) / W, *accum)
            updates, opt = problem.tx.update(mean, opt, params)
            params = optax.apply_updates(params, updates)
            accum = [jax.tree.map(jnp.zeros_like, params) for _ in range(W)]
        if (t + 1) % n_fetch == 0:
            cache = params
    return jax.tree.map(np.asarray, params)


@pytest.mark.parametrize(("n_push", "n_fetch"), [(1, 1), (2, 3), (3, 1)])
def test_matches_the_simulation(momentum_problem, n_push, n_fetch):
    c, problem, batches = momentum_problem
    c = cfg_lib.apply_overrides(
        c, [f"parallel.mesh.data={W}", f"parallel.n_push={n_push}", f"parallel.n_fetch={n_fetch}"]
    )
    _, final, _ = train_steps(strategies.make("param_server", problem, c.parallel), batches, STEPS)
    expected = simulate(problem, batches, n_push, n_fetch)
    assert_trees_close(final.params, expected, 1e-5, 1e-6, what=f"push {n_push} fetch {n_fetch}")
    if (n_push, n_fetch) != (1, 1):  # the schedule matters: dp's result is different
        with pytest.raises(AssertionError):
            assert_trees_close(final.params, simulate(problem, batches, 1, 1), 1e-5, 1e-6)


def test_bytes_pushed_and_pulled_are_reported(momentum_problem):
    c, _, _ = momentum_problem
    c = cfg_lib.apply_overrides(
        c,
        [
            "parallel.strategy=param_server",
            f"parallel.mesh.data={W}",
            "parallel.n_push=4",
            "parallel.n_fetch=2",
            "train.steps=8",
            "train.log_every=8",
            "train.eval_every=8",
            "train.batch_size=64",
            "train.progress=off",
        ],
    )
    row = bpjax.run(c).history[-1]
    params = sum(
        np.size(x) * 4 for x in jax.tree.leaves(make_problem(c, 24, 10).init(jax.random.key(0)).params)
    )
    assert row["bytes_pushed_per_step"] == pytest.approx(params / 4)
    assert row["bytes_pulled_per_step"] == pytest.approx(params / 2)


def test_bad_schedule(momentum_problem):
    c, problem, _ = momentum_problem
    c = cfg_lib.apply_overrides(c, ["parallel.n_push=0"])
    with pytest.raises(UserError, match="n_push=0"):
        strategies.make("param_server", problem, c.parallel)
