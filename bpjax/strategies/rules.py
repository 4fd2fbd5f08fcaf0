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


class NotDivisible(UserError):
    """A dimension whose only candidate mesh axes are strict and do not divide it (see `resolve`)."""

    def __init__(self, where: str, logical: str, width: int, axis: str, size: int):
        self.where, self.logical, self.width, self.axis, self.size = where, logical, width, axis, size
        self.layer = where.split(".")[0]
        super().__init__(self.fixes((self.layer,), (width,)))

    def problem(self) -> str:
        return f"{self.where}: {self.logical} width {self.width} is not divisible by the {self.axis} axis of size {self.size}"

    def fixes(self, keep: tuple[str, ...], widths: tuple[int, ...]) -> str:
        """The message: this problem, then keeping ``keep`` whole, a size dividing ``widths``, padding."""
        fits = [n for n in range(2, self.size) if all(w % n == 0 for w in widths)]
        size = f"a {self.axis} size that divides {', '.join(map(str, widths))}"
        fits = [str(n) for n in fits[-3:]]
        size += (
            f" ({', '.join(fits[:-1])} or {fits[-1]})" if len(fits) > 1 else f" ({fits[0]})" if fits else ""
        )
        pad = -(-self.width // self.size) * self.size
        what = "the layer" if len(keep) == 1 else "every layer that uses such a width"
        return (
            f'{self.problem()}; keep {what} whole (--set parallel.replicate="{keep!r}"), choose {size}, '
            f"or pad the width to {pad}"
        )


def resolve(
    axes: Sequence[str],
    shape: Sequence[int],
    rules: Rules,
    mesh_shape: Mapping[str, int],
    strict: Sequence[str] = (),
    where: str = "",
) -> jax.P:
    """The PartitionSpec of one array with logical ``axes`` and ``shape`` (see the module docstring).

    A dimension only strict axes could take, none of which divides it, raises `NotDivisible`
    (`param_specs` turns it into the error naming every layer to keep whole).
    """
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
                raise NotDivisible(where, axes[d], shape[d], bad[0], mesh_shape[bad[0]])
    return jax.P(*out)


def _layer_order(name: str):
    """``layer_10`` after ``layer_9``: layers sorted by their index, other names after them."""
    head, _, index = name.rpartition("_")
    return (0, int(index), head) if index.isdigit() else (1, 0, name)


def param_specs(problem, rules: Rules, mesh_shape: Mapping[str, int], replicate=(), strict=()) -> dict:
    """PartitionSpecs of every parameter of ``problem``'s model (a tree shaped like its params).

    ``replicate`` names layers (e.g. ``("layer_2",)``) kept whole on every device. When some widths
    cannot be split over a strict axis, the error names *every* layer that must stay whole, as the full
    ``parallel.replicate`` to pass (the layers already there included): a width is shared by the layer
    that writes it and the layer that reads it, so naming one layer at a time sends the user in
    circles. The set is grown until it stops changing, so following the hint once is accepted.
    """
    shapes = jax.eval_shape(problem.init, jax.random.key(0)).params
    unknown = set(replicate) - set(shapes)
    if unknown:
        raise UserError(
            f"parallel.replicate names {sorted(unknown)[0]!r}, not a layer; layers are {sorted(shapes)}"
        )

    def specs(whole: set[str]) -> tuple[dict, list[NotDivisible]]:
        out: dict = {}
        failures: list[NotDivisible] = []
        for layer, leaves in problem.param_axes.items():
            out[layer] = {}
            for name, axes in leaves.items():
                spec = jax.P()
                if layer not in whole:
                    shape = shapes[layer][name].shape
                    try:
                        spec = resolve(axes, shape, rules, mesh_shape, strict, f"{layer}.{name}")
                    except NotDivisible as e:
                        failures.append(e)
                out[layer][name] = spec
        return out, failures

    whole = set(replicate)
    out, failures = specs(whole)
    if not failures:
        return out
    first, widths = failures[0], tuple(sorted({f.width for f in failures}))
    while failures:  # a fixed point: keep whole every layer that fails, until none does
        whole |= {f.layer for f in failures}
        _, failures = specs(whole)
    raise UserError(first.fixes(tuple(sorted(whole, key=_layer_order)), widths))


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
