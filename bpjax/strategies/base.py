"""The Strategy interface, and the declaration through which a strategy owns everything it knows.

A strategy is one module. It ends with a `Definition`, its one declaration: its settings (defaults,
types, ranges), its mesh axes, its layout line, its capabilities, its cost model for ``bpjax plan``, where
it places each parameter (for ``plan`` and ``viz``), and the settings under which it equals ``single``.
Its ``make`` builds a `Strategy`: a small bundle of pure functions closed over its devices. The train
loop, ``plan``, ``viz``, the config and the tests read these two things and never name a strategy.

Contract of a built `Strategy` (checked for every registered strategy by ``tests/test_equivalence.py``):
  init(key)                   -> the strategy's state (a TrainState, or a pytree holding one plus
                                 extras such as async's parameter history), already placed on its
                                 devices; ``gather`` of it equals ``Problem.init(key)`` on one device.
                                 A ``jax.jit`` with ``out_shardings``, so ``jax.eval_shape`` of it
                                 shows every leaf's layout
  shard_batch(batch)          -> device batch. ``batch`` is a host dict of global arrays stacked over K
                                 steps: ``{"x": [K, B, D], "y": [K, B] or [K, B, T]}``
  step(state, device_batch)   -> (state, metrics): a ``jax.jit`` or ``jax.pmap`` function (the loop
                                 compiles it ahead of time with ``.lower().compile()``); runs K
                                 training steps; donates the input state; ``metrics`` is a dict of
                                 replicated ``[K]`` arrays (read with `to_host`)
  gather(state)               -> host numpy arrays in the reference (one-device) layout: a TrainState
                                 shaped like ``Problem.init``'s
  batch_rows(batch_size)      -> the rows of each global batch this process's devices hold (all of them
                                 in a single-process run); ``shard_batch`` then takes just those rows
  checkpointing               -> how the state goes into a checkpoint and comes back (`Checkpointing`):
                                 portable strategies save the reference TrainState, and any state of
                                 their own beside it
  events                      -> None, or the name of a file in the workdir for per-step records: the
                                 step's metrics then carry ``"events"``, a list of JSON-able dicts each
                                 with a ``"step"``, which the loop writes there (threads runs: the trace)
After n steps, ``gather(state)`` equals the ``single`` strategy's state to floating-point tolerance.

In a multi-process run (`bpjax.distributed`) every process calls the same functions: ``shard_batch``
builds global arrays from process-local rows, and ``gather`` all-gathers across processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from bpjax.schema import Setting
from bpjax.step import Batch, Metrics, Problem, TrainState, fuse_steps

# ------------------------------------------------------------------------------------- the contract


class Checkpointing(NamedTuple):
    """How a strategy's state is saved and restored (`bpjax.checkpoint`).

    A strategy whose `Definition` says ``portable_checkpoints`` saves a TrainState in the reference
    structure (``Problem.init``'s), with global arrays in its own layout; any portable strategy restores
    it into its own layout (orbax reshards on load).

    A strategy with state of its own beyond that TrainState (async's parameter history, the parameter
    server's cache and accumulators, the workers' copies of local SGD and DiLoCo) saves it beside, as
    its *extras*. They come back only under the same strategy and mesh, with the same shapes (a resume
    there is bit-identical); from any other checkpoint ``load(tree, None)`` builds them from the
    TrainState by the strategy's documented rule (``fresh`` says it in one line).
    """

    target: Callable[[], Any]  # the saved tree's abstract shape, with the shardings to restore into
    save: Callable[[Any], Any] = lambda state: state  # state -> saved tree (no copies)
    load: Callable[..., Any] = lambda tree, extras=None: tree  # (restored tree, extras or None) -> state
    extras: Callable[[], Any] | None = None  # the extras' abstract shape and shardings (None: none)
    save_extras: Callable[[Any], Any] = lambda state: None  # state -> extras tree
    fresh: str = ""  # what the extras start as without their own checkpoint, e.g. "history = parameters"


class Strategy(NamedTuple):
    """How one training step is laid out over devices. Pure functions closed over a mesh."""

    name: str
    layout: str  # one line of sharded-shape notation with this instance's settings filled in
    devices: tuple[jax.Device, ...]
    data_parallel: int  # how many ways each global batch is split; batch_size must divide by it
    init: Callable[[jax.Array], Any]
    shard_batch: Callable[[Batch], Batch]
    step: Callable[[Any, Batch], tuple[Any, Metrics]]
    gather: Callable[[Any], TrainState]
    checkpointing: Checkpointing
    mesh: jax.sharding.Mesh | None = None
    batch_rows: Callable[[int], slice] = lambda batch_size: slice(None)
    events: str | None = None  # a file of per-step records the loop writes (see the contract above)

    @property
    def num_devices(self) -> int:
        return len(self.devices)


# ---------------------------------------------------------------------------------- the declaration


class Example(NamedTuple):
    """Settings under which a strategy reproduces ``single`` (the equivalence and plan tests run them).

    ``mesh``: axis sizes on the suite's 8 devices; ``settings``: the strategy's own settings;
    ``optimizers``: those for which it is exact (local SGD needs an update linear in the gradient).
    """

    mesh: Mapping[str, int]
    settings: Mapping[str, Any] = {}
    optimizers: tuple[str, ...] = ("adam", "momentum")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective a training step needs, as `bpjax.plan` reports it (bytes per device)."""

    kind: str  # all-reduce, all-gather, reduce-scatter, collective-permute
    axis: str  # the mesh axis it runs over
    group: int  # devices per group
    array_bytes: int  # per occurrence
    where: str  # e.g. "layer_1 forward", "gradients"
    count: int = 1  # occurrences per step (pipeline: once per tick of a loop the HLO lists once)
    every: int = 1  # runs on one step in this many (local_sgd's averaging, param_server's push/fetch)

    @property
    def wire_bytes(self) -> float:
        """What one device sends in a ring implementation: 2(g-1)/g of the array for an all-reduce,
        (g-1)/g for an all-gather or reduce-scatter, all of it for a permute."""
        g = self.group
        factor = {"all-reduce": 2 * (g - 1) / g, "collective-permute": 1.0}.get(self.kind, (g - 1) / g)
        return self.array_bytes * factor * self.count


class Cost(NamedTuple):
    """A strategy's answer to ``bpjax plan``: the collectives of one step and notes on what it leaves out."""

    collectives: list[Collective]
    notes: list[str] = []
    # Per layer, the activation bytes one device keeps for the backward pass, where the strategy
    # knows better than the plan's default (the layer's output for the device's rows of the batch).
    activations: Mapping[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class CostInput:
    """What a cost model reads: the built strategy, its settings, and the reference parameters and
    optimizer state as ``ShapeDtypeStruct``s carrying the strategy's placement (`Definition.placement`)."""

    problem: Problem
    strategy: Strategy
    settings: Mapping[str, Any]  # the ``parallel`` config section
    params: Any
    opt_state: Any
    batch_size: int
    widths: tuple[int, ...]  # (input features, width of layer 0, ..., outputs)

    @property
    def mesh(self) -> dict[str, int]:
        return dict(self.strategy.mesh.shape) if self.strategy.mesh is not None else {}

    @property
    def b_local(self) -> int:
        return self.batch_size // self.strategy.data_parallel

    @property
    def act_itemsize(self) -> int:
        return np.dtype(self.problem.model.dtype).itemsize


def local_bytes(struct) -> int:
    """Bytes of one device's block of an abstract array (all of it when it carries no sharding)."""
    sharding = getattr(struct, "sharding", None)
    shape = sharding.shard_shape(struct.shape) if sharding is not None else struct.shape
    return math.prod(shape) * np.dtype(struct.dtype).itemsize


def no_collectives(inp: CostInput) -> Cost:
    return Cost([])


def init_placement(problem: Problem, strategy: Strategy, settings) -> Any:
    """Where the parameters of a state in the reference structure live: read from ``init``'s layout."""
    return jax.tree.map(lambda s: s.sharding, jax.eval_shape(strategy.init, jax.random.key(0)).params)


def replicated_placement(problem: Problem, strategy: Strategy, settings) -> Any:
    """Every parameter whole on every device of the strategy (data parallelism, workers' copies)."""
    replicated = jax.sharding.NamedSharding(strategy.mesh, jax.P())
    return jax.tree.map(lambda _: replicated, jax.eval_shape(problem.init, jax.random.key(0)).params)


@dataclasses.dataclass(frozen=True)
class Definition:
    """Everything about one strategy that the rest of bpjax may know. The registry lists these.

    ``make(problem, mesh, **settings)`` builds the strategy: ``mesh`` is the ``parallel.mesh`` dict, and
    its keyword arguments are exactly the keys of ``settings`` (checked by the tests), already validated.
    """

    name: str
    summary: str  # one line: what it is, for tables and messages
    layout: str  # sharded-shape notation, e.g. "In[B_data, D] · W[D, F_data]"
    make: Callable[..., Strategy]
    axes: tuple[str, ...] = ()  # the mesh axes it may lay out over
    settings: Mapping[str, Setting] = dataclasses.field(default_factory=dict)
    cost: Callable[[CostInput], Cost] = no_collectives
    # (problem, strategy, settings) -> a params-shaped tree of jax Shardings over strategy.devices
    placement: Callable[[Problem, Strategy, Any], Any] = init_placement
    examples: tuple[Example, ...] = ()  # settings under which it equals ``single`` (first: the main one)
    # Capabilities: runs across processes (for these settings), saves portable checkpoints, shards the
    # model's parameters (so it is a fix for a memory budget).
    multi_process: bool | Callable[[Any], bool] = False  # or a function of the ``parallel`` section
    multi_process_when: str = (
        ""  # the settings that make it multi-process, for messages, e.g. "execution=simulated"
    )
    portable_checkpoints: bool = False
    shards_parameters: bool = False
    # Takes its gradients through `Problem.loss_and_grads`, so that ``train.accumulate`` (microbatches)
    # and float16 loss scaling (``model.precision=fp16``) apply; a strategy that computes gradients its
    # own way says why not (``not_accumulating``), and the config refuses those settings in one line.
    accumulates: bool = True
    scales_loss: bool = True
    not_accumulating: str = ""  # the fix, for the message, e.g. "raise parallel.microbatches instead"
    # Checks that read other config sections (e.g. the batch size against microbatches), made before
    # anything is built; own settings are validated from ``settings``.
    check: Callable[[Any], None] = lambda config: None
    # (settings, number of devices) -> [devices, ticks] grid of what each device runs at each tick
    # (-1: idle), for strategies that follow a schedule (viz draws it).
    timeline: Callable[[Any, int], np.ndarray] | None = None


# -------------------------------------------------------------------------------- shared machinery

EVENTS_FORMAT = 1


def events_header(config, strategy: Strategy) -> dict[str, Any]:
    """The first line of a strategy's events file: what wrote it, under which config (a replay of a
    threads run's trace checks it)."""
    import json

    return {
        "bpjax_events": EVENTS_FORMAT,
        "strategy": strategy.name,
        "workers": strategy.num_devices,
        "config": json.loads(json.dumps(config.to_dict())),
    }


def rows_held(sharding: jax.sharding.Sharding, batch_size: int) -> slice:
    """The rows of a ``[K, B, ...]`` batch that this process's devices hold under ``sharding``."""
    if jax.process_count() == 1:
        return slice(None)
    rank = max(2, len(getattr(sharding, "spec", ())))
    spans = sorted(_row_spans(sharding, batch_size, rank))
    if any(start > end for (_, end), (start, _) in zip(spans, spans[1:], strict=False)):
        raise ValueError(f"this process holds rows {spans} of each batch, which are not contiguous")
    return slice(spans[0][0], max(end for _, end in spans))


def _global_shape(sharding: jax.sharding.Sharding, local: tuple[int, ...]) -> tuple[int, ...]:
    """The global shape of a ``[K, b, ...]`` leaf of which this process holds rows ``b`` (the ones
    `rows_held` names) and every other dimension whole, e.g. all input features where the batch is
    also cut by features (``dp`` with ``partition=feature``)."""
    if len(local) < 2:
        return local
    rows = len(sharding.device_set)  # a row count that any number of row blocks divides
    held = sum(end - start for start, end in _row_spans(sharding, rows, len(local)))
    return (local[0], local[1] * rows // held, *local[2:])


def _row_spans(sharding: jax.sharding.Sharding, rows: int, rank: int) -> set[tuple[int, int]]:
    """The ``(start, end)`` row spans of a ``[K, rows, ...]`` array this process's devices hold."""
    n = len(sharding.device_set)  # the other dimensions: a size any split of them divides
    shape = (1, rows) + (n,) * (rank - 2)
    return {idx[1].indices(rows)[:2] for idx in sharding.addressable_devices_indices_map(shape).values()}


def place_batch(batch: Batch, shardings) -> Batch:
    """Put a host batch on devices: as is in one process, from process-local rows in several.

    ``shardings``: one sharding for every leaf, or a dict like ``batch``. Each process holds its
    rows of each batch (`rows_held`) with every other dimension whole; the devices take their blocks.
    """
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = {k: shardings for k in batch}
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, _global_shape(shardings[k], v.shape))
    return out


def to_host(tree: Any) -> Any:
    """Numpy copies of a tree of global arrays, on every process: the one host transfer for metrics and
    for states in the reference structure.

    Across processes, a replicated array (the metrics, dp's parameters) is read from a local copy; only
    sharded ones are all-gathered, which is a collective every process must join.
    """
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def one(x):
        if isinstance(x, jax.Array) and x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def jit_checkpointing(init: Callable) -> Checkpointing:
    """Checkpointing for a state that ``init`` (a jit with ``out_shardings``) lays out: saved as it is."""
    return Checkpointing(lambda: jax.eval_shape(init, jax.random.key(0)))


def over_data(
    name: str,
    layout: str,
    mesh: jax.sharding.Mesh,
    problem: Problem,
    *,
    from_train: Callable[[TrainState, Any], Any],
    state_sharding: Any,
    step: Callable,
    train_of: Callable[[Any], TrainState],
    train_sharding: Any,
    extras_of: Callable[[Any], Any],
    fresh: str,
    axis: str = "data",
) -> Strategy:
    """A strategy whose batch is split over ``axis`` and whose state (laid out by ``state_sharding``)
    is a TrainState plus extras of its own: the assembly the simulated schemes share (async,
    param_server, local_sgd, diloco).

    ``from_train(train, extras)``: the state from a reference TrainState and its extras, or with
    ``extras=None`` by the strategy's rule (``fresh``, one line), which is also how ``init`` starts
    from ``Problem.init``; ``train_of(state)``: the reference TrainState (laid out by
    ``train_sharding``), which ``gather`` reads and checkpoints save (portable: any strategy resumes
    it); ``extras_of(state)``: the rest, saved beside it for a bit-identical resume under the same
    strategy and mesh. ``step`` is fused over K steps, jitted, its state donated.
    """
    batch_sh = jax.sharding.NamedSharding(mesh, jax.P(None, axis))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    init = jax.jit(lambda key: from_train(problem.init(key), None), out_shardings=state_sharding)
    reference = jax.jit(train_of, out_shardings=train_sharding)

    def abstract(tree, shardings):  # ``shardings``: a tree prefix of ``tree``
        def laid_out(sharding, subtree):
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), subtree)

        return jax.tree.map(laid_out, shardings, tree)

    def target():
        return abstract(jax.eval_shape(problem.init, jax.random.key(0)), train_sharding)

    def extras():
        return abstract(extras_of(jax.eval_shape(init, jax.random.key(0))), extras_of(state_sharding))

    checkpointing = Checkpointing(
        target=target,
        save=reference,
        load=jax.jit(from_train, out_shardings=state_sharding),
        extras=extras,
        save_extras=extras_of,
        fresh=fresh,
    )
    return Strategy(
        name=name,
        layout=layout,
        devices=tuple(mesh.devices.flat),
        data_parallel=mesh.shape[axis],
        init=init,
        shard_batch=lambda batch: place_batch(batch, batch_sh),
        step=jax.jit(fuse_steps(step), out_shardings=(state_sharding, replicated), donate_argnums=0),
        gather=lambda state: to_host(reference(state)),
        checkpointing=checkpointing,
        mesh=mesh,
        batch_rows=lambda batch_size: rows_held(batch_sh, batch_size),
    )


def worker_update(problem: Problem, step, params_1x, opt_1x, batch) -> tuple[TrainState, jax.Array]:
    """One worker's own optimizer step inside a ``shard_map`` over the workers (local SGD, DiLoCo):
    its copy ``[1, ...]`` of the parameters and optimizer state, the gradient of the loss on its shard
    of the batch, no communication. Returns the worker's new TrainState (unstacked) and its loss."""
    params, opt_state = jax.tree.map(lambda x: x[0], (params_1x, opt_1x))
    loss, grads = problem.loss_and_grads(params, batch)
    return problem.apply_gradients(TrainState(step, params, opt_state), grads), loss


def broadcast_copies(tree: Any, copies: int) -> Any:
    """Every leaf stacked ``[copies, ...]``, each copy equal to it: the workers' copies of a state."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (copies, *x.shape)), tree)


def mean_of_copies(x: jax.Array) -> jax.Array:
    """A worker-stacked leaf ``[W, ...]`` -> the mean of the workers' copies, on device (traced: call
    it inside a jit). Computed as ``x_0 + mean_w (x_w - x_0)`` so that identical copies (right after
    averaging, or as `broadcast_copies` makes them) give that copy back exactly; an integer leaf (a
    counter, equal on every worker) is the first copy."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x[0]
    return x[0] + (x - x[0]).mean(0)


def data_allreduce(
    inp: CostInput, where: str = "gradients and loss (one fused all-reduce)"
) -> list[Collective]:
    """Data parallelism's one collective: every gradient and the loss, all-reduced over ``data``."""
    data = inp.mesh.get("data", 1)
    if data == 1:
        return []
    total = sum(local_bytes(p) for p in jax.tree.leaves(inp.params))
    return [Collective("all-reduce", "data", data, total + 4, where)]


def split_over_data(params, data: int, gathered: bool = True) -> tuple[int, int]:
    """``(full bytes of the parameters stored split over data, bytes of the others)`` per device
    (within its model group). With ``gathered=False`` every parameter counts as unsplit."""
    split = whole = 0
    for leaf in jax.tree.leaves(params):
        local = local_bytes(leaf)
        if gathered and "data" in tuple(getattr(leaf.sharding, "spec", ())):
            split += local * data
        else:
            whole += local
    return split, whole
