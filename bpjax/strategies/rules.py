"""Logical-to-mesh axis rules: parallelism as data.

Models name every dimension with a logical axis (``batch``, ``input``, ``hidden_a``, ``hidden_b``,
``output``; see `bpjax.models.mlp`). A rule table is an ordered list of ``(logical axis, mesh axis)``
pairs; the rule-based strategies (dp, fsdp, tensor, hybrid) differ only in their table, as in MaxText,
t5x and Levanter.

How a parameter's PartitionSpec is resolved from a table: its dimensions are visited largest first;
each takes the first rule for its logical name whose mesh axis is still unused in this spec and whose
size divides the dimension. A dimension whose only candidate axes are *strict* (``model`` for tensor
parallelism) and do not divide it is an error naming the fix, never a silent replication.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from bpjax.errors import UserError

Rules = tuple[tuple[str, str], ...]

LOGICAL_AXES = ("batch", "input", "hidden_a", "hidden_b", "output")

# Data parallelism: split examples over ``data``; replicate every parameter.
DATA_PARALLEL: Rules = (("batch", "data"),)
# FSDP (ZeRO-3): also store every parameter sharded over ``data``, on its largest divisible dimension.
FSDP: Rules = DATA_PARALLEL + tuple((name, "data") for name in ("hidden_a", "hidden_b", "input", "output"))
# Megatron tensor parallelism: ``hidden_a`` (outputs of layers 0, 2, ...) over ``model`` makes layers
# 0, 2, ... column-parallel and 1, 3, ... row-parallel, one all-reduce per pair.
TENSOR: Rules = (("hidden_a", "model"),)
# Feature partitioning: each device holds a slice of the input features and the matching rows of the
# first layer's kernel; the partial products are summed (an all-reduce of the first layer's output).
FEATURE: Rules = (("input", "feature"),)
SAMPLE_FEATURE: Rules = DATA_PARALLEL + FEATURE
HYBRID_DP: Rules = DATA_PARALLEL + TENSOR
# FSDP x tensor: ``model`` takes hidden_a first, ``data`` takes the other dimension of each kernel.
HYBRID_FSDP: Rules = (
    DATA_PARALLEL + TENSOR + tuple((name, "data") for name in ("hidden_b", "input", "output", "hidden_a"))
)


def resolve(
    axes: Sequence[str],
    shape: Sequence[int],
    rules: Rules,
    mesh_shape: Mapping[str, int],
    strict: Sequence[str] = (),
    where: str = "",
) -> jax.P:
    """The PartitionSpec of one array with logical ``axes`` and ``shape`` (see the module docstring)."""
    out: list[str | None] = [None] * len(axes)
    used: set[str] = set()
    for d in sorted(range(len(axes)), key=lambda i: -shape[i]):
        candidates = [m for logical, m in rules if logical == axes[d] and m in mesh_shape and m not in used]
        for m in candidates:
            if mesh_shape[m] == 1:
                break
            if shape[d] % mesh_shape[m] == 0:
                out[d] = m
                used.add(m)
                break
        else:
            bad = [m for m in candidates if m in strict and mesh_shape[m] > 1]
            if bad:
                m, n = bad[0], mesh_shape[bad[0]]
                layer = where.split(".")[0]
                raise UserError(
                    f"{where}: {axes[d]} width {shape[d]} is not divisible by the {m} axis of size {n}; "
                    f"replicate the layer (--set parallel.replicate=\"('{layer}',)\"), choose a {m} size "
                    f"that divides {shape[d]}, or pad the width to {-(-shape[d] // n) * n}"
                )
    return jax.P(*out)


def param_specs(problem, rules: Rules, mesh_shape: Mapping[str, int], replicate=(), strict=()) -> dict:
    """PartitionSpecs of every parameter of ``problem``'s model (a tree shaped like its params).

    ``replicate`` names layers (e.g. ``("layer_2",)``) kept whole on every device.
    """
    shapes = jax.eval_shape(problem.init, jax.random.key(0)).params
    unknown = set(replicate) - set(shapes)
    if unknown:
        raise UserError(
            f"parallel.replicate names {sorted(unknown)[0]!r}, not a layer; layers are {sorted(shapes)}"
        )
    return {
        layer: {
            name: jax.P()
            if layer in replicate
            else resolve(axes, shapes[layer][name].shape, rules, mesh_shape, strict, f"{layer}.{name}")
            for name, axes in leaves.items()
        }
        for layer, leaves in problem.param_axes.items()
    }


def batch_specs(rules: Rules, mesh_shape: Mapping[str, int], y_ndim: int) -> dict[str, jax.P]:
    """Specs of a stacked batch ``{"x": [K, B, D], "y": [K, B(, T)]}``: B over the ``batch`` rule's
    axis, D over the ``input`` rule's axis (feature partitioning)."""

    def axis(logical, taken=None):
        return next((m for name, m in rules if name == logical and m in mesh_shape and m != taken), None)

    batch = axis("batch")
    # An axis already splitting the examples cannot split the features too (fsdp's ``input -> data``
    # rule is about the first kernel, not the batch).
    features = axis("input", taken=batch)
    return {"x": jax.P(None, batch, features), "y": jax.P(None, batch, *([None] * (y_ndim - 1)))}
