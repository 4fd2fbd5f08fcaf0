"""Pre-flight: everything checked and built before a run compiles or writes anything.

`prepare` validates a config against the schema, the data and the devices and builds the strategy
(nothing compiled); `check_output` makes the read-only checks of the output folder, including whether a
checkpoint can be resumed. ``bpjax run``, ``bpjax launch`` (before it starts any process), ``bpjax plan``
and ``bpjax compare`` all go through here, so bad input is refused the same way everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections as mlc

from bpjax import config as cfg_lib
from bpjax import data as data_lib
from bpjax import distributed, strategies
from bpjax import workdir as workdir_lib
from bpjax.checkpoint import CHECKPOINTS, Checkpointer
from bpjax.devices import use_accelerators, use_cpu_devices
from bpjax.errors import UserError, warn
from bpjax.plan import Plan, check_memory_budget, make_plan, per_device_bytes
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
    plan: Plan | None = None  # made by `prepare` for the memory checks; `bpjax plan` and compare reuse it
    notes: list[str] = field(default_factory=list)  # for the run's first line


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
    check_data_size(config)
    seeds = cfg_lib.seeds(config)
    ds = data_lib.load(config.data, seeds["split"])
    if ds.task == "regression" and config.train.loss != "mse":
        raise UserError(f"data {config.data.name} has real-valued targets; set train.loss=mse")
    if ds.task == "classification" and config.train.loss == "mse":
        raise UserError(f"data {config.data.name} has class labels; set train.loss=cross_entropy")
    fitted = use_accelerators(config)
    problem = make_problem(config, ds.num_features, ds.num_outputs)
    strategy = strategies.make(config.parallel.strategy, problem, config.parallel)
    b, n = config.train.batch_size, strategy.data_parallel
    if b % n:
        raise UserError(
            f"train.batch_size={b} is not divisible by {n} data-parallel devices; "
            f"use a multiple of {n} such as {max(b // n, 1) * n}"
        )
    a = config.train.accumulate
    if (b // n) % a:
        raise UserError(
            f"train.accumulate={a} does not divide the {b // n} examples each of {n} data-parallel devices "
            f"gets of train.batch_size={b}; use a batch size divisible by {n * a}, e.g. "
            f"{max(b // (n * a), 1) * n * a}, or another train.accumulate"
        )
    batches = data_lib.Batches(ds.x_train, ds.y_train, b, seeds["data_order"])
    setup = Setup(config, ds, problem, strategy, batches, notes=[fitted] if fitted else [])
    check_multi_process(setup, processes)
    plan = setup.plan = make_plan(setup)
    budget = config.parallel.memory_budget_mb
    if budget:
        check_memory_budget(plan, budget)
    check_memory(setup, plan)
    return setup


# ------------------------------------------------------------------------------------------ resources

GIB = 2**30
# What a run may plan to use of the memory the machine says is available: the rest is for XLA's own
# buffers, the compiler, Python, and the other processes of the machine.
USABLE = 0.8


def available_host_bytes() -> int | None:
    """Memory the OS can give this process now (Linux: MemAvailable), or None where it cannot say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_data_size(config) -> None:
    """A generated data set that cannot fit in memory is one line, before it is generated."""
    d = config.data
    if d.name not in ("synthetic_classification", "synthetic_regression"):
        return  # files are as large as they are; mnist1d and digits are small
    outputs = d.num_targets if d.name == "synthetic_regression" else 1
    # inputs, the teacher's hidden layer (64 wide) and outputs, in float32, and a standardised copy
    need = d.num_samples * (2 * d.num_features + 64 + outputs) * 4
    have = available_host_bytes()
    if have is not None and need > USABLE * have:
        raise UserError(
            f"data.num_samples={d.num_samples} x data.num_features={d.num_features} makes a data set of "
            f"about {need / GIB:.1f} GiB, but this machine has {have / GIB:.1f} GiB available; use fewer "
            "samples or features"
        )


def check_memory(setup: Setup, plan) -> None:
    """A run whose planned memory cannot fit is one line, before anything is allocated or compiled.

    The plan's bytes per device (state, gradients, activations, batch) are held against what each
    device has: on simulated CPU devices all of them share the host's memory, with the data set; on
    accelerators each against its own memory.
    """
    per_device = per_device_bytes(plan)
    devices = setup.strategy.devices
    data = sum(a.nbytes for a in (setup.dataset.x_train, setup.dataset.y_train))
    fix = (
        "use a smaller model, batch or parallel setting (e.g. parallel.staleness), more devices, or a "
        f"strategy that shards the model ({strategies.names(lambda d: d.shards_parameters)})"
    )
    if devices[0].platform == "cpu":
        have = available_host_bytes()
        local = sum(d.process_index == devices[0].client.process_index() for d in devices) or len(devices)
        need = per_device * local + data
        if have is not None and need > USABLE * have:
            raise UserError(
                f"{setup.strategy.name} needs about {need / GIB:.1f} GiB ({per_device / GIB:.2f} GiB on each "
                f"of {local} simulated devices, which share this machine's memory, and the data set) but "
                f"{have / GIB:.1f} GiB are available; {fix}"
            )
        return
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if limit and per_device > USABLE * limit:
        raise UserError(
            f"{setup.strategy.name} needs about {per_device / GIB:.1f} GiB on each {devices[0].device_kind} "
            f"but each has {limit / GIB:.1f} GiB; {fix}"
        )


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
        alone = f"runs across processes only with {when}" if when else "runs in one process only"
        raise UserError(f"{name} {alone}; across processes use {strategies.multi_process_names()}")


@dataclass
class Output:
    """Where a run writes and where it starts: the checked workdir (None: nothing written), the step,
    and for a resume the restored state and the newer checkpoints that could not be read."""

    workdir: Path | None
    start: int = 0
    state: Any = None
    damaged: list[tuple[int, str]] = field(default_factory=list)
    loop: dict = field(default_factory=dict)  # the train loop's host-side state saved with the checkpoint


def check_output(
    setup: Setup, workdir: str | Path | None, overwrite: bool, resume: bool, restore: bool = False
) -> Output:
    """Read-only checks of the output folder, and of the checkpoint a resume starts from.

    Every process makes them (and `bpjax launch`, before it starts any) before anything is written.
    With ``restore`` (the run itself), the resumed state is read here too, so that a checkpoint whose
    files are damaged is found before the workdir is touched: the newest readable one is used instead,
    with a warning line, and none readable is one error line.
    """
    out = workdir_lib.check(workdir, overwrite, resume, probe_lock=distributed.is_leader())
    if not resume:
        return Output(out)
    config = setup.config
    ckpt = Checkpointer(out / CHECKPOINTS, config, setup.strategy, create=False)
    try:
        step, state, loop, damaged, fresh = ckpt.newest_readable(restore=restore)
    finally:
        ckpt.close()
    for bad, why in damaged:
        warn(f"checkpoint {out / CHECKPOINTS / str(bad)} cannot be read ({why}); resuming from step {step}")
    if fresh:
        warn(fresh)
    if step >= config.train.steps:
        raise UserError(
            f"--resume: the run in {out} is complete at step {step}; raise train.steps to train further"
        )
    if step % config.train.steps_per_call:
        raise UserError(
            f"--resume: checkpoint step {step} is not a multiple of train.steps_per_call="
            f"{config.train.steps_per_call}; resume with the steps_per_call that saved it"
        )
    return Output(out, step, state, damaged, loop)
