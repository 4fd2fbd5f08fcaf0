"""``param_server``: Downpour-style parameter server, simulated deterministically.

Layout: server ``W[D, F_data]`` and its optimizer state sharded over the ``data`` devices (each device
hosts one server shard); workers ``In[B_data, D] · W_cache[D, F]`` on their last fetched copy.

As in Downpour SGD (Dean et al. 2012), each of the W workers:
  * computes the gradient of its shard of every batch on its cached copy of the parameters, and adds
    it to a local accumulator (no communication);
  * every ``parallel.n_push`` steps pushes the accumulated gradient to the server: a reduce-scatter
    that leaves each server shard the sum over workers of its slice (divided by W: the mean over
    workers, summed over the steps since the last push); the server applies one optimizer update;
  * every ``parallel.n_fetch`` steps pulls the current parameters from the server (an all-gather) into
    its cache.
Pushes and fetches happen at the same steps on every worker, so the run is deterministic; real
parameter servers are not, and the delays here are the schedule's, not the network's. With
``n_fetch = n_push = 1`` a worker's gradient is dp's gradient at the current parameters and the server
applies it at once: synchronous dp exactly (tested).

The metrics report ``bytes_pushed`` and ``bytes_pulled`` per step and worker (zero on steps without).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.devices import make_mesh, mesh_axes
from bpjax.errors import UserError
from bpjax.schema import Int
from bpjax.step import Problem, TrainState
from bpjax.strategies import threaded
from bpjax.strategies.base import (
    Collective,
    Cost,
    CostInput,
    Definition,
    Example,
    Strategy,
    over_data,
    replicated_placement,
    split_over_data,
)
from bpjax.strategies.rules import FSDP, param_specs
from bpjax.strategies.sharded import state_shardings

AXIS = "data"
FRESH = "the workers' caches start from the restored parameters and their gradient accumulators at zero"


class ServerState(NamedTuple):
    """The server's TrainState (sharded), the workers' cached parameters and gradient accumulators."""

    train: TrainState
    cache: object  # params, replicated: every worker fetches the same copy at the same steps
    accum: object  # params-shaped, stacked [W, ...] over data: each worker's own sum of gradients


def make(
    problem: Problem,
    mesh: dict,
    *,
    n_push: int,
    n_fetch: int,
    staleness: int,
    execution: str,
    stragglers: dict,
    replay: str,
) -> Strategy:
    # In threads execution every push is one update of one batch (n_push = 1, checked); a worker's
    # cached copy is refreshed every n_fetch of its batches.
    real = threaded.host_driven(
        problem,
        mesh,
        name="param_server",
        execution=execution,
        replay=replay,
        staleness=staleness,
        fetch_every=n_fetch,
        stragglers=stragglers,
    )
    if real is not None:
        return real
    mesh = make_mesh(mesh_axes(dict(mesh), (AXIS,), "param_server"))
    W = mesh.shape[AXIS]
    named = lambda spec: jax.sharding.NamedSharding(mesh, spec)  # noqa: E731
    replicated, per_worker = named(jax.P()), named(jax.P(AXIS))
    # Server shards: each parameter split over the devices on its largest divisible dimension (the
    # fsdp rule table), its optimizer state alike.
    specs = param_specs(problem, FSDP, dict(mesh.shape))
    server_sh = state_shardings(problem, mesh, specs)
    shard_dim = jax.tree.map(
        lambda s: next((d for d, a in enumerate(s) if a == AXIS), None),
        specs,
        is_leaf=lambda x: isinstance(x, jax.P),
    )

    def from_train(train: TrainState, extras=None) -> ServerState:
        # Without a cache and accumulators of their own (a fresh start, another strategy's checkpoint),
        # the workers have just fetched the parameters and pushed everything: as after a step at
        # n_push = n_fetch = 1.
        if extras is None:
            zeros = jax.tree.map(lambda p: jnp.zeros((W, *p.shape), p.dtype), train.params)
            extras = {"cache": train.params, "accum": zeros}
        return ServerState(train, extras["cache"], extras["accum"])

    shapes = jax.eval_shape(lambda key: from_train(problem.init(key)), jax.random.key(0))
    param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(shapes.cache))
    state_sh = ServerState(
        server_sh,
        jax.tree.map(lambda _: replicated, shapes.cache),
        jax.tree.map(lambda _: per_worker, shapes.accum),
    )

    def worker(step, cache, accum_1x, batch):
        loss, grads = problem.loss_and_grads(cache, batch)
        accum = jax.tree.map(lambda a, g: a[0] + g, accum_1x, grads)
        push = (step + 1) % n_push == 0

        def send(acc):
            # The push: the sum over workers of each server shard's slice, a reduce-scatter (or an
            # all-reduce for a parameter no dimension of which the worker count divides).
            def one(a, d):
                if d is None:
                    return jax.lax.psum(a, AXIS) / W
                return jax.lax.psum_scatter(a, AXIS, scatter_dimension=d, tiled=True) / W

            return jax.tree.map(one, acc, shard_dim)

        def nothing(acc):
            return jax.tree.map(
                lambda a, d: jnp.zeros(
                    a.shape if d is None else a.shape[:d] + (a.shape[d] // W,) + a.shape[d + 1 :], a.dtype
                ),
                acc,
                shard_dim,
            )

        pushed = jax.lax.cond(push, send, nothing, accum)
        accum = jax.tree.map(lambda a: jnp.where(push, jnp.zeros_like(a), a), accum)
        return jax.lax.pmean(loss, AXIS), pushed, jax.tree.map(lambda a: a[None], accum)

    def step(state: ServerState, batch):
        train = state.train
        grad_specs = jax.tree.map(
            lambda s: jax.P(*(a if a == AXIS else None for a in s)),
            specs,
            is_leaf=lambda x: isinstance(x, jax.P),
        )
        loss, pushed, accum = jax.shard_map(
            worker,
            mesh=mesh,
            in_specs=(
                jax.P(),
                jax.P(),
                jax.tree.map(lambda _: jax.P(AXIS), state.accum),
                jax.tree.map(lambda _: jax.P(AXIS), batch),
            ),
            out_specs=(jax.P(), grad_specs, jax.tree.map(lambda _: jax.P(AXIS), state.accum)),
            check_vma=False,  # nothing is differentiated across the shard_map boundary
        )(train.step, state.cache, state.accum, batch)
        push = (train.step + 1) % n_push == 0
        fetch = (train.step + 1) % n_fetch == 0
        # The server applies a push; the step counter counts worker steps either way.
        updated = problem.apply_gradients(train, pushed)
        new_train = jax.tree.map(lambda u, t: jnp.where(push, u, t), updated, train)
        new_train = new_train._replace(step=train.step + 1)
        cache = jax.lax.cond(
            fetch,
            lambda p: jax.lax.with_sharding_constraint(p, jax.tree.map(lambda _: replicated, p)),
            lambda _: state.cache,
            new_train.params,
        )
        metrics = {
            "loss": loss,
            "bytes_pushed": jnp.where(push, jnp.float32(param_bytes), 0.0),
            "bytes_pulled": jnp.where(fetch, jnp.float32(param_bytes), 0.0),
        }
        return ServerState(new_train, cache, accum), metrics

    return over_data(
        "param_server",
        f"server W[D, F_data] sharded over the {W} devices; workers In[B_data, D] · W_cache[D, F]; "
        f"push every {n_push}, fetch every {n_fetch} step(s)",
        mesh,
        problem,
        from_train=from_train,
        state_sharding=state_sh,
        step=step,
        train_of=lambda state: state.train,
        train_sharding=server_sh,
        extras_of=lambda state: {"cache": state.cache, "accum": state.accum},
        fresh=FRESH,
    )


def check(config) -> None:
    p = config.parallel
    threaded.check(config)
    if p.execution == "threads" and p.n_push != 1:
        raise UserError(
            f"parallel.n_push={p.n_push}: in threads execution every push is one update of one batch; set "
            "parallel.n_push=1 (parallel.n_fetch sets how stale a worker's copy may get)"
        )
    if p.execution == "simulated" and p.staleness:
        raise UserError(
            f"parallel.staleness={p.staleness} bounds param_server's workers in threads execution; set "
            "parallel.execution=threads, or use n_push and n_fetch for the simulated schedule"
        )


def placement(problem: Problem, strategy: Strategy, settings):
    """The parameters' home: the server shards (the workers' caches are copies)."""
    if settings.execution == "threads" or settings.replay:
        return replicated_placement(problem, strategy, settings)
    return jax.tree.map(lambda s: s.sharding, jax.eval_shape(strategy.init, jax.random.key(0)).train.params)


def cost(inp: CostInput) -> Cost:
    if inp.settings.execution == "threads" or inp.settings.replay:
        return threaded.cost(inp)
    data = inp.mesh.get(AXIS, 1)
    if data == 1:
        return Cost([])
    n_push, n_fetch = inp.settings.n_push, inp.settings.n_fetch
    sharded_b, whole_b = split_over_data(inp.params, data)
    push, pull = f"once every {n_push} step(s)", f"once every {n_fetch} step(s)"
    out = [
        Collective(
            "reduce-scatter",
            AXIS,
            data,
            sharded_b,
            f"push: gradients to the server shards, {push}",
            every=n_push,
        )
    ]
    if whole_b:
        out.append(
            Collective(
                "all-reduce",
                AXIS,
                data,
                whole_b,
                f"push: gradients of unsplit parameters, {push}",
                every=n_push,
            )
        )
    out.append(
        Collective(
            "all-gather", AXIS, data, sharded_b, f"fetch: parameters from the server, {pull}", every=n_fetch
        )
    )
    out.append(Collective("all-reduce", AXIS, data, 4, "loss (mean over workers, for the log)"))
    notes = [
        "param_server's pushes and fetches run under a condition; the compiler may add its own copies "
        "(compare with --compiled)"
    ]
    return Cost(out, notes)


DEFINITION = Definition(
    name="param_server",
    summary="Downpour-style parameter server: workers push gradients every n_push, fetch every n_fetch steps "
    "(simulated, or real worker threads)",
    layout="server W[D, F_data] sharded over the devices; workers In[B_data, D] · W_cache[D, F]",
    make=make,
    axes=(AXIS,),
    settings={
        "n_push": Int(1, "workers push their accumulated gradients every n_push steps", min=1),
        "n_fetch": Int(1, "workers pull the parameters every n_fetch steps", min=1),
        "staleness": threaded.SETTINGS["staleness"],
        "execution": threaded.SETTINGS["execution"],
        "stragglers": threaded.SETTINGS["stragglers"],
        "replay": threaded.SETTINGS["replay"],
    },
    check=check,
    cost=cost,
    placement=placement,
    examples=(
        Example({"data": 8}, {"n_push": 1, "n_fetch": 1}),
        Example({"data": 4}),
        Example({"data": 1}),
        Example({"data": 1}, {"execution": "threads", "n_fetch": 1}),
    ),
    multi_process=threaded.multi_process,
    multi_process_when=threaded.MULTI_PROCESS_WHEN,
    portable_checkpoints=True,
)
