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
  batch_rows(batch_size)      -> the rows of each global batch this process's devices hold (all of them
                                 in a single-process run); ``shard_batch`` then takes just those rows
  checkpointing               -> how the state goes into a checkpoint and comes back (`Checkpointing`)
After n steps, ``gather(state)`` equals the ``single`` strategy's state to floating-point tolerance.

In a multi-process run (`bpjax.distributed`) every process calls the same functions: ``shard_batch``
builds global arrays from process-local rows, and ``gather`` all-gathers across processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from bpjax.step import Batch, Metrics, TrainState, fuse_steps


class Checkpointing(NamedTuple):
    """How a strategy's state is saved and restored (`bpjax.checkpoint`).

    ``portable``: the saved tree is a TrainState in the reference structure (``Problem.init``'s), with
    global arrays in this strategy's layout; any portable strategy restores it into its own layout
    (orbax reshards on load). Other strategies' states (async's history, the parameter server's cache)
    restore only under the same strategy and mesh.
    """

    portable: bool
    target: Callable[[], Any]  # the saved tree's abstract shape, with the shardings to restore into
    save: Callable[[Any], Any] = lambda state: state  # state -> saved tree (no copies)
    load: Callable[[Any], Any] = lambda tree: tree  # restored tree -> state


def all_rows(batch_size: int) -> slice:
    return slice(None)


def rows_held(sharding: jax.sharding.Sharding, batch_size: int) -> slice:
    """The rows of a ``[K, B, ...]`` batch that this process's devices hold under ``sharding``."""
    if jax.process_count() == 1:
        return slice(None)
    rank = max(2, len(getattr(sharding, "spec", ())))
    shape = (1, batch_size) + (1,) * (rank - 2)
    spans = sorted(
        {idx[1].indices(batch_size)[:2] for idx in sharding.addressable_devices_indices_map(shape).values()}
    )
    if any(start > end for (_, end), (start, _) in zip(spans, spans[1:], strict=False)):
        raise ValueError(f"this process holds rows {spans} of each batch, which are not contiguous")
    return slice(spans[0][0], max(end for _, end in spans))


def place_batch(batch: Batch, shardings) -> Batch:
    """Put a host batch on devices: as is in one process, from process-local rows in several.

    ``shardings``: one sharding for every leaf, or a dict like ``batch``.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = {k: shardings for k in batch}
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of global arrays, on every process.

    Across processes, a replicated array (the metrics, dp's parameters) is read from a local copy; only
    sharded ones are all-gathered, which is a collective every process must join.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def one(x):
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def jit_checkpointing(init: Callable, portable: bool) -> Checkpointing:
    """Checkpointing for a state that ``init`` (a jit with ``out_shardings``) lays out: saved as it is."""
    return Checkpointing(portable, lambda: jax.eval_shape(init, jax.random.key(0)))


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
    batch_rows: Callable[[int], slice] = all_rows
    checkpointing: Checkpointing | None = None  # None: saved as it is, restored under this strategy only
    multi_process: bool = False  # tested across processes (pmap and the rule-based strategies)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def checkpoint_codec(self) -> Checkpointing:
        return self.checkpointing or jit_checkpointing(self.init, portable=False)


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
    init = jax.jit(init, out_shardings=state_sharding)
    return Strategy(
        name=name,
        layout=layout,
        devices=tuple(mesh.devices.flat),
        data_parallel=mesh.shape[axis],
        init=init,
        shard_batch=lambda batch: place_batch(batch, batch_sh),
        step=jax.jit(fuse_steps(step), out_shardings=(state_sharding, replicated), donate_argnums=0),
        gather=gather,
        mesh=mesh,
    )
