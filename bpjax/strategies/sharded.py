"""The one jit engine behind every rule-based strategy: dp, fsdp, tensor, hybrid.

Given a mesh and a rule table (`bpjax.strategies.rules`), it derives a ``NamedSharding`` for every
parameter from the model's logical axes, gives each optimizer-state leaf the sharding of the parameter
it mirrors (``optax.tree_map_params``; counters replicated), and compiles:
  * ``init`` as ``jax.jit(problem.init, out_shardings=...)``: each device computes only its own shards,
    so full parameters never exist on one device;
  * ``step`` as ``jax.jit(fused steps, out_shardings=..., donate_argnums=0)``.

For dp, tensor and hybrid the compiler partitions the step and inserts the collectives the layout
implies; `bpjax.plan` predicts them and the tests check the prediction against the compiled HLO. For
fsdp the gradient runs inside a ``jax.shard_map`` over ``data``: parameters are all-gathered for use
and autodiff turns that all-gather into a reduce-scatter of the gradients, the minimal ZeRO-3 traffic.
(Left to itself, XLA:CPU all-reduces the full gradients and slices them: 1.5x the wire bytes.) The same
shard_map around a compiler-partitioned ``model`` axis (hybrid with fsdp) made XLA gather the parameters
over ``model`` too (3.8x the minimum), so hybrid leaves both axes to the compiler (1.1-1.2x, reported
by ``bpjax plan --compiled``).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from bpjax.devices import make_mesh, mesh_axes
from bpjax.errors import warn
from bpjax.models.mlp import layer_name
from bpjax.schema import Names
from bpjax.step import Problem, TrainState, fuse_steps
from bpjax.strategies.base import (
    Collective,
    Cost,
    CostInput,
    Strategy,
    jit_checkpointing,
    place_batch,
    rows_held,
    split_over_data,
    to_host,
)
from bpjax.strategies.rules import Rules, batch_specs, param_specs

# The setting tensor and hybrid share.
REPLICATE = Names((), "layers kept whole on every device, e.g. ('layer_2',)", note="layer names")


def state_shardings(problem: Problem, mesh: jax.sharding.Mesh, specs) -> TrainState:
    """A TrainState-shaped tree of NamedShardings: parameters by ``specs``, optimizer state alike."""
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    param_sh = jax.tree.map(
        lambda p: jax.sharding.NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, jax.P)
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


def _only(spec: jax.P, axis: str) -> jax.P:
    """``spec`` with every mesh axis but ``axis`` removed (what a shard_map manual over ``axis`` sees)."""
    return jax.P(*(a if a == axis else None for a in spec))


def gathered_step(problem: Problem, mesh: jax.sharding.Mesh, specs, axis: str):
    """A train step whose parameters are stored sharded over ``axis`` (the only mesh axis) and
    all-gathered for use.

    Layout (fsdp): ``In[B_data, D] · W[D, F_data]``: W gathered to ``W[D, F]`` for the forward pass;
    its gradient reduce-scattered back to ``F_data``.
    """
    manual = jax.tree.map(lambda s: _only(s, axis), specs, is_leaf=lambda x: isinstance(x, jax.P))

    def gather(local, spec):
        for d, a in enumerate(spec):
            if a == axis:
                return jax.lax.all_gather(local, axis, axis=d, tiled=True)
        return local  # stored whole (no dimension divisible by the axis size)

    def local_loss(local_params, batch):
        params = jax.tree.map(gather, local_params, manual, is_leaf=lambda x: isinstance(x, jax.P))
        # The mean of the equal-sized per-device means is the global mean. Differentiating the pmean'd
        # loss gives the mean gradient directly: all_gather transposes to a reduce-scatter (psum), and
        # parameters stored whole get their gradient summed over the axis by shard_map itself, so no
        # further pmean (which would make those updates N times too large).
        return jax.lax.pmean(problem.loss_fn(params, batch), axis)

    def loss_and_grads(params, batch):
        batch_spec = {k: jax.P(axis) for k in batch}
        return jax.shard_map(
            lambda p, b: problem.loss_and_grads(p, b, local_loss),
            mesh=mesh,
            in_specs=(manual, batch_spec),
            out_specs=(jax.P(), manual),
        )(params, batch)

    def step(state: TrainState, batch):
        loss, grads = loss_and_grads(state.params, batch)
        return problem.apply_gradients(state, grads), {"loss": loss}

    return step


def warn_idle_axes(name: str, mesh_shape, specs, batch_spec: jax.P) -> None:
    """One ``warning:`` line per mesh axis of size > 1 that splits no parameter and no batch dimension:
    its devices would all compute the same thing, which is rarely what was meant (e.g. tensor with every
    layer in ``parallel.replicate``)."""
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P))
    used = {a for spec in (*leaves, batch_spec) for a in spec if a is not None}
    for axis, size in mesh_shape.items():
        if size > 1 and axis not in used:
            warn(
                f"{name}: the {axis} axis of size {size} splits no parameter and no batch dimension, so this "
                f"run has no parallelism over it; split something over it (e.g. fewer layers in "
                f"parallel.replicate, widths divisible by {size}) or set parallel.mesh.{axis}=1"
            )


def rule_based(
    name: str,
    layout: str,
    problem: Problem,
    mesh_cfg,
    rules: Rules,
    axes: tuple[str, ...],
    replicate: tuple[str, ...] = (),
    strict: tuple[str, ...] = (),
    gather_axis: str | None = None,
) -> Strategy:
    """A strategy from a rule table over a mesh with ``axes`` (sizes from ``parallel.mesh``).

    ``replicate``: layers kept whole. ``strict``: mesh axes whose non-divisible widths are errors.
    ``gather_axis``: parameters sharded over this axis are gathered for use (FSDP) rather than used
    where they are stored.
    """
    mesh = make_mesh(mesh_axes(dict(mesh_cfg), axes, name))
    mesh_shape = dict(mesh.shape)
    specs = param_specs(problem, rules, mesh_shape, tuple(replicate), strict)
    state_sh = state_shardings(problem, mesh, specs)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    step = problem.train_step if gather_axis is None else gathered_step(problem, mesh, specs, gather_axis)
    batch_axis = batch_specs(rules, mesh_shape, 1)["x"][1]
    warn_idle_axes(name, mesh_shape, specs, batch_specs(rules, mesh_shape, 1)["x"])

    @functools.cache
    def batch_shardings(y_ndim: int) -> dict:
        return {
            k: jax.sharding.NamedSharding(mesh, s) for k, s in batch_specs(rules, mesh_shape, y_ndim).items()
        }

    x_sharding = batch_shardings(1)["x"]
    init = jax.jit(problem.init, out_shardings=state_sh)
    return Strategy(
        name=name,
        layout=layout,
        devices=tuple(mesh.devices.flat),
        data_parallel=mesh_shape[batch_axis] if batch_axis else 1,
        init=init,
        shard_batch=lambda batch: place_batch(batch, batch_shardings(np.ndim(batch["y"]) - 1)),
        step=jax.jit(fuse_steps(step), out_shardings=(state_sh, replicated), donate_argnums=0),
        gather=to_host,
        checkpointing=jit_checkpointing(init),
        mesh=mesh,
        batch_rows=lambda batch_size: rows_held(x_sharding, batch_size),
    )


# ------------------------------------------------------------------------------------ the cost model


def tensor_collectives(inp: CostInput) -> Cost:
    """Activations crossing the ``model`` axis, walking the layers with the activation's layout."""
    out, notes = [], []
    model, b_local, widths, act = inp.mesh.get("model", 1), inp.b_local, inp.widths, inp.act_itemsize
    sharded_in = False  # is the activation entering layer i split over model?
    for i in range(len(widths) - 1):
        spec = tuple(inp.params[layer_name(i)]["kernel"].sharding.spec) + (None, None)
        row, col = spec[0] == "model", spec[1] == "model"
        x_in, x_out = b_local * widths[i] * act, b_local * widths[i + 1] * act
        where = layer_name(i)
        if row:  # each device holds a slice of the inputs: the output is a partial sum
            out.append(
                Collective("all-reduce", "model", model, x_out, f"{where} forward (row-parallel output)")
            )
            if i > 0 and not sharded_in:  # the input gradient comes out split; the layer below needs it whole
                out.append(
                    Collective("all-gather", "model", model, x_in, f"{where} backward (input gradient)")
                )
        else:
            if sharded_in:
                out.append(Collective("all-gather", "model", model, x_in, f"{where} forward (input)"))
                notes.append(
                    f"{where} is replicated after a column-parallel layer: this is the minimum, the compiler "
                    "may move more (see --compiled)"
                )
            if col and i > 0:  # each device's input gradient is a partial sum
                out.append(
                    Collective("all-reduce", "model", model, x_in, f"{where} backward (input gradient)")
                )
        sharded_in = col
    return Cost(out, notes)


def rule_cost(inp: CostInput) -> Cost:
    """The minimum collectives of any rule table, read from the parameters' specs and the mesh:
    the first layer's partial products over ``feature``; activations over ``model`` (Megatron pairs);
    over ``data``, parameters stored split are all-gathered and their gradients reduce-scattered, and
    the other gradients (with the loss) all-reduced."""
    mesh = inp.mesh
    data, model, feature = mesh.get("data", 1), mesh.get("model", 1), mesh.get("feature", 1)
    out: list[Collective] = []
    notes: list[str] = []
    if feature > 1:
        out.append(
            Collective(
                "all-reduce",
                "feature",
                feature,
                inp.b_local * inp.widths[1] * inp.act_itemsize,
                "layer_0 forward (sum over features)",
            )
        )
    if model > 1:
        tensor = tensor_collectives(inp)
        out += tensor.collectives
        notes += tensor.notes
    if data > 1:
        gather_b, reduce_b = split_over_data(inp.params, data)
        if gather_b and model > 1:
            notes.append(
                "with the parameters split over data and model, the compiler chooses how to gather them "
                "and reduce the gradients, and can move more than this minimum (XLA:CPU all-reduced "
                "instead of reduce-scattering on a 24-64-48-10 net: 1.09x at data=2 x model=4, 1.24x at "
                "data=4 x model=2; 1.00x on 64-512-256-128-10); check with --compiled"
            )
        if gather_b:
            out.append(Collective("all-gather", "data", data, gather_b, "parameters, gathered for use"))
            out.append(
                Collective("reduce-scatter", "data", data, gather_b, "gradients of sharded parameters")
            )
        where = (
            "gradients of the other parameters, loss"
            if gather_b or model > 1
            else ("gradients and loss (one fused all-reduce)")
        )
        out.append(Collective("all-reduce", "data", data, reduce_b + 4, where))
    return Cost(out, notes)
