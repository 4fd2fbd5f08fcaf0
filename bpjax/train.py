"""The train loop: one loop for every strategy, with no parallel logic of its own.

``run(config, workdir)`` checks everything it can before it compiles or writes anything (config, data,
devices, batch divisibility), then: ``strategy.init`` -> for each call ``shard_batch`` + ``step`` (K fused
steps) -> log and evaluate between calls -> write ``summary.json``. The CLI, the experiment files, the
notebooks and the tests all call this function.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from bpjax import config as cfg_lib
from bpjax import data as data_lib
from bpjax import distributed, faults, strategies
from bpjax.checkpoint import CHECKPOINTS, Checkpointer
from bpjax.devices import use_cpu_devices
from bpjax.errors import TrainingStopped, UserError
from bpjax.metrics import RUN_FILES, MetricsLog, Progress, read_jsonl, write_json
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
    """Validate ``config`` against the schema, the data and the devices; build the strategy (no compile).

    In a multi-process run (`bpjax.distributed`) this is also where the process joins the others:
    ``parallel.cpu_devices`` counts devices over all processes, so each simulates its share.
    """
    config = cfg_lib.merge_into_default(config)
    cfg_lib.validate(config)
    strategies.get(config.parallel.strategy)  # an unknown name fails here, before any data is loaded
    processes = distributed.num_processes()
    if config.parallel.cpu_devices:
        check_processes(config, processes)
        use_cpu_devices(config.parallel.cpu_devices // processes)
    distributed.initialize(config.distributed)
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
    setup = Setup(config, ds, problem, strategy, batches)
    check_multi_process(setup, processes)
    return setup


def check_processes(config: mlc.ConfigDict, processes: int) -> None:
    """The simulated CPU devices must split evenly over the processes (``processes`` >= 1)."""
    n = config.parallel.cpu_devices
    if n and n % processes:
        ok = [p for p in range(1, n + 1) if n % p == 0]
        raise UserError(
            f"{processes} processes cannot share parallel.cpu_devices={n} evenly; "
            f"use --processes {' or '.join(map(str, ok))}"
        )


def check_multi_process(setup: Setup, processes: int) -> None:
    """Only the strategies tested across processes may run in several."""
    if processes > 1 and not setup.strategy.multi_process:
        raise UserError(
            f"{setup.strategy.name} (partition={setup.config.parallel.partition}) runs in one process only; "
            f"across processes use pmap, dp (partition=sample), fsdp, tensor or hybrid"
        )


def check_output(
    setup: Setup, workdir: str | Path | None, overwrite: bool, resume: bool
) -> tuple[Path | None, int]:
    """Read-only checks of the output folder: ``(workdir, the step the run starts from)``.

    Every process makes them (and `bpjax launch`, before it starts any) before anything is written.
    """
    out = _check_workdir(workdir, overwrite, resume)
    return out, _resume_point(setup.config, setup.strategy, out) if resume else 0


def _check_workdir(workdir: str | Path | None, overwrite: bool, resume: bool) -> Path | None:
    """Read-only checks of the output folder (every process makes them before anything is written)."""
    if workdir is None:
        if resume:
            raise UserError("--resume needs the --workdir of the run to continue")
        return None
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; give a folder")
    if resume and overwrite:
        raise UserError(
            "--resume continues the run in --workdir and --overwrite replaces it; pass one of them"
        )
    if resume:
        if not (workdir / CHECKPOINTS).is_dir():
            raise UserError(
                f"--resume: {workdir} holds no checkpoints; run without --resume (checkpoint.every > 0 saves them)"
            )
        return workdir
    taken = [f for f in (*RUN_FILES, CHECKPOINTS) if (workdir / f).exists()]
    if taken and not overwrite:
        raise UserError(
            f"{workdir} already holds a run ({taken[0]}); choose another --workdir, pass --resume to continue "
            f"it or --overwrite to replace it"
        )
    return workdir


def _open_workdir(workdir: Path, resume_step: int | None) -> None:
    """Process 0 only: clear an overwritten run, or cut a resumed run's log back to its checkpoint."""
    if resume_step is None:
        for f in RUN_FILES:
            (workdir / f).unlink(missing_ok=True)
        shutil.rmtree(workdir / CHECKPOINTS, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        (workdir / "summary.json").unlink(missing_ok=True)
        log = workdir / "metrics.jsonl"
        rows = read_jsonl(log) if log.exists() else []
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))
        os.replace(tmp, log)


def _resume_point(config, strategy: Strategy, workdir: Path) -> int:
    """The latest complete checkpoint's step, checked against this run's config and strategy."""
    ckpt = Checkpointer(workdir / CHECKPOINTS, config, strategy, create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(
                f"--resume: {workdir / CHECKPOINTS} holds no complete checkpoint; run without --resume"
            )
        ckpt.check(step)
    finally:
        ckpt.close()
    if step >= config.train.steps:
        raise UserError(
            f"--resume: the run in {workdir} is complete at step {step}; raise train.steps to train further"
        )
    if step % config.train.steps_per_call:
        raise UserError(
            f"--resume: checkpoint step {step} is not a multiple of train.steps_per_call="
            f"{config.train.steps_per_call}; resume with the steps_per_call that saved it"
        )
    return step


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


def run(
    config: mlc.ConfigDict,
    workdir: str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> RunResult:
    """Train the BP network ``config`` describes; write run files into ``workdir`` if one is given.

    Args:
      config: a config from ``bpjax.config.default()`` / an experiment's ``get_config()``.
      workdir: folder for ``config.json``, ``metrics.jsonl``, ``summary.json`` and ``checkpoints/``;
        None writes nothing (and saves no checkpoints).
      overwrite: replace an earlier run in ``workdir``.
      resume: continue the run in ``workdir`` from its latest checkpoint, under this config's strategy
        (the model, optimizer, data and seed must match; steps, strategy and mesh may change).

    Raises:
      UserError: before anything is compiled or written, for any bad input.
      TrainingStopped: the loss became NaN or Inf (``train.nonfinite``); the last good checkpoint stays.
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
    out, start = check_output(setup, workdir, overwrite, resume)
    leader = distributed.is_leader()
    distributed.barrier("bpjax: run checked")  # nobody writes before every process has checked
    if out and leader:
        _open_workdir(out, start if resume else None)
        write_json(out / "config.json", config.to_dict())
    distributed.barrier("bpjax: workdir ready")
    every = config.checkpoint.every
    ckpt = Checkpointer(out / CHECKPOINTS, config, strategy) if out and (every or resume) else None
    log = MetricsLog(out if leader else None, append=resume)
    evaluate = make_evaluator(problem, ds)
    k = t.steps_per_call
    rows = strategy.batch_rows(t.batch_size)
    wall_start = time.perf_counter()

    state = ckpt.restore(start) if resume else strategy.init(jax.random.key(config.seed))
    first_batch = strategy.shard_batch(batches.stack(start, k, rows))
    compile_start = time.perf_counter()
    step_fn = strategy.step.lower(state, first_batch).compile()
    compile_seconds = time.perf_counter() - compile_start

    progress = Progress(t.steps, t.progress if leader else "off", desc=f"{config.name} [{strategy.name}]")
    progress.advance(start)
    train_seconds = 0.0  # time spent in training calls, evaluation and logging excluded
    window_seconds, window_steps, window = 0.0, 0, []  # since the last logged row; window: host metrics
    pending = []  # device metrics since the last sync
    chunk_start = time.perf_counter()  # since the last sync
    last_sync = start
    bad_in_a_row, nonfinite_steps = 0, 0
    row: dict[str, Any] = {}
    fault = faults.after_step_check(distributed.process_index())  # None outside the fault tests
    try:
        for call in range(start // k, t.steps // k):
            batch = (
                first_batch if call == start // k else strategy.shard_batch(batches.stack(call * k, k, rows))
            )
            state, metrics = step_fn(state, batch)
            done = (call + 1) * k
            window_steps += k
            pending.append(metrics)
            progress.advance(k)
            if fault:
                fault(done)
            log_now = done == t.steps or (t.log_every and (done // t.log_every) > ((done - k) // t.log_every))
            eval_now = done == t.steps or (t.eval_every and done % t.eval_every == 0)
            save_now = ckpt is not None and every and (done % every == 0 or done == t.steps)
            if not (log_now or eval_now or save_now or done - last_sync >= t.sync_every):
                continue
            # Block: forced CPU devices deadlock with too many calls queued, and timings need it anyway.
            hosts = [strategy.gather(m) for m in pending]
            losses = np.concatenate([np.reshape(h["loss"], -1) for h in hosts])
            elapsed = time.perf_counter() - chunk_start
            train_seconds += elapsed
            window_seconds += elapsed
            for i, loss in enumerate(losses):
                if np.isfinite(loss):
                    bad_in_a_row = 0
                    continue
                nonfinite_steps += 1
                bad_in_a_row += 1
                if t.nonfinite == "stop" or bad_in_a_row > t.max_skipped:
                    _stop_nonfinite(last_sync + i + 1, float(loss), t, ckpt, out)
            last_sync, pending = done, []
            window.extend(hosts)
            if save_now:
                # The losses were finite, but the last update may not have been: never save such a state.
                if not bool(all_finite(state)):
                    _stop_nonfinite(done, float("nan"), t, ckpt, out, what="the parameters became")
                ckpt.save(done, state)
            if log_now or eval_now:
                means = {
                    key: float(np.concatenate([np.reshape(m[key], -1) for m in window]).mean())
                    for key in window[-1]
                }
                row = {
                    "step": done,
                    "train_loss": float(losses[-1]),
                    "train_loss_mean": means.pop("loss"),
                    "samples_per_second": window_steps * t.batch_size / max(window_seconds, 1e-9),
                }
                # A strategy's own metrics (param_server: bytes_pushed, bytes_pulled), per step.
                row.update({f"{key}_per_step": value for key, value in means.items()})
                if eval_now:
                    row.update(evaluate(strategy.gather(state).params))
                log.write(row)
                progress.log(row)
                window_seconds, window_steps, window = 0.0, 0, []
            chunk_start = time.perf_counter()
    finally:
        progress.close()
        log.close()
        if ckpt is not None:
            ckpt.wait()  # the last checkpoint is complete on disk before the run returns or raises
            ckpt.close()

    final = strategy.gather(state)
    summary = {
        "name": config.name,
        "strategy": strategy.name,
        "layout": strategy.layout,
        "num_devices": strategy.num_devices,
        "processes": jax.process_count(),
        "data_parallel": strategy.data_parallel,
        "mesh": dict(strategy.mesh.shape) if strategy.mesh is not None else {},
        "model": describe(problem.model, ds.num_features),
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(final.params))),
        "data": repr(ds),
        "steps": t.steps,
        "resumed_from_step": start if resume else None,
        "batch_size": t.batch_size,
        "steps_per_call": k,
        "nonfinite_steps": nonfinite_steps,
        "final_train_loss": row.get("train_loss"),
        "eval_loss": row.get("eval_loss"),
        "eval_accuracy": row.get("eval_accuracy"),
        "samples_per_second": (t.steps - start) * t.batch_size / max(train_seconds, 1e-9),
        "compile_seconds": compile_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
    }
    if out and leader:
        write_json(out / "summary.json", summary)
    return RunResult(config, summary, log.rows, final, out)


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no floating-point leaf of ``tree`` holds a NaN or Inf (one fused reduction)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _stop_nonfinite(
    step: int,
    value: float,
    t,
    ckpt: Checkpointer | None,
    out: Path | None,
    what: str = "the training loss became",
) -> None:
    if ckpt is not None:
        ckpt.wait()
    last = ckpt.latest_step() if ckpt is not None else None
    kept = (
        f"the last good checkpoint is step {last} in {out / CHECKPOINTS}"
        if last is not None
        else "no checkpoint was saved"
    )
    skip = (
        f"more than train.max_skipped={t.max_skipped} steps in a row were non-finite"
        if t.nonfinite == "skip"
        else "set train.nonfinite=skip to skip such steps"
    )
    raise TrainingStopped(
        f"{what} {value} at step {step}; stopped ({kept}); lower optimizer.learning_rate, "
        f"set optimizer.clip_norm, or {skip}"
    )
