"""``pipeline``: inter-layer model parallelism with a GPipe microbatch schedule, in one ``jax.jit``.

Layout: ``W_l[D_l, F_l] on device stage(l), packed as P[S, Pmax] sharded over stage; In[B/M, D]
microbatches flow stage s -> s+1 (ppermute)``. Letters: S stages (one device each), M microbatches,
B the global batch, Pmax the parameter count of the largest stage.

The layers ``layer_0 .. layer_{L-1}`` are split into S contiguous stages (`assign_stages`: balanced by
kernel FLOPs, or given by ``parallel.stages``). The batch is split into M equal microbatches, and the
loss is the mean of the M microbatch means, which is the mean over the batch. The batch is
replicated over the stages (stage 0 reads x, the last stage y); ``data_parallel`` is 1.

Schedule (GPipe, `schedule`): M+S-1 ticks; at tick t stage s runs microbatch t-s if 0 <= t-s < M and
idles otherwise, then ``ppermute`` hands its output to stage s+1. The ticks are a ``lax.scan`` inside a
``shard_map`` over ``stage``; ``lax.switch`` on the stage index picks each device's layers (and an idle
branch in the bubble, so idle stages compute nothing). The backward pass is JAX's derivative of that
scan: the ticks in reverse, the transposed ``ppermute`` sending cotangents s+1 -> s, which is GPipe's
all-forward-then-all-backward schedule. Each stage idles S-1 of M+S-1 ticks in each direction, a
bubble fraction of (S-1)/(M+S-1) (`bubble_fraction`).

Why packing and padding: ``shard_map`` gives every device an equal block of one array, but stages of
a free-width net hold parameters of different shapes and counts. So each stage's kernels and biases
are raveled into one flat buffer, zero-padded to the largest stage, and stacked to P[S, Pmax] sharded
``P("stage")``: each device holds only its own stage. The optimizer state has the same packed layout.
No layer reads a padded entry, so its gradient is exactly zero and an elementwise optimizer (sgd,
momentum, adam, adamw, rmsprop, adagrad, lion) keeps it zero: updating the packed buffers is then the
reference update, and a global gradient norm (clipping) is the reference norm, summed over all stages
by the compiler. Optimizers with per-layer statistics (lamb's trust ratio) are refused. Activations
crossing a boundary are padded to the widest boundary for the same reason: ``ppermute`` needs one
shape. The gradient is ``jax.value_and_grad`` of the pipelined loss, and the optimizer runs in
`Problem.apply_gradients` on the packed buffers.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpjax.devices import make_mesh, mesh_axes
from bpjax.errors import UserError
from bpjax.models.mlp import ACTIVATIONS, layer_name
from bpjax.schema import Int, Ints
from bpjax.step import Problem, TrainState, fuse_steps
from bpjax.strategies.base import (
    Checkpointing,
    Collective,
    Cost,
    CostInput,
    Definition,
    Example,
    Strategy,
)

AXIS = "stage"
ELEMENTWISE = "sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad or lion"


# ------------------------------------------------------------------------------ stages and schedule


def assign_stages(
    widths_in_out: Sequence[tuple[int, int]], num_stages: int, explicit: Sequence[int] = ()
) -> list[list[int]]:
    """Split layers ``0 .. L-1`` (``widths_in_out[l] = (in, out)``) into ``num_stages`` contiguous stages.

    ``explicit`` gives the first layer of every stage but the first, e.g. ``(2,)``; empty, the split
    minimises the largest stage's kernel FLOPs (``sum in*out``; ties go to the earliest boundaries).
    Every stage gets at least one layer.

    >>> assign_stages([(40, 512), (512, 256), (256, 128), (128, 10)], 2)
    [[0, 1], [2, 3]]
    """
    num_layers = len(widths_in_out)
    if num_stages < 1:
        raise UserError(f"parallel.mesh.stage={num_stages} must be >= 1")
    if num_stages > num_layers:
        raise UserError(
            f"{num_stages} pipeline stages for a net of {num_layers} layers: every stage needs a layer; "
            f"set parallel.mesh.stage to at most {num_layers}"
        )
    if explicit:
        starts = [int(b) for b in explicit]
        if len(starts) != num_stages - 1:
            raise UserError(
                f"parallel.stages={tuple(starts)} makes {len(starts) + 1} stages but parallel.mesh.stage="
                f"{num_stages}; give {num_stages - 1} first-layer indices, or () to balance FLOPs"
            )
        bounds = [0, *starts, num_layers]
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise UserError(
                f"parallel.stages={tuple(starts)} must be strictly increasing layer indices in "
                f"1..{num_layers - 1} (the first layer of each stage after the first), or () to balance FLOPs"
            )
    else:
        bounds = _balanced_bounds([i * o for i, o in widths_in_out], num_stages)
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


def _balanced_bounds(flops: Sequence[int], num_stages: int) -> list[int]:
    """Stage boundaries ``[0, b_1, .., L]`` minimising the largest stage sum (dynamic programming)."""
    n = len(flops)
    prefix = np.concatenate([[0], np.cumsum(flops, dtype=np.int64)]).tolist()
    # best[k][i]: the smallest possible largest stage over the first i layers in k stages; cut: its last start.
    best = [[None] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    for i in range(1, n + 1):
        best[1][i] = prefix[i]
    for k in range(2, num_stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if best[k][i] is None or cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds = [n]
    for k in range(num_stages, 1, -1):
        bounds.append(cut[k][bounds[-1]])
    return [0, *reversed(bounds)]


def schedule(num_stages: int, num_microbatches: int) -> np.ndarray:
    """GPipe forward schedule ``[S, M+S-1]``: the microbatch stage s runs at tick t, or -1 when idle.

    >>> schedule(2, 3)
    array([[ 0,  1,  2, -1],
           [-1,  0,  1,  2]], dtype=int32)
    """
    s = np.arange(num_stages)[:, None]
    m = np.arange(num_microbatches + num_stages - 1)[None, :] - s
    return np.where((m >= 0) & (m < num_microbatches), m, -1).astype(np.int32)


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Share of stage-ticks idle in `schedule`; equals (S-1)/(M+S-1)."""
    return float(np.mean(schedule(num_stages, num_microbatches) < 0))


# ------------------------------------------------------------------------------------ packing


class _Slot(NamedTuple):
    layer: int
    name: str  # "kernel" or "bias"
    offset: int  # into the stage's flat buffer
    shape: tuple[int, ...]


def _slots(param_shapes: dict, stages: list[list[int]]) -> list[list[_Slot]]:
    """Where every parameter lives in its stage's flat buffer: kernel then bias, layer by layer."""
    out = []
    for stage in stages:
        slots, offset = [], 0
        for layer in stage:
            for name in ("kernel", "bias"):
                shape = tuple(param_shapes[layer_name(layer)][name].shape)
                slots.append(_Slot(layer, name, offset, shape))
                offset += int(np.prod(shape))
        out.append(slots)
    return out


def _stage_size(slots: list[_Slot]) -> int:
    return slots[-1].offset + int(np.prod(slots[-1].shape))


def _pack(params: dict, slots: list[list[_Slot]], pmax: int) -> jax.Array:
    """Reference params -> ``[S, Pmax]``, each row one stage, zero-padded."""
    rows = []
    for stage in slots:
        flat = jnp.concatenate([params[layer_name(s.layer)][s.name].ravel() for s in stage])
        rows.append(jnp.pad(flat, (0, pmax - flat.size)))
    return jnp.stack(rows)


def _unpack_stage(flat_P, slots: list[_Slot], first_layer: int = 0) -> dict:
    """One stage's flat buffer -> ``{"layer_i": {"kernel", "bias"}}`` named from ``layer - first_layer``."""
    params: dict = {}
    for s in slots:
        leaf = flat_P[s.offset : s.offset + int(np.prod(s.shape))].reshape(s.shape)
        params.setdefault(layer_name(s.layer - first_layer), {})[s.name] = leaf
    return params


def _unpack(packed_SxP, slots: list[list[_Slot]]) -> dict:
    """``[S, Pmax]`` -> the reference parameter tree (global layer names)."""
    params = {}
    for row, stage in zip(packed_SxP, slots, strict=True):
        params.update(_unpack_stage(row, stage))
    return params


def _is_elementwise(tx: optax.GradientTransformation) -> bool:
    """Whether ``tx`` updates a packed, zero-padded buffer exactly as it updates the parameter tree.

    A probe, since optax states do not say (lamb's trust-ratio state is an ``EmptyState``): two steps
    on two leaves of different scales, against the same two steps on their concatenation plus a padded
    zero. Global-norm clipping passes (the norm is the same); lamb and lars (a ratio per leaf) fail.
    """
    p = {"a": np.array([0.5, -2.0], np.float32), "b": np.array([30.0, -40.0, 7.0], np.float32)}
    g = {"a": np.array([0.1, 0.3], np.float32), "b": np.array([-0.2, 0.05, 0.4], np.float32)}
    pack = lambda t: np.concatenate([t["a"], t["b"], np.zeros(1, np.float32)])

    @jax.jit
    def two_steps(params, grads):
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params

    tree, packed = jax.device_get((two_steps(p, g), two_steps(pack(p), pack(g))))
    return packed[-1] == 0 and np.allclose(pack(tree)[:-1], packed[:-1], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------ the pipelined loss


def _pipelined_loss(
    problem: Problem,
    mesh: jax.sharding.Mesh,
    stages: list[list[int]],
    slots: list[list[_Slot]],
    pmax: int,
    num_microbatches: int,
) -> Callable[[jax.Array, dict], jax.Array]:
    """``(packed[S, Pmax], {"x": [B, D], "y": [B(, T)]}) -> mean loss`` through the GPipe schedule."""
    S, M = len(stages), num_microbatches
    model = problem.model
    widths = (problem.input_dim, *model.widths)  # layer l maps widths[l] -> widths[l + 1]
    act = ACTIVATIONS[model.activation]
    dtype = jnp.dtype(model.dtype)
    A = max((widths[stage[-1] + 1] for stage in stages[:-1]), default=1)  # widest boundary
    ticks_TxS = schedule(S, M).T

    def stage_branch(s: int):
        # The stage's layers are an MLP of their own (layer names from 0): the model's own apply, so
        # activation and dtype semantics are the reference's. Not the last stage: the activation that
        # the full MLP applies after this stage's last layer is applied here.
        first, last = stages[s][0], s == S - 1
        sub = dataclasses.replace(
            problem, model=model.clone(widths=tuple(widths[layer + 1] for layer in stages[s]))
        )

        def run(flat_P, h_bxA, x_bxD, y_b):
            params = _unpack_stage(flat_P, slots[s], first_layer=first)
            h = x_bxD if s == 0 else h_bxA[:, : widths[first]]
            if last:
                return jnp.zeros_like(h_bxA), sub.loss_fn(params, {"x": h, "y": y_b}).astype(jnp.float32)
            out = act(sub.model.apply({"params": params}, h)).astype(dtype)
            out = jnp.pad(out, ((0, 0), (0, A - out.shape[1])))
            return out, jnp.zeros_like(flat_P, shape=(), dtype=jnp.float32)

        return run

    def idle(flat_P, h_bxA, x_bxD, y_b):
        # zeros_like keeps the operands' "varies over stage" type, which all switch branches must share.
        return jnp.zeros_like(h_bxA), jnp.zeros_like(flat_P, shape=(), dtype=jnp.float32)

    branches = [stage_branch(s) for s in range(S)] + [idle]
    forward = [(i, i + 1) for i in range(S - 1)]

    def per_stage(packed_1xP, x_BxD, y_B):
        B = x_BxD.shape[0]
        assert packed_1xP.shape == (1, pmax), packed_1xP.shape
        _check_batch(B, M)
        flat_P = packed_1xP[0]
        x_MxbxD = x_BxD.reshape(M, B // M, *x_BxD.shape[1:])
        y_Mxb = y_B.reshape(M, B // M, *y_B.shape[1:])
        s = jax.lax.axis_index(AXIS)

        def tick(carry, microbatch_S):
            h_bxA, loss = carry
            m = microbatch_S[s]
            mc = jnp.maximum(m, 0)
            out_bxA, mb_loss = jax.lax.switch(
                jnp.where(m >= 0, s, S), branches, flat_P, h_bxA, x_MxbxD[mc], y_Mxb[mc]
            )
            if S > 1:
                out_bxA = jax.lax.ppermute(out_bxA, AXIS, forward)
            return (out_bxA, loss + mb_loss), None

        h0 = jnp.zeros_like(flat_P, shape=(B // M, A), dtype=dtype)
        loss0 = jnp.zeros_like(flat_P, shape=(), dtype=jnp.float32)
        (_, loss), _ = jax.lax.scan(tick, (h0, loss0), ticks_TxS)
        # Only the last stage added losses; the mean of the M equal-sized microbatch means.
        return jax.lax.psum(loss, AXIS) / M

    # Differentiated from outside: the gradient of the packed parameters, which vary over stage, is
    # each device's own; nothing is replicated that would need (or must not get) a pmean.

    mapped = jax.shard_map(per_stage, mesh=mesh, in_specs=(jax.P(AXIS), jax.P(), jax.P()), out_specs=jax.P())
    return lambda packed, batch: mapped(packed, batch["x"], batch["y"])


# ------------------------------------------------------------------------------------ the strategy


def _check_batch(batch_size: int, num_microbatches: int) -> None:
    b, m = batch_size, num_microbatches
    if b % m:
        raise UserError(
            f"train.batch_size={b} is not divisible by parallel.microbatches={m}; "
            f"use batch_size={max(b // m, 1) * m} or a divisor of {b} as microbatches"
        )


def _mesh_and_stages(problem: Problem, mesh_cfg, explicit: Sequence[int]):
    sizes = mesh_axes(dict(mesh_cfg), (AXIS,), "pipeline")
    mesh = make_mesh(sizes)
    widths = (problem.input_dim, *problem.model.widths)
    stages = assign_stages(list(itertools.pairwise(widths)), mesh.shape[AXIS], tuple(explicit))
    return mesh, stages


def make(problem: Problem, mesh: dict, *, microbatches: int, stages: tuple[int, ...]) -> Strategy:
    M = microbatches
    mesh, stages = _mesh_and_stages(problem, mesh, stages)
    ref_shapes = jax.eval_shape(problem.init, jax.random.key(0))
    if not _is_elementwise(problem.tx):
        raise UserError(
            "pipeline updates packed per-stage buffers, so the optimizer must act entry by entry and "
            f"lamb's per-layer trust ratio does not; use optimizer.name={ELEMENTWISE}, or keep lamb "
            "with the dp strategy"
        )
    slots = _slots(ref_shapes.params, stages)
    pmax = max(_stage_size(s) for s in slots)
    pipelined_loss = _pipelined_loss(problem, mesh, stages, slots, pmax, M)

    def train_step(state: TrainState, batch):
        loss, grads = jax.value_and_grad(pipelined_loss)(state.params, batch)
        return problem.apply_gradients(state, grads), {"loss": loss}

    def init(key):
        # The reference init, packed; the jit's out_shardings leave each device only its stage's rows.
        params = _pack(problem.init(key).params, slots, pmax)
        return TrainState(jnp.zeros((), jnp.int32), params, problem.tx.init(params))

    stage_sh = jax.sharding.NamedSharding(mesh, jax.P(AXIS))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    shapes = jax.eval_shape(init, jax.random.key(0))
    opt_sh = optax.tree_map_params(
        problem.tx, lambda _: stage_sh, shapes.opt_state, transform_non_params=lambda _: replicated
    )
    state_sh = TrainState(replicated, stage_sh, opt_sh)

    def shard_batch(batch):
        # Replicated over stages: stage 0 reads x, the last stage reads y.
        _check_batch(np.shape(batch["x"])[1], M)
        return jax.device_put(batch, replicated)

    def gather(state: TrainState) -> TrainState:
        unpack = lambda packed: _unpack(np.asarray(jax.device_get(packed)), slots)
        opt_state = optax.tree_map_params(
            problem.tx, unpack, state.opt_state, transform_non_params=lambda x: np.asarray(jax.device_get(x))
        )
        return TrainState(np.asarray(jax.device_get(state.step)), unpack(state.params), opt_state)

    sizes = "+".join(str(len(s)) for s in stages)
    init = jax.jit(init, out_shardings=state_sh)
    return Strategy(
        name="pipeline",
        layout=(
            f"layers split {sizes} over stage: W_l[D_l, F_l] on device stage(l), packed P[S, Pmax]; "
            f"In[B/M, D] microbatches (M={M}) flow stage s -> s+1 (ppermute)"
        ),
        devices=tuple(mesh.devices.flat),
        data_parallel=1,
        init=init,
        shard_batch=shard_batch,
        step=jax.jit(fuse_steps(train_step), out_shardings=(state_sh, replicated), donate_argnums=0),
        gather=gather,
        checkpointing=Checkpointing(lambda: jax.eval_shape(init, jax.random.key(0))),
        mesh=mesh,
    )


# ------------------------------------------------------------------------------ what plan and viz read


def _layer_stages(problem: Problem, settings, num_stages: int) -> list[list[int]]:
    widths = (problem.input_dim, *problem.model.widths)
    return assign_stages(list(itertools.pairwise(widths)), num_stages, tuple(settings.stages))


def placement(problem: Problem, strategy: Strategy, settings):
    """Each layer whole on its stage's device."""
    stages = _layer_stages(problem, settings, strategy.num_devices)
    where = {i: strategy.devices[s] for s, layers in enumerate(stages) for i in layers}
    shapes = jax.eval_shape(problem.init, jax.random.key(0)).params
    return {
        layer_name(i): {k: jax.sharding.SingleDeviceSharding(device) for k in shapes[layer_name(i)]}
        for i, device in where.items()
    }


def cost(inp: CostInput) -> Cost:
    """Activations cross stages once per tick each way; the loss is summed from the last stage."""
    stages = _layer_stages(inp.problem, inp.settings, inp.strategy.num_devices)
    S, M, widths = len(stages), inp.settings.microbatches, inp.widths
    notes = [
        f"{M + S - 1} ticks each way, a bubble of (S-1)/(M+S-1) = {(S - 1) / (M + S - 1):.2f}; activations "
        f"cross stages padded to the widest boundary; parameters per device are the largest stage, padded "
        "(see state as stored)"
    ]
    if S == 1:
        return Cost([], notes)
    widest = max(widths[members[-1] + 1] for members in stages[:-1])
    tick = inp.batch_size // M * widest * inp.act_itemsize
    return Cost(
        [
            Collective(
                "collective-permute", AXIS, 2, tick, "activations, stage s -> s+1, every tick", M + S - 1
            ),
            Collective(
                "collective-permute", AXIS, 2, tick, "gradients, stage s+1 -> s, every tick", M + S - 1
            ),
            Collective("all-reduce", AXIS, S, 4, "loss (summed from the last stage)"),
        ],
        notes,
    )


def check(config) -> None:
    _check_batch(config.train.batch_size, config.parallel.microbatches)


DEFINITION = Definition(
    name="pipeline",
    summary="inter-layer model parallelism: contiguous stages, one per device, GPipe microbatches",
    layout="W_l[D_l, F_l] on device stage(l), packed P[S, Pmax]; In[B/M, D] microbatches flow stage s -> s+1",
    make=make,
    axes=(AXIS,),
    settings={
        "microbatches": Int(1, "microbatches M per step (M=1: plain layer-wise model parallelism)", min=1),
        "stages": Ints(
            (),
            "first layer of every stage but the first, e.g. (2,); () balances kernel FLOPs",
            min=1,
            note="layer indices",
        ),
    },
    cost=cost,
    placement=placement,
    examples=(
        Example({"stage": 4}, {"microbatches": 4}),
        Example({"stage": 4}),
        Example({"stage": 2}, {"microbatches": 4}),
        Example({"stage": 2}),
        Example({"stage": 1}),
    ),
    shards_parameters=True,
    check=check,
    timeline=lambda settings, num_devices: schedule(num_devices, settings.microbatches),
)


# ----------------------------------------------------------------------------------- measurement


def measure_bubble(
    problem: Problem,
    parallel,
    microbatch_size: int = 64,
    microbatches: Sequence[int] = (1, 2, 4, 8, 16),
    repeats: int = 5,
    seed: int = 0,
) -> list[dict]:
    """Time the compiled forward-backward (no optimizer) for several M at a fixed microbatch size.

    Fits ``seconds = a + b*M`` over the M's: b is the time a microbatch adds (one tick of the slowest
    stage, forward and backward) and a the fixed cost, ideally S-1 bubble ticks (plus dispatch). Per M
    it reports the measured bubble ``1 - M*b / seconds`` beside (S-1)/(M+S-1) and ``idle_ticks = a/b``
    (ideally S-1).

    What this measures depends on the host. Idle stages take the empty branch, so they wait rather
    than compute; the bubble shows as time only where each stage has compute of its own (one
    accelerator per stage). Simulated CPU devices share the host's cores, and XLA already spreads one
    device's work over all of them, so on a small host the time tracks the total work and the fitted
    bubble is ~0 within noise: that host pays no compute for the bubble, and gains nothing from stages.
    """
    if len(set(microbatches)) < 2:
        raise ValueError(
            f"measure_bubble fits a line through the times; give two or more M, got {microbatches}"
        )
    mesh, stages = _mesh_and_stages(problem, parallel.mesh, parallel.stages)
    S = len(stages)
    params = jax.eval_shape(problem.init, jax.random.key(0)).params
    slots = _slots(params, stages)
    pmax = max(_stage_size(s) for s in slots)
    packed = jax.jit(
        lambda k: _pack(problem.init(k).params, slots, pmax),
        out_shardings=jax.sharding.NamedSharding(mesh, jax.P(AXIS)),
    )(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    seconds = []
    for M in microbatches:
        B = M * microbatch_size
        x = rng.standard_normal((B, problem.input_dim), dtype=np.float32)
        outputs = problem.model.widths[-1]
        if problem.loss == "cross_entropy":
            y = rng.integers(0, outputs, B).astype(np.int32)
        else:
            y = rng.standard_normal((B, outputs), dtype=np.float32)
        batch = jax.device_put({"x": x, "y": y}, replicated)
        loss = _pipelined_loss(problem, mesh, stages, slots, pmax, M)
        fwd_bwd = jax.jit(jax.value_and_grad(loss)).lower(packed, batch).compile()
        jax.block_until_ready(fwd_bwd(packed, batch))
        best = np.inf
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fwd_bwd(packed, batch))  # one call in flight at a time (CPU collectives)
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
    ms = np.asarray(microbatches, np.float64)
    b, a = np.polyfit(ms, np.asarray(seconds), 1)
    return [
        {
            "stages": S,
            "microbatches": int(M),
            "seconds": t,
            "measured_bubble": float(1 - M * b / t),
            "formula_bubble": (S - 1) / (M + S - 1),
            "idle_ticks": float(a / b),
        }
        for M, t in zip(microbatches, seconds, strict=True)
    ]
