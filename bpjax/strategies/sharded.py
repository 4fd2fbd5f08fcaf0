"""The one jit engine behind every rule-based strategy (``dp`` now; FSDP, tensor and hybrid later).

Given a mesh and a rule table, it derives a ``NamedSharding`` for every parameter from the model's
logical axes, gives each optimizer-state leaf the sharding of the parameter it mirrors (via
``optax.tree_map_params``; counters are replicated), and compiles:
  * ``init`` as ``jax.jit(problem.init, out_shardings=...)``: each device computes only its own shards,
    so full parameters never exist on one device;
  * ``step`` as ``jax.jit(fuse_steps(train_step), in_shardings, out_shardings, donate_argnums=0)``: the
    compiler inserts the collectives the layout implies (for ``dp``, one all-reduce of the gradients).
"""

from __future__ import annotations

import jax
import numpy as np
import optax

from bpjax.devices import make_mesh
from bpjax.errors import UserError
from bpjax.step import Problem, TrainState, fuse_steps
from bpjax.strategies.base import Strategy
from bpjax.strategies.rules import Rules, spec, specs


def state_shardings(problem: Problem, mesh: jax.sharding.Mesh, rules: Rules) -> TrainState:
    """A TrainState-shaped tree of NamedShardings for ``problem`` laid out by ``rules`` on ``mesh``."""
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    param_sh = jax.tree.map(
        lambda p: jax.sharding.NamedSharding(mesh, p),
        specs(problem.param_axes, rules),
        is_leaf=lambda x: isinstance(x, jax.P),
    )
    shapes = jax.eval_shape(problem.init, jax.random.key(0))
    opt_sh = optax.tree_map_params(
        problem.tx,
        lambda _, sharding: sharding,
        shapes.opt_state,
        param_sh,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(replicated, param_sh, opt_sh)


def batch_shardings(mesh: jax.sharding.Mesh, rules: Rules, y_ndim: int) -> dict:
    """Shardings of a stacked host batch ``{"x": [K, B, D], "y": [K, B(, T)]}``."""
    x = jax.P(None, *spec(("batch", "input"), rules))
    y = jax.P(None, *spec(("batch", "output")[: y_ndim - 1], rules))
    return {"x": jax.sharding.NamedSharding(mesh, x), "y": jax.sharding.NamedSharding(mesh, y)}


def rule_based(
    name: str, layout: str, problem: Problem, parallel, rules: Rules, axes: tuple[str, ...]
) -> Strategy:
    """A strategy from a rule table over a mesh with ``axes`` (sizes from ``parallel.mesh``)."""
    mesh_cfg = dict(parallel.mesh)
    extra = set(mesh_cfg) - set(axes)
    if extra:
        raise UserError(f"{name} lays out over mesh axes {axes}; remove parallel.mesh.{sorted(extra)[0]}")
    mesh = make_mesh({a: mesh_cfg.get(a, 1) for a in axes})
    state_sh = state_shardings(problem, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    batch_axis = rules.get("batch")
    data_parallel = int(np.prod([mesh.shape[a] for a in np.atleast_1d(batch_axis)])) if batch_axis else 1
    step = fuse_steps(problem.train_step)
    batch_sh = {}

    def shard_batch(batch):
        y_ndim = np.ndim(batch["y"]) - 1
        if y_ndim not in batch_sh:
            batch_sh[y_ndim] = batch_shardings(mesh, rules, y_ndim)
        return jax.device_put(batch, batch_sh[y_ndim])

    return Strategy(
        name=name,
        layout=layout,
        devices=tuple(mesh.devices.flat),
        data_parallel=data_parallel,
        init=jax.jit(problem.init, out_shardings=state_sh),
        shard_batch=shard_batch,
        step=jax.jit(step, out_shardings=(state_sh, replicated), donate_argnums=0),
        gather=lambda tree: jax.tree.map(np.asarray, jax.device_get(tree)),
        mesh=mesh,
    )
