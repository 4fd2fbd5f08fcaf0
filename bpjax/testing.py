"""Helpers to check a strategy against the one-device reference (used by the tests; public for users
who write strategies of their own)."""

from __future__ import annotations

import jax
import numpy as np

from bpjax.data import Batches
from bpjax.strategies.base import Strategy, to_host


def train_steps(strategy: Strategy, batches: Batches, steps: int, k: int = 1, seed: int = 0):
    """Run ``steps`` training steps, K per call, from ``jax.random.key(seed)``.

    Returns ``(init_state, final_state, losses[steps])``, states gathered to the reference layout.
    Blocks after every call: forced CPU devices deadlock with many calls in flight.
    """
    if steps % k:
        raise ValueError(f"steps={steps} is not a multiple of k={k}")
    state = strategy.init(jax.random.key(seed))
    init = strategy.gather(state)
    losses = []
    for start in range(0, steps, k):
        state, metrics = strategy.step(state, strategy.shard_batch(batches.stack(start, k)))
        losses.append(to_host(metrics)["loss"].reshape(-1))
    return init, strategy.gather(state), np.concatenate(losses)


def assert_trees_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6, what: str = "") -> None:
    """``np.testing.assert_allclose`` leaf by leaf, naming the leaf that differs most.

    ``atol`` is relative to each leaf's largest magnitude, so that leaves of very different scales
    (parameters ~1e-1, Adam's second moments ~1e-8) are held to the same standard: an entry passes if
    ``|a - e| <= atol * max|e_leaf| + rtol * |e|``. Fails on different tree structures or shapes too.
    """
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    if a_def != e_def:
        raise AssertionError(f"{what}: tree structures differ:\n{a_def}\n{e_def}")
    worst = (-1.0, None, None, None, 0.0)
    for (path, a), (_, e) in zip(a_leaves, e_leaves, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if a.shape != e.shape:
            raise AssertionError(f"{what}{jax.tree_util.keystr(path)}: shape {a.shape} != {e.shape}")
        leaf_atol = atol * float(np.abs(e).max(initial=0.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            excess = np.nan_to_num(np.abs(a - e) / (leaf_atol + rtol * np.abs(e)), nan=np.inf, posinf=np.inf)
        excess = np.where(a == e, 0.0, excess)
        if a.size and excess.max() > worst[0]:
            worst = (float(excess.max()), path, a, e, leaf_atol)
    excess, path, a, e, leaf_atol = worst
    if excess > 1.0:
        np.testing.assert_allclose(
            a,
            e,
            rtol=rtol,
            atol=leaf_atol,
            err_msg=f"{what}{jax.tree_util.keystr(path)} (atol={leaf_atol:.2e})",
        )
