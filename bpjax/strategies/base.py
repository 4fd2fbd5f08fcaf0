"""The Strategy interface: how one training step is laid out over devices.

A strategy is a small bundle of pure functions closed over its devices. The train loop, the tests and the
notebooks use nothing else, so a new strategy is a new file plus one registry line.

Contract (checked for every registered strategy by ``tests/test_equivalence.py``):
  init(key)                   -> the strategy's state (a TrainState, or a pytree holding one plus
                                 extras such as async's parameter history), already placed on its
                                 devices; ``gather`` of it equals ``Problem.init(key)`` on one device
  shard_batch(batch)          -> device batch. ``batch`` is a host dict of global arrays stacked over K
                                 steps: ``{"x": [K, B, D], "y": [K, B] or [K, B, T]}``
  step(state, device_batch)   -> (state, metrics): a ``jax.jit`` or ``jax.pmap`` function (the loop
                                 compiles it ahead of time with ``.lower().compile()``); runs K
                                 training steps; donates the input state; ``metrics`` leaves have a
                                 leading axis of K (after ``gather``)
  gather(tree)                -> host numpy arrays in the reference (one-device) layout: a state gives
                                 a TrainState shaped like ``Problem.init``'s; a metrics dict, itself
After n steps, ``gather(state)`` equals the ``single`` strategy's state to floating-point tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from bpjax.step import Batch, Metrics, TrainState, fuse_steps


class Strategy(NamedTuple):
    """How one training step is laid out over devices. Pure functions closed over a mesh."""

    name: str
    layout: str  # one line of sharded-shape notation, e.g. "In[B_data, D] . W[D, F]"
    devices: tuple[jax.Device, ...]
    data_parallel: int  # how many ways each global batch is split; batch_size must divide by it
    init: Callable[[jax.Array], TrainState]
    shard_batch: Callable[[Batch], Batch]
    step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
    gather: Callable[[Any], Any]
    mesh: jax.sharding.Mesh | None = None
    microbatches: int = 1  # pipeline: each global batch is also split into this many microbatches

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def over_data(
    name: str,
    layout: str,
    mesh: jax.sharding.Mesh,
    *,
    init: Callable,
    state_sharding: Any,
    step: Callable,
    gather: Callable,
    axis: str = "data",
) -> Strategy:
    """A strategy whose batch is split over ``axis`` and whose state has ``state_sharding``: ``init``
    jitted into that layout, ``step`` fused over K steps, jitted, its state donated (the assembly the
    simulated schemes share: async, param_server, local_sgd)."""
    batch_sh = jax.sharding.NamedSharding(mesh, jax.P(None, axis))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    return Strategy(
        name=name,
        layout=layout,
        devices=tuple(mesh.devices.flat),
        data_parallel=mesh.shape[axis],
        init=jax.jit(init, out_shardings=state_sharding),
        shard_batch=lambda batch: jax.device_put(batch, batch_sh),
        step=jax.jit(fuse_steps(step), out_shardings=(state_sharding, replicated), donate_argnums=0),
        gather=gather,
        mesh=mesh,
    )
