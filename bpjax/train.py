"""The train loop: one loop for every strategy, with no parallel logic of its own.

``run(config, workdir)`` checks everything it can before it compiles or writes anything (config, data,
devices, batch divisibility), then: ``strategy.init`` -> for each call ``shard_batch`` + ``step`` (K fused
steps) -> log and evaluate between calls -> write ``summary.json``. The CLI, the experiment files, the
notebooks and the tests all call this function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from bpjax import config as cfg_lib
from bpjax import data as data_lib
from bpjax import strategies
from bpjax.devices import use_cpu_devices
from bpjax.errors import UserError
from bpjax.metrics import RUN_FILES, MetricsLog, Progress, write_json
from bpjax.models import describe
from bpjax.step import Problem, TrainState, make_problem
from bpjax.strategies.base import Strategy

EVAL_CHUNK = 8192  # test examples per evaluation call: bounds memory for large synthetic test sets


@dataclass
class RunResult:
    """What `run` returns: the summary, the logged rows, and the final state in the reference layout."""

    config: mlc.ConfigDict
    summary: dict[str, Any]
    history: list[dict[str, Any]]
    state: TrainState = field(repr=False)
    workdir: Path | None = None

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one logged metric, skipping rows where it is absent."""
        rows = [r for r in self.history if r.get(key) is not None]
        return np.array([r["step"] for r in rows]), np.array([r[key] for r in rows], dtype=float)


@dataclass
class Setup:
    """Everything checked and built before the first compile or write."""

    config: mlc.ConfigDict
    dataset: data_lib.Dataset
    problem: Problem
    strategy: Strategy
    batches: data_lib.Batches


def prepare(config: mlc.ConfigDict) -> Setup:
    """Validate ``config`` against the schema, the data and the devices; build the strategy (no compile)."""
    config = cfg_lib.merge_into_default(config)
    cfg_lib.validate(config)
    strategies.get(config.parallel.strategy)  # an unknown name fails here, before any data is loaded
    if config.parallel.cpu_devices:
        use_cpu_devices(config.parallel.cpu_devices)
    ds = data_lib.load(config.data, config.seed)
    if ds.task == "regression" and config.train.loss != "mse":
        raise UserError(f"data {config.data.name} has real-valued targets; set train.loss=mse")
    if ds.task == "classification" and config.train.loss == "mse":
        raise UserError(f"data {config.data.name} has class labels; set train.loss=cross_entropy")
    problem = make_problem(config, ds.num_features, ds.num_outputs)
    strategy = strategies.make(config.parallel.strategy, problem, config.parallel)
    b, n = config.train.batch_size, strategy.data_parallel
    if b % n:
        raise UserError(
            f"train.batch_size={b} is not divisible by {n} data-parallel devices; "
            f"use a multiple of {n} such as {max(b // n, 1) * n}"
        )
    if b % strategy.microbatches:
        m = strategy.microbatches
        raise UserError(
            f"train.batch_size={b} is not divisible by parallel.microbatches={m}; "
            f"use batch_size={max(b // m, 1) * m} or a divisor of {b} as microbatches"
        )
    batches = data_lib.Batches(ds.x_train, ds.y_train, b, config.seed)
    return Setup(config, ds, problem, strategy, batches)


def _open_workdir(workdir: str | Path | None, overwrite: bool) -> Path | None:
    if workdir is None:
        return None
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; give a folder")
    taken = [f for f in RUN_FILES if (workdir / f).exists()]
    if taken and not overwrite:
        raise UserError(
            f"{workdir} already holds a run ({taken[0]}); choose another --workdir or pass --overwrite"
        )
    for f in taken:
        (workdir / f).unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def make_evaluator(problem: Problem, ds: data_lib.Dataset):
    """Test loss and accuracy of host parameters, computed exactly in the reference layout.

    Evaluation runs on gathered parameters, so it is identical for every strategy and needs no padding
    of the test set to a multiple of the device count.
    """
    metrics = jax.jit(problem.eval_metrics)
    n = len(ds.x_test)
    chunks = [(i, min(i + EVAL_CHUNK, n)) for i in range(0, n, EVAL_CHUNK)]

    def evaluate(params) -> dict[str, float]:
        params = jax.device_put(params)
        loss = correct = 0.0
        for lo, hi in chunks:
            m = metrics(params, {"x": ds.x_test[lo:hi], "y": ds.y_test[lo:hi]})
            loss += float(m["loss_sum"])
            correct += float(m["correct"])
        out = {"eval_loss": loss / n}
        if ds.task == "classification":
            out["eval_accuracy"] = correct / n
        return out

    return evaluate


def run(config: mlc.ConfigDict, workdir: str | Path | None = None, *, overwrite: bool = False) -> RunResult:
    """Train the BP network ``config`` describes; write run files into ``workdir`` if one is given.

    Args:
      config: a config from ``bpjax.config.default()`` / an experiment's ``get_config()``.
      workdir: folder for ``config.json``, ``metrics.jsonl`` and ``summary.json``; None writes nothing.
      overwrite: replace the run files of an earlier run in ``workdir``.

    Raises:
      UserError: before anything is compiled or written, for any bad input.
    """
    setup = prepare(config)
    if setup.config.parallel.memory_budget_mb:
        from bpjax.plan import check_memory_budget, make_plan

        check_memory_budget(make_plan(setup.config, setup), setup.config.parallel.memory_budget_mb)
    config, ds, problem, strategy, batches = (
        setup.config,
        setup.dataset,
        setup.problem,
        setup.strategy,
        setup.batches,
    )
    t = config.train
    out = _open_workdir(workdir, overwrite)
    if out:
        write_json(out / "config.json", config.to_dict())
    log = MetricsLog(out)
    evaluate = make_evaluator(problem, ds)
    k = t.steps_per_call
    calls = t.steps // k
    wall_start = time.perf_counter()

    state = strategy.init(jax.random.key(config.seed))
    first_batch = strategy.shard_batch(batches.stack(0, k))
    compile_start = time.perf_counter()
    step_fn = strategy.step.lower(state, first_batch).compile()
    compile_seconds = time.perf_counter() - compile_start

    progress = Progress(t.steps, t.progress, desc=f"{config.name} [{strategy.name}]")
    train_seconds = 0.0  # time spent in training calls, evaluation and logging excluded
    window_seconds, window_steps, window_metrics = 0.0, 0, []  # since the last logged row
    chunk_start = time.perf_counter()  # since the last sync
    last_sync = 0
    row: dict[str, Any] = {}
    try:
        for call in range(calls):
            batch = first_batch if call == 0 else strategy.shard_batch(batches.stack(call * k, k))
            state, metrics = step_fn(state, batch)
            done = (call + 1) * k
            window_steps += k
            window_metrics.append(metrics)
            progress.advance(k)
            log_now = done == t.steps or (t.log_every and (done // t.log_every) > ((done - k) // t.log_every))
            eval_now = done == t.steps or (t.eval_every and done % t.eval_every == 0)
            if not (log_now or eval_now or done - last_sync >= t.sync_every):
                continue
            # Block: forced CPU devices deadlock with too many calls queued, and timings need it anyway.
            host = strategy.gather(metrics)
            last_sync = done
            elapsed = time.perf_counter() - chunk_start
            train_seconds += elapsed
            window_seconds += elapsed
            if log_now or eval_now:
                window = [strategy.gather(m) for m in window_metrics]
                means = {
                    key: float(np.concatenate([np.reshape(m[key], -1) for m in window]).mean())
                    for key in host
                }
                row = {
                    "step": done,
                    "train_loss": float(host["loss"][-1]),
                    "train_loss_mean": means.pop("loss"),
                    "samples_per_second": window_steps * t.batch_size / max(window_seconds, 1e-9),
                }
                # A strategy's own metrics (param_server: bytes_pushed, bytes_pulled), per step.
                row.update({f"{key}_per_step": value for key, value in means.items()})
                if eval_now:
                    row.update(evaluate(strategy.gather(state).params))
                log.write(row)
                progress.log(row)
                window_seconds, window_steps, window_metrics = 0.0, 0, []
            chunk_start = time.perf_counter()
    finally:
        progress.close()
        log.close()

    final = strategy.gather(state)
    summary = {
        "name": config.name,
        "strategy": strategy.name,
        "layout": strategy.layout,
        "num_devices": strategy.num_devices,
        "data_parallel": strategy.data_parallel,
        "mesh": dict(strategy.mesh.shape) if strategy.mesh is not None else {},
        "model": describe(problem.model, ds.num_features),
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(final.params))),
        "data": repr(ds),
        "steps": t.steps,
        "batch_size": t.batch_size,
        "steps_per_call": k,
        "final_train_loss": row.get("train_loss"),
        "eval_loss": row.get("eval_loss"),
        "eval_accuracy": row.get("eval_accuracy"),
        "samples_per_second": t.steps * t.batch_size / max(train_seconds, 1e-9),
        "compile_seconds": compile_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }
    if out:
        write_json(out / "summary.json", summary)
    return RunResult(config, summary, log.rows, final, out)
