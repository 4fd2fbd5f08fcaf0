"""The train loop: one loop for every strategy, with no parallel logic of its own.

``run(config, workdir)`` makes every pre-flight check (`bpjax.preflight`: config, data, devices, memory,
the output folder) before it compiles or writes anything, then: ``strategy.init`` -> for each call
``shard_batch`` + ``step`` (K fused steps) -> between calls, when due: sync, the non-finite policy,
save, log and evaluate -> write ``summary.json``. The CLI, the experiment files, the notebooks and the
tests all call this function.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from bpjax import config as cfg_lib
from bpjax import data as data_lib
from bpjax import distributed, faults, tracking
from bpjax.checkpoint import CHECKPOINTS, Checkpointer
from bpjax.config import seeds
from bpjax.devices import describe as describe_devices
from bpjax.errors import Interrupted, TrainingStopped, WriteFailed, quiet_stderr, warn
from bpjax.feed import Feed
from bpjax.metrics import MetricsLog, Progress, read_jsonl, write_json
from bpjax.models import describe
from bpjax.preflight import Output, Setup, check_output, prepare
from bpjax.step import Problem, TrainState
from bpjax.strategies.base import events_header, to_host
from bpjax.workdir import BEST, TENSORBOARD, RunDir, describe_os_error

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


def _cut_log(workdir: Path, resume_step: int, events: str | None) -> None:
    """A resumed run's logs continue from its checkpoint: later rows (to be trained again) go; rows
    without a step (an events file's header) stay."""
    (workdir / "summary.json").unlink(missing_ok=True)
    for log in (workdir / "metrics.jsonl", workdir / events if events else None):
        if log is None or not log.exists():
            continue
        rows = read_jsonl(log)
        tmp = log.with_name(log.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))
        os.replace(tmp, log)


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
      Interrupted: SIGINT or SIGTERM; a checkpoint was saved at the step reached (with a workdir).
      WriteFailed: a write failed (a full disk); the last complete checkpoint stays.
    """
    config, asked = _resolve_schedule(config, workdir, resume)
    setup = prepare(config)
    tracking.check(setup.config, workdir)
    output = check_output(setup, workdir, overwrite, resume, restore=True)
    if output.state is not None and distributed.is_leader():
        n = setup.config.optimizer.schedule_steps
        how = (
            "as asked (optimizer.schedule_steps)"
            if asked
            else "as when the run started; --set optimizer.schedule_steps=N re-stretches it"
        )
        print(
            f"resuming at step {output.start} of {setup.config.train.steps}: the learning-rate schedule "
            f"spans {n} steps, {how}",
            flush=True,
        )
    run_dir = _open_run(setup, output, overwrite)
    try:
        loop = _Loop(setup, output, run_dir)
    except BaseException:
        if run_dir is not None:
            run_dir.roll_back()
            run_dir.release()
        raise
    try:
        state, step_fn = loop.start()
        for call in range(output.start // loop.k, loop.steps // loop.k):
            loop.tracker.before_call(call * loop.k, (call + 1) * loop.k)
            state, metrics = step_fn(state, loop.batch(call))
            done = loop.dispatched(call, metrics)
            if not loop.due(done):
                continue
            losses = loop.sync(done)
            loop.police_nonfinite(losses)
            loop.log_and_evaluate(done, state, losses)
            loop.keep_best(done, state)
            if loop.stop_early(done):
                loop.save(done, state, now=loop.ckpt is not None)
                break
            loop.save(done, state)
            loop.stop_if_signalled(done, state)
        result = loop.result(state)
    except BaseException:
        loop.fail()
        raise
    finally:
        loop.close()
    return result


def _resolve_schedule(config: mlc.ConfigDict, workdir, resume: bool) -> tuple[mlc.ConfigDict, bool]:
    """``optimizer.schedule_steps = 0`` is the ``train.steps`` the run started with: fixed here, so that
    ``config.json`` and the checkpoints record it and a resume with more steps keeps the schedule (read
    from the run's ``config.json``). Returns the config and whether the user set it."""
    config = cfg_lib.merge_into_default(config)
    if config.optimizer.schedule_steps:
        return config, True
    steps = config.train.steps
    if resume and workdir is not None:
        try:
            before = json.loads((Path(workdir).expanduser() / "config.json").read_text())
            steps = before["optimizer"].get("schedule_steps") or before["train"]["steps"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no readable config.json: check_output says what is wrong with the folder
    return cfg_lib.apply_overrides(config, [f"optimizer.schedule_steps={int(steps)}"]), False


def _open_run(setup: Setup, output: Output, overwrite: bool) -> RunDir | None:
    """Every process has checked; process 0 takes the workdir's lock, moves an overwritten run aside,
    sets damaged checkpoints aside, and writes ``config.json``."""
    distributed.barrier("bpjax: run checked")  # nobody writes before every process has checked
    out, run_dir = output.workdir, None
    if out and distributed.is_leader():
        run_dir = RunDir(out)
        run_dir.acquire()
        try:
            if overwrite:
                run_dir.move_aside()
            if output.damaged:
                run_dir.set_aside_damaged([step for step, _ in output.damaged])
            if output.state is not None:
                _cut_log(out, output.start, setup.strategy.events)
            write_json(out / "config.json", setup.config.to_dict())
        except OSError as e:
            run_dir.roll_back()
            run_dir.release()
            raise WriteFailed(
                describe_os_error(e, str(out)) + "; nothing of an earlier run was lost"
            ) from None
    distributed.barrier("bpjax: workdir ready")
    return run_dir


class _Loop:
    """The train loop's state between calls, and its named steps: batch, sync, non-finite policy,
    save, log and evaluate. Nothing here knows how the strategy lays out its step."""

    def __init__(self, setup: Setup, output: Output, run_dir: RunDir | None):
        out, start, resume = output.workdir, output.start, output.state is not None
        self.setup, self.out, self.start_step, self.resume = setup, out, start, resume
        self.restored, self.run_dir = output.state, run_dir
        config, strategy = setup.config, setup.strategy
        t = self.t = config.train
        self.k, self.steps = t.steps_per_call, t.steps
        self.leader = distributed.is_leader()
        every = config.checkpoint.every
        self.ckpt = Checkpointer(out / CHECKPOINTS, config, strategy) if out and (every or resume) else None
        self.every = every
        self.log = MetricsLog(out if self.leader else None, append=resume)
        self.events = None  # a strategy's per-step records (a threads run's trace), when it has them
        if strategy.events and out and self.leader:
            self.events = MetricsLog(out, append=resume, name=strategy.events, keep=False)
            if self.events.empty:
                self.events.write(events_header(config, strategy))
        self.evaluate = make_evaluator(setup.problem, setup.dataset)
        self.rows = strategy.batch_rows(t.batch_size)
        self.feed = Feed(setup.batches, strategy, self.k, self.rows, t.device_data)
        self.progress = Progress(
            t.steps, t.progress if self.leader else "off", desc=f"{config.name} [{strategy.name}]"
        )
        self.fault = faults.after_step_check(distributed.process_index())  # None outside the fault tests
        self.wall_start = time.perf_counter()
        self.compile_seconds = 0.0
        # Time spent in training calls, evaluation and logging excluded (a resume continues the count).
        self.train_seconds = self.resumed_seconds = output.loop.get("train_seconds", 0.0)
        self.window_seconds, self.window_steps = 0.0, 0  # since the last logged row
        self.window: list[dict] = []  # host metrics since the last logged row
        if output.loop.get("window"):  # a resume mid-window: the steps before it count in the next row
            self.window = [{k: np.asarray(v["values"], v["dtype"]) for k, v in output.loop["window"].items()}]
        self.nonfinite_steps = output.loop.get("nonfinite_steps", 0)
        self.bad_in_a_row = output.loop.get("bad_in_a_row", 0)
        self.pending: list = []  # device metrics since the last sync
        self.last_sync = start
        self.row: dict[str, Any] = {}
        self.first_batch = None
        self.quiet = None  # stderr silenced after a failed write has been reported
        self.saved: int | None = None  # the step of the last checkpoint started
        self.failing = False  # the run is raising: close quietly
        self.signal: int | None = None  # SIGINT or SIGTERM received, acted on at the next sync
        self._handlers: dict = {}
        self.done = start  # steps dispatched
        # A resume trains the steps after ``start`` again: TensorBoard purges the old points from there.
        with self._writing(out / TENSORBOARD if out else Path(TENSORBOARD)):
            self.tracker = tracking.Tracker(config, out, self.leader, start + 1 if resume else 0)
        # checkpoint.keep_best and train.early_stop_patience: the test metric's best value so far (signed:
        # lower is better), its step, and how many evaluations since it improved.
        c = config.checkpoint
        self.best_metric = c.keep_best or "eval_loss"
        self.best_sign = -1.0 if self.best_metric == "eval_accuracy" else 1.0
        self.best = output.loop.get("best")
        self.best_step = output.loop.get("best_step")
        self.since_best = output.loop.get("since_best", 0)
        self.stopped_early = False
        self.best_ckpt = None
        if c.keep_best and out is not None:  # every process: orbax saves sharded state together
            self.best_ckpt = Checkpointer(out / BEST, config, strategy, keep=1)

    def start(self):
        """The initial (or restored) state and the step, compiled ahead of time."""
        strategy, s = self.setup.strategy, self.start_step
        self._catch_signals()
        state = (
            self.restored if self.resume else strategy.init(jax.random.key(seeds(self.setup.config)["init"]))
        )
        self.restored = None
        where = "on the device" if self.feed.on_device else "from the host, prefetched"
        mesh = dict(strategy.mesh.shape) if strategy.mesh is not None else {}
        for note in self.setup.notes:
            self.progress.note(f"bpjax: {note}")
        devices = describe_devices(strategy.devices)
        self.progress.note(f"bpjax: {devices}; {strategy.name} over {mesh}; batches {where}")
        compile_start = time.perf_counter()
        step_fn, self.first_batch = self.feed.compile(strategy.step, state, s // self.k)
        self.compile_seconds = time.perf_counter() - compile_start
        self.progress.advance(s)
        self.chunk_start = time.perf_counter()  # since the last sync
        return state, step_fn

    def batch(self, call: int):
        if call == self.start_step // self.k:
            return self.first_batch
        return self.feed(call)

    def dispatched(self, call: int, metrics) -> int:
        """Note a call in flight; returns the steps done once it completes."""
        done = self.done = (call + 1) * self.k
        events = metrics.pop("events", None)
        if self.events is not None and events:
            with self._writing(self.out / self.setup.strategy.events):
                for row in events:
                    self.events.write(row)
        self.window_steps += self.k
        self.pending.append(metrics)
        self.progress.advance(self.k)
        if self.fault:
            self.fault(done)
        return done

    def _log_now(self, done: int) -> bool:
        t = self.t
        return done == t.steps or bool(
            t.log_every and (done // t.log_every) > ((done - self.k) // t.log_every)
        )

    def _eval_now(self, done: int) -> bool:
        return done == self.t.steps or bool(self.t.eval_every and done % self.t.eval_every == 0)

    def _save_now(self, done: int) -> bool:
        return self.ckpt is not None and bool(self.every) and (done % self.every == 0 or done == self.t.steps)

    def due(self, done: int) -> bool:
        """Whether to block now: to log, evaluate or save, or because ``sync_every`` steps are queued;
        in one process, also at once after a signal (several processes agree at their next sync)."""
        return (
            self._log_now(done)
            or self._eval_now(done)
            or self._save_now(done)
            or done - self.last_sync >= self.t.sync_every
            or (self.signal is not None and jax.process_count() == 1)
            or self.tracker.wants_sync(done)
        )

    def sync(self, done: int) -> np.ndarray:
        """Block on the calls in flight (forced CPU devices deadlock with too many queued, and timings
        need it anyway); returns the losses of the steps since the last sync."""
        hosts = [to_host(m) for m in self.pending]
        losses = np.concatenate([np.reshape(h["loss"], -1) for h in hosts])
        elapsed = time.perf_counter() - self.chunk_start
        self.train_seconds += elapsed
        self.window_seconds += elapsed
        self.window.extend(hosts)
        self.pending = []
        self.synced_from, self.last_sync = self.last_sync, done
        self.tracker.after_sync(done)
        return losses

    def police_nonfinite(self, losses: np.ndarray) -> None:
        """``train.nonfinite``: stop at a NaN/Inf loss, or count it as skipped (optax skipped the update)."""
        t = self.t
        for i, loss in enumerate(losses):
            if np.isfinite(loss):
                self.bad_in_a_row = 0
                continue
            self.nonfinite_steps += 1
            self.bad_in_a_row += 1
            if t.nonfinite == "stop" or self.bad_in_a_row > t.max_skipped:
                _stop_nonfinite(self.synced_from + i + 1, float(loss), t, self.ckpt, self.out)

    def save(self, done: int, state, now: bool = False) -> None:
        if not (now or self._save_now(done)):
            return
        # The losses were finite, but the last update may not have been: never save such a state.
        if not bool(all_finite(state)):
            _stop_nonfinite(done, float("nan"), self.t, self.ckpt, self.out, what="the parameters became")
        if self.ckpt is None:  # a signal, in a run that saves no checkpoints otherwise
            self.ckpt = Checkpointer(self.out / CHECKPOINTS, self.setup.config, self.setup.strategy)
        with self._writing(self.out / CHECKPOINTS / str(done)):
            if self.saved != done:  # a signal on a step that was just saved: only wait for it
                self.ckpt.save(done, state, loop=self._loop_state())
                self.saved = done
            if now:
                self.ckpt.wait()
        if self.run_dir is not None:
            self.run_dir.commit()  # the new run has something to show: an overwritten run may go

    def _loop_state(self) -> dict:
        """What a resume needs of the loop to go on as if never stopped: the host metrics since the
        last logged row (the next row's means include them) and the non-finite step counts."""
        state = {
            "nonfinite_steps": self.nonfinite_steps,
            "bad_in_a_row": self.bad_in_a_row,
            "train_seconds": self.train_seconds,
            "best": self.best,
            "best_step": self.best_step,
            "since_best": self.since_best,
        }
        if self.window:
            keys = self.window[-1]
            joined = {k: np.concatenate([np.reshape(m[k], -1) for m in self.window]) for k in keys}
            state["window"] = {k: {"dtype": str(v.dtype), "values": v.tolist()} for k, v in joined.items()}
        return state

    @contextlib.contextmanager
    def _writing(self, path: Path):
        """A full disk or another OS error while writing: one line naming the path; the last complete
        checkpoint stays (orbax writes into a temporary folder and renames it when complete)."""
        try:
            yield
        except OSError as e:
            raise WriteFailed(self._write_failure(describe_os_error(e, str(path)))) from None
        except Exception as e:  # orbax reports a failed background write as its own error
            cause = _os_error_in(e)
            if cause is None:
                raise
            raise WriteFailed(self._write_failure(describe_os_error(cause, str(path)))) from None

    def _write_failure(self, what: str) -> str:
        last = None
        if self.quiet is None:  # orbax's threads report the same failure at length: not to the user
            self.quiet = quiet_stderr()
            self.quiet.__enter__()
        # asyncio then logs the same failure again for every unfinished write task.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        if self.ckpt is not None:
            self.ckpt.failed = True
            with contextlib.suppress(Exception):
                last = self.ckpt.latest_step()
        kept = (
            f"checkpoint {last} is intact; free space and --resume"
            if last is not None
            else "no checkpoint was saved"
        )
        return f"{what}; {kept}"

    def _catch_signals(self) -> None:
        """SIGINT and SIGTERM (a scheduler's preemption) set a flag; the loop saves and stops at its next
        sync. A second signal of the same kind stops at once (Python's default)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, _frame):
            if self.signal is not None:
                signal.signal(
                    signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler
                )
                signal.raise_signal(signum)
                return
            self.signal = signum

        for signum in (signal.SIGINT, signal.SIGTERM):
            self._handlers[signum] = signal.signal(signum, handler)

    def stop_if_signalled(self, done: int, state) -> None:
        """After a signal: every process stops at the same step, with one checkpoint, and says how to
        go on. Across processes the flag is agreed on (any process signalled) at every sync."""
        signum = self.signal
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.int32(signum or 0))
            signum = int(np.max(flags)) or None
        if signum is None:
            return
        name = signal.Signals(signum).name
        if self.out is None:
            raise Interrupted(f"{name} at step {done}; nothing was saved (no workdir)", signum)
        self.save(done, state, now=True)
        raise Interrupted(
            f"{name} at step {done}; saved checkpoint {done} in {self.out / CHECKPOINTS}; "
            f"continue with --resume --workdir {self.out}",
            signum,
        )

    def fail(self) -> None:
        """The run failed: an earlier run it was replacing, with nothing new to show yet, goes back."""
        self.failing = True
        if self.run_dir is not None and self.run_dir.roll_back():
            warn(
                f"the run did not get to its first checkpoint; the earlier run in {self.out} is back in place"
            )

    def log_and_evaluate(self, done: int, state, losses: np.ndarray) -> None:
        if self._log_now(done) or self._eval_now(done):
            window = self.window
            means = {
                key: float(np.concatenate([np.reshape(m[key], -1) for m in window]).mean())
                for key in window[-1]
            }
            row = {
                "step": done,
                "train_loss": float(losses[-1]),
                "train_loss_mean": means.pop("loss"),
                "samples_per_second": self.window_steps * self.t.batch_size / max(self.window_seconds, 1e-9),
                # Time spent training since the run began (compilation, evaluation and logging
                # excluded; a resumed run goes on from its checkpoint's): the x axis of loss against
                # wall clock.
                "train_seconds": self.train_seconds,
            }
            # A strategy's own metrics (param_server: bytes_pushed, bytes_pulled), per step.
            row.update({f"{key}_per_step": value for key, value in means.items()})
            if self._eval_now(done):
                row.update(self.evaluate(self.setup.strategy.gather(state).params))
            with self._writing(self.out / "metrics.jsonl" if self.out else Path("metrics.jsonl")):
                self.log.write(row)
            self.tracker.log(row)
            self.progress.log(row)
            self.row = row
            self.window_seconds, self.window_steps, self.window = 0.0, 0, []
        self.chunk_start = time.perf_counter()

    def keep_best(self, done: int, state) -> None:
        """After an evaluation: note whether the test metric improved; with ``checkpoint.keep_best``,
        save the state into ``WORKDIR/best_checkpoint`` (one kept) when it did."""
        row = self.row
        if row.get("step") != done or row.get(self.best_metric) is None:
            return
        value = self.best_sign * row[self.best_metric]
        if self.best is not None and not value < self.best:
            self.since_best += 1
            return
        self.best, self.best_step, self.since_best = value, done, 0
        if self.best_ckpt is not None:
            with self._writing(self.out / BEST / str(done)):
                self.best_ckpt.save(done, state, loop=self._loop_state())

    def stop_early(self, done: int) -> bool:
        """``train.early_stop_patience``: that many evaluations in a row without improvement."""
        patience = self.t.early_stop_patience
        if not patience or self.since_best < patience or done >= self.steps:
            return False
        self.stopped_early = True
        if self.leader:
            print(
                f"{self.setup.config.name}: stopped early at step {done}: {self.best_metric} has not improved "
                f"for {self.since_best} evaluations (best {self.best_sign * self.best:.4g} at step "
                f"{self.best_step})",
                flush=True,
            )
        return True

    def close(self) -> None:
        self.progress.close()
        self.feed.close()
        try:
            # After a failure, whatever else fails while shutting down (a full disk again, orbax's
            # failed background save) is a consequence: the first error is the one to report.
            with contextlib.suppress(Exception) if self.failing else contextlib.nullcontext():
                with self._writing(self.out / "metrics.jsonl" if self.out else Path("metrics.jsonl")):
                    self.log.close()
                    if self.events is not None:
                        self.events.close()
                if self.ckpt is not None:
                    # The last checkpoint is complete on disk before the run returns or raises (a
                    # failed write was reported already: then only shut down).
                    if not self.ckpt.failed:
                        with self._writing(self.out / CHECKPOINTS):
                            self.ckpt.wait()
                    self.ckpt.close()
                if self.best_ckpt is not None:
                    if not self.best_ckpt.failed:
                        with self._writing(self.out / BEST):
                            self.best_ckpt.wait()
                    self.best_ckpt.close()
                self.tracker.close()
        finally:
            if self.quiet is not None:
                self.quiet.__exit__(None, None, None)
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
            if self.run_dir is not None:
                self.run_dir.release()

    def result(self, state) -> RunResult:
        setup, t, row = self.setup, self.t, self.row
        strategy, config, ds = setup.strategy, setup.config, setup.dataset
        final = strategy.gather(state)
        start = self.start_step
        summary = {
            "name": config.name,
            "strategy": strategy.name,
            "layout": strategy.layout,
            "num_devices": strategy.num_devices,
            "processes": jax.process_count(),
            "data_parallel": strategy.data_parallel,
            "mesh": dict(strategy.mesh.shape) if strategy.mesh is not None else {},
            "model": describe(setup.problem.model, ds.num_features),
            "num_params": int(sum(np.size(x) for x in jax.tree.leaves(final.params))),
            "data": repr(ds),
            "steps": self.done,
            "stopped_early": self.stopped_early,
            "best_step": self.best_step,
            f"best_{self.best_metric}": None if self.best is None else self.best_sign * self.best,
            "resumed_from_step": start if self.resume else None,
            "batch_size": t.batch_size,
            "steps_per_call": self.k,
            "nonfinite_steps": self.nonfinite_steps,
            "final_train_loss": row.get("train_loss"),
            "eval_loss": row.get("eval_loss"),
            "eval_accuracy": row.get("eval_accuracy"),
            "samples_per_second": (self.done - start)
            * t.batch_size
            / max(self.train_seconds - self.resumed_seconds, 1e-9),
            "compile_seconds": self.compile_seconds,
            "wall_seconds": time.perf_counter() - self.wall_start,
            "device_data": self.feed.on_device,
            "backend": jax.default_backend(),
            "jax_version": jax.__version__,
        }
        if self.out and self.leader:
            with self._writing(self.out / "summary.json"):
                write_json(self.out / "summary.json", summary)
        if self.run_dir is not None:
            self.run_dir.commit()
        return RunResult(config, summary, self.log.rows, final, self.out)


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind an exception, following its causes (orbax wraps the one a write raised)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        if "No space left on device" in str(e):
            return OSError(28, "No space left on device")
        e = e.__cause__ or e.__context__
    return None


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
