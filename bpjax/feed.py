"""The input pipeline: each compiled call's batches, laid out on the strategy's devices.

`Batches` (bpjax.data) is a pure function of (seed, step): which rows of the training set each step
takes. This module only decides where those rows are gathered, two ways with the same result bit for
bit (``train.device_data``):

  on the device  The training set is copied to every device of the strategy once. The gather and the
                 strategy's step are one compiled program (`Feed.compile`): it takes the call's row
                 numbers (``[K, B]`` int32, laid out as the strategy lays out a batch) from a block of
                 many calls' sent ahead, with a counter the program advances on the device, and gathers
                 the rows straight into the strategy's layout: no host gather, and a call sends nothing.
  from the host  The rows are gathered on the host and copied with ``strategy.shard_batch``, as before;
                 a background thread prepares the next call's batches while the current call runs.

``auto`` puts the data on the devices when the training set takes at most a quarter of a device's
memory (on simulated CPU devices, of the host memory available per device) and the run is one
process (across processes each process holds only its own rows of each batch). A strategy whose
step is driven from the host (its ``shard_batch`` keeps numpy arrays) always takes host batches.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import jax
import numpy as np

from bpjax.data import Batches
from bpjax.errors import warn
from bpjax.strategies.base import Strategy, to_host

# The share of one device's memory a training set may take to be kept there under ``auto``.
DEVICE_SHARE = 0.25
# Row numbers sent to the devices at a time (on the device): a block of up to CHUNK_CALLS calls'.
CHUNK_CALLS = 256
CHUNK_INDICES = 2**20


def fits_on_device(strategy: Strategy, nbytes: int) -> bool:
    """Whether ``nbytes`` of training data take at most `DEVICE_SHARE` of each device's memory."""
    device = strategy.devices[0]
    limit = (device.memory_stats() or {}).get("bytes_limit") if device.platform != "cpu" else None
    if limit is None:
        from bpjax.preflight import available_host_bytes

        have = available_host_bytes()
        if have is None:
            return False
        limit = have / len(strategy.devices)  # simulated devices share the host's memory
    return nbytes <= DEVICE_SHARE * limit


class Feed:
    """The input of a run's compiled calls.

    ``step_fn, first = feed.compile(strategy.step, state, call)`` then ``step_fn(state, feed(c))`` for
    each call c: ``feed(c)`` is the call number on the device (``on_device``; ``step_fn`` finds its
    rows there) or the call's batches from the host. ``feed.batch(c)`` is the device batch either way
    (what ``strategy.step`` sees).
    """

    def __init__(self, batches: Batches, strategy: Strategy, k: int, rows: slice, mode: str = "auto"):
        self.batches, self.strategy, self.k, self.rows = batches, strategy, k, rows
        nbytes = batches.x.nbytes + batches.y.nbytes
        self.on_device = jax.process_count() == 1 and (
            mode == "on" or (mode == "auto" and fits_on_device(strategy, nbytes))
        )
        if self.on_device:
            # A strategy whose step runs on the host (its batches stay numpy arrays) has no compiled
            # program to gather in: its batches come from the host.
            probe = strategy.shard_batch(batches.stack(0, 1, rows))
            self.on_device = all(isinstance(a, jax.Array) for a in jax.tree.leaves(probe))
        if mode == "on" and not self.on_device:
            why = "a multi-process run" if jax.process_count() > 1 else f"{strategy.name}'s host-driven step"
            warn(f"train.device_data=on: {why} takes its batches from the host; set train.device_data=auto")
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._next: tuple[int, concurrent.futures.Future] | None = None
        self._gather: Callable | None = None

    def __call__(self, call: int):
        """What ``step_fn`` takes for call ``call``: the call number on the device (``step_fn`` finds
        its rows there), else the call's batches from the host."""
        if self.on_device:
            return call
        return self._from_host(call)

    def batch(self, call: int):
        """The device batch of call ``call``, laid out as ``strategy.shard_batch`` lays it out."""
        if self.on_device:
            idx = self.rows_on_device(call)  # sets the gather up on the first call
            return jax.jit(self._gather)(self._data, idx)
        return self._from_host(call)

    def compile(self, step: Callable, state, call: int):
        """``(step_fn, feed(call))``: ``step`` compiled ahead of time for ``state`` and this input.

        On the device ``step_fn`` is one program that takes the call's row numbers from a block of
        calls' already on the device (a device-side counter, advanced by the program itself, says
        which), gathers the rows and runs the step. A call is then one dispatch with nothing sent
        to the device, as with a batch placed once; a block of row numbers (`CHUNK_INDICES` at most)
        is sent every so many calls, or when the calls do not follow each other.
        """
        first = self(call)
        if not self.on_device:
            return step.lower(state, first).compile(), first
        self.rows_on_device(call)  # sets the gather up
        gather, data = self._gather, self._data

        def fused(st, chunk, j, data):
            st, metrics = step(st, gather(data, chunk[j]))
            return st, metrics, j + 1

        chunk, j = self._chunk(call)
        compiled = jax.jit(fused, donate_argnums=0).lower(state, chunk, j, data).compile()
        box = {"next": None, "chunk": None, "j": None}

        def step_fn(st, call: int):
            if call != box["next"]:  # a new block of calls (or a jump): send its row numbers
                box["chunk"], box["j"] = self._chunk(call)
            st, metrics, box["j"] = compiled(st, box["chunk"], box["j"], data)
            box["next"] = call + 1 if (call + 1 - self._chunk_start) < self._chunk_calls else None
            return st, metrics

        return step_fn, first

    def _chunk(self, call: int) -> tuple[jax.Array, jax.Array]:
        """Row numbers of calls ``call .. call+M-1`` on the devices, ``[M, *layout]``, and a zero
        counter; ``M`` keeps the block under `CHUNK_INDICES` numbers."""
        m = max(1, min(CHUNK_CALLS, CHUNK_INDICES // self._positions.size))
        rows = np.stack([self.indices(c) for c in range(call, call + m)])
        sharding = self._index_sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.P(None, *sharding.spec))
            counter = jax.sharding.NamedSharding(sharding.mesh, jax.P())
        else:
            counter = sharding
        self._chunk_start, self._chunk_calls = call, m
        return jax.device_put(rows, sharding), jax.device_put(np.int32(0), counter)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._next = None

    # ---------------------------------------------------------------------------------- from the host

    def host_batch(self, call: int):
        """The call's batches gathered on the host and placed by the strategy."""
        return self.strategy.shard_batch(self.batches.stack(call * self.k, self.k, self.rows))

    def _from_host(self, call: int):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bpjax-prefetch")
        if self._next is not None and self._next[0] == call:
            batch = self._next[1].result()
        else:
            batch = self.host_batch(call)
        # The next call's batches are prepared while this call runs (calls are consecutive in a run).
        self._next = (call + 1, self._pool.submit(self.host_batch, call + 1))
        return batch

    # ---------------------------------------------------------------------------------- on the device

    def _setup_device(self, call: int) -> None:
        """Learn the strategy's batch layout from one host batch: where each of the ``K x B`` rows of a
        call lands (row numbers sent through ``shard_batch`` in place of the labels), and the shardings
        of ``x`` and ``y``; then copy the training set to the devices."""
        strategy, k = self.strategy, self.k
        host = self.batches.stack(call * k, k, self.rows)
        first = strategy.shard_batch(host)
        b = host["y"].shape[1]
        positions = strategy.shard_batch(
            {"x": host["x"], "y": np.arange(k * b, dtype=np.int32).reshape(k, b)}
        )
        self._positions = to_host(positions["y"])  # [K, B] or the strategy's own shape, e.g. pmap's
        self._index_sharding = positions["y"].sharding
        out = {key: first[key].sharding for key in ("x", "y")}
        if strategy.mesh is not None:
            everywhere = jax.sharding.NamedSharding(strategy.mesh, jax.P())
        else:
            everywhere = jax.sharding.SingleDeviceSharding(strategy.devices[0])
        self._data = jax.device_put((self.batches.x, self.batches.y), everywhere)

        def gather(data, idx):
            batch = {"x": data[0][idx], "y": data[1][idx]}
            return jax.lax.with_sharding_constraint(batch, out)

        self._gather = gather

    def indices(self, call: int) -> np.ndarray:
        """The training-set rows of the call's batches, in the strategy's batch layout."""
        steps = range(call * self.k, (call + 1) * self.k)
        idx = np.stack([self.batches.indices(s)[self.rows] for s in steps])
        return idx.reshape(-1)[self._positions].astype(np.int32)

    def rows_on_device(self, call: int) -> jax.Array:
        """The call's row numbers, on the devices in the layout of the strategy's batches."""
        if self._gather is None:
            self._setup_device(call)
        return jax.device_put(self.indices(call), self._index_sharding)
