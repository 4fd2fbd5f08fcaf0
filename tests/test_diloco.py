"""diloco against an independent simulation (W workers as a vmap on one device, an optax outer step),
and its degenerate settings against local_sgd."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bpjax import config as cfg_lib
from bpjax import strategies
from bpjax.errors import UserError
from bpjax.step import make_problem
from bpjax.strategies.diloco import fragments_of
from bpjax.testing import assert_trees_close, train_steps

W, STEPS = 4, 8


def simulate(problem, batches, H, outer_lr=0.7, outer_momentum=0.9, fragments=1):
    """W copies trained independently on their quarter of each batch; every H steps (per fragment,
    staggered by p*H/P) the outer Nesterov step on the mean; inner optimizer states kept per worker."""
    state = problem.init(jax.random.key(0))
    outer = state.params
    params = jax.tree.map(lambda x: jnp.stack([x] * W), state.params)
    opt = jax.tree.map(lambda x: jnp.stack([x] * W), state.opt_state)
    groups = fragments_of(len(problem.model.widths), fragments)
    tx = optax.sgd(outer_lr, momentum=outer_momentum or None, nesterov=outer_momentum > 0)
    outer_opt = [tx.init({k: outer[k] for k in g}) for g in groups]

    def one(p, o, x, y):
        g = jax.grad(problem.loss_fn)(p, {"x": x, "y": y})
        u, o = problem.tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    step = jax.jit(jax.vmap(one))
    for s in range(STEPS):
        b = batches.batch(s)
        x, y = (a.reshape(W, -1, *a.shape[1:]) for a in (b["x"], b["y"]))
        params, opt = step(params, opt, x, y)
        for p, group in enumerate(groups):
            if (s + 1 - p * H // fragments) % H:
                continue
            frag = {k: outer[k] for k in group}
            delta = jax.tree.map(lambda o, w: o - w.mean(0), frag, {k: params[k] for k in group})
            u, outer_opt[p] = tx.update(delta, outer_opt[p], frag)
            frag = optax.apply_updates(frag, u)
            outer = {**outer, **frag}
            params = {**params, **jax.tree.map(lambda a: jnp.stack([a] * W), frag)}
    return jax.tree.map(np.asarray, outer)


def configure(c, **parallel):
    return cfg_lib.apply_overrides(
        c, [f"parallel.mesh.data={W}", *(f"parallel.{k}={v}" for k, v in parallel.items())]
    )


@pytest.mark.parametrize(("optimizer", "H"), [("momentum", 1), ("momentum", 2), ("adamw", 3), ("adamw", 4)])
def test_matches_the_simulation(momentum_problem, optimizer, H):
    c, _, batches = momentum_problem
    c = configure(cfg_lib.apply_overrides(c, [f"optimizer.name={optimizer}"]), local_steps=H)
    problem = make_problem(c, 24, 10)
    _, final, _ = train_steps(strategies.make("diloco", problem, c.parallel), batches, STEPS)
    assert_trees_close(final.params, simulate(problem, batches, H), 1e-5, 1e-6, what=f"{optimizer} H={H}")


def test_streaming_matches_the_simulation(momentum_problem):
    c, problem, batches = momentum_problem
    c = configure(c, local_steps=4, fragments=3)
    _, final, _ = train_steps(strategies.make("diloco", problem, c.parallel), batches, STEPS)
    expected = simulate(problem, batches, 4, fragments=3)
    assert_trees_close(final.params, expected, 1e-5, 1e-6, what="streaming P=3")
    # The fragments are synced at other steps than all at once: the check above sees the difference.
    with pytest.raises(AssertionError):
        assert_trees_close(final.params, simulate(problem, batches, 4), 1e-5, 1e-6)


@pytest.mark.parametrize("H", [1, 3])
def test_outer_lr_one_without_momentum_is_local_sgd(momentum_problem, H):
    """With plain SGD inside (no optimizer state to average or keep) and the outer step set to the
    workers' mean, DiLoCo is local SGD with the same H. Compared after a sync (6 steps): between syncs
    DiLoCo's model is the outer one of the last sync, local SGD's the mean of the current copies."""
    c, _, batches = momentum_problem
    c = cfg_lib.apply_overrides(c, ["optimizer.name=sgd", "optimizer.momentum=0.0"])
    problem = make_problem(c, 24, 10)
    c = configure(c, local_steps=H, outer_learning_rate=1.0, outer_momentum=0.0)
    _, diloco, diloco_losses = train_steps(strategies.make("diloco", problem, c.parallel), batches, 6)
    _, local, local_losses = train_steps(strategies.make("local_sgd", problem, c.parallel), batches, 6)
    np.testing.assert_allclose(diloco_losses, local_losses, rtol=1e-5)
    assert_trees_close(diloco.params, local.params, 1e-5, 1e-6, what=f"diloco vs local_sgd H={H}")


def test_outer_settings_change_the_result(momentum_problem):
    """The defaults (0.7, Nesterov 0.9) are not the plain mean: the checks above cannot pass by
    ignoring the outer optimizer."""
    c, problem, batches = momentum_problem
    finals = []
    for lr, mu in ((1.0, 0.0), (0.7, 0.9)):
        c2 = configure(c, local_steps=2, outer_learning_rate=lr, outer_momentum=mu)
        finals.append(train_steps(strategies.make("diloco", problem, c2.parallel), batches, STEPS)[1])
    with pytest.raises(AssertionError):
        assert_trees_close(finals[0].params, finals[1].params, 1e-5, 1e-6)


def test_fragments_of():
    assert fragments_of(3, 1) == [["layer_0", "layer_1", "layer_2"]]
    assert fragments_of(3, 3) == [["layer_0"], ["layer_1"], ["layer_2"]]
    assert fragments_of(4, 3) == [["layer_0", "layer_1"], ["layer_2"], ["layer_3"]]


def test_too_many_fragments(momentum_problem):
    c, problem, _ = momentum_problem
    with pytest.raises(UserError, match="parallel.fragments=5 but the net has 3 layers"):
        strategies.make("diloco", problem, configure(c, fragments=5).parallel)
