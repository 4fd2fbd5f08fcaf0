"""Experiment configs: the schema with its defaults, loading experiment files, ``--set`` overrides, checks.

An experiment is a Python file with ``get_config()`` returning the `default()` config with some fields
changed. The schema is locked, so a misspelt key fails with a suggestion instead of being ignored.

Sections:
  seed                      one integer; parameters, data order and data generation derive from it
  data.*                    which data set and how it is split and scaled (see `bpjax.data`)
  model.*                   the MLP: hidden widths, activation, dtypes, init (see `bpjax.models.mlp`)
  optimizer.*               an optax optimizer by name, a learning-rate schedule, gradient clipping
  train.*                   steps, batch size, loss, how often to evaluate and log, steps fused per call
  parallel.*                the strategy, the mesh it lays out, and simulated CPU devices
  checkpoint.*              how often orbax saves the train state, how many to keep (see `bpjax.checkpoint`)
  distributed.*             multi-process runs: how fast a dead peer is noticed (see `bpjax.distributed`)
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
from pathlib import Path
from typing import Any

import ml_collections as mlc

from bpjax.errors import UserError

ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "silu", "elu", "leaky_relu", "identity")
INITS = (
    "lecun_normal",
    "lecun_uniform",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "he_uniform",
    "normal",
    "zeros",
)
DTYPES = ("float32", "bfloat16", "float16", "float64")
DATASETS = (
    "mnist1d",
    "digits",
    "synthetic_classification",
    "synthetic_regression",
    "npz",
    "csv",
    "idx",
)
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "lamb", "lion")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear", "exponential")


def default() -> mlc.ConfigDict:
    """The full schema with its defaults. Experiment files start from this and change fields."""
    c = mlc.ConfigDict()
    c.name = ""  # filled from the experiment file name when empty
    c.seed = 0

    c.data = mlc.ConfigDict()
    c.data.name = "mnist1d"
    c.data.num_samples = 5000  # mnist1d and synthetic: total examples before the split
    c.data.num_features = 32  # synthetic only
    c.data.num_classes = 10  # synthetic_classification only
    c.data.num_targets = 1  # synthetic_regression only
    c.data.noise = 0.1  # synthetic: label noise (classification) or target noise std (regression)
    c.data.test_fraction = 0.2  # held-out share where the source has no split of its own
    c.data.standardize = True  # zero mean, unit variance per feature, fitted on the training split
    c.data.path = ""  # npz / csv: the file; idx: the training images file
    c.data.labels_path = ""  # idx: the training labels file
    c.data.test_path = ""  # idx: test images (optional; else test_fraction is split off)
    c.data.test_labels_path = ""  # idx: test labels
    c.data.label_column = -1  # csv: which column holds the label (or target)
    c.data.task = "classification"  # npz / csv / idx: classification or regression
    c.data.cache_dir = ""  # mnist1d cache; default $BPJAX_CACHE or ~/.cache/bpjax

    c.model = mlc.ConfigDict()
    c.model.hidden = (512, 256)  # hidden widths; input and output widths come from the data
    c.model.activation = "relu"
    c.model.dtype = "float32"  # computation dtype
    c.model.param_dtype = "float32"
    c.model.kernel_init = "lecun_normal"
    c.model.bias_init = "zeros"

    c.optimizer = mlc.ConfigDict()
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9  # sgd-family momentum; 0 gives plain sgd
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 1e-4  # adamw, lamb, lion
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.end_value_fraction = 0.0  # final learning rate / initial, for decaying schedules
    c.optimizer.decay_rate = 0.5  # exponential: factor per `decay_steps`
    c.optimizer.decay_steps = 0  # exponential: steps per factor; 0 means train.steps
    c.optimizer.clip_norm = 0.0  # global-norm gradient clipping; 0 turns it off

    c.train = mlc.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 128
    c.train.loss = "cross_entropy"
    c.train.eval_every = 250  # 0: only at the end
    c.train.log_every = 50
    c.train.steps_per_call = 1  # K steps fused into one compiled call with lax.scan
    c.train.sync_every = 16  # block on a result at least this often (forced CPU collectives can deadlock)
    c.train.progress = "auto"  # auto: a bar on a terminal, plain lines otherwise; or bar / lines / off
    c.train.nonfinite = "stop"  # a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step
    c.train.max_skipped = 10  # nonfinite=skip: stop anyway after this many non-finite steps in a row

    c.parallel = mlc.ConfigDict()
    c.parallel.strategy = "single"
    c.parallel.mesh = mlc.ConfigDict({"data": -1})  # axis -> size; -1 is "all remaining devices"
    c.parallel.cpu_devices = 0  # >0: simulate this many CPU devices (must be set before JAX starts)
    c.parallel.replicate = ()  # tensor / hybrid: layers kept whole on every device, e.g. ("layer_2",)
    c.parallel.partition = "sample"  # dp: cut the data by samples, features, or both (hybrid)
    c.parallel.hybrid_data = "dp"  # hybrid: the data axis replicates parameters (dp) or shards them (fsdp)
    c.parallel.staleness = 0  # async: gradient delay tau (or its bound s with random_staleness); 0 is dp
    c.parallel.random_staleness = False  # async: draw tau per step and worker uniformly from [0, s]
    c.parallel.n_push = 1  # param_server: workers push accumulated gradients every n_push steps
    c.parallel.n_fetch = 1  # param_server: workers pull the parameters every n_fetch steps
    c.parallel.local_steps = 1  # local_sgd: optimizer steps each worker takes between averaging (H)
    c.parallel.microbatches = 1  # pipeline: GPipe microbatches M per step (M=1: plain layer-wise MP)
    c.parallel.stages = ()  # pipeline: first layer of every stage but the first, e.g. (2,); () balances FLOPs
    c.parallel.memory_budget_mb = 0.0  # >0: refuse layouts whose planned bytes per device exceed this

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every = 0  # save every this many steps and at the end; 0: no checkpoints
    c.checkpoint.keep = 3  # keep the latest this many checkpoints
    c.checkpoint.async_save = True  # write in the background while training goes on

    c.distributed = mlc.ConfigDict()
    c.distributed.heartbeat_timeout_s = 10  # a peer silent this long is dead: every process then exits
    c.distributed.shutdown_timeout_s = 30  # how long the processes wait for each other at the end
    c.distributed.init_timeout_s = 120  # how long to wait for every process to join
    return c


def parse_value(text: str) -> Any:
    """``--set`` values are Python literals (``1e-3``, ``(512, 256)``, ``True``) or else plain strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; known keys: {', '.join(sorted(choices))}"


def _all_keys(c: mlc.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in c.items():
        keys.append(prefix + k)
        if isinstance(v, mlc.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def set_value(c: mlc.ConfigDict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` on a locked config, with a one-line error for unknown keys or wrong types."""
    parts = dotted.split(".")
    node = c
    for i, part in enumerate(parts):
        if ".".join(parts[:i]) == "parallel.mesh" and i == len(parts) - 1 and part not in node:
            with node.unlocked():  # mesh axes are an open set, checked by the strategy that reads them
                node[part] = value
            return
        if not isinstance(node, mlc.ConfigDict) or part not in node:
            here = ".".join(parts[:i])
            siblings = list(node.keys()) if isinstance(node, mlc.ConfigDict) else []
            full = [here + "." + s if here else s for s in siblings] or _all_keys(c)
            raise UserError(f"unknown config key {dotted!r}{_closest(dotted, full + _all_keys(c))}")
        if i < len(parts) - 1:
            node = node[part]
    key = parts[-1]
    old = node[key]
    if isinstance(old, mlc.ConfigDict):
        raise UserError(
            f"{dotted!r} is a section; set one of its keys, e.g. {dotted}.{next(iter(old.keys()))}"
        )
    if isinstance(old, tuple) and not isinstance(value, list | tuple):
        value = (value,)
    if isinstance(old, tuple):
        value = tuple(value)
    if isinstance(old, bool) and not isinstance(value, bool):
        raise UserError(f"{dotted} must be True or False, got {value!r}")
    if isinstance(old, int | float) and not isinstance(old, bool) and isinstance(value, bool):
        raise UserError(f"{dotted} must be a number, got {value!r}")
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float):
        if not value.is_integer():
            raise UserError(f"{dotted} must be a whole number, got {value!r}")
        value = int(value)
    try:
        with node.unlocked():
            node[key] = value
    except TypeError:
        raise UserError(
            f"{dotted} must be of type {type(old).__name__} (like {old!r}), got {value!r}"
        ) from None


def apply_overrides(c: mlc.ConfigDict, overrides: list[str]) -> mlc.ConfigDict:
    """Apply ``key=value`` strings in order. The config is copied, not changed in place."""
    c = mlc.ConfigDict(c.to_dict())
    c.lock()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set takes key=value, got {item!r}; e.g. --set train.steps=100")
        key, text = item.split("=", 1)
        set_value(c, key.strip(), parse_value(text.strip()))
    return c


def load_module(path: str | Path):
    """Import an experiment or study file; a missing file or one that fails to run is one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"experiment file {str(path)!r} not found; pass a path such as experiments/mnist1d_dp.py"
        )
    spec = importlib.util.spec_from_file_location(f"bpjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as e:  # the user's file: say where it broke, in one line
        raise UserError(f"experiment file {path} failed to load: {type(e).__name__}: {e}") from e
    return module


def from_file(path: str | Path) -> mlc.ConfigDict:
    """The raw ``get_config()`` of an experiment file, so that one experiment can build on another."""
    path = Path(path)
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise UserError(
            f"experiment file {path} has no get_config(); define one returning bpjax.config.default()"
        )
    c = module.get_config()
    if not isinstance(c, mlc.ConfigDict):
        raise UserError(
            f"{path}: get_config() must return an ml_collections.ConfigDict (start from bpjax.config.default())"
        )
    if not c.get("name"):
        with c.unlocked():
            c.name = path.stem
    return c


def load(path: str | Path, overrides: list[str] | None = None) -> mlc.ConfigDict:
    """Load an experiment file's ``get_config()``, apply ``key=value`` overrides, validate. No jax work."""
    c = merge_into_default(from_file(path), source=str(path))
    c = apply_overrides(c, overrides or [])
    validate(c)
    return c


def merge_into_default(c: mlc.ConfigDict, source: str = "config") -> mlc.ConfigDict:
    """Check a config's keys against the schema and fill the missing ones with defaults."""
    base = default()
    d = c.to_dict()
    if "mesh" in d.get("parallel", {}):  # a config's mesh replaces the default one, axes and all
        base.parallel.mesh = mlc.ConfigDict({})
    base.lock()
    flat = _flatten(d)
    for key, value in flat.items():
        try:
            set_value(base, key, value)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    return base


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix + k == "parallel.mesh"):
            out.update(_flatten(v, prefix + k + "."))
        elif isinstance(v, dict):
            for axis, size in v.items():
                out[f"{prefix}{k}.{axis}"] = size
        else:
            out[prefix + k] = v
    return out


def _choice(value, choices, key):
    if value not in choices:
        raise UserError(f"{key}={value!r} is not known{_closest(str(value), choices)}")


def validate(c: mlc.ConfigDict) -> None:
    """Checks that need no data and no devices. Data and device checks happen where those are known."""
    _choice(c.data.name, DATASETS, "data.name")
    _choice(c.model.activation, ACTIVATIONS, "model.activation")
    _choice(c.model.kernel_init, INITS, "model.kernel_init")
    _choice(c.model.bias_init, INITS, "model.bias_init")
    _choice(c.model.dtype, DTYPES, "model.dtype")
    _choice(c.model.param_dtype, DTYPES, "model.param_dtype")
    _choice(c.optimizer.name, OPTIMIZERS, "optimizer.name")
    _choice(c.optimizer.schedule, SCHEDULES, "optimizer.schedule")
    _choice(c.train.loss, LOSSES, "train.loss")
    _choice(c.train.progress, ("auto", "bar", "lines", "off"), "train.progress")
    _choice(c.train.nonfinite, ("stop", "skip"), "train.nonfinite")
    _choice(c.data.task, ("classification", "regression"), "data.task")

    for i, w in enumerate(c.model.hidden):
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise UserError(
                f"model.hidden[{i}]={w!r}: layer widths must be positive integers, e.g. (512, 256)"
            )
    lr = c.optimizer.learning_rate
    if not math.isfinite(lr) or lr <= 0:
        raise UserError(f"optimizer.learning_rate={lr!r} must be a positive finite number, e.g. 1e-3")
    if c.optimizer.clip_norm < 0:
        raise UserError(f"optimizer.clip_norm={c.optimizer.clip_norm} must be >= 0 (0 turns clipping off)")
    if not 0 <= c.optimizer.momentum < 1:
        raise UserError(f"optimizer.momentum={c.optimizer.momentum} must be in [0, 1)")
    warmup = c.optimizer.warmup_steps
    if warmup < 0 or (warmup and warmup >= c.train.steps):
        raise UserError(f"optimizer.warmup_steps={warmup} must be in [0, train.steps={c.train.steps})")

    t = c.train
    for key in ("steps", "batch_size", "steps_per_call", "sync_every"):
        if t[key] < 1:
            raise UserError(f"train.{key}={t[key]} must be >= 1")
    for key in ("eval_every", "log_every"):
        if t[key] < 0:
            raise UserError(f"train.{key}={t[key]} must be >= 0 (0: only at the end)")
    k = t.steps_per_call
    if t.steps % k:
        raise UserError(
            f"train.steps={t.steps} is not a multiple of train.steps_per_call={k}; "
            f"use steps={t.steps // k * k or k} or another steps_per_call"
        )
    if t.eval_every % k:
        raise UserError(
            f"train.eval_every={t.eval_every} is not a multiple of train.steps_per_call={k}; "
            f"evaluation happens between compiled calls (use eval_every={max(t.eval_every // k, 1) * k})"
        )
    if c.data.num_samples < 2:
        raise UserError(f"data.num_samples={c.data.num_samples} must be >= 2")
    if not 0 < c.data.test_fraction < 1:
        raise UserError(f"data.test_fraction={c.data.test_fraction} must be between 0 and 1")
    if c.train.loss == "cross_entropy" and c.data.name == "synthetic_regression":
        raise UserError(
            "train.loss=cross_entropy needs class labels; synthetic_regression needs train.loss=mse"
        )
    if c.parallel.cpu_devices < 0:
        raise UserError(
            f"parallel.cpu_devices={c.parallel.cpu_devices} must be >= 0 (0 leaves JAX's default)"
        )
    for axis, size in c.parallel.mesh.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise UserError(
                f"parallel.mesh.{axis}={size!r} must be a positive integer or -1 (all remaining devices)"
            )
    _choice(c.parallel.hybrid_data, ("dp", "fsdp"), "parallel.hybrid_data")
    _choice(c.parallel.partition, ("sample", "feature", "hybrid"), "parallel.partition")
    if c.parallel.memory_budget_mb < 0:
        raise UserError(f"parallel.memory_budget_mb={c.parallel.memory_budget_mb} must be >= 0 (0: no check)")
    if c.parallel.staleness < 0:
        raise UserError(f"parallel.staleness={c.parallel.staleness} must be >= 0 (0 is synchronous dp)")
    if c.parallel.n_push < 1 or c.parallel.n_fetch < 1:
        raise UserError("parallel.n_push and parallel.n_fetch must be >= 1 (1 and 1 is synchronous dp)")
    if c.parallel.local_steps < 1:
        raise UserError(f"parallel.local_steps={c.parallel.local_steps} must be >= 1")
    if c.parallel.microbatches < 1:
        raise UserError(f"parallel.microbatches={c.parallel.microbatches} must be >= 1")
    ck = c.checkpoint
    if ck.every < 0 or ck.keep < 1:
        raise UserError(
            f"checkpoint.every={ck.every} must be >= 0 (0: no checkpoints) and checkpoint.keep={ck.keep} >= 1"
        )
    if ck.every % k:
        raise UserError(
            f"checkpoint.every={ck.every} is not a multiple of train.steps_per_call={k}; checkpoints are "
            f"saved between compiled calls (use every={max(ck.every // k, 1) * k})"
        )
    if t.max_skipped < 1:
        raise UserError(f"train.max_skipped={t.max_skipped} must be >= 1")
    for key in ("heartbeat_timeout_s", "shutdown_timeout_s", "init_timeout_s"):
        if c.distributed[key] < 1:
            raise UserError(f"distributed.{key}={c.distributed[key]} must be >= 1 second")
    if list(c.parallel.mesh.values()).count(-1) > 1:
        raise UserError("parallel.mesh may use -1 for one axis only; give the other sizes explicitly")
