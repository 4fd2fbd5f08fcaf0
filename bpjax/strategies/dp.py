"""``dp``: data parallelism with ``jax.jit`` over a 1-D ``data`` mesh.

Layout: ``In[B_data, D] · W[D, F] -> Out[B_data, O]``; W and the optimizer state replicated.

The batch is sharded over ``data`` and the parameters replicated; the compiler all-reduces the gradients.
"""

from __future__ import annotations

from bpjax.step import Problem
from bpjax.strategies.base import Strategy
from bpjax.strategies.rules import DATA_PARALLEL
from bpjax.strategies.sharded import rule_based


def make(problem: Problem, parallel) -> Strategy:
    return rule_based(
        "dp",
        "In[B_data, D] · W[D, F] -> Out[B_data, O]; W and optimizer state replicated",
        problem,
        parallel,
        DATA_PARALLEL,
        axes=("data",),
    )
