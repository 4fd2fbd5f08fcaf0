"""``tensor``: Megatron-style intra-layer (tensor) parallelism on a ``model`` mesh axis.

Layout: ``In[B, D] · W0[D, H_model] -> H[B, H_model] · W1[H_model, D'] -> (all-reduce) Out[B, D']``.

The rule ``hidden_a -> model`` shards the outputs of layers 0, 2, 4, ... (column-parallel) and with them
the inputs of layers 1, 3, 5, ... (row-parallel), so each pair of layers needs one all-reduce of
activations forward and one backward (none for the first layer's input). Biases follow their outputs.
``parallel.replicate`` keeps named layers whole (e.g. a small output layer); a width the ``model`` size
does not divide is an error that names the layer and the options.
"""

from __future__ import annotations

from bpjax.step import Problem
from bpjax.strategies.base import Definition, Example, Strategy
from bpjax.strategies.rules import TENSOR
from bpjax.strategies.sharded import REPLICATE, rule_based, rule_cost

LAYOUT = "In[B, D] · W_even[D, F_model] -> H[B, F_model] · W_odd[F_model, D'] -> all-reduce -> Out[B, D']"


def make(problem: Problem, mesh: dict, *, replicate: tuple[str, ...]) -> Strategy:
    return rule_based(
        "tensor", LAYOUT, problem, mesh, TENSOR, axes=("model",), replicate=replicate, strict=("model",)
    )


DEFINITION = Definition(
    name="tensor",
    summary="Megatron tensor parallelism: column- then row-parallel layers over a model axis",
    layout=LAYOUT,
    make=make,
    axes=("model",),
    settings={"replicate": REPLICATE},
    cost=rule_cost,
    examples=(
        Example({"model": 8}),
        Example({"model": 4}),
        Example({"model": 8}, {"replicate": ("layer_1",)}),
        Example({"model": 1}),
    ),
    multi_process=True,
    portable_checkpoints=True,
    shards_parameters=True,
)
