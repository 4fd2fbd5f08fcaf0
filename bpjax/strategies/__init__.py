"""The strategy registry: the only list of strategies.

Each strategy is a module that ends with a `Definition` (see `bpjax.strategies.base`). Adding one is a new
module plus one line in ``REGISTRY``; config keys, validation, ``plan``, ``viz``, messages that name
strategies and the registry-wide tests all read it from here.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax

from bpjax.errors import UserError
from bpjax.schema import Setting
from bpjax.step import Problem
from bpjax.strategies import (
    async_sgd,
    diloco,
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
from bpjax.strategies.base import Definition, Strategy

REGISTRY: dict[str, Definition] = {
    d.name: d
    for d in (
        single.DEFINITION,
        pmap.DEFINITION,
        dp.DEFINITION,
        fsdp.DEFINITION,
        tensor.DEFINITION,
        hybrid.DEFINITION,
        pipeline.DEFINITION,
        local_sgd.DEFINITION,
        async_sgd.DEFINITION,
        param_server.DEFINITION,
        diloco.DEFINITION,
    )
}


def get(name: str) -> Definition:
    """The definition registered as ``name``, or a one-line error suggesting the closest name."""
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(REGISTRY)}"
        raise UserError(f"unknown strategy {name!r}; {hint}")
    return REGISTRY[name]


def settings() -> dict[str, Setting]:
    """Every strategy's settings, ``parallel.KEY -> Setting``; a key two strategies share is one
    declaration (e.g. ``replicate`` of tensor and hybrid)."""
    out: dict[str, Setting] = {}
    for d in REGISTRY.values():
        for key, setting in d.settings.items():
            if out.setdefault(key, setting) != setting:
                raise AssertionError(f"parallel.{key} is declared differently by two strategies")
    return out


def users(key: str) -> list[str]:
    """The strategies that read ``parallel.KEY``."""
    return [name for name, d in REGISTRY.items() if key in d.settings]


def own_settings(name: str, parallel: Mapping[str, Any]) -> dict[str, Any]:
    """The values of strategy ``name``'s settings in a ``parallel`` section (defaults where absent)."""
    return {key: parallel.get(key, s.default) for key, s in get(name).settings.items()}


def make(name: str, problem: Problem, parallel) -> Strategy:
    """Build a registered strategy from a ``parallel`` config section. Checks the mesh against the
    devices and the settings against their declarations; compiles nothing."""
    d = get(name)
    values = own_settings(name, parallel)
    for key, value in values.items():
        d.settings[key].check(f"parallel.{key}", value)
    return d.make(problem, dict(parallel.get("mesh", {})), **values)


def names(
    where: Callable[[Definition], Any] = lambda d: True, *, when: Callable[[Definition], str] = lambda d: ""
) -> str:
    """``"a, b (when) or c"``: the registered strategies for which ``where`` holds, for messages."""
    found = [d.name + (f" ({when(d)})" if when(d) else "") for d in REGISTRY.values() if where(d)]
    return ", ".join(found[:-1]) + f" or {found[-1]}" if len(found) > 1 else "".join(found)


def runs_multi_process(name: str, parallel) -> bool:
    """Whether strategy ``name`` with these settings may run across processes."""
    mp = get(name).multi_process
    return bool(mp(parallel) if callable(mp) else mp)


def multi_process_names() -> str:
    """The strategies that may run across processes, with the settings some of them need."""
    return names(lambda d: d.multi_process is not False, when=lambda d: d.multi_process_when)


def placement(problem: Problem, strategy: Strategy, parallel) -> Any:
    """The reference parameters as ``ShapeDtypeStruct``s carrying where ``strategy`` keeps each one."""
    shardings = get(strategy.name).placement(problem, strategy, parallel)
    shapes = jax.eval_shape(problem.init, jax.random.key(0)).params
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def check_make_signatures() -> None:
    """Each ``make(problem, mesh, *, ...)`` takes exactly its declared settings as keyword arguments."""
    for d in REGISTRY.values():
        params = inspect.signature(d.make).parameters.values()
        keywords = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if keywords != set(d.settings):
            raise AssertionError(f"{d.name}.make takes {sorted(keywords)}, declares {sorted(d.settings)}")


__all__ = ["REGISTRY", "Definition", "Strategy", "get", "make", "names", "placement", "settings"]
