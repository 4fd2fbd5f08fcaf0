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

from bpjax.schema import Choice
from bpjax.step import Problem
from bpjax.strategies.base import Definition, Example, Strategy
from bpjax.strategies.rules import DATA_PARALLEL, FEATURE, SAMPLE_FEATURE
from bpjax.strategies.sharded import rule_based, rule_cost

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


def make(problem: Problem, mesh: dict, *, partition: str) -> Strategy:
    rules, axes, layout = PARTITIONS[partition]
    return rule_based("dp", layout, problem, mesh, rules, axes=axes, strict=("feature",))


DEFINITION = Definition(
    name="dp",
    summary="data parallelism with jax.jit over a mesh; the data cut by samples, features or both",
    layout=PARTITIONS["sample"][2],
    make=make,
    axes=("data", "feature"),
    settings={
        "partition": Choice(
            "sample", tuple(PARTITIONS), "cut the data by samples, by input features, or both (hybrid)"
        ),
    },
    cost=rule_cost,
    examples=(
        Example({"data": 8}),
        Example({"data": 4}),
        Example({"data": 1}),
        Example({"feature": 8}, {"partition": "feature"}),
        Example({"data": 2, "feature": 4}, {"partition": "hybrid"}),
        Example({"feature": 1}, {"partition": "feature"}),
    ),
    # Processes load their rows of each batch, every feature; the devices take their feature blocks.
    multi_process=True,
    portable_checkpoints=True,
)
