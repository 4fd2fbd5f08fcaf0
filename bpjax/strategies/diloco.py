"""``diloco``: DiLoCo (Douillard et al. 2023), and its streaming variant (Douillard et al. 2025).

Layout: ``In[B_data, D] · W_w[D, F]`` per worker w; the outer ``W[D, F]`` replicated, and updated every H
steps from the mean of the workers' copies.

W workers (the ``data`` devices) each hold their own copy of the parameters and of the inner
optimizer's state (stacked ``[W, ...]``, sharded over ``data``). Every step each worker takes one inner
step of any optimizer (AdamW included) on its own shard of the batch, with no communication. Every
``parallel.local_steps`` = H steps comes the outer step, one all-reduce:

    pseudo-gradient  Delta = W_outer - mean_w W_w
    W_outer         <- outer Nesterov SGD(Delta)   (lr ``outer_learning_rate`` 0.7, momentum
                                                    ``outer_momentum`` 0.9, the paper's values)
    W_w             <- W_outer for every worker

The inner optimizer states are kept across rounds, each worker its own (unlike ``local_sgd``, which
averages them too). With outer learning rate 1 and momentum 0 the outer step sets the model to the
workers' mean: that is ``local_sgd`` for an optimizer without state (plain SGD), and synchronous dp for
H=1 and an update linear in the gradient (tested).

Streaming DiLoCo (``parallel.fragments`` = P > 1): the layers are cut into P contiguous fragments, and
fragment p has its outer step at steps ``t`` with ``(t - p*H/P) % H == 0``: each all-reduce carries 1/P
of the parameters, spread over the round, instead of all of them at once. P=1 is DiLoCo.

``gather`` returns the outer parameters (the model DiLoCo evaluates) and the mean of the workers'
inner optimizer states: the TrainState a checkpoint saves, with the rest of the state beside it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from bpjax.devices import make_mesh, mesh_axes
from bpjax.errors import UserError
from bpjax.models.mlp import layer_name
from bpjax.schema import Float, Int
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
from bpjax.strategies.local_sgd import LOCAL_STEPS

AXIS = "data"
FRESH = (
    "a round starts: the outer model is the restored parameters with zero outer momentum, and every "
    "worker's copy and inner optimizer state the restored ones"
)


class DilocoState(NamedTuple):
    """The step counter, the outer model and its optimizer (one state per fragment), and the workers'
    copies and inner optimizer states (stacked ``[W, ...]``)."""

    step: jax.Array
    outer: Any  # params, replicated
    outer_opt: tuple  # per fragment: the outer optimizer's state of that fragment's layers
    params: Any  # params, each leaf [W, ...]
    opt_state: Any  # the inner optimizer's state, each leaf [W, ...]


def fragments_of(num_layers: int, fragments: int) -> list[list[str]]:
    """Layers cut into ``fragments`` contiguous groups, as equal as possible, earliest first.

    >>> fragments_of(5, 2)
    [['layer_0', 'layer_1', 'layer_2'], ['layer_3', 'layer_4']]
    """
    bounds = np.linspace(0, num_layers, fragments + 1)
    bounds = np.ceil(bounds - 1e-9).astype(int)
    return [[layer_name(i) for i in range(a, b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def outer_optimizer(learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """The outer step: Nesterov SGD on the pseudo-gradient (plain SGD with momentum 0)."""
    return optax.sgd(learning_rate, momentum=momentum or None, nesterov=momentum > 0)


def make(
    problem: Problem,
    mesh: dict,
    *,
    local_steps: int,
    outer_learning_rate: float,
    outer_momentum: float,
    fragments: int,
) -> Strategy:
    H, P = local_steps, fragments
    num_layers = len(problem.model.widths)
    if P > num_layers:
        raise UserError(
            f"parallel.fragments={P} but the net has {num_layers} layers; streaming DiLoCo syncs whole "
            f"layers, so use at most {num_layers} fragments"
        )
    groups = fragments_of(num_layers, P)
    offsets = [p * H // P for p in range(P)]
    outer_tx = outer_optimizer(outer_learning_rate, outer_momentum)
    mesh = make_mesh(mesh_axes(dict(mesh), (AXIS,), "diloco"))
    W = mesh.shape[AXIS]
    per_worker = jax.sharding.NamedSharding(mesh, jax.P(AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())

    def from_train(train: TrainState, extras=None) -> DilocoState:
        # Without state of its own (a fresh start, another strategy's checkpoint), a round starts: the
        # outer model is the TrainState's parameters, its Nesterov momentum zero, and every worker's
        # copy and inner optimizer state the TrainState's.
        if extras is None:
            copies = broadcast_copies((train.params, train.opt_state), W)
            outer_opt = tuple(outer_tx.init({k: train.params[k] for k in g}) for g in groups)
            extras = {"outer_opt": outer_opt, "params": copies[0], "opt_state": copies[1]}
        return DilocoState(
            train.step, train.params, extras["outer_opt"], extras["params"], extras["opt_state"]
        )

    shapes = jax.eval_shape(lambda key: from_train(problem.init(key)), jax.random.key(0))
    state_sh = DilocoState(
        replicated,
        jax.tree.map(lambda _: replicated, shapes.outer),
        jax.tree.map(lambda _: replicated, shapes.outer_opt),
        *jax.tree.map(lambda _: per_worker, (shapes.params, shapes.opt_state)),
    )

    def outer_step(args):
        outer, outer_opt, local = args
        delta = jax.tree.map(lambda o, w: o - jax.lax.pmean(w, AXIS), outer, local)
        updates, outer_opt = outer_tx.update(delta, outer_opt, outer)
        outer = optax.apply_updates(outer, updates)
        return outer, outer_opt, outer

    def worker_step(step, outer, outer_opt, params_1x, opt_1x, batch):
        new, loss = worker_update(problem, step, params_1x, opt_1x, batch)
        outer, params, outer_opt = dict(outer), dict(new.params), list(outer_opt)
        for p, group in enumerate(groups):
            # Every device has the same step counter, so all take the same branch of the cond.
            due = (new.step - offsets[p]) % H == 0
            frag = ({k: outer[k] for k in group}, outer_opt[p], {k: params[k] for k in group})
            o, outer_opt[p], w = jax.lax.cond(due, outer_step, lambda a: a, frag)
            outer.update(o)
            params.update(w)
        copies = jax.tree.map(lambda x: x[None], (params, new.opt_state))
        return new.step, outer, tuple(outer_opt), *copies, jax.lax.pmean(loss, AXIS)

    def step(state: DilocoState, batch):
        stacked = jax.tree.map(lambda _: jax.P(AXIS), (state.params, state.opt_state))
        rep = jax.tree.map(lambda _: jax.P(), (state.outer, state.outer_opt))
        new_step, outer, outer_opt, params, opt_state, loss = jax.shard_map(
            worker_step,
            mesh=mesh,
            in_specs=(jax.P(), *rep, *stacked, jax.tree.map(lambda _: jax.P(AXIS), batch)),
            out_specs=(jax.P(), *rep, *stacked, jax.P()),
            check_vma=False,  # nothing here is differentiated across the shard_map boundary
        )(state.step, state.outer, state.outer_opt, state.params, state.opt_state, batch)
        return DilocoState(new_step, outer, outer_opt, params, opt_state), {"loss": loss}

    def reference(state: DilocoState) -> TrainState:
        return TrainState(state.step, state.outer, jax.tree.map(mean_of_copies, state.opt_state))

    streaming = f", {P} fragments synced in turn" if P > 1 else ""
    return over_data(
        "diloco",
        f"In[B_data, D] · W_w[D, F] per worker w; outer W[D, F] replicated, Nesterov step on "
        f"W - mean_w W_w every {H} step(s){streaming}",
        mesh,
        problem,
        from_train=from_train,
        state_sharding=state_sh,
        step=step,
        train_of=reference,
        train_sharding=replicated,
        extras_of=lambda state: {
            "outer_opt": state.outer_opt,
            "params": state.params,
            "opt_state": state.opt_state,
        },
        fresh=FRESH,
    )


def cost(inp: CostInput) -> Cost:
    data, H, P = inp.mesh.get(AXIS, 1), inp.settings.local_steps, inp.settings.fragments
    if data == 1:
        return Cost([])
    out = []
    for p, group in enumerate(fragments_of(len(inp.widths) - 1, P)):
        synced = sum(local_bytes(x) for layer in group for x in jax.tree.leaves(inp.params[layer]))
        which = f"fragment {p} ({', '.join(group)})" if P > 1 else "parameters"
        out.append(
            Collective(
                "all-reduce",
                AXIS,
                data,
                synced,
                f"{which}: the workers' mean, once every {H} step(s)",
                every=H,
            )
        )
    out.append(Collective("all-reduce", AXIS, data, 4, "loss (mean over workers, for the log)"))
    notes = [
        f"the outer steps run on 1 step in {H}; per step that is {1 / H:.2f} of their bytes, and the inner "
        "optimizer states never move"
    ]
    return Cost(out, notes)


DEFINITION = Definition(
    name="diloco",
    summary="DiLoCo: W workers take H inner steps with any optimizer, then an outer Nesterov step on the "
    "averaged pseudo-gradient",
    layout="In[B_data, D] · W_w[D, F] per worker w; outer W averaged every H steps",
    make=make,
    axes=(AXIS,),
    settings={
        "local_steps": LOCAL_STEPS,
        "outer_learning_rate": Float(
            0.7,
            "diloco: learning rate of the outer Nesterov step on the pseudo-gradient",
            min=0,
            min_open=True,
        ),
        "outer_momentum": Float(
            0.9, "diloco: momentum of the outer Nesterov step (0: plain SGD)", min=0, max=1, max_open=True
        ),
        "fragments": Int(
            1,
            "diloco: streaming DiLoCo's fragments, contiguous layer groups synced in turn (1: DiLoCo)",
            min=1,
        ),
    },
    cost=cost,
    placement=replicated_placement,
    # Outer lr 1 and momentum 0 make the outer step the workers' mean: with H=1 and an update linear
    # in the gradient that is synchronous dp; with one worker it is that worker's run, any optimizer.
    examples=(
        Example(
            {"data": 8}, {"local_steps": 1, "outer_learning_rate": 1.0, "outer_momentum": 0.0}, ("momentum",)
        ),
        Example(
            {"data": 4}, {"local_steps": 1, "outer_learning_rate": 1.0, "outer_momentum": 0.0}, ("momentum",)
        ),
        Example({"data": 1}, {"local_steps": 3, "outer_learning_rate": 1.0, "outer_momentum": 0.0}),
        Example(
            {"data": 8},
            {"local_steps": 1, "outer_learning_rate": 1.0, "outer_momentum": 0.0, "fragments": 2},
            ("momentum",),
        ),
    ),
    multi_process=True,
    portable_checkpoints=True,
)
