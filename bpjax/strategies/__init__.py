"""The strategy registry: name -> factory ``(problem, parallel_config) -> Strategy``.

A new strategy is a new module plus one line here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from bpjax.errors import UserError
from bpjax.step import Problem
from bpjax.strategies import (
    async_sgd,
    dp,
    fsdp,
    hybrid,
    local_sgd,
    param_server,
    pipeline,
    pmap,
    single,
    tensor,
)
from bpjax.strategies.base import Strategy

Factory = Callable[[Problem, object], Strategy]

REGISTRY: dict[str, Factory] = {
    "single": single.make,
    "pmap": pmap.make,
    "dp": dp.make,
    "pipeline": pipeline.make,
    "fsdp": fsdp.make,
    "tensor": tensor.make,
    "hybrid": hybrid.make,
    "local_sgd": local_sgd.make,
    "async": async_sgd.make,
    "param_server": param_server.make,
}


def get(name: str) -> Factory:
    """The factory registered as ``name``, or a one-line error suggesting the closest name."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(REGISTRY)}"
        raise UserError(f"unknown strategy {name!r}; {hint}")
    return REGISTRY[name]


def make(name: str, problem: Problem, parallel) -> Strategy:
    """Build a registered strategy. Checks the mesh against the devices; compiles nothing."""
    return get(name)(problem, parallel)


__all__ = ["REGISTRY", "Strategy", "get", "make"]
