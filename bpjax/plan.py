"""``bpjax plan``: explain a layout without training, and check the explanation against the compiler.

For the strategy a config selects, `make_plan` reports, per layer, each parameter's PartitionSpec and the
per-device bytes of its parameters, gradients, optimizer state and activations, and the collectives one
training step needs, with their bytes: an *analytic* model of the layout, written from the sharded-shape
algebra (e.g. a row-parallel layer all-reduces its output ``[B, F]``). `compiled_report` compiles the
step and reads what the compiler actually emitted (`bpjax.hlo`) and its memory analysis, so the two can
be compared; the tests hold them to 5%.

Bytes of a collective are the bytes of the per-device array it works on (an all-gather's output, a
reduce-scatter's input, an all-reduce's operand). ``wire`` bytes are what one device sends in a ring
implementation over a group of g devices: 2(g-1)/g of the array for an all-reduce, (g-1)/g for an
all-gather or reduce-scatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpjax import hlo
from bpjax.errors import UserError
from bpjax.models import describe
from bpjax.models.mlp import layer_name
from bpjax.train import Setup, prepare


@dataclass(frozen=True)
class Collective:
    kind: str  # all-reduce, all-gather, reduce-scatter, collective-permute
    axis: str  # the mesh axis it runs over
    group: int  # devices per group
    array_bytes: int  # per occurrence
    where: str  # e.g. "layer_1 forward", "gradients"
    count: int = 1  # occurrences per step (pipeline: once per tick of a loop the HLO lists once)
    every: int = 1  # runs on one step in this many (local_sgd's averaging, param_server's push/fetch)

    @property
    def wire_bytes(self) -> float:
        g = self.group
        factor = {"all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}.get(self.kind, (g - 1) / g)
        return self.array_bytes * factor * self.count


@dataclass
class LayerPlan:
    name: str
    shape: str  # "W[40, 512] b[512]"
    specs: dict[str, str]  # parameter -> PartitionSpec text
    param_bytes: int  # per device
    grad_bytes: int
    opt_bytes: int
    act_bytes: int
    stage: int | None = None  # pipeline: the stage (device) that holds the layer


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
        groups: dict = {}  # per device: all layers, or (pipeline) the layers of one stage; take the largest
        for layer in self.layers:
            groups.setdefault(layer.stage, []).append(layer)
        out = {k: max(sum(getattr(x, k) for x in g) for g in groups.values()) for k in keys}
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


def _spec_text(sharding, stacked: bool) -> str:
    if stacked:
        return "P(data) stacked"
    spec = getattr(sharding, "spec", None)
    return str(spec if spec is not None else "P()").replace("PartitionSpec", "P")


def _local_bytes(struct, stacked: bool) -> int:
    shape = struct.shape[1:] if stacked else struct.shape
    sharding = getattr(struct, "sharding", None)
    if sharding is not None and not stacked:
        shape = sharding.shard_shape(struct.shape)
    return math.prod(shape) * np.dtype(struct.dtype).itemsize


def _batch_bytes(setup: Setup) -> int:
    """Bytes of one step's batch on one device, as the strategy lays it out (one small batch placed)."""
    placed = setup.strategy.shard_batch(setup.batches.stack(0, 1))
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(placed))


def _opt_bytes_by_param(problem, opt_shapes, stacked: bool) -> dict[tuple[str, str], int]:
    """Per-device optimizer-state bytes of each (layer, parameter): the leaves that mirror it."""
    local = optax.tree_map_params(
        problem.tx, lambda leaf: _local_bytes(leaf, stacked), opt_shapes, transform_non_params=lambda _: 0
    )
    out: dict[tuple[str, str], int] = {}
    for path, n in jax.tree_util.tree_flatten_with_path(local)[0]:
        keys = [getattr(k, "key", None) for k in path]
        if len(keys) >= 2 and keys[-2] is not None and keys[-1] in ("kernel", "bias"):
            out[(keys[-2], keys[-1])] = out.get((keys[-2], keys[-1]), 0) + int(n)
    return out


def make_plan(config, setup: Setup | None = None) -> Plan:
    """The plan of the strategy ``config`` selects (nothing is compiled or allocated)."""
    setup = setup or prepare(config)
    problem, strategy, config = setup.problem, setup.strategy, setup.config
    full_shapes = jax.eval_shape(strategy.init, jax.random.key(0))
    shapes = getattr(full_shapes, "train", full_shapes)  # async keeps a TrainState plus a history
    if strategy.name == "pipeline":
        return _pipeline_plan(setup, shapes)
    stacked = strategy.name == "pmap"  # pmap's leaves carry a leading device axis
    mesh = dict(strategy.mesh.shape) if strategy.mesh is not None else {}
    b_local = config.train.batch_size // strategy.data_parallel
    widths = [setup.dataset.num_features, *problem.model.widths]
    act_itemsize = jnp.dtype(problem.model.dtype).itemsize
    opt_bytes = _opt_bytes_by_param(problem, shapes.opt_state, stacked)
    layers = []
    for i in range(len(problem.model.widths)):
        name = layer_name(i)
        p = shapes.params[name]
        specs = {k: _spec_text(getattr(p[k], "sharding", None), stacked) for k in ("kernel", "bias")}
        local = sum(_local_bytes(p[k], stacked) for k in ("kernel", "bias"))
        out_split = _local_bytes(p["bias"], stacked) / (widths[i + 1] * np.dtype(p["bias"].dtype).itemsize)
        layers.append(
            LayerPlan(
                name=name,
                shape=f"W[{widths[i]}, {widths[i + 1]}] b[{widths[i + 1]}]",
                specs=specs,
                param_bytes=local,
                grad_bytes=local,
                opt_bytes=opt_bytes.get((name, "kernel"), 0) + opt_bytes.get((name, "bias"), 0),
                # The layer's output, kept for the backward pass, split where its bias is.
                act_bytes=int(b_local * widths[i + 1] * out_split * act_itemsize),
            )
        )
    collectives, notes = predicted_collectives(strategy.name, config, problem, shapes, mesh, b_local, widths)
    return Plan(
        strategy=strategy.name,
        layout=strategy.layout,
        mesh=mesh,
        model=describe(problem.model, setup.dataset.num_features),
        batch_size=config.train.batch_size,
        layers=layers,
        collectives=collectives,
        state_bytes=sum(_local_bytes(leaf, stacked) for leaf in jax.tree.leaves(full_shapes)),
        batch_bytes=_batch_bytes(setup),
        notes=notes,
    )


def _pipeline_plan(setup: Setup, shapes) -> Plan:
    """Pipeline: each layer whole on its stage's device; activations cross stages once per tick."""
    from bpjax.strategies.pipeline import assign_stages

    problem, strategy, config = setup.problem, setup.strategy, setup.config
    widths = [setup.dataset.num_features, *problem.model.widths]
    n = len(problem.model.widths)
    stages = assign_stages(
        [(widths[i], widths[i + 1]) for i in range(n)], strategy.num_devices, config.parallel.stages
    )
    ref = jax.eval_shape(problem.init, jax.random.key(0))
    opt_bytes = _opt_bytes_by_param(problem, ref.opt_state, False)
    act = jnp.dtype(problem.model.dtype).itemsize
    batch = config.train.batch_size
    layers = []
    for s, members in enumerate(stages):
        for i in members:
            name, p = layer_name(i), ref.params[layer_name(i)]
            local = sum(_local_bytes(p[k], False) for k in ("kernel", "bias"))
            layers.append(
                LayerPlan(
                    name=name,
                    shape=f"W[{widths[i]}, {widths[i + 1]}] b[{widths[i + 1]}]",
                    specs={"kernel": f"stage {s}", "bias": f"stage {s}"},
                    param_bytes=local,
                    grad_bytes=local,
                    opt_bytes=opt_bytes.get((name, "kernel"), 0) + opt_bytes.get((name, "bias"), 0),
                    act_bytes=batch * widths[i + 1] * act,  # all M microbatches are kept for backward
                    stage=s,
                )
            )
    S, M = len(stages), config.parallel.microbatches
    collectives = []
    if S > 1:
        widest = max(widths[members[-1] + 1] for members in stages[:-1])
        tick = batch // M * widest * act
        collectives = [
            Collective(
                "collective-permute", "stage", 2, tick, "activations, stage s -> s+1, every tick", M + S - 1
            ),
            Collective(
                "collective-permute", "stage", 2, tick, "gradients, stage s+1 -> s, every tick", M + S - 1
            ),
            Collective("all-reduce", "stage", S, 4, "loss (summed from the last stage)"),
        ]
    notes = [
        f"{M + S - 1} ticks each way, a bubble of (S-1)/(M+S-1) = {(S - 1) / (M + S - 1):.2f}; activations "
        f"cross stages padded to the widest boundary; parameters per device are the largest stage, padded "
        "(see state as stored)"
    ]
    return Plan(
        strategy=strategy.name,
        layout=strategy.layout,
        mesh=dict(strategy.mesh.shape),
        model=describe(problem.model, setup.dataset.num_features),
        batch_size=batch,
        layers=layers,
        collectives=collectives,
        state_bytes=sum(_local_bytes(leaf, False) for leaf in jax.tree.leaves(shapes)),
        batch_bytes=_batch_bytes(setup),
        notes=notes,
    )


def _tensor_collectives(problem, shapes, model: int, b_local: int, widths) -> tuple[list, list]:
    """Activations crossing the ``model`` axis, walking the layers with the activation's layout."""
    out, notes = [], []
    act = jnp.dtype(problem.model.dtype).itemsize
    sharded_in = False  # is the activation entering layer i split over model?
    for i in range(len(problem.model.widths)):
        spec = tuple(shapes.params[layer_name(i)]["kernel"].sharding.spec) + (None, None)
        row, col = spec[0] == "model", spec[1] == "model"
        x_in, x_out = b_local * widths[i] * act, b_local * widths[i + 1] * act
        where = layer_name(i)
        if row:  # each device holds a slice of the inputs: the output is a partial sum
            out.append(
                Collective("all-reduce", "model", model, x_out, f"{where} forward (row-parallel output)")
            )
            if i > 0 and not sharded_in:  # the input gradient comes out split; the layer below needs it whole
                out.append(
                    Collective("all-gather", "model", model, x_in, f"{where} backward (input gradient)")
                )
        else:
            if sharded_in:
                out.append(Collective("all-gather", "model", model, x_in, f"{where} forward (input)"))
                notes.append(
                    f"{where} is replicated after a column-parallel layer: this is the minimum, the compiler "
                    "may move more (see --compiled)"
                )
            if col and i > 0:  # each device's input gradient is a partial sum
                out.append(
                    Collective("all-reduce", "model", model, x_in, f"{where} backward (input gradient)")
                )
        sharded_in = col
    return out, notes


def _split_over_data(params, data: int, gathered: bool = True) -> tuple[int, int]:
    """``(full bytes of the parameters stored split over data, bytes of the others)`` per device
    (within its model group). With ``gathered=False`` every parameter counts as unsplit."""
    split = whole = 0
    for leaf in jax.tree.leaves(params):
        local = _local_bytes(leaf, False)
        if gathered and "data" in tuple(leaf.sharding.spec):
            split += local * data
        else:
            whole += local
    return split, whole


def predicted_collectives(name, config, problem, shapes, mesh, b_local, widths):
    """The collectives one step needs at the minimum: ``(collectives, notes)``."""
    out: list[Collective] = []
    notes: list[str] = []
    data, model, feature = mesh.get("data", 1), mesh.get("model", 1), mesh.get("feature", 1)

    if name == "dp" and feature > 1:  # feature partitioning: the first layer's partial products
        act = jnp.dtype(problem.model.dtype).itemsize
        out.append(
            Collective(
                "all-reduce",
                "feature",
                feature,
                b_local * widths[1] * act,
                "layer_0 forward (sum over features)",
            )
        )
    if name == "async" and config.parallel.staleness:
        notes.append(
            f"async keeps {config.parallel.staleness + 1} versions of the parameters on every device "
            "(see state as stored); the gradients are all-reduced every step, as in dp"
        )
    if name in ("pmap", "dp", "async") and data > 1:
        total = sum(_local_bytes(s, name == "pmap") for s in jax.tree.leaves(shapes.params))
        out.append(
            Collective("all-reduce", "data", data, total + 4, "gradients and loss (one fused all-reduce)")
        )
    if name == "param_server" and data > 1:
        p = config.parallel
        sharded_b, whole_b = _split_over_data(shapes.params, data)
        push, pull = f"once every {p.n_push} step(s)", f"once every {p.n_fetch} step(s)"
        out.append(
            Collective(
                "reduce-scatter",
                "data",
                data,
                sharded_b,
                f"push: gradients to the server shards, {push}",
                every=p.n_push,
            )
        )
        if whole_b:
            out.append(
                Collective(
                    "all-reduce",
                    "data",
                    data,
                    whole_b,
                    f"push: gradients of unsplit parameters, {push}",
                    every=p.n_push,
                )
            )
        out.append(
            Collective(
                "all-gather",
                "data",
                data,
                sharded_b,
                f"fetch: parameters from the server, {pull}",
                every=p.n_fetch,
            )
        )
        out.append(Collective("all-reduce", "data", data, 4, "loss (mean over workers, for the log)"))
        notes.append(
            "param_server's pushes and fetches run under a condition; the compiler may add its own copies "
            "(compare with --compiled)"
        )
    if name == "local_sgd" and data > 1:
        H = config.parallel.local_steps
        floats = [
            x
            for x in jax.tree.leaves((shapes.params, shapes.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)
        ]
        out.append(
            Collective(
                "all-reduce",
                "data",
                data,
                sum(_local_bytes(x, False) for x in floats),
                f"parameters and optimizer state, averaged once every {H} step(s)",
                every=H,
            )
        )
        out.append(Collective("all-reduce", "data", data, 4, "loss (mean over workers, for the log)"))
        notes.append(f"the averaging runs on 1 step in {H}; per step that is {1 / H:.2f} of its bytes")
    if name in ("tensor", "hybrid") and model > 1:
        tensor, tensor_notes = _tensor_collectives(problem, shapes, model, b_local, widths)
        out += tensor
        notes += tensor_notes
    if name == "hybrid" and data > 1 and config.parallel.hybrid_data == "fsdp":
        notes.append(
            "hybrid with fsdp: the compiler chooses how to gather the parameters and reduce the "
            "gradients, and can move more than this minimum (XLA:CPU all-reduced instead of "
            "reduce-scattering on a 24-64-48-10 net: 1.09x at data=2 x model=4, 1.24x at data=4 x "
            "model=2; 1.00x on 64-512-256-128-10); check with --compiled"
        )
    if name in ("fsdp", "hybrid") and data > 1:
        if name == "fsdp" or config.parallel.hybrid_data == "fsdp":
            gather_b, reduce_b = _split_over_data(shapes.params, data)
        else:
            gather_b, reduce_b = 0, _split_over_data(shapes.params, data, gathered=False)[1]
        if gather_b:
            out.append(Collective("all-gather", "data", data, gather_b, "parameters, gathered for use"))
            out.append(
                Collective("reduce-scatter", "data", data, gather_b, "gradients of sharded parameters")
            )
        out.append(
            Collective("all-reduce", "data", data, reduce_b + 4, "gradients of the other parameters, loss")
        )
    return out, notes


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


def compare(plan: Plan, setup: Setup) -> str:
    """The compiled program against the plan, as text: collectives and argument bytes, with ratios."""
    r = compiled_report(setup)
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
            "(fsdp, tensor, hybrid, pipeline), use more devices, or raise the budget"
        )
