"""Experiment configs: the schema with its defaults, loading experiment files, ``--set`` overrides, checks.

An experiment is a Python file with ``get_config()`` returning the `default()` config with some fields
changed. The schema is locked, so a misspelt key fails with a suggestion instead of being ignored. Every
key is declared once, with its default, type, valid range and help (`SCHEMA` here; each strategy's own
``parallel.*`` settings in its module), and `validate` checks every value against its declaration;
``docs/configuration.md`` is generated from the same declarations.

Sections:
  seed, seeds.*             the run's seed; seeds.init / data_order / split override one use of it each
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
import inspect
import os
import re
from pathlib import Path
from typing import Any

import ml_collections as mlc
import numpy as np

from bpjax.errors import UserError, one_line
from bpjax.schema import Bool, Choice, Float, Int, IntOrName, Ints, Setting, Str

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
MAX_SEED = 2**31 - 1
# Every whole number in a config must fit JAX's default integer (int32): step counters, schedules and
# intervals reach traced code, where a larger Python int fails mid-run (checked for every key in
# `validate`, the strategies' settings included).
MAX_INT = 2**31 - 1
# Simulated CPU devices: JAX's start-up grows fast with the count (measured with JAX 0.10 on 2 cores: 1024
# devices start in 2 s and train mnist1d_dp in 35 s; 4096 start in 11 s, 8192 in 73 s, 16384 in more
# than 200 s, and 100000 never finished).
MAX_CPU_DEVICES = 1024

# The schema: every key but the strategies' own (``parallel.*`` from their declarations, added by
# `default`) and ``parallel.mesh`` (an open set of axes, checked below).
SCHEMA: dict[str, Any] = {
    "name": Str("", "the run's name; empty: the experiment file's name"),
    "seed": Int(
        0,
        "the run's seed: parameter initialisation and the order of training batches derive from it "
        "(seeds.*); a sweep over seed keeps the data and its train/test split",
        min=0,
        max=MAX_SEED,
    ),
    "seeds": {
        "init": Int(-1, "parameter initialisation; -1: seed", min=-1, max=MAX_SEED),
        "data_order": Int(-1, "the order of training batches; -1: seed", min=-1, max=MAX_SEED),
        "split": Int(
            0,
            "synthetic data and the train/test split of data without one; fixed by default, so that runs "
            "with different seeds share one test set; -1: seed",
            min=-1,
            max=MAX_SEED,
        ),
    },
    "data": {
        "name": Choice("mnist1d", DATASETS, "which data set (see bpjax.data)"),
        "num_samples": Int(5000, "mnist1d and synthetic: total examples before the split", min=2),
        "num_features": Int(32, "synthetic only: input features", min=1),
        "num_classes": Int(10, "synthetic_classification only", min=2),
        "num_targets": Int(1, "synthetic_regression only", min=1),
        "noise": Float(
            0.1, "synthetic: label noise (classification) or target noise std (regression)", min=0
        ),
        "test_fraction": Float(
            0.2,
            "held-out share where the source has no split of its own",
            min=0,
            max=1,
            min_open=True,
            max_open=True,
        ),
        "standardize": Bool(True, "zero mean, unit variance per feature, fitted on the training split"),
        "path": Str("", "npz / csv: the file; idx: the training images file"),
        "labels_path": Str("", "idx: the training labels file"),
        "test_path": Str("", "idx: test images (optional; else test_fraction is split off)"),
        "test_labels_path": Str("", "idx: test labels"),
        "label_column": IntOrName(
            -1,
            "csv: the column that holds the label (or target): its name in the header, or its index (-1: the last)",
        ),
        "task": Choice(
            "classification", ("classification", "regression"), "npz / csv / idx: the kind of target"
        ),
        "cache_dir": Str("", "mnist1d cache; default $BPJAX_CACHE or ~/.cache/bpjax"),
    },
    "model": {
        "hidden": Ints(
            (512, 256),
            "hidden widths; input and output widths come from the data",
            min=1,
            note="layer widths",
        ),
        "activation": Choice("relu", ACTIVATIONS, "the nonlinearity after every hidden layer"),
        "dtype": Choice("float32", DTYPES, "computation dtype"),
        "param_dtype": Choice(
            "auto",
            ("auto", *DTYPES),
            "dtype of the parameters and optimizer state; auto: float64 when model.dtype is float64, "
            "else float32",
        ),
        "precision": Choice(
            "auto",
            ("auto", "fp32", "bf16", "fp16"),
            "mixed-precision policy: bf16 / fp16 compute in bfloat16 / float16 with float32 parameters, "
            "optimizer state and gradients; fp32 everything float32; auto: model.dtype and "
            "model.param_dtype as given (see docs/gpu.md)",
        ),
        "loss_scale": Float(
            1024.0,
            "float16 compute only: static loss scale (the loss is multiplied by it before "
            "back-propagation, the float32 gradients divided by it)",
            min=1,
        ),
        "kernel_init": Choice("lecun_normal", INITS, "initialiser of the kernels"),
        "bias_init": Choice("zeros", INITS, "initialiser of the biases"),
    },
    "optimizer": {
        "name": Choice("adam", OPTIMIZERS, "an optax optimizer"),
        "learning_rate": Float(1e-3, "the (peak) learning rate", min=0, min_open=True),
        "momentum": Float(
            0.9, "sgd-family and rmsprop momentum; 0 gives plain sgd", min=0, max=1, max_open=True
        ),
        "b1": Float(0.9, "adam, adamw, lamb, lion: first-moment decay", min=0, max=1, max_open=True),
        "b2": Float(0.999, "adam, adamw, lamb, lion: second-moment decay", min=0, max=1, max_open=True),
        "eps": Float(1e-8, "adam-family, rmsprop, adagrad: added to the denominator", min=0, min_open=True),
        "weight_decay": Float(1e-4, "adamw, lamb, lion: decoupled weight decay", min=0),
        "schedule": Choice("constant", SCHEDULES, "the learning-rate schedule after warmup"),
        "warmup_steps": Int(0, "linear warmup from 0 over this many steps", min=0),
        "end_value_fraction": Float(
            0.0, "final learning rate / initial, for decaying schedules", min=0, max=1
        ),
        "decay_rate": Float(0.5, "exponential: factor per decay_steps", min=0, max=1, min_open=True),
        "decay_steps": Int(0, "exponential: steps per factor; 0 means train.steps", min=0),
        "clip_norm": Float(0.0, "global-norm gradient clipping; 0 turns it off", min=0),
        "schedule_steps": Int(
            0,
            "steps the learning-rate schedule spans; 0: train.steps when the run started (a --resume with "
            "more train.steps keeps the schedule; set this to re-stretch it)",
            min=0,
        ),
    },
    "train": {
        "steps": Int(1000, "training steps", min=1),
        "batch_size": Int(128, "global batch size (over all devices)", min=1),
        "loss": Choice("cross_entropy", LOSSES, "cross_entropy for labels, mse for real-valued targets"),
        "eval_every": Int(250, "evaluate the test set every this many steps; 0: only at the end", min=0),
        "log_every": Int(50, "write a metrics.jsonl row every this many steps; 0: only at the end", min=0),
        "steps_per_call": Int(1, "K steps fused into one compiled call with lax.scan", min=1),
        "accumulate": Int(
            1,
            "gradient accumulation: cut each step's batch into this many microbatches and sum their "
            "gradients before one update (must divide each device's share of the batch)",
            min=1,
        ),
        "matmul_precision": Choice(
            "default",
            ("default", "high", "highest"),
            "jax.default_matmul_precision of the step's matmuls: default lets XLA choose (TF32 for "
            "float32 on recent NVIDIA GPUs), highest forces full float32",
        ),
        "device_data": Choice(
            "auto",
            ("auto", "on", "off"),
            "on: keep the training set on the devices and draw each call's batches there (same order, "
            "bit-identical); off: gather them on the host and copy them, prefetching the next call's "
            "while the current one runs; auto: on when the training set takes at most a quarter of a "
            "device's memory and the run is one process",
        ),
        "sync_every": Int(
            16, "block on a result at least this often (forced CPU collectives can deadlock)", min=1
        ),
        "progress": Choice(
            "auto", ("auto", "bar", "lines", "off"), "auto: a bar on a terminal, plain lines otherwise"
        ),
        "nonfinite": Choice(
            "stop",
            ("stop", "skip"),
            "a NaN/Inf loss: stop (keeping the last good checkpoint) or skip the step",
        ),
        "max_skipped": Int(
            10, "nonfinite=skip: stop anyway after this many non-finite steps in a row", min=1
        ),
        "profile": Ints(
            (),
            "(start, stop): write a jax.profiler trace of these steps into WORKDIR/tensorboard "
            "(TensorBoard's profile tab, or Perfetto); (): no trace",
            min=0,
        ),
        "early_stop_patience": Int(
            0,
            "> 0: stop when the test metric (checkpoint.keep_best's, else eval_loss) has not improved "
            "for this many evaluations; 0: train all train.steps",
            min=0,
        ),
    },
    "parallel": {
        "strategy": Str("single", "the strategy (see docs/strategies.md)"),
        "cpu_devices": Int(
            0,
            "> 0: simulate this many CPU devices (set before JAX starts; an explicit "
            "--xla_force_host_platform_device_count in XLA_FLAGS wins); 0 leaves JAX's default",
            min=0,
            max=MAX_CPU_DEVICES,
            note="more take JAX minutes to start",
        ),
        "memory_budget_mb": Float(
            0.0, "> 0: refuse layouts whose planned bytes per device exceed this", min=0
        ),
    },
    "checkpoint": {
        "every": Int(0, "save every this many steps and at the end; 0: no checkpoints", min=0),
        "keep": Int(3, "keep the latest this many checkpoints", min=1),
        "async_save": Bool(True, "write in the background while training goes on"),
        "keep_best": Choice(
            "",
            ("", "eval_loss", "eval_accuracy"),
            "also keep the checkpoint with the best value of this test metric in WORKDIR/best_checkpoint "
            "(bpjax.load_run(..., best=True)); empty: none",
        ),
    },
    "distributed": {
        "heartbeat_timeout_s": Int(
            10, "a peer silent this long (s) is dead: every process then exits", min=1
        ),
        "shutdown_timeout_s": Int(30, "how long (s) the processes wait for each other at the end", min=1),
        "init_timeout_s": Int(120, "how long (s) to wait for every process to join", min=1),
    },
}


def seeds(c: mlc.ConfigDict) -> dict[str, int]:
    """The three seeds a run uses: ``init`` (parameters), ``data_order`` (batches) and ``split`` (synthetic
    data and the train/test split); ``seeds.X = -1`` takes the top-level ``seed``."""
    return {k: (v if v >= 0 else c.seed) for k, v in c.seeds.items()}


def schedule_steps(c: mlc.ConfigDict) -> int:
    """The steps the learning-rate schedule spans (``optimizer.schedule_steps``, else ``train.steps``)."""
    return c.optimizer.schedule_steps or c.train.steps


def _untyped(dotted: str) -> bool:
    """Keys whose values may be of more than one type (an int or a name)."""
    section, _, leaf = dotted.rpartition(".")
    node = SCHEMA.get(section, {}) if section else SCHEMA
    return isinstance(node, dict) and getattr(node.get(leaf), "item", "") == "int_or_name"


def with_schedule_steps(d: dict) -> dict:
    """A config as a dict, with ``optimizer.schedule_steps`` as the steps it stands for (0 and a config
    from before the key: ``train.steps``), for comparing configs that record it with ones that do not."""
    opt, train = d.get("optimizer"), d.get("train")
    if isinstance(opt, dict) and isinstance(train, dict) and not opt.get("schedule_steps"):
        d = {**d, "optimizer": {**opt, "schedule_steps": train.get("steps")}}
    return d


def schema() -> dict[str, Setting]:
    """Every declared key, dotted (``train.steps``), with its `Setting`: this module's and the
    strategies' (``parallel.*``). ``parallel.mesh`` is the one open section."""
    from bpjax import strategies

    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = v

    walk(SCHEMA, "")
    out.update({f"parallel.{k}": s for k, s in strategies.settings().items()})
    return out


def default() -> mlc.ConfigDict:
    """The full schema with its defaults. Experiment files start from this and change fields."""
    c = mlc.ConfigDict()
    for key, setting in schema().items():
        *sections, leaf = key.split(".")
        node = c
        for section in sections:
            if section not in node:
                node[section] = mlc.ConfigDict()
            node = node[section]
        # A key that takes an int or a name: ml_collections would otherwise fix its type to int.
        node[leaf] = (
            mlc.FieldReference(setting.default, field_type=object) if _untyped(key) else setting.default
        )
    c.parallel.mesh = mlc.ConfigDict({"data": -1})  # axis -> size; -1 is "all remaining devices"
    return c


def parse_value(text: str) -> Any:
    """``--set`` values are Python literals (``1e-3``, ``(512, 256)``, ``True``) or else plain strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else "; bpjax config --schema lists every key"


def _all_keys(c: mlc.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in c.items():
        keys.append(prefix + k)
        if isinstance(v, mlc.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _plain(value: Any) -> Any:
    """numpy scalars (``np.int64(3)``, from an experiment file's arithmetic) as their Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return type(value)(v.item() if isinstance(v, np.generic) else v for v in value)
    return value


def _kind(value: Any) -> str:
    """What a value is, as a user would say it: "a whole number", "a number", "a string"."""
    kinds = {bool: "True or False", int: "a whole number", float: "a number", str: "a string"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def set_value(c: mlc.ConfigDict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` on a locked config, with a one-line error for unknown keys or wrong types."""
    value = _plain(value)
    if not dotted:
        raise UserError(f"--set ={value!r} names no key; give key=value, e.g. --set train.steps=100")
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
    if dotted in _dict_keys():
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise UserError(f"{dotted} must be a dict like {{3: 4.0}}, got {value!r}")
        # JSON (config.json) writes whole-number keys as strings: read them back as numbers.
        value = {
            int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k: v
            for k, v in value.items()
        }
        with node.unlocked():
            node[key] = value
        return
    if isinstance(old, mlc.ConfigDict) and isinstance(value, dict):
        # A dict sets a section: parallel.mesh (an open set of axes) is replaced whole, others key by key.
        if any(not isinstance(k, str) or not k for k in value):
            raise UserError(f"{dotted}={value!r}: the keys of a section are names, e.g. {{'data': 2}}")
        if dotted == "parallel.mesh":
            with node.unlocked():
                node[key] = mlc.ConfigDict({})
        for k, v in value.items():
            set_value(c, f"{dotted}.{k}", v)
        return
    if isinstance(old, mlc.ConfigDict):
        raise UserError(
            f"{dotted!r} is a section; set one of its keys, e.g. {dotted}.{next(iter(old.keys()), 'KEY')}, "
            "or give a dict of them"
        )
    if _untyped(dotted) and not isinstance(value, dict | list | tuple) and value is not None:
        with node.unlocked():  # checked against its declaration in `validate`
            del node[key]
            node[key] = value
        return
    if value is None:  # ml_collections would take None for any field; no key has None among its values
        raise UserError(f"{dotted}=None is not a value; give {_kind(old)} like {old!r}")
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
    except (TypeError, ValueError, OverflowError):  # ValueError, OverflowError: an int too big for a float
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


def examples_dir() -> Path | None:
    """The example experiments: ``bpjax/experiments`` in an installed wheel, ``experiments/`` beside the
    package in a source checkout (editable install)."""
    package = Path(__file__).resolve().parent
    for folder in (package / "experiments", package.parent / "experiments"):
        if folder.is_dir():
            return folder
    return None


def examples() -> list[str]:
    """The names of the packaged example experiments and studies (``bpjax run NAME`` finds them)."""
    folder = examples_dir()
    return sorted(p.stem for p in folder.glob("*.py") if not p.name.startswith("_")) if folder else []


def find_experiment(path: str | Path) -> str | Path:
    """``path`` itself if it exists; else, for a bare name (``mnist1d_dp`` or ``mnist1d_dp.py``), the
    packaged example of that name; else ``path`` (for `_user_file` to report)."""
    text = str(path)
    if Path(text).expanduser().exists() or "/" in text or os.sep in text:
        return path
    folder = examples_dir()
    name = text if text.endswith(".py") else text + ".py"
    if folder is not None and (folder / name).is_file():
        return str(folder / name)
    return path


def _user_file(path: str | Path, what: str) -> Path:
    """``path`` (``~`` expanded) if it names a readable regular file; else a one-line error naming it."""
    text = str(path)
    p = Path(text).expanduser()
    if p.is_dir():
        inside = sorted(p.glob("*.py"))
        hint = f", e.g. {inside[0]}" if inside else ""
        raise UserError(f"{what} {text!r} is a folder; pass one .py file{hint}")
    if not p.exists():
        near = []
        if p.parent.is_dir():
            near = difflib.get_close_matches(p.name, [c.name for c in p.parent.iterdir()], n=1, cutoff=0.6)
        named = difflib.get_close_matches(p.stem, examples(), n=1, cutoff=0.6) if "/" not in text else []
        hint = (
            f"did you mean {str(p.parent / near[0])!r}?"
            if near
            else f"did you mean the example {named[0]!r}?"
            if named
            else "pass a path such as experiments/mnist1d_dp.py, or an example's name (bpjax config --examples)"
        )
        raise UserError(f"{what} {text!r} not found; {hint}")
    if text.endswith(("/", "\\")):
        raise UserError(f"{what} {text!r} ends with a slash but is a file; remove the trailing slash")
    if not p.is_file():
        raise UserError(f"{what} {text!r} is not a regular file; pass a .py file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {text!r} cannot be read (permission denied); make it readable (chmod +r)")
    return p


def _failure(e: BaseException, path: Path) -> str:
    """``NameError: name 'x' is not defined (line 5)``: an exception raised by a user's file, in one
    line, with the line of that file it came from when the traceback passes through it."""
    line = None
    tb = e.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(e, SyntaxError) and Path(e.filename or "").resolve() == path.resolve():
        line, text = e.lineno, e.msg
    else:
        text = str(e)
    where = f" (line {line})" if line else ""
    return f"{type(e).__name__}: {one_line(text)}{where}" if text else f"{type(e).__name__}{where}"


def load_module(path: str | Path):
    """Import an experiment or study file; a file that is missing, not Python, or fails to run is one
    line naming it and the fix."""
    path = find_experiment(path)
    p = _user_file(path, "experiment file")
    if p.suffix != ".py":
        hint = " (a run's config.json is not an experiment)" if p.suffix == ".json" else ""
        raise UserError(
            f"experiment file {str(path)!r} is not a .py file{hint}; an experiment is a Python file whose "
            "get_config() returns bpjax.config.default() with fields changed"
        )
    try:
        p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"experiment file {str(path)!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"experiment file {str(path)!r} cannot be read ({one_line(e)})") from None
    spec = importlib.util.spec_from_file_location(f"bpjax_experiment_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except UserError:
        raise
    except SystemExit as e:
        raise UserError(
            f"experiment file {path} exits while it loads (SystemExit({e.code!r})); put script code "
            "under if __name__ == '__main__':"
        ) from None
    except Exception as e:  # the user's file: say where it broke, in one line
        raise UserError(f"experiment file {path} failed to load: {_failure(e, p)}") from e
    return module


def _call(path, module, name: str):
    """``module.NAME()``, the user's function, with every way it can fail as one line naming the file."""
    fn = getattr(module, name)
    if not callable(fn):
        raise UserError(
            f"{path}: {name} must be a function, found {type(fn).__name__}; define def {name}(): "
            "returning bpjax.config.default() with fields changed"
        )
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    required = [
        q.name for q in params if q.default is q.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)
    ]
    if required:
        raise UserError(
            f"{path}: {name}() must take no arguments, but requires {', '.join(required)}; "
            "give them defaults or remove them"
        )
    try:
        return fn()
    except UserError:
        raise
    except SystemExit as e:
        raise UserError(f"{path}: {name}() exits (SystemExit({e.code!r})); return instead") from None
    except Exception as e:
        raise UserError(f"{path}: {name}() failed: {_failure(e, Path(str(path)).expanduser())}") from e


def _config(path, what: str, c) -> mlc.ConfigDict:
    if not isinstance(c, mlc.ConfigDict):
        raise UserError(
            f"{path}: {what} returned {type(c).__name__}, not an ml_collections.ConfigDict; "
            "return bpjax.config.default() with fields changed"
        )
    return c


def from_file(path: str | Path) -> mlc.ConfigDict:
    """The raw ``get_config()`` of an experiment file, so that one experiment can build on another."""
    module = load_module(path)
    if not hasattr(module, "get_config"):
        if hasattr(module, "get_configs"):
            raise UserError(
                f"{path} is a study file (get_configs(): several runs); run it with bpjax compare {path}"
            )
        raise UserError(
            f"experiment file {path} has no get_config(); define one returning bpjax.config.default()"
        )
    c = _config(path, "get_config()", _call(path, module, "get_config"))
    if not c.get("name"):
        with c.unlocked():
            c.name = Path(str(path)).expanduser().stem
    return c


def from_study(path: str | Path) -> dict[str, mlc.ConfigDict]:
    """The raw ``get_configs()`` of a study file (run name -> config), checked like `from_file`."""
    module = load_module(path)
    if not hasattr(module, "get_configs"):
        return {Path(str(path)).expanduser().stem: from_file(path)}
    runs = _call(path, module, "get_configs")
    if not isinstance(runs, dict) or not runs:
        raise UserError(
            f"{path}: get_configs() returned {type(runs).__name__}"
            + (" with no runs" if isinstance(runs, dict) else "")
            + "; return a dict of run name -> config, e.g. {'sync': config_a, 'async': config_b}"
        )
    for name, c in runs.items():
        if not isinstance(name, str) or not name:
            raise UserError(f"{path}: get_configs() names a run {name!r}; run names are non-empty strings")
        _config(path, f"get_configs()[{name!r}]", c)
    return runs


def load(path: str | Path, overrides: list[str] | None = None) -> mlc.ConfigDict:
    """Load an experiment file's ``get_config()``, apply ``key=value`` overrides, validate. No jax work."""
    path = find_experiment(path)
    c = merge_into_default(from_file(path), source=str(path))
    c = apply_overrides(c, overrides or [])
    resolve_data_paths(c, path)
    validate(c)
    return c


DATA_PATHS = ("path", "labels_path", "test_path", "test_labels_path")


def resolve_data_paths(c: mlc.ConfigDict, experiment: str | Path) -> None:
    """A relative ``data.*path`` that does not exist from the working directory but does beside the
    experiment file is taken from there (as an absolute path, so ``config.json`` names the file used):
    an experiment and its data move together, and run from any folder."""
    here = Path(os.path.abspath(Path(str(experiment)).expanduser())).parent
    for key in DATA_PATHS:
        value = c.data[key]
        if not value or Path(value).expanduser().is_absolute() or Path(value).expanduser().exists():
            continue
        beside = here / value
        if beside.exists():
            with c.data.unlocked():
                c.data[key] = str(beside)


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


def _dict_keys() -> set[str]:
    """The keys whose values are whole dicts (e.g. ``parallel.stragglers``), set and checked whole."""
    return {key for key, s in schema().items() if s.item == "dict"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and prefix + k in _dict_keys():
            out[prefix + k] = v
        elif isinstance(v, dict) and not (prefix + k == "parallel.mesh"):
            out.update(_flatten(v, prefix + k + "."))
        elif isinstance(v, dict):
            for axis, size in v.items():
                out[f"{prefix}{k}.{axis}"] = size
        else:
            out[prefix + k] = v
    return out


def _get(c: mlc.ConfigDict, dotted: str):
    for part in dotted.split("."):
        c = c[part]
    return c


def _check_int_size(key: str, setting: Setting, value: Any) -> None:
    """Whole numbers must fit JAX's int32 (`MAX_INT`), whatever their declared range."""
    if not (setting.item == "int" or (type(setting.default) is int and not setting.choices)):
        return
    for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
        if isinstance(v, int) and not -MAX_INT - 1 <= v <= MAX_INT:
            where = f"{key}[{i}]" if isinstance(value, tuple) else key
            raise UserError(
                f"{where}={v} is out of range: whole numbers in a config must fit in 32 bits "
                f"(between -2**31 and 2**31 - 1 = {MAX_INT})"
            )


def _check_name(name: str) -> None:
    """The run's name becomes a folder name (``runs/NAME-TIME``): one path component, printable."""
    bad = any(ch in name for ch in "/\\") or name.startswith(".") or not name.isprintable() or len(name) > 100
    if bad:
        safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).lstrip("._")[:100] or "run"
        raise UserError(
            f"name={name!r} must work as a folder name (no slashes, not starting with '.', printable, at most "
            f"100 characters); e.g. name={safe!r}"
        )


def validate(c: mlc.ConfigDict) -> None:
    """Checks that need no data and no devices: every key against its declared range, then the checks
    across keys. Data and device checks happen where those are known."""
    from bpjax import strategies

    for key, setting in schema().items():
        value = _get(c, key)
        setting.check(key, value)
        _check_int_size(key, setting, value)
    strategies.get(c.parallel.strategy)
    _check_name(c.name)
    t = c.train
    warmup = c.optimizer.warmup_steps
    if warmup and warmup >= t.steps:
        raise UserError(f"optimizer.warmup_steps={warmup} must be in [0, train.steps={t.steps})")
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
    if c.train.loss == "cross_entropy" and c.data.name == "synthetic_regression":
        raise UserError(
            "train.loss=cross_entropy needs class labels; synthetic_regression needs train.loss=mse"
        )
    known = sorted({a for d in strategies.REGISTRY.values() for a in d.axes})
    for axis, size in c.parallel.mesh.items():
        if axis not in known:
            match = difflib.get_close_matches(axis, known, n=1, cutoff=0.5)
            hint = f"did you mean parallel.mesh.{match[0]}?" if match else f"the axes are {', '.join(known)}"
            raise UserError(f"parallel.mesh.{axis}: no strategy lays out over an axis named {axis!r}; {hint}")
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise UserError(
                f"parallel.mesh.{axis}={size!r} must be a positive integer or -1 (all remaining devices)"
            )
    if list(c.parallel.mesh.values()).count(-1) > 1:
        raise UserError("parallel.mesh may use -1 for one axis only; give the other sizes explicitly")
    every = c.checkpoint.every
    if every % k:
        raise UserError(
            f"checkpoint.every={every} is not a multiple of train.steps_per_call={k}; checkpoints are "
            f"saved between compiled calls (use every={max(every // k, 1) * k})"
        )
    _check_precision_and_accumulation(c)
    strategies.get(c.parallel.strategy).check(c)


def _check_precision_and_accumulation(c: mlc.ConfigDict) -> None:
    """``model.precision`` against the dtypes set by hand; ``train.accumulate`` against the batch; both
    against what the strategy declares it can do."""
    from bpjax import strategies
    from bpjax.step import precision_policy

    d = strategies.get(c.parallel.strategy)
    compute, _ = precision_policy(c.model)
    if compute == "float16" and not d.scales_loss:
        can = strategies.names(lambda s: s.scales_loss)
        raise UserError(
            f"{d.name} computes its gradients its own way, without the loss scaling float16 needs; use "
            f"model.precision=bf16, or float16 with {can}"
        )
    n, b = c.train.accumulate, c.train.batch_size
    if n > 1 and not d.accumulates:
        raise UserError(f"{d.name} cannot accumulate gradients (train.accumulate={n}); {d.not_accumulating}")
    if b % n:
        raise UserError(
            f"train.accumulate={n} does not divide train.batch_size={b}; microbatches are equal shares of "
            f"the batch: use a divisor of {b} or a batch size such as {max(b // n, 1) * n}"
        )


def reference_markdown() -> str:
    """``docs/configuration.md``: every key with its type, default, valid values and help, generated
    from the declarations (a test fails when the file in the repository is stale)."""
    from bpjax import strategies

    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by `bpjax config --schema > docs/configuration.md`; do not edit by hand. -->",
        "",
        "An experiment file's `get_config()` returns `bpjax.config.default()` with some keys changed; "
        "`--set KEY=VALUE` changes one more (values are Python literals). Every value is checked against "
        "the range below before anything is compiled or written; whole numbers must also fit in 32 bits "
        "(below 2**31). `parallel.mesh` maps mesh axes to sizes "
        "(`-1`: all remaining devices); each strategy's own settings are listed with the strategies that "
        "read them.",
    ]
    section = None
    keys = schema()
    order = list(dict.fromkeys(k.split(".")[0] if "." in k else "" for k in keys))
    ranked = sorted(keys.items(), key=lambda kv: order.index(kv[0].split(".")[0] if "." in kv[0] else ""))
    for key, s in ranked:
        head = key.split(".")[0] if "." in key else "top level"
        if head != section:
            section = head
            lines += ["", f"## `{head}`" if head != "top level" else "## Top level", ""]
            lines += ["| key | type | default | valid values | meaning |", "|---|---|---|---|---|"]
        meaning = s.help
        if key.startswith("parallel.") and strategies.users(key.split(".", 1)[1]):
            meaning += f" (read by {', '.join(strategies.users(key.split('.', 1)[1]))})"
        valid = s.range_text() or "any"
        lines.append(f"| `{key}` | {s.kind} | `{s.default!r}` | {valid} | {meaning.replace('|', '/')} |")
        if key == "parallel.strategy":
            names = ", ".join(f"`{n}`" for n in strategies.REGISTRY)
            lines.append(
                f"| `parallel.mesh` | dict | `{{'data': -1}}` | axis -> size >= 1 or -1 | mesh axes and "
                f"their sizes; strategies: {names} |"
            )
    return "\n".join(lines) + "\n"
