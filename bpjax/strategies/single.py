"""``single``: the reference. One device, plain ``jax.jit``, no shardings.

Layout: ``In[B, D] . W_0[D, F] . ... -> Out[B, O]``, everything on device 0.

Every other strategy is tested against this one, so it stays as plain as the code it checks.
"""

from __future__ import annotations

import jax
import numpy as np

from bpjax.step import Problem, fuse_steps
from bpjax.strategies.base import Definition, Example, Strategy, jit_checkpointing

LAYOUT = "In[B, D] · W[D, F] -> Out[B, O] on one device"


def make(problem: Problem, mesh: dict) -> Strategy:
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    init = jax.jit(problem.init, out_shardings=sharding)
    return Strategy(
        name="single",
        layout=LAYOUT,
        devices=(device,),
        data_parallel=1,
        init=init,
        shard_batch=lambda batch: jax.device_put(batch, sharding),
        step=jax.jit(fuse_steps(problem.train_step), donate_argnums=0),
        gather=lambda tree: jax.tree.map(np.asarray, jax.device_get(tree)),
        checkpointing=jit_checkpointing(init),
    )


DEFINITION = Definition(
    name="single",
    summary="the reference: one device, plain jax.jit",
    layout=LAYOUT,
    make=make,
    examples=(Example({}),),
    portable_checkpoints=True,
)
