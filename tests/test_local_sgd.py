"""local_sgd against an independent simulation: W workers as a vmap on one device, averaged every H."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpjax import config as cfg_lib
from bpjax import strategies
from bpjax.errors import UserError
from bpjax.step import make_problem
from bpjax.testing import assert_trees_close, train_steps

W, STEPS = 4, 6


def simulate(problem, batches, H):
    """W copies trained independently on their quarter of each batch, averaged every H steps."""
    state = problem.init(jax.random.key(0))
    params = jax.tree.map(lambda x: jnp.stack([x] * W), state.params)
    opt = jax.tree.map(lambda x: jnp.stack([x] * W), state.opt_state)

    def one(p, o, x, y):
        g = jax.grad(problem.loss_fn)(p, {"x": x, "y": y})
        u, o = problem.tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    step = jax.jit(jax.vmap(one))
    for s in range(STEPS):
        b = batches.batch(s)
        x, y = (a.reshape(W, -1, *a.shape[1:]) for a in (b["x"], b["y"]))
        params, opt = step(params, opt, x, y)
        if (s + 1) % H == 0:
            params, opt = jax.tree.map(
                lambda a: (
                    jnp.broadcast_to(a.mean(0), a.shape) if jnp.issubdtype(a.dtype, jnp.floating) else a
                ),
                (params, opt),
            )
    return jax.tree.map(lambda a: np.asarray(a.mean(0)), params)


@pytest.mark.parametrize("H", [1, 2, 3])
def test_matches_the_simulation(momentum_problem, H):
    c, problem, batches = momentum_problem
    c = cfg_lib.apply_overrides(c, [f"parallel.mesh.data={W}", f"parallel.local_steps={H}"])
    _, final, _ = train_steps(strategies.make("local_sgd", problem, c.parallel), batches, STEPS)
    assert_trees_close(final.params, simulate(problem, batches, H), 1e-5, 1e-6, what=f"H={H}")


def test_local_steps_change_the_result(momentum_problem):
    """H=3 is not H=1: the check above cannot pass by ignoring local_steps."""
    c, problem, batches = momentum_problem
    finals = []
    for H in (1, 3):
        c2 = cfg_lib.apply_overrides(c, [f"parallel.mesh.data={W}", f"parallel.local_steps={H}"])
        finals.append(train_steps(strategies.make("local_sgd", problem, c2.parallel), batches, STEPS)[1])
    with pytest.raises(AssertionError):
        assert_trees_close(finals[0].params, finals[1].params, 1e-5, 1e-6)


@pytest.mark.parametrize("overrides", [["optimizer.name=adam"], ["optimizer.clip_norm=0.5"]])
def test_nonlinear_updates_are_refused(momentum_problem, overrides):
    c, _, _ = momentum_problem
    c = cfg_lib.apply_overrides(c, overrides)
    problem = make_problem(c, 24, 10)
    with pytest.raises(UserError, match="linear in the gradient"):
        strategies.make("local_sgd", problem, c.parallel)
