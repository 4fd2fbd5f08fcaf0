"""``local_sgd``: W workers each take H optimizer steps on their own shard of every batch, then average.

Layout: ``In[B_data, D] · W_w[D, F]``: every worker w holds its own copy of the parameters and optimizer
state (stacked ``[W, ...]``, sharded over ``data``); every ``parallel.local_steps`` = H steps the copies
(and their optimizer states) are replaced by their mean, one all-reduce per H steps instead of per step.

Per worker, inside a ``shard_map`` over ``data``: the gradient of the local loss (no pmean: the point of
local SGD is that workers do not agree every step) and the worker's own optimizer update; then, on
steps that are multiples of H, ``pmean`` of the parameters and of the optimizer state. With H=1 and a
linear optimizer (sgd, momentum, nesterov) this is exactly synchronous dp: the mean of the W updates
from the same point is the update with the mean gradient. With Adam it is not, even at H=1 (the mean of
W normalised updates is not the normalised mean update), nor with global-norm clipping; bpjax refuses
such optimizers here (a probe checks that the update is linear in the gradient) rather than train
something other than what the user compares against.

``gather`` returns the mean of the workers' copies (parameters and optimizer state): the consensus
model, equal to every copy right after an averaging step. A checkpoint saves it, and the copies beside.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.devices import make_mesh, mesh_axes
from bpjax.errors import UserError
from bpjax.schema import Int
from bpjax.step import Problem, TrainState
from bpjax.strategies.base import (
    Collective,
    Cost,
    CostInput,
    Definition,
    Example,
    Strategy,
    broadcast_copies,
    local_bytes,
    mean_of_copies,
    over_data,
    replicated_placement,
    worker_update,
)

AXIS = "data"
LINEAR = ("sgd", "momentum", "nesterov")
FRESH = "every worker's copy of the parameters and optimizer state starts as the restored one"


def _is_linear(tx) -> bool:
    """Whether ``tx``'s update is linear in the gradients (then averaging W updates = one averaged)."""
    p = {"w": np.array([0.5, -2.0, 3.0], np.float32)}
    ga, gb = {"w": np.array([0.1, 0.3, -5.0], np.float32)}, {"w": np.array([-0.2, 0.05, 1.0], np.float32)}
    mean = {"w": (ga["w"] + gb["w"]) / 2}

    @jax.jit
    def two_updates(g):
        state = tx.init(p)
        out = []
        for _ in range(2):
            u, state = tx.update(g, state, p)
            out.append(u["w"])
        return jnp.stack(out)

    a, b, m = jax.device_get((two_updates(ga), two_updates(gb), two_updates(mean)))
    return bool(np.allclose((a + b) / 2, m, rtol=1e-5, atol=1e-7))


def make(problem: Problem, mesh: dict, *, local_steps: int) -> Strategy:
    H = local_steps
    if not _is_linear(problem.tx):
        raise UserError(
            "local_sgd averages parameters, which matches synchronous training only when the update is "
            f"linear in the gradient; use optimizer.name={' / '.join(LINEAR)} without clip_norm"
        )
    mesh = make_mesh(mesh_axes(dict(mesh), (AXIS,), "local_sgd"))
    W = mesh.shape[AXIS]
    per_worker = jax.sharding.NamedSharding(mesh, jax.P(AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())

    def from_train(train: TrainState, copies=None) -> TrainState:
        # Without copies of their own (a fresh start, another strategy's checkpoint), every worker
        # starts from the TrainState: as right after an averaging step.
        if copies is None:
            copies = broadcast_copies((train.params, train.opt_state), W)
        return TrainState(train.step, *copies)

    shapes = jax.eval_shape(lambda key: from_train(problem.init(key)), jax.random.key(0))
    state_sh = TrainState(replicated, *jax.tree.map(lambda _: per_worker, (shapes.params, shapes.opt_state)))

    def average(tree):
        return jax.tree.map(
            lambda x: jax.lax.pmean(x, AXIS) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
        )

    def worker_step(step, params_1x, opt_1x, batch):
        new, loss = worker_update(problem, step, params_1x, opt_1x, batch)
        # Every device has the same step counter, so all take the same branch of the cond.
        params, opt_state = jax.lax.cond(new.step % H == 0, average, lambda t: t, (new.params, new.opt_state))
        copies = jax.tree.map(lambda x: x[None], (params, opt_state))
        return new.step, *copies, jax.lax.pmean(loss, AXIS)

    def step(state: TrainState, batch):
        specs = jax.tree.map(lambda _: jax.P(AXIS), (state.params, state.opt_state))
        new_step, params, opt_state, loss = jax.shard_map(
            worker_step,
            mesh=mesh,
            in_specs=(jax.P(), *specs, jax.tree.map(lambda _: jax.P(AXIS), batch)),
            out_specs=(jax.P(), *specs, jax.P()),
            check_vma=False,  # nothing here is differentiated across the shard_map boundary
        )(state.step, state.params, state.opt_state, batch)
        return TrainState(new_step, params, opt_state), {"loss": loss}

    def consensus(state: TrainState) -> TrainState:
        return TrainState(state.step, *jax.tree.map(mean_of_copies, (state.params, state.opt_state)))

    return over_data(
        "local_sgd",
        f"In[B_data, D] · W_w[D, F] per worker w; copies averaged every {H} step(s)",
        mesh,
        problem,
        from_train=from_train,
        state_sharding=state_sh,
        step=step,
        train_of=consensus,
        train_sharding=replicated,
        extras_of=lambda state: (state.params, state.opt_state),
        fresh=FRESH,
    )


def cost(inp: CostInput) -> Cost:
    data, H = inp.mesh.get(AXIS, 1), inp.settings.local_steps
    if data == 1:
        return Cost([])
    floats = [
        x for x in jax.tree.leaves((inp.params, inp.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    averaged = sum(local_bytes(x) for x in floats)
    return Cost(
        [
            Collective(
                "all-reduce",
                AXIS,
                data,
                averaged,
                f"parameters and optimizer state, averaged once every {H} step(s)",
                every=H,
            ),
            Collective("all-reduce", AXIS, data, 4, "loss (mean over workers, for the log)"),
        ],
        [f"the averaging runs on 1 step in {H}; per step that is {1 / H:.2f} of its bytes"],
    )


LOCAL_STEPS = Int(1, "optimizer steps each worker takes between averaging (H)", min=1)

DEFINITION = Definition(
    name="local_sgd",
    summary="local SGD: workers step on their own, parameters and optimizer state averaged every H steps",
    layout="In[B_data, D] · W_w[D, F] per worker w; copies averaged every H steps",
    make=make,
    axes=(AXIS,),
    settings={"local_steps": LOCAL_STEPS},
    cost=cost,
    placement=replicated_placement,
    # H=1: averaging after every step is synchronous dp for an update linear in the gradient.
    examples=tuple(Example({"data": n}, {"local_steps": 1}, optimizers=("momentum",)) for n in (8, 4, 1)),
    multi_process=True,
    portable_checkpoints=True,
)
