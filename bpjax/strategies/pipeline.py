"""``pipeline``: inter-layer model parallelism with microbatch schedules, in one ``jax.jit``.

Layout: ``W_l[D_l, F_l] on device stage(l), packed as P[S, Pmax] sharded over stage; In[B/M, D]
microbatches flow stage s -> s+1 (ppermute)``. Letters: S stages (one device each), M microbatches,
B the global batch, Pmax the parameter count of the largest stage, v chunks per device (interleaved).

The layers ``layer_0 .. layer_{L-1}`` are split into S contiguous stages (`assign_stages`: balanced by
kernel FLOPs, or given by ``parallel.stages``); the interleaved schedule splits them into S*v chunks
and puts chunks d, d+S, d+2S, ... on device d. The batch is split into M equal microbatches, and the
loss is the mean of the M microbatch means, which is the mean over the batch. The batch is
replicated over the stages (stage 0 reads x, the last stage y); ``data_parallel`` is 1.

Schedules (``parallel.schedule``; the tables are plain data in `bpjax.strategies.schedules`):

- ``gpipe`` (the default, `schedule`): M+S-1 ticks; at tick t stage s runs microbatch t-s if
  0 <= t-s < M and idles otherwise, then ``ppermute`` hands its output to stage s+1. The ticks are a
  ``lax.scan`` inside a ``shard_map`` over ``stage``; ``lax.switch`` on the stage index picks each
  device's layers (and an idle branch in the bubble, so idle stages compute nothing). The backward
  pass is JAX's derivative of that scan: the ticks in reverse, the transposed ``ppermute`` sending
  cotangents s+1 -> s, which is GPipe's all-forward-then-all-backward schedule. Each stage idles S-1
  of M+S-1 ticks in each direction, a bubble fraction of (S-1)/(M+S-1) (`bubble_fraction`); each
  keeps the activations of all M microbatches for its backward.
- ``1f1b``, ``interleaved``, ``zero_bubble``: one SPMD program that follows the schedule's table
  (`_scheduled_grads`): a ``lax.scan`` over its ticks in a ``shard_map`` over ``stage``, where
  ``lax.switch`` runs this device's action at this tick, with the forward and the backward written
  out per tick: F stores each layer's pre-activation in the microbatch's slot of a per-device buffer
  (as many slots as the table's peak: at most S for 1f1b, where gpipe needs M), and a backward takes
  ``jax.vjp`` of each layer at the stored values for the input cotangent (B) and the weight gradient
  (W), or both at once (BW). After each tick one ``ppermute`` moves activations to the next chunk's
  device and one moves cotangents back (both every tick, round a ring for interleaved). The weight
  gradients add up in each device's packed row. 1f1b (PipeDream-Flush) has gpipe's bubble with at
  most S microbatches held; interleaved shrinks the bubble by v; zero_bubble (ZB-H1) splits the
  backward into B and W and fills the bubble with W's (`schedules` gives the tables, ticks and idle
  shares; `activation_bytes` what each schedule keeps).

Why packing and padding: ``shard_map`` gives every device an equal block of one array, but stages of
a free-width net hold parameters of different shapes and counts. So each stage's kernels and biases
(an interleaved device's chunks, one after the other) are raveled into one flat buffer, zero-padded
to the largest stage, and stacked to P[S, Pmax] sharded ``P("stage")``: each device holds only its
own stage. The optimizer state has the same packed layout. No layer reads a padded entry, so its
gradient is exactly zero and an elementwise optimizer (sgd, momentum, adam, adamw, rmsprop, adagrad,
lion) keeps it zero: updating the packed buffers is then the reference update, and a global gradient
norm (clipping) is the reference norm, summed over all stages by the compiler. Optimizers with
per-layer statistics (lamb's trust ratio) are refused. Activations crossing a boundary are padded to
the widest boundary for the same reason: ``ppermute`` needs one shape. The gradient is
``jax.value_and_grad`` of the pipelined loss (gpipe) or the scheduled engine's accumulated weight
gradients, and the optimizer runs in `Problem.apply_gradients` on the packed buffers.
"""

from __future__ import annotations

import dataclasses
import functools
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
from bpjax.schema import Choice, Int, Ints
from bpjax.step import Problem, TrainState, fuse_steps
from bpjax.strategies import schedules
from bpjax.strategies.base import (
    Checkpointing,
    Collective,
    Cost,
    CostInput,
    Definition,
    Example,
    Strategy,
    place_batch,
    to_host,
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
                return jnp.zeros_like(h_bxA), sub.loss_fn(params, {"x": h, "y": y_b}).astype(
                    problem.loss_dtype
                )
            out = act(sub.model.apply({"params": params}, h)).astype(dtype)
            out = jnp.pad(out, ((0, 0), (0, A - out.shape[1])))
            return out, jnp.zeros_like(flat_P, shape=(), dtype=problem.loss_dtype)

        return run

    def idle(flat_P, h_bxA, x_bxD, y_b):
        # zeros_like keeps the operands' "varies over stage" type, which all switch branches must share.
        return jnp.zeros_like(h_bxA), jnp.zeros_like(flat_P, shape=(), dtype=problem.loss_dtype)

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
        loss0 = jnp.zeros_like(flat_P, shape=(), dtype=problem.loss_dtype)
        (_, loss), _ = jax.lax.scan(tick, (h0, loss0), ticks_TxS)
        # Only the last stage added losses; the mean of the M equal-sized microbatch means.
        return jax.lax.psum(loss, AXIS) / M

    # Differentiated from outside: the gradient of the packed parameters, which vary over stage, is
    # each device's own; nothing is replicated that would need (or must not get) a pmean.

    mapped = jax.shard_map(per_stage, mesh=mesh, in_specs=(jax.P(AXIS), jax.P(), jax.P()), out_specs=jax.P())
    return lambda packed, batch: mapped(packed, batch["x"], batch["y"])


# ------------------------------------------------------------------------ the scheduled engine


class _Chunk(NamedTuple):
    layers: list[int]
    params: list[_Slot]  # its parameters' places in its device's flat buffer
    start: int  # its parameters' span in that buffer
    end: int


def _chunks_on_devices(chunks: list[list[int]], slots: list[list[_Slot]]) -> list[_Chunk]:
    """Chunk c (on device c % S) with its parameters' places in that device's packed row."""
    out = []
    for c, layers in enumerate(chunks):
        params = [s for s in slots[c % len(slots)] if s.layer in layers]
        out.append(_Chunk(layers, params, params[0].offset, _stage_size(params)))
    return out


def _scheduled_grads(
    problem: Problem,
    mesh: jax.sharding.Mesh,
    chunks: list[list[int]],
    slots: list[list[_Slot]],
    pmax: int,
    table: schedules.Table,
) -> Callable[[jax.Array, dict], tuple[jax.Array, jax.Array]]:
    """``(packed[S, Pmax], batch) -> (mean loss, gradients[S, Pmax])`` following ``table`` tick by tick.

    One ``shard_map`` over ``stage``; a ``lax.scan`` over the table's ticks; each tick ``lax.switch``
    runs this device's action (`schedules`): F stores the chunk's pre-activations z_l (and keeps the
    arrived input) in the microbatch's buffer slot, B/BW/W take ``jax.vjp`` of each layer at the
    stored values (the layer's input is the chunk's input or act(z_{l-1})): B gives the input
    cotangent and stores each layer's output cotangent for W, W the weight gradient, BW both. Only
    elementwise recomputation (act(z)); a vjp's own primal matmul is unused and removed by the
    compiler. Then one ``ppermute`` moves activations to the next chunk's device and one moves
    cotangents back, written into the receiving slot the table names. The weight gradients add up in
    the device's packed row; the loss is the mean of the microbatch means (seed 1/M on each).
    """
    S, M, C = table.stages, table.microbatches, table.chunks
    model = problem.model
    widths = (problem.input_dim, *model.widths)
    num_layers = len(model.widths)
    act = ACTIVATIONS[model.activation]
    dtype = jnp.dtype(model.dtype)
    A = max((widths[layers[-1] + 1] for layers in chunks[:-1]), default=1)  # widest boundary
    placed = _chunks_on_devices(chunks, slots)
    head = dataclasses.replace(problem, model=model.clone(widths=()))  # the loss of given outputs
    dense = [model.clone(widths=(widths[layer + 1],)) for layer in range(num_layers)]  # one layer each
    K = table.num_slots  # buffer slots per device: the table's peak of microbatches held
    split = table.split

    kinds = [
        schedules.FORWARD,
        *((schedules.INPUT_GRAD, schedules.WEIGHT_GRAD) if split else (schedules.BACKWARD,)),
    ]
    index = {(k, c): 1 + i * C + c for i, k in enumerate(kinds) for c in range(C)}  # 0: idle
    branch_SxT = np.zeros(table.kind.shape, np.int32)
    for (k, c), i in index.items():
        branch_SxT[(table.kind == k) & (table.chunk == c)] = i
    # Scanned over ticks: [T, S] each, this device's column read inside.
    cols = tuple(
        jnp.asarray(a.T)
        for a in (branch_SxT, table.micro, table.slot, table.recv_forward, table.recv_backward)
    )
    if S == 1:
        forward = backward = None
    elif table.virtual_stages > 1:  # chunk c+1 is on the next device, round the ring
        forward = [(i, (i + 1) % S) for i in range(S)]
        backward = [(i, (i - 1) % S) for i in range(S)]
    else:
        forward = [(i, i + 1) for i in range(S - 1)]
        backward = [(i + 1, i) for i in range(S - 1)]

    def layer_params(flat_P, chunk: _Chunk, layer: int) -> dict:
        return _unpack_stage(flat_P, [s for s in chunk.params if s.layer == layer], first_layer=layer)

    def apply(layer: int, params, h):
        return dense[layer].apply({"params": params}, h)

    def per_device(packed_1xP, x_BxD, y_B):
        B = x_BxD.shape[0]
        _check_batch(B, M)
        b = B // M
        flat_P = packed_1xP[0]
        x_MxbxD = x_BxD.reshape(M, b, *x_BxD.shape[1:])
        y_Mxb = y_B.reshape(M, b, *y_B.shape[1:])
        sizes = [[b * widths[layer + 1] for layer in chunk.layers] for chunk in placed]
        zmax = max(sum(s) for s in sizes)
        zeros = lambda shape, dt=dtype: jnp.zeros_like(flat_P, shape=shape, dtype=dt)  # varies over stage
        no_grad = lambda: zeros((pmax,), flat_P.dtype)
        no_loss = lambda: zeros((), problem.loss_dtype)

        def unpack_z(c: int, row) -> list:
            out, at = [], 0
            for layer, n in zip(placed[c].layers, sizes[c], strict=True):
                out.append(row[at : at + n].reshape(b, widths[layer + 1]))
                at += n
            return out

        def pack_z(zs: list) -> jax.Array:
            flat = jnp.concatenate([z.astype(dtype).ravel() for z in zs])
            return jnp.pad(flat, (0, zmax - flat.size))

        def inputs(c: int, h_bxA, x_bxD, zs) -> list:
            """Each layer's input: the chunk's (x for chunk 0), then act of the previous z."""
            first = placed[c].layers[0]
            return [x_bxD if c == 0 else h_bxA[:, : widths[first]]] + [act(z) for z in zs[:-1]]

        def grad_row(c: int, grads: dict) -> jax.Array:
            chunk = placed[c]
            flat = jnp.concatenate([grads[s.layer][s.name].ravel() for s in chunk.params])
            return jnp.pad(flat.astype(flat_P.dtype), (chunk.start, pmax - chunk.end))

        def forward_branch(c: int):
            def run(flat_P, h_bxA, g_bxA, z_row, dz_row, x_bxD, y_b):
                chunk = placed[c]
                h, zs = x_bxD if c == 0 else h_bxA[:, : widths[chunk.layers[0]]], []
                for layer in chunk.layers:
                    zs.append(apply(layer, layer_params(flat_P, chunk, layer), h))
                    if layer < num_layers - 1:
                        h = act(zs[-1])
                if c == C - 1:
                    loss = head.loss_fn({}, {"x": zs[-1], "y": y_b}).astype(problem.loss_dtype)
                    send = jnp.zeros_like(h_bxA)
                else:
                    loss = no_loss()
                    send = jnp.pad(h.astype(dtype), ((0, 0), (0, A - h.shape[1])))
                return pack_z(zs), dz_row, send, jnp.zeros_like(g_bxA), no_grad(), loss

            return run

        def backward_branch(c: int, kind: int):
            weights = kind in (schedules.BACKWARD, schedules.WEIGHT_GRAD)
            cotangents = kind in (schedules.BACKWARD, schedules.INPUT_GRAD)

            def run(flat_P, h_bxA, g_bxA, z_row, dz_row, x_bxD, y_b):
                chunk = placed[c]
                zs = unpack_z(c, z_row)
                hs = inputs(c, h_bxA, x_bxD, zs)
                n = len(chunk.layers)
                if kind == schedules.WEIGHT_GRAD:
                    dzs = unpack_z(c, dz_row)
                elif c == C - 1:  # the loss: seed 1/M, the mean of M microbatch means
                    loss, vjp = jax.vjp(lambda z: head.loss_fn({}, {"x": z, "y": y_b}), zs[-1])
                    dzs = [None] * (n - 1) + [vjp(jnp.full_like(loss, 1 / M))[0]]
                else:  # the cotangent of act(z) that arrived from the next chunk
                    last = chunk.layers[-1]
                    vjp = jax.vjp(act, zs[-1])[1]
                    dzs = [None] * (n - 1) + [vjp(g_bxA[:, : widths[last + 1]].astype(dtype))[0]]
                grads, send = {}, jnp.zeros_like(g_bxA)
                for i in reversed(range(n)):
                    layer = chunk.layers[i]
                    params = layer_params(flat_P, chunk, layer)
                    need_input = cotangents and (i > 0 or c > 0)
                    f = functools.partial(apply, layer)
                    if weights and need_input:
                        dp, dh = jax.vjp(f, params, hs[i])[1](dzs[i])
                    elif weights:
                        (dp,) = jax.vjp(lambda p: f(p, hs[i]), params)[1](dzs[i])  # noqa: B023
                    elif need_input:
                        (dh,) = jax.vjp(lambda h: f(params, h), hs[i])[1](dzs[i])  # noqa: B023
                    if weights:
                        grads[layer] = dp["layer_0"]
                    if need_input and i > 0:
                        dzs[i - 1] = jax.vjp(act, zs[i - 1])[1](dh)[0]
                    elif need_input:
                        send = jnp.pad(dh.astype(dtype), ((0, 0), (0, A - dh.shape[1])))
                grad = grad_row(c, grads) if weights else no_grad()
                if kind == schedules.INPUT_GRAD:
                    dz_row = pack_z(dzs)
                return z_row, dz_row, jnp.zeros_like(h_bxA), send, grad, no_loss()

            return run

        def idle(flat_P, h_bxA, g_bxA, z_row, dz_row, x_bxD, y_b):
            return z_row, dz_row, jnp.zeros_like(h_bxA), jnp.zeros_like(g_bxA), no_grad(), no_loss()

        branches = [idle] + [
            forward_branch(c) if k == schedules.FORWARD else backward_branch(c, k)
            for k in kinds
            for c in range(C)
        ]
        d = jax.lax.axis_index(AXIS)

        def tick(carry, cols_t):
            H, G, Z, DZ, grads, loss = carry
            branch, m, slot, recv_f, recv_b = (col[d] for col in cols_t)
            slot, mc = jnp.maximum(slot, 0), jnp.maximum(m, 0)  # idle: slot 0, given back unchanged
            z_row, dz_row, send_f, send_b, grad, mb_loss = jax.lax.switch(
                branch, branches, flat_P, H[slot], G[slot], Z[slot], DZ[slot], x_MxbxD[mc], y_Mxb[mc]
            )
            Z, DZ = Z.at[slot].set(z_row), DZ.at[slot].set(dz_row)
            if S > 1:
                send_f = jax.lax.ppermute(send_f, AXIS, forward)
                send_b = jax.lax.ppermute(send_b, AXIS, backward)
            # What arrived goes into the slot the table names; nothing arrived (-1): slots unchanged.
            at_f, at_b = jnp.maximum(recv_f, 0), jnp.maximum(recv_b, 0)
            H = H.at[at_f].set(jnp.where(recv_f >= 0, send_f, H[at_f]))
            G = G.at[at_b].set(jnp.where(recv_b >= 0, send_b, G[at_b]))
            return (H, G, Z, DZ, grads + grad, loss + mb_loss), None

        carry = (
            zeros((K, b, A)),  # inputs that arrived (chunk 0 reads x)
            zeros((K, b, A)),  # output cotangents that arrived
            zeros((K, zmax)),  # each layer's pre-activation z
            zeros((K, zmax if split else 1)),  # each layer's output cotangent, from B to W
            no_grad(),
            no_loss(),
        )
        (*_, grads, loss), _ = jax.lax.scan(tick, carry, cols)
        # Only the last chunk's device added losses; the mean of the M equal-sized microbatch means.
        return grads[None], jax.lax.psum(loss, AXIS) / M

    mapped = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(jax.P(AXIS), jax.P(), jax.P()),
        out_specs=(jax.P(AXIS), jax.P()),
    )

    def loss_and_grads(packed, batch):
        grads, loss = mapped(packed, batch["x"], batch["y"])
        return loss, grads

    return loss_and_grads


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


def _check_schedule(schedule: str, virtual_stages: int) -> None:
    """The settings' combinations, before anything is built (one-line errors naming the fix)."""
    v = virtual_stages
    if schedule == "interleaved" and v < 2:
        raise UserError(
            f"parallel.schedule=interleaved puts parallel.virtual_stages >= 2 chunks of layers on each "
            f"device, got virtual_stages={v}; set parallel.virtual_stages=2, or use parallel.schedule=1f1b"
        )
    if schedule != "interleaved" and v != 1:
        raise UserError(
            f"parallel.virtual_stages={v} is for parallel.schedule=interleaved, not {schedule}; set "
            "parallel.schedule=interleaved, or parallel.virtual_stages=1"
        )


def _chunk_layers(
    widths: Sequence[int], num_stages: int, explicit: Sequence[int], virtual_stages: int = 1
) -> tuple[list[list[int]], list[list[int]]]:
    """``(chunks, rows)``: the S*v contiguous chunks of layers (chunk c on device c % S; with v = 1 the
    stages), and each device's layers (its chunks in order), which its packed row holds."""
    S, v, num_layers = num_stages, virtual_stages, len(widths) - 1
    if v > 1 and S * v > num_layers:
        fix = (
            f"set parallel.virtual_stages={num_layers // S}"
            if num_layers // S >= 2
            else f"set parallel.mesh.stage={max(num_layers // v, 1)}"
        )
        raise UserError(
            f"parallel.schedule=interleaved cuts the net into parallel.mesh.stage x parallel.virtual_stages"
            f" = {S} x {v} = {S * v} chunks, but it has {num_layers} layers and every chunk needs one; "
            f"{fix}, or use parallel.schedule=1f1b"
        )
    if v > 1 and explicit and len(explicit) != S * v - 1:
        raise UserError(
            f"parallel.stages={tuple(explicit)} makes {len(explicit) + 1} chunks but interleaved needs "
            f"parallel.mesh.stage x parallel.virtual_stages = {S * v}; give {S * v - 1} first-layer "
            "indices, or () to balance FLOPs"
        )
    chunks = assign_stages(list(itertools.pairwise(widths)), S * v, tuple(explicit))
    return chunks, [[layer for c in range(d, S * v, S) for layer in chunks[c]] for d in range(S)]


def make(
    problem: Problem,
    mesh: dict,
    *,
    microbatches: int,
    stages: tuple[int, ...],
    schedule: str,
    virtual_stages: int,
) -> Strategy:
    M = microbatches
    _check_schedule(schedule, virtual_stages)
    mesh = make_mesh(mesh_axes(dict(mesh), (AXIS,), "pipeline"))
    S = mesh.shape[AXIS]
    widths = (problem.input_dim, *problem.model.widths)
    chunks, rows = _chunk_layers(widths, S, stages, virtual_stages)
    ref_shapes = jax.eval_shape(problem.init, jax.random.key(0))
    if not _is_elementwise(problem.tx):
        raise UserError(
            "pipeline updates packed per-stage buffers, so the optimizer must act entry by entry and "
            f"lamb's per-layer trust ratio does not; use optimizer.name={ELEMENTWISE}, or keep lamb "
            "with the dp strategy"
        )
    slots = _slots(ref_shapes.params, rows)
    pmax = max(_stage_size(s) for s in slots)
    if schedule == "gpipe":
        # GPipe as JAX's derivative of the forward scan (bit for bit the original engine).
        pipelined_loss = _pipelined_loss(problem, mesh, rows, slots, pmax, M)
        loss_and_grads = jax.value_and_grad(pipelined_loss)
    else:
        table = schedules.build(schedule, S, M, virtual_stages)
        loss_and_grads = _scheduled_grads(problem, mesh, chunks, slots, pmax, table)

    def train_step(state: TrainState, batch):
        loss, grads = loss_and_grads(state.params, batch)
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
        # Replicated over stages: stage 0 reads x, the last stage reads y (every process holds all rows).
        _check_batch(np.shape(batch["x"])[1], M)
        return place_batch(batch, replicated)

    def gather(state: TrainState) -> TrainState:
        host = to_host(state)  # across processes, the stages' rows are all-gathered
        unpack = lambda packed: _unpack(packed, slots)
        opt_state = optax.tree_map_params(
            problem.tx, unpack, host.opt_state, transform_non_params=lambda x: x
        )
        return TrainState(host.step, unpack(host.params), opt_state)

    # Portable checkpoints: saved as the reference TrainState (each layer's arrays whole), so that any
    # portable strategy resumes a pipeline run, and a pipeline resumes theirs, whatever the stages.
    whole_params = lambda tree: isinstance(tree, dict) and layer_name(0) in tree  # noqa: E731

    def to_reference(state: TrainState) -> TrainState:
        unpack = lambda packed: _unpack(packed, slots)
        opt_state = optax.tree_map_params(
            problem.tx, unpack, state.opt_state, transform_non_params=lambda x: x
        )
        return TrainState(state.step, unpack(state.params), opt_state)

    def from_reference(tree: TrainState) -> TrainState:
        pack = lambda params: _pack(params, slots, pmax)
        opt_state = optax.tree_map_params(
            problem.tx, pack, tree.opt_state, transform_non_params=lambda x: x, is_leaf=whole_params
        )
        return TrainState(tree.step, pack(tree.params), opt_state)

    def reference_target():
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
            jax.eval_shape(problem.init, jax.random.key(0)),
        )

    checkpointing = Checkpointing(
        target=reference_target,
        save=jax.jit(to_reference, out_shardings=replicated),
        load=jax.jit(from_reference, out_shardings=state_sh),
    )

    sizes = "+".join(str(len(c)) for c in chunks)
    if virtual_stages > 1:
        where = f"layers split {sizes} into {len(chunks)} chunks, chunk c on device c % {S}"
        flow = "chunk c -> c+1 (ppermute round the ring)"
    else:
        where, flow = f"layers split {sizes} over stage", "stage s -> s+1 (ppermute)"
    init = jax.jit(init, out_shardings=state_sh)
    return Strategy(
        name="pipeline",
        layout=(
            f"{where}: W_l[D_l, F_l] on device stage(l), packed P[S, Pmax]; "
            f"In[B/M, D] microbatches (M={M}, {schedule}) flow {flow}"
        ),
        devices=tuple(mesh.devices.flat),
        data_parallel=1,
        init=init,
        shard_batch=shard_batch,
        step=jax.jit(fuse_steps(train_step), out_shardings=(state_sh, replicated), donate_argnums=0),
        gather=gather,
        checkpointing=checkpointing,
        mesh=mesh,
    )


# ------------------------------------------------------------------------------ what plan and viz read


def _layout(problem: Problem, settings, num_stages: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(chunks, rows)`` of `_chunk_layers` for a ``parallel`` config section."""
    widths = (problem.input_dim, *problem.model.widths)
    return _chunk_layers(widths, num_stages, tuple(settings.stages), settings.virtual_stages)


def _table(settings, num_stages: int) -> schedules.Table:
    return schedules.build(settings.schedule, num_stages, settings.microbatches, settings.virtual_stages)


def placement(problem: Problem, strategy: Strategy, settings):
    """Each layer whole on its chunk's device (its stage's, without interleaving)."""
    S = strategy.num_devices
    chunks, _ = _layout(problem, settings, S)
    where = {i: strategy.devices[c % S] for c, layers in enumerate(chunks) for i in layers}
    shapes = jax.eval_shape(problem.init, jax.random.key(0)).params
    return {
        layer_name(i): {k: jax.sharding.SingleDeviceSharding(device) for k in shapes[layer_name(i)]}
        for i, device in sorted(where.items())
    }


def activation_bytes(inp: CostInput) -> dict[str, int]:
    """Per layer, the bytes of its activations its device keeps for the backward pass at the device's
    peak under the schedule: the layer's output for each microbatch of that chunk held then
    (`schedules.Table.occupancy`), ``held x B/M x width x itemsize``, twice that for zero_bubble (which
    keeps each layer's output cotangent from B to W too). gpipe holds all M microbatches, so a layer
    keeps ``B x width``; 1f1b at most S of them. Not counted: the buffers of arrived inputs and
    cotangents (one microbatch each per slot, at the widest boundary)."""
    S = inp.strategy.num_devices
    chunks, _ = _layout(inp.problem, inp.settings, S)
    table = _table(inp.settings, S)
    b = inp.batch_size // inp.settings.microbatches
    factor = 2 if table.split else 1
    per_chunk = [b * sum(inp.widths[i + 1] for i in layers) * inp.act_itemsize * factor for layers in chunks]
    held = table.occupancy()  # [C, 2T]
    out = {}
    for d in range(S):
        mine = list(range(d, len(chunks), S))
        total = sum(held[c] * per_chunk[c] for c in mine)
        peak = int(np.argmax(total))
        for c in mine:
            for i in chunks[c]:
                out[layer_name(i)] = int(held[c, peak]) * b * inp.widths[i + 1] * inp.act_itemsize * factor
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].split("_")[1])))


def cost(inp: CostInput) -> Cost:
    """Activations cross stages once per tick each way; the loss is summed from the last stage."""
    S, M, widths = inp.strategy.num_devices, inp.settings.microbatches, inp.widths
    chunks, rows = _layout(inp.problem, inp.settings, S)
    table = _table(inp.settings, S)
    name = inp.settings.schedule
    acts = activation_bytes(inp)  # also the plan's per-layer activation bytes (Cost.activations)
    busiest = max(sum(acts[layer_name(i)] for i in row) for row in rows)
    held = "microbatch-chunks" if table.virtual_stages > 1 else "microbatches"
    notes = [
        f"{name}: {table.ticks} ticks, {table.idle_fraction:.2f} of device-ticks idle (in lockstep time, "
        f"a BW twice an F, B or W: {table.idle_time_fraction:.2f}); activations kept for the backward: up "
        f"to {table.num_slots} {held} of M={M} per device, {busiest:,} bytes on the busiest "
        "(activation_bytes)",
        "activations cross stages padded to the widest boundary; parameters per device are the largest "
        "stage, padded (see state as stored)",
    ]
    if name == "gpipe":
        notes[0] = (
            f"{M + S - 1} ticks each way, a bubble of (S-1)/(M+S-1) = {(S - 1) / (M + S - 1):.2f}; "
            + notes[0]
        )
    if S == 1:
        return Cost([], notes, acts)
    widest = max(widths[members[-1] + 1] for members in chunks[:-1])
    tick = inp.batch_size // M * widest * inp.act_itemsize
    # gpipe's forward scan permutes once a tick and its derivative once a reverse tick; the scheduled
    # engine permutes both ways every tick of its table.
    count = M + S - 1 if name == "gpipe" else table.ticks
    ring = ", round the ring" if table.virtual_stages > 1 else ""
    return Cost(
        [
            Collective(
                "collective-permute", AXIS, 2, tick, f"activations, stage s -> s+1{ring}, every tick", count
            ),
            Collective(
                "collective-permute", AXIS, 2, tick, f"gradients, stage s+1 -> s{ring}, every tick", count
            ),
            Collective("all-reduce", AXIS, S, 4, "loss (summed from the last stage)"),
        ],
        notes,
        acts,
    )


def check(config) -> None:
    _check_batch(config.train.batch_size, config.parallel.microbatches)
    _check_schedule(config.parallel.schedule, config.parallel.virtual_stages)


SCHEDULE = Choice(
    "gpipe",
    schedules.NAMES,
    "microbatch schedule: gpipe (all forwards, then all backwards), 1f1b (a stage keeps at most S "
    "microbatches' activations, not M), interleaved (parallel.virtual_stages chunks per device, the "
    "bubble shrinks by that), zero_bubble (ZB-H1: weight gradients fill the bubble)",
)
VIRTUAL_STAGES = Int(
    1, "chunks of layers per device for parallel.schedule=interleaved (>= 2 there; 1 otherwise)", min=1
)

DEFINITION = Definition(
    name="pipeline",
    summary="inter-layer model parallelism: contiguous stages, one per device, microbatches on a "
    "GPipe, 1F1B, interleaved or zero-bubble schedule",
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
        "schedule": SCHEDULE,
        "virtual_stages": VIRTUAL_STAGES,
    },
    cost=cost,
    placement=placement,
    examples=(
        Example({"stage": 4}, {"microbatches": 4}),
        Example({"stage": 4}),
        Example({"stage": 2}, {"microbatches": 4}),
        Example({"stage": 2}),
        Example({"stage": 1}),
        Example({"stage": 4}, {"microbatches": 4, "schedule": "1f1b"}),
        Example({"stage": 4}, {"microbatches": 4, "schedule": "zero_bubble"}),
        # 4 layers in the registry-wide tests' net: 2 stages x 2 chunks.
        Example({"stage": 2}, {"microbatches": 4, "schedule": "interleaved", "virtual_stages": 2}),
    ),
    multi_process=True,
    portable_checkpoints=True,
    shards_parameters=True,
    # Its engines take the weight gradients stage by stage (GPipe's scan, the schedules' own backward):
    # a pipeline already accumulates over its microbatches, and its 1f1b-family schedules bound the
    # activations in memory by the stage count whatever their number.
    accumulates=False,
    scales_loss=False,
    not_accumulating="a pipeline already sums its microbatches' gradients: raise parallel.microbatches "
    "instead (with parallel.schedule=1f1b its activation memory stays bounded)",
    check=check,
    # The chosen schedule's table, forwards and backwards: the microbatch each device runs per tick.
    timeline=lambda settings, num_devices: _table(settings, num_devices).grid(),
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
