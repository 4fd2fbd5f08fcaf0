"""Pre-flight: everything checked and built before a run compiles or writes anything.

`prepare` validates a config against the schema, the data and the devices and builds the strategy
(nothing compiled); `check_output` makes the read-only checks of the output folder, including whether a
checkpoint can be resumed. ``bpjax run``, ``bpjax launch`` (before it starts any process), ``bpjax plan``
and ``bpjax compare`` all go through here, so bad input is refused the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ml_collections as mlc

from bpjax import config as cfg_lib
from bpjax import data as data_lib
from bpjax import distributed, strategies
from bpjax.checkpoint import CHECKPOINTS, Checkpointer
from bpjax.devices import use_cpu_devices
from bpjax.errors import UserError
from bpjax.metrics import RUN_FILES
from bpjax.plan import check_memory_budget, make_plan
from bpjax.step import Problem, make_problem
from bpjax.strategies.base import Strategy


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
    batches = data_lib.Batches(ds.x_train, ds.y_train, b, config.seed)
    setup = Setup(config, ds, problem, strategy, batches)
    check_multi_process(setup, processes)
    budget = config.parallel.memory_budget_mb
    if budget:
        check_memory_budget(make_plan(setup), budget)
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
    name = setup.strategy.name
    if processes > 1 and not strategies.runs_multi_process(name, setup.config.parallel):
        when = strategies.get(name).multi_process_when
        raise UserError(
            f"{name}{f' without {when}' if when else ''} runs in one process only; "
            f"across processes use {strategies.multi_process_names()}"
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
