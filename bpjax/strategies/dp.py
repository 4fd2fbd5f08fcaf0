"""``dp``: data parallelism with ``jax.jit``, the data partitioned by samples, features or both.

``parallel.partition`` chooses how the data is cut (the BP literature's sample / feature / hybrid
parallelism):
  sample   ``In[B_data, D] · W[D, F] -> Out[B_data, O]``; W and the optimizer state replicated; the
           compiler all-reduces the gradients over ``data``.
  feature  ``In[B, D_feature] · W0[D_feature, F] -> (all-reduce) H[B, F]``: each device holds a slice
           of the input features and the matching rows of the first kernel; the partial products are
           summed, and every later layer is replicated.
  hybrid   ``In[B_data, D_feature] · W0[D_feature, F]`` on a 2-D ``data x feature`` mesh: both.
"""

from __future__ import annotations

from bpjax.errors import UserError
from bpjax.step import Problem
from bpjax.strategies.base import Strategy
from bpjax.strategies.rules import DATA_PARALLEL, FEATURE, SAMPLE_FEATURE
from bpjax.strategies.sharded import rule_based

PARTITIONS = {
    "sample": (
        DATA_PARALLEL,
        ("data",),
        "In[B_data, D] · W[D, F] -> Out[B_data, O]; W and optimizer state replicated",
    ),
    "feature": (
        FEATURE,
        ("feature",),
        "In[B, D_feature] · W0[D_feature, F] -> all-reduce -> H[B, F]; later layers replicated",
    ),
    "hybrid": (
        SAMPLE_FEATURE,
        ("data", "feature"),
        "In[B_data, D_feature] · W0[D_feature, F] -> all-reduce over feature -> H[B_data, F]",
    ),
}


def make(problem: Problem, parallel) -> Strategy:
    partition = parallel.get("partition", "sample")
    if partition not in PARTITIONS:
        raise UserError(f"parallel.partition={partition!r} is not known; choose sample, feature or hybrid")
    rules, axes, layout = PARTITIONS[partition]
    return rule_based("dp", layout, problem, parallel, rules, axes=axes, strict=("feature",))
