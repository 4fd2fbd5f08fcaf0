"""``pmap``: data parallelism with ``jax.pmap`` and ``lax.pmean`` of gradients, in today's idiom.

Layout: ``In[B_data, D] . W[D, F]`` with W replicated; every leaf carries a leading device axis.

Since JAX 0.8, ``pmap`` is ``jit`` + ``shard_map`` underneath and in maintenance mode; this strategy is
kept because users ask for it, and written the way the new implementation is fastest:
  * the state is initialised *on every device* by a jitted, vmapped ``init`` from one replicated key
    whose output sharding puts copy i on device i, so full parameters are never built on one device
    and copied (this also works across processes, where a pmapped init would need local keys);
  * batches are placed with a ``NamedSharding`` over the pmap devices, which the new pmap takes as is
    (across processes, each process supplies the rows of its own devices);
  * results are read with ``x.addressable_shards[0].data`` rather than ``x[0]`` (70x faster), and the
    metrics, already equal on every device after the ``pmean``, leave the pmap unmapped
    (``out_axes=None``), like every other strategy's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bpjax.devices import mesh_axes, resolve_mesh_shape
from bpjax.step import Problem, fuse_steps
from bpjax.strategies.base import (
    Checkpointing,
    Cost,
    CostInput,
    Definition,
    Example,
    Strategy,
    data_allreduce,
    replicated_placement,
    rows_held,
)

AXIS = "data"
LAYOUT = "In[B_data, D] · W[D, F] -> Out[B_data, O]; W replicated, grads pmean'd over data"


def make(problem: Problem, mesh: dict) -> Strategy:
    n = resolve_mesh_shape(mesh_axes(dict(mesh), (AXIS,), "pmap"), len(jax.devices()))[AXIS]
    devices = tuple(jax.devices()[:n])
    mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
    per_device = jax.sharding.NamedSharding(mesh, jax.P(AXIS))

    def local_step(state, batch):
        # Each device's loss is the mean over its B/n examples; the mean of the n equal-sized means is
        # the global mean, and likewise for the gradients.
        return problem.train_step(state, batch, reduce=lambda t: jax.lax.pmean(t, AXIS))

    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    n_local = sum(d.process_index == jax.process_index() for d in devices)
    init = jax.jit(lambda key: jax.vmap(problem.init)(jnp.broadcast_to(key, (n,))), out_shardings=per_device)

    def shard_batch(batch):
        # [K, b, ...] -> [n_local, K, B/n, ...]: device i gets examples i*B/n .. (i+1)*B/n of every step,
        # the same split as the jit strategies' P(None, "data"); b is this process's rows (all of B in one).
        def split(a):
            a = np.asarray(a)
            k, b = a.shape[:2]
            a = a.reshape(k, n_local, b // n_local, *a.shape[2:]).swapaxes(0, 1)
            if jax.process_count() == 1:
                return jax.device_put(a, per_device)
            return jax.make_array_from_process_local_data(per_device, a)

        return jax.tree.map(split, batch)

    def batch_rows(size):
        return rows_held(jax.sharding.NamedSharding(mesh, jax.P(None, AXIS)), size)

    def gather(state):
        # Every device holds the same values; read device 0's copy without its leading axis.
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]), state)

    def one_copy(x):
        # [n, ...] with copy i on device i -> [...] replicated: the same buffers, viewed without the axis.
        shards = [s.data.reshape(x.shape[1:]) for s in x.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape[1:], replicated, shards)

    def per_device_copies(x):
        shards = [s.data[None] for s in x.addressable_shards]
        return jax.make_array_from_single_device_arrays((n, *x.shape), per_device, shards)

    def target():
        # The reference state's shapes, replicated over the pmap devices (traced only when restoring).
        reference = jax.eval_shape(problem.init, jax.random.key(0))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), reference)

    checkpointing = Checkpointing(
        target=target,
        save=lambda state: jax.tree.map(one_copy, state),
        load=lambda tree: jax.tree.map(per_device_copies, tree),
    )

    return Strategy(
        name="pmap",
        layout=LAYOUT,
        devices=devices,
        data_parallel=n,
        init=init,
        shard_batch=shard_batch,
        step=jax.pmap(
            fuse_steps(local_step), axis_name=AXIS, devices=devices, donate_argnums=0, out_axes=(0, None)
        ),
        gather=gather,
        checkpointing=checkpointing,
        mesh=mesh,
        batch_rows=batch_rows,
    )


def cost(inp: CostInput) -> Cost:
    return Cost(data_allreduce(inp))


DEFINITION = Definition(
    name="pmap",
    summary="data parallelism with jax.pmap and a pmean of the gradients",
    layout=LAYOUT,
    make=make,
    axes=(AXIS,),
    cost=cost,
    placement=replicated_placement,
    examples=(Example({"data": 8}), Example({"data": 4}), Example({"data": 1})),
    multi_process=True,
    portable_checkpoints=True,
)
