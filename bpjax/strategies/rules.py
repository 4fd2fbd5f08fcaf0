"""Logical-to-mesh axis rules: parallelism as data.

Models name every dimension with a logical axis (``batch``, ``input``, ``hidden_a``, ``hidden_b``,
``output``; see `bpjax.models.mlp`). A rule table maps each logical axis to a mesh axis, or to ``None``
for "replicated". The rule-based strategies differ only in their table (MaxText, t5x, Levanter do the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

Rules = Mapping[str, str | tuple[str, ...] | None]

LOGICAL_AXES = ("batch", "input", "hidden_a", "hidden_b", "output")

# Data parallelism: split examples over ``data``; replicate every parameter.
DATA_PARALLEL: Rules = {"batch": "data"}


def spec(axes: tuple[str, ...], rules: Rules) -> jax.P:
    """The PartitionSpec for a tuple of logical axis names under ``rules`` (unnamed axes replicate)."""
    return jax.P(*(rules.get(a) for a in axes))


def specs(logical: Any, rules: Rules) -> Any:
    """Map a tree of logical-axis tuples to a tree of PartitionSpecs."""
    return jax.tree.map(lambda axes: spec(axes, rules), logical, is_leaf=lambda x: isinstance(x, tuple))
