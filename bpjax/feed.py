"""The input pipeline: each compiled call's batches, laid out on the strategy's devices.

`Batches` (bpjax.data) is a pure function of (seed, step): which rows of the training set each step
takes. This module only decides where those rows are gathered, two ways with the same result bit for
bit (``train.device_data``):

  on the device  The training set is copied to every device of the strategy once. Each call sends only
                 the row numbers (``[K, B]`` int32, laid out as the strategy lays out a batch), and one
                 jitted gather takes the rows there, straight into the strategy's layout
                 (``out_shardings``): no host gather, no per-call copy of the data.
  from the host  The rows are gathered on the host and copied with ``strategy.shard_batch``, as before;
                 a background thread prepares the next call's batches while the current call runs.

``auto`` puts the data on the devices when the training set takes at most a quarter of a device's
memory (on simulated CPU devices, of the host memory available per device) and the run is one
process (across processes each process holds only its own rows of each batch).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import jax
import numpy as np

from bpjax.data import Batches
from bpjax.strategies.base import Strategy, to_host

# The share of one device's memory a training set may take to be kept there under ``auto``.
DEVICE_SHARE = 0.25


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
    """``feed(call) -> device batch`` of steps ``call*K .. call*K+K-1``; ``on_device`` says which way."""

    def __init__(self, batches: Batches, strategy: Strategy, k: int, rows: slice, mode: str = "auto"):
        self.batches, self.strategy, self.k, self.rows = batches, strategy, k, rows
        nbytes = batches.x.nbytes + batches.y.nbytes
        self.on_device = jax.process_count() == 1 and (
            mode == "on" or (mode == "auto" and fits_on_device(strategy, nbytes))
        )
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._next: tuple[int, concurrent.futures.Future] | None = None
        self._take: Callable | None = None

    def __call__(self, call: int):
        if self.on_device:
            return self._on_device(call)
        return self._from_host(call)

    # ---------------------------------------------------------------------------------- from the host

    def host_batch(self, call: int):
        """The call's batches gathered on the host and placed by the strategy (today's way)."""
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

    def _setup_device(self, call: int):
        """Learn the strategy's batch layout from one host batch: where each of the ``K x B`` rows of a
        call lands (row numbers sent through ``shard_batch`` in place of the labels), and the shardings
        of ``x`` and ``y``; then copy the training set to the devices and compile the gather."""
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
        self._take = jax.jit(lambda data, idx: {"x": data[0][idx], "y": data[1][idx]}, out_shardings=out)
        return first

    def indices(self, call: int) -> np.ndarray:
        """The training-set rows of the call's batches, in the strategy's batch layout."""
        idx = np.stack(
            [self.batches.indices(s)[self.rows] for s in range(call * self.k, (call + 1) * self.k)]
        )
        return idx.reshape(-1)[self._positions].astype(np.int32)

    def _on_device(self, call: int):
        if self._take is None:
            return self._setup_device(call)
        idx = jax.device_put(self.indices(call), self._index_sharding)
        return self._take(self._data, idx)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            self._next = None
