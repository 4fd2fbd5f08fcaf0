"""Finished (and unfinished) runs: browse them, load one, predict with it.

* `list_runs` / `table`: every run folder under a directory, read from its files (``config.json``,
  ``metrics.jsonl``, ``summary.json``, the lock) without training or importing JAX: ``bpjax runs [DIR]``.
* `load_run`: a run's config, history and parameters, restored onto one device whatever strategy
  trained them, with `TrainedRun.predict` and `TrainedRun.evaluate`: ``bpjax.load_run(WORKDIR)``.
* `read_inputs` / `write_predictions`: ``bpjax predict WORKDIR INPUT.npz|csv``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bpjax.errors import UserError, one_line
from bpjax.metrics import read_jsonl
from bpjax.workdir import BEST, CHECKPOINTS, in_use

# ------------------------------------------------------------------------------------------ browsing


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_rows(path: Path) -> list[dict]:
    try:
        return read_jsonl(path)
    except (OSError, ValueError):
        return []


def run_info(folder: Path) -> dict[str, Any]:
    """One run's row for `table`, from its files: a finished run's ``summary.json``, else its config and
    last logged rows."""
    config = _read_json(folder / "config.json") or {}
    summary = _read_json(folder / "summary.json")
    rows = _last_rows(folder / "metrics.jsonl")
    last = rows[-1] if rows else {}
    last_eval = next((r for r in reversed(rows) if r.get("eval_loss") is not None), {})
    total = config.get("train", {}).get("steps")
    mesh = (summary or {}).get("mesh") or config.get("parallel", {}).get("mesh") or {}
    if summary is not None:
        status = "stopped early" if summary.get("stopped_early") else "finished"
        steps = summary.get("steps")
    else:
        status = "running" if in_use(folder) else "unfinished"
        steps = last.get("step", 0)
    return {
        "run": str(folder),
        "name": config.get("name") or folder.name,
        "strategy": (summary or {}).get("strategy") or config.get("parallel", {}).get("strategy", "?"),
        "mesh": "x".join(f"{a}={n}" for a, n in mesh.items()) or "-",
        "steps": f"{steps}/{total}" if total is not None else str(steps),
        "train_loss": (summary or {}).get("final_train_loss", last.get("train_loss")),
        "eval_loss": (summary or last_eval).get("eval_loss"),
        "eval_accuracy": (summary or last_eval).get("eval_accuracy"),
        "samples_per_second": (summary or last).get("samples_per_second"),
        "status": status,
    }


def list_runs(directory: str | Path = "runs") -> list[dict[str, Any]]:
    """Every run folder (one with a ``config.json``) under ``directory``, sorted by path."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise UserError(
            f"bpjax runs: {directory} {what}; give the folder that holds your runs (default: runs)"
        )
    found = sorted({p.parent for p in root.rglob("config.json") if ".replaced-" not in str(p)})
    return [run_info(folder) for folder in found]


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def table(rows: list[dict[str, Any]], relative_to: Path | None = None) -> str:
    """Rows as an aligned plain-text table (runs under ``relative_to`` are named relative to it)."""
    keys = ["run", "strategy", "mesh", "steps", "train_loss", "eval_loss", "eval_accuracy"]
    keys += ["samples_per_second", "status"]
    heads = [*keys[:-2], "samples/s", "status"]
    cells = []
    for r in rows:
        run = Path(r["run"])
        if relative_to is not None and run.is_relative_to(relative_to) and run != relative_to:
            run = run.relative_to(relative_to)
        cells.append([str(run), *(_cell(r[k]) for k in keys[1:])])
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    numeric = {"train_loss", "eval_loss", "eval_accuracy", "samples_per_second", "steps"}
    lines = []
    for line in [heads, *cells]:
        parts = [
            c.rjust(w) if k in numeric else c.ljust(w) for c, w, k in zip(line, widths, keys, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- loading


def _config_of(workdir: Path):
    from bpjax import config as cfg_lib

    raw = _read_json(workdir / "config.json")
    if raw is None:
        raise UserError(
            f"{workdir} holds no readable config.json, so it is not a bpjax run; give the --workdir of a run "
            "(bpjax runs lists them)"
        )
    import ml_collections as mlc

    try:
        config = cfg_lib.merge_into_default(mlc.ConfigDict(raw), source=str(workdir / "config.json"))
        cfg_lib.validate(config)
    except UserError as e:
        raise UserError(f"{workdir}/config.json is not a config this bpjax can load ({e})") from None
    return config


def check_workdir(workdir: str | Path, best: bool = False) -> Path:
    """A run folder with a config and a checkpoint (the best one with ``best``): one error line if not."""
    w = Path(workdir).expanduser()
    if not w.is_dir():
        raise UserError(
            f"run folder {workdir} {'is a file' if w.exists() else 'does not exist'}; give a run's --workdir "
            "(bpjax runs lists them)"
        )
    if not (w / "config.json").is_file():
        raise UserError(f"{workdir} is not a bpjax run (no config.json); give a run's --workdir (bpjax runs)")
    folder = w / (BEST if best else CHECKPOINTS)
    steps = [p for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    if not steps:
        hint = (
            "train with --set checkpoint.keep_best=eval_loss"
            if best
            else "train with --set checkpoint.every=N to save checkpoints"
        )
        raise UserError(f"{workdir} holds no {'best ' if best else ''}checkpoint to load; {hint}")
    return w


@dataclass
class TrainedRun:
    """A trained run, restored onto one device: ``config``, ``summary``, ``history`` (the
    ``metrics.jsonl`` rows), the ``step`` its parameters were saved at, and ``params``."""

    workdir: Path
    config: Any
    summary: dict | None
    history: list[dict]
    step: int
    params: Any = field(repr=False)
    problem: Any = field(repr=False)
    dataset: Any = field(repr=False)  # the run's data, standardized as it trained on it
    mean: np.ndarray | None = field(repr=False, default=None)  # data.standardize's scaler, or None
    std: np.ndarray | None = field(repr=False, default=None)

    def prepare_inputs(self, x) -> np.ndarray:
        """Raw inputs ``[N, D]`` (as in the data file) -> what the network saw (standardized, float32)."""
        x = np.asarray(x)
        if x.ndim == 1 and x.size == self.dataset.num_features:
            x = x[None]
        x = x.reshape(len(x), -1)
        if x.shape[1] != self.dataset.num_features:
            raise UserError(
                f"the inputs have {x.shape[1]} features, the run {self.workdir} was trained on "
                f"{self.dataset.num_features}"
            )
        x = x.astype(np.float32)  # as the data loader holds them, before scaling
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x.astype(np.float32)

    def outputs(self, x, standardized: bool = False) -> np.ndarray:
        """The network's outputs ``[N, O]``: logits for classification, targets for regression."""
        import jax

        if not standardized:
            x = self.prepare_inputs(x)
        return np.asarray(jax.jit(self.problem.predict)(self.params, np.asarray(x, np.float32)))

    def predict(self, x, standardized: bool = False) -> np.ndarray:
        """Predicted labels ``[N]`` (classification) or targets ``[N, T]`` (regression) for raw inputs
        ``x`` ``[N, D]`` (``standardized=True``: inputs already scaled like ``dataset.x_test``)."""
        out = self.outputs(x, standardized)
        return out.argmax(-1) if self.dataset.task == "classification" else out

    def evaluate(self, data=None) -> dict[str, float]:
        """``eval_loss`` (and ``eval_accuracy``) on the run's test split, or on ``data``: raw
        ``(x, y)`` or a `bpjax.Dataset` (its test split), computed exactly as the run evaluated."""
        from bpjax import data as data_lib
        from bpjax.train import make_evaluator

        ds = self.dataset
        if isinstance(data, data_lib.Dataset):
            ds = data
        elif data is not None:
            x, y = data
            y = np.asarray(y)
            y = (
                y.astype(np.int32)
                if ds.task == "classification"
                else y.reshape(len(y), -1).astype(np.float32)
            )
            x = self.prepare_inputs(x)
            ds = data_lib.Dataset(ds.name, ds.x_train, ds.y_train, x, y, ds.task, ds.num_outputs)
        return make_evaluator(self.problem, ds)(self.params)


def load_run(workdir: str | Path, *, best: bool = False, step: int | None = None) -> TrainedRun:
    """A run's config, history and parameters from its latest checkpoint (``best=True``: from
    ``checkpoint.keep_best``'s; ``step``: that one), on one device.

    Checkpoints of strategies with portable checkpoints (every registered one) restore straight into
    the one-device layout, a scheme's own state beside the TrainState left out; a strategy without
    them restores under itself, which needs its devices, and is gathered.
    """
    from bpjax import config as cfg_lib
    from bpjax import data as data_lib
    from bpjax import strategies
    from bpjax.checkpoint import Checkpointer, Unreadable
    from bpjax.step import make_problem

    w = check_workdir(workdir, best)
    config = _config_of(w)
    split = cfg_lib.seeds(config)["split"]
    ds = data_lib.load(config.data, split)
    mean = std = None
    if config.data.standardize:
        raw = config.copy_and_resolve_references()
        with raw.unlocked():
            raw.data.standardize = False
        x = data_lib.load(raw.data, split).x_train
        mean, std = x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64)
        std[std == 0] = 1.0
    problem = make_problem(config, ds.num_features, ds.num_outputs)
    folder = w / (BEST if best else CHECKPOINTS)
    if strategies.get(config.parallel.strategy).portable_checkpoints:
        single = config.copy_and_resolve_references()
        with single.unlocked():
            single.parallel.strategy = "single"
        strategy = strategies.make("single", problem, single.parallel)
        restore_config = single
    else:
        from bpjax.preflight import prepare

        restore_config = config
        strategy = prepare(config).strategy
    ckpt = Checkpointer(folder, restore_config, strategy, create=False)
    try:
        if step is None:
            found = ckpt.newest_readable()
            step, state = found.step, found.state
        else:
            if step not in ckpt.all_steps():
                raise UserError(f"{folder} holds no checkpoint {step}; it holds {sorted(ckpt.all_steps())}")
            try:
                state = ckpt.restore(step)
            except Unreadable as e:
                raise UserError(f"checkpoint {folder / str(step)} cannot be read ({one_line(e)})") from None
    finally:
        ckpt.close()
    params = strategy.gather(state).params
    summary = _read_json(w / "summary.json")
    history = _last_rows(w / "metrics.jsonl")
    return TrainedRun(w, config, summary, history, step, params, problem, ds, mean, std)


# -------------------------------------------------------------------------------------- predicting


def read_inputs(path: str | Path) -> np.ndarray:
    """Inputs ``[N, D]`` for ``bpjax predict``: an ``.npz`` with ``x`` (or one array), or a numeric CSV
    whose columns are the features (one header row allowed). One error line for anything else."""
    from bpjax.data import _need_file, read_csv

    text = str(path)
    p = _need_file(text, "INPUT", "input")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as e:  # noqa: BLE001  (numpy raises many kinds for a damaged file)
            raise UserError(f"INPUT {text!r} is not a readable .npz file ({one_line(e, 100)})") from None
        if "x" in arrays:
            x = arrays["x"]
        elif len(arrays) == 1:
            x = next(iter(arrays.values()))
        else:
            raise UserError(
                f"INPUT {text!r} holds {sorted(arrays)}; name the inputs x (np.savez(path, x=...))"
            )
    elif p.suffix == ".csv":
        features, last = read_csv(text, -1)  # every column is a feature: put the label column back
        x = np.concatenate([features, last[:, None]], axis=1)
    else:
        raise UserError(f"INPUT {text!r} must be an .npz file (with x) or a .csv file of features")
    if not np.issubdtype(np.asarray(x).dtype, np.number) or np.asarray(x).dtype.kind == "c":
        raise UserError(f"INPUT {text!r} holds {np.asarray(x).dtype} values; give real numbers")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2 or len(x) == 0:
        raise UserError(f"INPUT {text!r} holds an array of shape {x.shape}; give examples as rows [N, D]")
    if not np.isfinite(x).all():
        row = int(np.nonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0][0])
        raise UserError(f"INPUT {text!r}: example {row} holds a NaN or Inf; fix or drop it")
    return x


def write_predictions(run: TrainedRun, x: np.ndarray, output: Path) -> None:
    """Predictions as CSV (``prediction`` then each class's probability, or each target) or ``.npz``."""
    import jax

    out = run.outputs(x)
    classification = run.dataset.task == "classification"
    if classification:
        probs = np.asarray(jax.nn.softmax(out, axis=-1))
        pred = out.argmax(-1)
    tmp = output.with_name(output.name + ".tmp" + output.suffix)
    if output.suffix == ".npz":
        arrays = {"prediction": pred, "probabilities": probs} if classification else {"prediction": out}
        np.savez(tmp, **arrays)
    else:
        if classification:
            head = ["prediction", *(f"p{k}" for k in range(out.shape[1]))]
            body = [[str(int(c)), *(f"{v:.6g}" for v in p)] for c, p in zip(pred, probs, strict=True)]
        else:
            head = [f"target{k}" for k in range(out.shape[1])] if out.shape[1] > 1 else ["prediction"]
            body = [[f"{v:.8g}" for v in row] for row in out]
        tmp.write_text(",".join(head) + "\n" + "".join(",".join(r) + "\n" for r in body))
    tmp.replace(output)
