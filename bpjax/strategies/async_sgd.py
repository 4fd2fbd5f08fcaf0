"""``async``: asynchronous data parallelism with stale gradients, simulated deterministically.

Layout: ``In[B_data, D] · W_{t-tau_w}[D, F]``: worker w computes its gradient on the parameters of step
``t - tau_w(t)``; W replicated, with the last ``s+1`` versions kept in a ring buffer.

Real asynchronous SGD (Downpour, Hogwild) is nondeterministic: a worker's gradient arrives some steps
after the parameters it was computed on were read, and that delay depends on timing. bpjax makes the
delay an experimental variable instead. At step t, worker w reads the parameters of version
``max(t - tau_w(t), 0)``, computes the gradient of its shard of the batch there, and the mean of the W
stale gradients is applied, in worker order, as one optimizer update to the current parameters (so a
step still consumes one global batch). The delays are either fixed (``parallel.staleness = tau``) or,
with ``parallel.random_staleness``, drawn per step and worker uniformly from ``[0, s]`` with
``s = parallel.staleness`` (the stale-synchronous-parallel bound), from a fixed key folded with the
step and the worker: runs are bit-identical. With tau = 0 every worker reads the
current parameters and this is synchronous dp exactly.

Everything runs inside one ``shard_map`` over ``data``: each device picks its version from the ring
buffer (a replicated ``[s+1, ...]`` copy of the parameters: s+1 times dp's parameter memory), takes its
gradient, and ``pmean`` averages the W gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bpjax.devices import make_mesh, mesh_axes
from bpjax.errors import UserError
from bpjax.schema import Bool
from bpjax.step import Problem, TrainState
from bpjax.strategies import threaded
from bpjax.strategies.base import (
    Cost,
    CostInput,
    Definition,
    Example,
    Strategy,
    broadcast_copies,
    data_allreduce,
    over_data,
    replicated_placement,
)

AXIS = "data"
FRESH = "the parameter history starts with every slot holding the restored parameters"


class AsyncState(NamedTuple):
    """The train state plus the last ``s+1`` parameter versions; version v is at ``v % (s+1)``."""

    train: TrainState
    history: object  # params tree, each leaf [s+1, ...]


def delays(step: jax.Array, worker: jax.Array, staleness: int, random: bool, seed: int = 0) -> jax.Array:
    """tau_w(t): fixed ``staleness``, or uniform in ``[0, staleness]`` from (seed, step, worker)."""
    if not random or staleness == 0:
        return jnp.asarray(staleness, jnp.int32)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), worker)
    return jax.random.randint(key, (), 0, staleness + 1, dtype=jnp.int32)


def make(
    problem: Problem,
    mesh: dict,
    *,
    staleness: int,
    random_staleness: bool,
    execution: str,
    stragglers: dict,
    replay: str,
) -> Strategy:
    real = threaded.host_driven(
        problem,
        mesh,
        name="async",
        execution=execution,
        replay=replay,
        staleness=staleness,
        fetch_every=1,  # a worker fetches the parameters before every batch
        stragglers=stragglers,
    )
    if real is not None:
        return real
    if staleness < 0:  # also for callers that build it without validating the whole config
        raise UserError(threaded.UNBOUNDED)
    s, random = staleness, random_staleness
    mesh = make_mesh(mesh_axes(dict(mesh), (AXIS,), "async"))
    slots = s + 1
    replicated = jax.sharding.NamedSharding(mesh, jax.P())

    def from_train(train: TrainState, history=None) -> AsyncState:
        # Without a history of its own (a fresh start, another strategy's checkpoint), every slot holds
        # the current parameters: the next s steps read them, as if they had not changed before.
        if history is None:
            history = broadcast_copies(train.params, slots)
        return AsyncState(train, history)

    def worker_grads(step, history, batch):
        w = jax.lax.axis_index(AXIS)
        version = jnp.maximum(step - delays(step, w, s, random), 0)
        stale = jax.tree.map(lambda h: h[version % slots], history)
        loss, grads = problem.loss_and_grads(stale, batch)
        # Worker order is fixed, so the mean (and the run) is deterministic.
        return jax.lax.pmean((loss, grads), AXIS)

    def step(state: AsyncState, batch):
        train = state.train
        loss, grads = jax.shard_map(
            worker_grads,
            mesh=mesh,
            in_specs=(jax.P(), jax.P(), jax.tree.map(lambda _: jax.P(AXIS), batch)),
            out_specs=jax.P(),
            check_vma=False,  # the gradient is taken inside, on each device's own version
        )(train.step, state.history, batch)
        new = problem.apply_gradients(train, grads)
        history = jax.tree.map(lambda h, p: h.at[new.step % slots].set(p), state.history, new.params)
        return AsyncState(new, history), {"loss": loss}

    kind = f"uniform in [0, {s}]" if random and s else f"{s}"
    return over_data(
        "async",
        f"In[B_data, D] · W_(t-tau)[D, F], tau {kind}; W and {slots} version(s) replicated",
        mesh,
        problem,
        from_train=from_train,
        state_sharding=AsyncState(replicated, replicated),
        step=step,
        train_of=lambda state: state.train,
        train_sharding=replicated,
        extras_of=lambda state: state.history,
        fresh=FRESH,
    )


def cost(inp: CostInput) -> Cost:
    if inp.settings.execution == "threads" or inp.settings.replay:
        return threaded.cost(inp)
    s = inp.settings.staleness
    notes = [
        f"async keeps {s + 1} versions of the parameters on every device (see state as stored); the "
        "gradients are all-reduced every step, as in dp"
    ]
    return Cost(data_allreduce(inp), notes if s else [])


DEFINITION = Definition(
    name="async",
    summary="asynchronous SGD with stale gradients: simulated deterministically (fixed or random delay), "
    "or real worker threads with an SSP bound, stragglers and a bit-exact replay",
    layout="In[B_data, D] · W_(t-tau)[D, F]; W and tau+1 versions replicated",
    make=make,
    axes=(AXIS,),
    settings={
        "staleness": threaded.SETTINGS["staleness"],
        "random_staleness": Bool(False, "draw tau per step and worker uniformly from [0, staleness]"),
        "execution": threaded.SETTINGS["execution"],
        "stragglers": threaded.SETTINGS["stragglers"],
        "replay": threaded.SETTINGS["replay"],
    },
    check=threaded.check,
    cost=cost,
    placement=replicated_placement,
    examples=(
        Example({"data": 8}, {"staleness": 0}),
        Example({"data": 4}, {"staleness": 0}),
        Example({"data": 1}, {"staleness": 0}),
        # One worker thread: it reads the parameters the last update made, so this is single exactly.
        Example({"data": 1}, {"execution": "threads"}),
    ),
    multi_process=threaded.multi_process,
    multi_process_when=threaded.MULTI_PROCESS_WHEN,
    portable_checkpoints=True,
)
