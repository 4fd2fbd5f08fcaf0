"""``fsdp``: fully sharded data parallelism (ZeRO-3) over a 1-D ``data`` mesh.

Layout: ``In[B_data, D] · W[D, F_data]``, W all-gathered for use; grads reduce-scattered; optimizer
state sharded like W.

Each parameter (and its optimizer state) is stored sharded over ``data`` on its largest dimension that
the mesh size divides (one that none divides stays whole). For the step, parameters are all-gathered
inside a ``shard_map`` manual over ``data`` and the gradient is reduce-scattered back (see
`bpjax.strategies.sharded.gathered_step`): per step, each device receives (N-1)/N of the parameters and
sends (N-1)/N of the gradients, against dp's all-reduce of every gradient, while holding 1/N of them.
"""

from __future__ import annotations

from bpjax.step import Problem
from bpjax.strategies.base import Definition, Example, Strategy
from bpjax.strategies.rules import FSDP
from bpjax.strategies.sharded import rule_based, rule_cost

LAYOUT = "In[B_data, D] · W[D, F_data] (gathered for use) -> Out[B_data, O]; optimizer state like W"


def make(problem: Problem, mesh: dict) -> Strategy:
    return rule_based("fsdp", LAYOUT, problem, mesh, FSDP, axes=("data",), gather_axis="data")


DEFINITION = Definition(
    name="fsdp",
    summary="fully sharded data parallelism (ZeRO-3): parameters stored split, gathered for use",
    layout=LAYOUT,
    make=make,
    axes=("data",),
    cost=rule_cost,
    examples=(Example({"data": 8}), Example({"data": 4}), Example({"data": 1})),
    multi_process=True,
    portable_checkpoints=True,
    shards_parameters=True,
)
