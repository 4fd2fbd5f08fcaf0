"""The one place where losses, gradients and the optimizer run.

A `Problem` is everything about training that does not depend on devices: the model, the loss, the
optax optimizer, the input width. Strategies lay its pure functions out over devices; they never
compute a gradient or an update of their own. Data-parallel strategies pass a ``reduce`` function
(e.g. ``lax.pmean`` over the data axis) that `Problem.train_step` applies to the local gradients and loss,
so that the only difference between strategies is where arrays live and how partial results meet.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bpjax.errors import UserError
from bpjax.models import MLP, logical_axes
from bpjax.models.mlp import resolve_param_dtype

Params = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    """What a training step carries: a step counter, the parameters and the optimizer state."""

    step: jax.Array  # int32 scalar
    params: Params
    opt_state: optax.OptState


def identity(tree):
    return tree


@dataclass(frozen=True)
class Problem:
    """A BP network, its loss and optimizer: the device-independent half of a run."""

    model: MLP
    tx: optax.GradientTransformation
    loss: str  # "cross_entropy" or "mse"
    input_dim: int
    # Gradient accumulation: each step's batch is cut into this many microbatches whose gradients are
    # summed (in the parameters' dtype, float32 or wider) before the one update (`loss_and_grads`).
    accumulate: int = 1
    # Static loss scaling (float16 compute): the loss is multiplied by this before back-propagation and
    # the float32 gradients divided by it, so that small gradients do not underflow float16.
    loss_scale: float = 1.0
    # jax.default_matmul_precision while the loss is traced: None (XLA's default for the dtype; on
    # GPUs float32 matmuls may use TF32), "highest", "high" or "default".
    matmul_precision: str | None = None

    @property
    def param_axes(self) -> dict:
        """Logical axis names of every parameter (see `bpjax.models.mlp`)."""
        return logical_axes(self.model)

    def init(self, key: jax.Array) -> TrainState:
        """Initial state from a key. Flax derives each parameter's key from its name, never from devices."""
        x = jnp.zeros((1, self.input_dim), jnp.dtype(self.model.dtype))
        params = self.model.init(key, x)["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

    @property
    def loss_dtype(self):
        """The dtype losses are computed in: the model's, promoted to at least float32 (bfloat16 and
        float16 -> float32, float64 stays float64)."""
        return jnp.promote_types(jnp.dtype(self.model.dtype), jnp.float32)

    def predict(self, params: Params, x_BxD: jax.Array) -> jax.Array:
        with _matmul_precision(self.matmul_precision):
            return self.model.apply({"params": params}, x_BxD).astype(self.loss_dtype)

    def loss_fn(self, params: Params, batch: Batch) -> jax.Array:
        """Mean loss over the batch (so a mean of equal-sized shard means is the global mean)."""
        out = self.predict(params, batch["x"])
        if self.loss == "cross_entropy":
            return optax.softmax_cross_entropy_with_integer_labels(out, batch["y"]).mean()
        return jnp.mean(jnp.square(out - batch["y"]))

    def eval_metrics(self, params: Params, batch: Batch) -> Metrics:
        """Summed (not mean) loss and correct count, so that chunks of a test set add up exactly."""
        out = self.predict(params, batch["x"])
        if self.loss == "cross_entropy":
            losses = optax.softmax_cross_entropy_with_integer_labels(out, batch["y"])
            correct = jnp.sum(jnp.argmax(out, -1) == batch["y"])
        else:
            losses = jnp.mean(jnp.square(out - batch["y"]), axis=-1)
            correct = jnp.zeros((), jnp.int32)
        return {"loss_sum": jnp.sum(losses), "correct": correct}

    def train_step(
        self, state: TrainState, batch: Batch, reduce: Callable = identity
    ) -> tuple[TrainState, Metrics]:
        """One step of back-propagation and an optimizer update.

        ``reduce`` combines per-device gradients and losses into global ones (identity on one device or
        where the compiler partitions the computation itself).
        """
        loss, grads = self.loss_and_grads(state.params, batch)
        loss, grads = reduce((loss, grads))
        # Only the loss: on small nets every extra reduction (a gradient norm costs ~10% of a step on
        # CPU, measured by benchmarks/step_overhead.py) shows in the time per step.
        return self.apply_gradients(state, grads), {"loss": loss}

    def loss_and_grads(
        self, params: Params, batch: Batch, loss_fn: Callable | None = None
    ) -> tuple[jax.Array, Params]:
        """``(loss, gradient of the loss w.r.t. params)`` on one (local) batch: the one place every
        strategy's gradients come from, so that accumulation and loss scaling hold for all of them.

        ``loss_fn(params, batch)``: a mean loss (default `loss_fn`). With ``accumulate = N`` the batch
        ``[B, ...]`` is cut into N microbatches of B/N rows, microbatch j holding rows j, j+N, j+2N, ...
        (a strided cut keeps each device's rows on that device when B is split over devices), and a
        ``lax.scan`` sums their gradients: the mean over equal microbatches of their mean losses is the
        mean over the batch, so the update equals one big batch's to rounding, with a microbatch's
        activations in memory instead of the batch's. N = 1 is exactly ``jax.value_and_grad``.
        """
        loss_fn = self.loss_fn if loss_fn is None else loss_fn
        scale = self.loss_scale
        scaled = loss_fn if scale == 1 else lambda p, b: loss_fn(p, b) * scale
        value_and_grad = jax.value_and_grad(scaled)
        n = self.accumulate
        if n == 1:
            loss, grads = value_and_grad(params, batch)
        else:

            def micro(a):  # [B, ...] -> [N, B/N, ...]; microbatch j is rows j::N
                return jnp.moveaxis(a.reshape(a.shape[0] // n, n, *a.shape[1:]), 1, 0)

            def add(total, microbatch):
                return jax.tree.map(jnp.add, total, value_and_grad(params, microbatch)), None

            zeros = (jnp.zeros((), self.loss_dtype), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(add, zeros, jax.tree.map(micro, batch))
            loss, grads = jax.tree.map(lambda t: t / n, (loss, grads))
        if scale != 1:
            loss, grads = jax.tree.map(lambda t: t / scale, (loss, grads))
        return loss, grads

    def apply_gradients(self, state: TrainState, grads: Params) -> TrainState:
        """The optimizer half of a step, for strategies that compute the gradients their own way."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)


@contextlib.contextmanager
def _matmul_precision(precision: str | None):
    if precision is None:
        yield
    else:
        with jax.default_matmul_precision(precision):
            yield


def fuse_steps(step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]):
    """K steps in one call: ``(state, batches[K, ...]) -> (state, metrics[K])``.

    K is read from the batch's leading axis at trace time. K=1 calls ``step`` directly rather than a
    length-one scan, so that one step per call is, by construction, exactly per-step training.
    """

    def fused(state: TrainState, batches: Batch) -> tuple[TrainState, Metrics]:
        k = jax.tree.leaves(batches)[0].shape[0]
        if k == 1:
            state, metrics = step(state, jax.tree.map(lambda b: b[0], batches))
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(step, state, batches)

    return fused


# -------------------------------------------------------------------------------------- from a config


def make_schedule(cfg, total_steps: int) -> optax.ScalarOrSchedule:
    """The learning rate as a function of the step: a named decay after an optional linear warmup.

    A constant rate without warmup is returned as a float: optax then keeps no step count for it and
    evaluates no schedule, which is measurably cheaper per step on small nets.
    """
    lr, warmup = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant" and not warmup:
        return lr
    end = lr * cfg.end_value_fraction
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, end)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_value_fraction)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(lr, end, decay_steps)
    elif cfg.schedule == "exponential":
        main = optax.exponential_decay(lr, cfg.decay_steps or decay_steps, cfg.decay_rate)
    else:
        raise ValueError(cfg.schedule)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """An optax optimizer from the ``optimizer`` config section, with optional global-norm clipping."""
    lr = make_schedule(cfg, total_steps)
    name = cfg.name
    if name in ("sgd", "momentum", "nesterov"):
        momentum = cfg.momentum or None
        if name != "sgd" and momentum is None:
            momentum = 0.9
        tx = optax.sgd(lr, momentum=momentum, nesterov=name == "nesterov")
    elif name == "adam":
        tx = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    elif name == "adamw":
        tx = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif name == "rmsprop":
        tx = optax.rmsprop(lr, eps=cfg.eps, momentum=cfg.momentum or None)
    elif name == "adagrad":
        tx = optax.adagrad(lr, eps=cfg.eps)
    elif name == "lamb":
        tx = optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    elif name == "lion":
        tx = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(name)
    if cfg.clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


_X64_OURS = False  # whether `use_x64` turned JAX's 64-bit mode on (then it may turn it off again)


def use_x64(needed: bool) -> None:
    """Turn JAX's 64-bit mode on for a float64 model, and off again for the next problem if it was us
    who turned it on (``bpjax compare`` or a notebook may build float32 and float64 problems in turn).

    JAX creates float64 arrays only in this mode (otherwise it silently truncates them to float32). It
    is a switch JAX reads when it traces, not when its backend starts: it may be flipped at any time
    (checked with JAX 0.10: arrays made before stay as they are, new ones follow the switch, and
    compiled programs are cached per setting), so `make_problem` sets it, before the run's first array.
    A user's own ``JAX_ENABLE_X64=1`` is left alone.
    """
    global _X64_OURS
    on = bool(jax.config.jax_enable_x64)
    if needed and not on:
        jax.config.update("jax_enable_x64", True)
        _X64_OURS = True
    elif not needed and on and _X64_OURS:
        jax.config.update("jax_enable_x64", False)
        _X64_OURS = False


# The mixed-precision policies ``model.precision`` names: (compute dtype, parameter dtype). Parameters
# and optimizer state stay float32, so gradients (taken w.r.t. them) are float32 and are reduced and
# applied in float32; only the matmuls and activations run in the low precision.
PRECISIONS = {
    "fp32": ("float32", "float32"),
    "bf16": ("bfloat16", "float32"),
    "fp16": ("float16", "float32"),
}


def precision_policy(model_cfg) -> tuple[str, str]:
    """``(compute dtype, parameter dtype)`` of a ``model`` config section: ``model.precision``'s policy,
    or for ``auto`` ``model.dtype`` and ``model.param_dtype`` (resolved) as given."""
    m = model_cfg
    if m.precision == "auto":
        return m.dtype, resolve_param_dtype(m.dtype, m.param_dtype)
    if m.dtype != "float32" or m.param_dtype != "auto":
        raise UserError(
            f"model.precision={m.precision} sets the compute and parameter dtypes itself, but model.dtype="
            f"{m.dtype} and model.param_dtype={m.param_dtype} are set too; remove those or use "
            "model.precision=auto"
        )
    return PRECISIONS[m.precision]


def make_problem(config, input_dim: int, num_outputs: int) -> Problem:
    """The `Problem` a config describes, for data of ``input_dim`` features and ``num_outputs`` outputs.

    A float64 model (``model.dtype`` or ``model.param_dtype``) turns on JAX's 64-bit mode (`use_x64`).
    ``model.precision`` picks the dtypes (`precision_policy`); a float16 compute dtype brings static
    loss scaling by ``model.loss_scale``; ``train.accumulate`` and ``train.matmul_precision`` ride on
    the Problem, so every strategy's gradients follow them (`Problem.loss_and_grads`).
    """
    m = config.model
    dtype, param_dtype = precision_policy(m)
    use_x64("float64" in (dtype, param_dtype))
    _check_size(config, input_dim, num_outputs)
    model = MLP(
        widths=(*m.hidden, num_outputs),
        activation=m.activation,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=m.kernel_init,
        bias_init=m.bias_init,
    )
    tx = make_optimizer(config.optimizer, config.optimizer.get("schedule_steps") or config.train.steps)
    if config.train.nonfinite == "skip":
        # A step whose gradients hold a NaN or Inf changes nothing (optax counts it in the state); the
        # loop stops after train.max_skipped such steps in a row, before this would apply one anyway.
        tx = optax.apply_if_finite(
            tx, max_consecutive_errors=min(config.train.max_skipped + config.train.sync_every, 2**31 - 1)
        )
    t = config.train
    return Problem(
        model,
        tx,
        t.loss,
        input_dim,
        accumulate=t.accumulate,
        loss_scale=float(m.loss_scale) if jnp.dtype(dtype) == jnp.float16 else 1.0,
        matmul_precision=None if t.matmul_precision == "default" else t.matmul_precision,
    )


def _check_size(config, input_dim: int, num_outputs: int) -> None:
    """A network whose parameters alone exceed this machine's memory is refused before anything is
    allocated (``parallel.memory_budget_mb`` checks a layout's bytes per device against a budget)."""
    m = config.model
    widths = (input_dim, *m.hidden, num_outputs)
    count = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    nbytes = count * np.dtype(precision_policy(m)[1]).itemsize
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > total:
        net = "-".join(map(str, widths))
        raise UserError(
            f"a {net} network has {count:,} parameters ({nbytes / 2**30:.1f} GiB), more than this machine's "
            f"{total / 2**30:.1f} GiB of memory; use smaller model.hidden widths"
        )
