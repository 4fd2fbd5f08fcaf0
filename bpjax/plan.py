"""``bpjax plan``: explain a layout without training, and check the explanation against the compiler.

For the strategy a config selects, `make_plan` reports, per layer, each parameter's PartitionSpec and the
per-device bytes of its parameters, gradients, optimizer state and activations, and the collectives one
training step needs, with their bytes: an *analytic* model of the layout, written from the sharded-shape
algebra (e.g. a row-parallel layer all-reduces its output ``[B, F]``). Nothing here knows a strategy:
where each parameter lives comes from the strategy's declared placement, and the collectives from its
declared cost model (`bpjax.strategies.base.Definition`), beside the code that causes them. `compiled_report` compiles the
step and reads what the compiler actually emitted (`bpjax.hlo`) and its memory analysis, so the two can
be compared; the tests hold them to 5%.

Bytes of a collective are the bytes of the per-device array it works on (an all-gather's output, a
reduce-scatter's input, an all-reduce's operand). ``wire`` bytes are what one device sends in a ring
implementation over a group of g devices: 2(g-1)/g of the array for an all-reduce, (g-1)/g for an
all-gather or reduce-scatter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jax
import numpy as np
import optax

from bpjax import hlo, strategies
from bpjax.errors import UserError
from bpjax.models import describe
from bpjax.models.mlp import layer_name
from bpjax.strategies.base import Collective, CostInput, local_bytes

if TYPE_CHECKING:
    from bpjax.preflight import Setup


@dataclass
class LayerPlan:
    name: str
    shape: str  # "W[40, 512] b[512]"
    specs: dict[str, str]  # parameter -> PartitionSpec text
    param_bytes: int  # per device
    grad_bytes: int
    opt_bytes: int
    act_bytes: int
    devices: tuple[int, ...] = ()  # positions in the strategy's devices that hold a block of the layer


@dataclass
class Plan:
    strategy: str
    layout: str
    mesh: dict[str, int]
    model: str
    batch_size: int
    layers: list[LayerPlan]
    collectives: list[Collective]
    state_bytes: int  # per device: parameters, optimizer state and counters, as stored
    batch_bytes: int  # per device: one step's inputs and labels
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict[str, float]:
        keys = ("param_bytes", "grad_bytes", "opt_bytes", "act_bytes")
        # Per device: the layers it holds a block of (all of them, or a pipeline stage's); the largest.
        devices = {d for layer in self.layers for d in layer.devices} or {0}
        out = {
            k: max(
                sum(getattr(x, k) for x in self.layers if d in x.devices or not x.devices) for d in devices
            )
            for k in keys
        }
        out["collective_bytes"] = sum(c.array_bytes * c.count for c in self.collectives)
        # Each collective once, as the HLO text lists the body of a loop once: what --compiled compares.
        out["static_collective_bytes"] = sum(c.array_bytes for c in self.collectives)
        # Averaged over steps: what one device sends per training step in a ring implementation.
        out["wire_bytes_per_step"] = sum(c.wire_bytes / c.every for c in self.collectives)
        out["wire_bytes"] = sum(c.wire_bytes for c in self.collectives)
        return out

    def table(self) -> str:
        """The plan as plain text: a row per layer, the collectives, totals per device."""
        mesh = ", ".join(f"{a}={n}" for a, n in self.mesh.items()) or "one device"
        lines = [
            f"strategy {self.strategy} on mesh {{{mesh}}}: {self.model}, batch {self.batch_size}",
            f"layout   {self.layout}",
            "",
            f"{'layer':<9} {'shape':<22} {'kernel spec':<18} {'bias spec':<14} "
            f"{'params':>9} {'grads':>9} {'opt':>9} {'acts':>9}   (bytes per device)",
        ]
        for r in self.layers:
            lines.append(
                f"{r.name:<9} {r.shape:<22} {r.specs['kernel']:<18} {r.specs['bias']:<14} "
                f"{_b(r.param_bytes):>9} {_b(r.grad_bytes):>9} {_b(r.opt_bytes):>9} {_b(r.act_bytes):>9}"
            )
        t = self.totals
        lines.append(
            f"{'total':<9} {'':<22} {'':<18} {'':<14} {_b(t['param_bytes']):>9} {_b(t['grad_bytes']):>9} "
            f"{_b(t['opt_bytes']):>9} {_b(t['act_bytes']):>9}"
        )
        lines.append(
            f"state as stored {_b(self.state_bytes)} + batch {_b(self.batch_bytes)} = "
            f"{_b(self.state_bytes + self.batch_bytes)} of arguments per device"
        )
        lines += ["", "collectives per step (predicted):"]
        if not self.collectives:
            lines.append("  none")
        for c in self.collectives:
            times = f" x{c.count}" if c.count > 1 else ""
            lines.append(
                f"  {c.kind:<18} over {c.axis:<6} (groups of {c.group}) {_b(c.array_bytes):>9}{times:<4} "
                f"wire {_b(c.wire_bytes):>9}  {c.where}"
            )
        lines.append(
            f"  total {_b(t['collective_bytes'])} per device ({_b(t['wire_bytes'])} sent in a ring implementation)"
        )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _b(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _spec_text(sharding, devices: tuple[jax.Device, ...]) -> str:
    spec = getattr(sharding, "spec", None)
    if spec is not None:
        return str(spec).replace("PartitionSpec", "P")
    held = sorted(devices.index(d) for d in sharding.device_set)
    return "on " + ",".join(f"d{i}" for i in held)


def _batch_bytes(setup: Setup) -> int:
    """Bytes of one step's batch on one device, as the strategy lays it out (one small batch placed)."""
    placed = setup.strategy.shard_batch(setup.batches.stack(0, 1))
    # A host array (a threads run's batch, which one worker takes whole) counts in full.
    return sum(
        x.addressable_shards[0].data.nbytes if isinstance(x, jax.Array) else x.nbytes
        for x in jax.tree.leaves(placed)
    )


def _with_placement(problem, params, tree):
    """The reference optimizer state's abstract leaves, each laid out like the parameter it mirrors."""
    return optax.tree_map_params(
        problem.tx,
        lambda leaf, p: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=p.sharding),
        tree,
        params,
        transform_non_params=lambda leaf: leaf,
    )


def make_plan(setup: Setup) -> Plan:
    """The plan of the strategy ``setup`` holds (nothing is compiled or allocated)."""
    problem, strategy, config = setup.problem, setup.strategy, setup.config
    definition = strategies.get(strategy.name)
    params = strategies.placement(problem, strategy, config.parallel)
    reference = jax.eval_shape(problem.init, jax.random.key(0))
    opt_state = _with_placement(problem, params, reference.opt_state)
    opt_by_param = _opt_bytes_by_param(problem, opt_state)
    widths = (setup.dataset.num_features, *problem.model.widths)
    inp = CostInput(problem, strategy, config.parallel, params, opt_state, config.train.batch_size, widths)
    position = {d: i for i, d in enumerate(strategy.devices)}
    cost = definition.cost(inp)
    activations = cost.activations or {}
    # With gradient accumulation only one microbatch's activations are alive at a time.
    rows = inp.b_local // problem.accumulate
    layers = []
    for i in range(len(problem.model.widths)):
        name = layer_name(i)
        p = params[name]
        local = sum(local_bytes(p[k]) for k in ("kernel", "bias"))
        out_split = local_bytes(p["bias"]) / (widths[i + 1] * np.dtype(p["bias"].dtype).itemsize)
        layers.append(
            LayerPlan(
                name=name,
                shape=f"W[{widths[i]}, {widths[i + 1]}] b[{widths[i + 1]}]",
                specs={k: _spec_text(p[k].sharding, strategy.devices) for k in ("kernel", "bias")},
                param_bytes=local,
                grad_bytes=local,
                opt_bytes=opt_by_param.get((name, "kernel"), 0) + opt_by_param.get((name, "bias"), 0),
                # The layer's output, kept for the backward pass, split where its bias is (unless the
                # strategy's cost model knows better, e.g. a pipeline schedule's peak).
                act_bytes=activations.get(name, int(rows * widths[i + 1] * out_split * inp.act_itemsize)),
                devices=tuple(sorted(position[d] for d in p["kernel"].sharding.device_set)),
            )
        )
    full_state = jax.eval_shape(strategy.init, jax.random.key(0))
    return Plan(
        strategy=strategy.name,
        layout=strategy.layout,
        mesh=inp.mesh,
        model=describe(problem.model, setup.dataset.num_features),
        batch_size=config.train.batch_size,
        layers=layers,
        collectives=list(cost.collectives),
        state_bytes=sum(local_bytes(leaf) for leaf in jax.tree.leaves(full_state)),
        batch_bytes=_batch_bytes(setup),
        notes=list(cost.notes),
    )


def _opt_bytes_by_param(problem, opt_state) -> dict[tuple[str, str], int]:
    """Per-device optimizer-state bytes of each (layer, parameter): the leaves that mirror it."""
    local = optax.tree_map_params(problem.tx, local_bytes, opt_state, transform_non_params=lambda _: 0)
    out: dict[tuple[str, str], int] = {}
    for path, n in jax.tree_util.tree_flatten_with_path(local)[0]:
        keys = [getattr(k, "key", None) for k in path]
        if len(keys) >= 2 and keys[-2] is not None and keys[-1] in ("kernel", "bias"):
            out[(keys[-2], keys[-1])] = out.get((keys[-2], keys[-1]), 0) + int(n)
    return out


def compiled_report(setup: Setup) -> dict:
    """Compile one step (K=1) and read its collectives and memory analysis from the compiler."""
    strategy = setup.strategy
    state = strategy.init(jax.random.key(0))
    batch = strategy.shard_batch(setup.batches.stack(0, 1))
    compiled = strategy.step.lower(state, batch).compile()
    items = hlo.collectives(compiled.as_text())
    mem = compiled.memory_analysis()
    return {
        "collectives": items,
        "collective_bytes": hlo.total_bytes(items),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
    }


def compare(plan: Plan, setup: Setup, report: dict | None = None) -> str:
    """The compiled program against the plan, as text: collectives and argument bytes, with ratios."""
    r = report or compiled_report(setup)
    predicted = plan.totals["static_collective_bytes"]
    args = plan.state_bytes + plan.batch_bytes
    lines = ["collectives per step (compiled):"]
    lines += [f"  {c.kind:<15} (groups of {c.group}) {_b(c.array_bytes):>9}" for c in r["collectives"]] or [
        "  none"
    ]
    ratio = (
        r["collective_bytes"] / predicted
        if predicted
        else (1.0 if not r["collective_bytes"] else float("inf"))
    )
    loops = any(c.count > 1 for c in plan.collectives)
    lines.append(
        f"compiled / predicted collective bytes{' (each once: the HLO lists a loop body once)' if loops else ''}: "
        f"{_b(r['collective_bytes'])} / {_b(predicted)} = {ratio:.3f}"
    )
    if r["argument_bytes"] is not None:
        lines.append(
            f"compiled / predicted argument bytes per device: {_b(r['argument_bytes'])} / {_b(args)} = "
            f"{r['argument_bytes'] / args:.3f}; compiler temporaries {_b(r['temp_bytes'])}"
        )
    if abs(ratio - 1) > 0.05:
        lines.append(f"the compiler moves {ratio:.2f}x the predicted bytes (see the notes above)")
    return "\n".join(lines)


def to_json(plan: Plan, compiled: dict | None = None) -> dict:
    """The plan as one JSON-ready object (``bpjax plan --json``); bytes per device and per training step.

    ``predicted.collective_bytes`` counts every occurrence, averaged over steps for collectives that run
    on one step in several; ``static_collective_bytes`` counts each once, as the HLO text lists a loop
    body once, which is what ``compiled.collective_bytes`` (read from that text) compares with.
    """
    t = plan.totals
    out = {
        "strategy": plan.strategy,
        "mesh": plan.mesh,
        "layout": plan.layout,
        "model": plan.model,
        "batch_size": plan.batch_size,
        "predicted": {
            "collective_bytes": sum(c.array_bytes * c.count / c.every for c in plan.collectives),
            "static_collective_bytes": t["static_collective_bytes"],
            "wire_bytes": t["wire_bytes_per_step"],
            "state_bytes_per_device": plan.state_bytes,
            "activation_bytes_per_device": t["act_bytes"],
            "param_bytes_per_device": t["param_bytes"],
            "grad_bytes_per_device": t["grad_bytes"],
            "opt_bytes_per_device": t["opt_bytes"],
            "batch_bytes_per_device": plan.batch_bytes,
            "total_bytes_per_device": per_device_bytes(plan),
            "collectives": [
                {
                    "kind": c.kind,
                    "axis": c.axis,
                    "group": c.group,
                    "array_bytes": c.array_bytes,
                    "count": c.count,
                    "every": c.every,
                    "where": c.where,
                }
                for c in plan.collectives
            ],
        },
        "layers": [
            {
                "name": r.name,
                "shape": r.shape,
                "specs": r.specs,
                "param_bytes": r.param_bytes,
                "opt_bytes": r.opt_bytes,
                "act_bytes": r.act_bytes,
                "devices": list(r.devices),
            }
            for r in plan.layers
        ],
        "notes": plan.notes,
    }
    if compiled is not None:
        out["compiled"] = {
            "collective_bytes": compiled["collective_bytes"],
            "temp_bytes_per_device": compiled["temp_bytes"],
            "argument_bytes_per_device": compiled["argument_bytes"],
            "collectives": [
                {"kind": c.kind, "group": c.group, "array_bytes": c.array_bytes}
                for c in compiled["collectives"]
            ],
        }
    json.dumps(out)  # fails here, not in the caller, if anything is not JSON
    return out


def per_device_bytes(plan: Plan) -> int:
    """What one device holds during a step: stored state, gradients, activations and the batch."""
    t = plan.totals
    return int(plan.state_bytes + t["grad_bytes"] + t["act_bytes"] + plan.batch_bytes)


def check_memory_budget(plan: Plan, budget_mb: float) -> None:
    """A one-line error, before anything is compiled, when the plan needs more than the budget."""
    need = per_device_bytes(plan)
    if budget_mb and need > budget_mb * 2**20:
        raise UserError(
            f"{plan.strategy} needs {need / 2**20:.1f} MiB per device (parameters, gradients, optimizer "
            f"state, activations) but parallel.memory_budget_mb={budget_mb:g}; shard the model "
            f"({strategies.names(lambda d: d.shards_parameters)}), use more devices, or raise the budget"
        )
