"""The command line: the only place that parses arguments.

  bpjax run EXPERIMENT.py [--set key=value ...] [--workdir DIR] [--overwrite | --resume]
  bpjax launch --processes N EXPERIMENT.py [the options of run]   N local processes, one run
  bpjax plan EXPERIMENT.py [--set key=value ...] [--compiled] [--json]
  bpjax config [EXPERIMENT.py] [--set key=value ...] [--schema]   the resolved config, or every key
  bpjax compare EXPERIMENT_OR_STUDY.py ... [--set key=value ...] [--workdir DIR] [--target-loss X]
  python -m bpjax run ...              the same
  python experiments/NAME.py [...]      the same, for that file

Bad input prints one line, ``error: ...``, and exits with status 2 before anything is compiled or written.
A run that stops on a NaN or Inf loss exits with status 3; a failed multi-process run with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bpjax.errors import OneLineError, UserError, WriteFailed, mute_stderr


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bpjax", description="Train BP networks in parallel with JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    commands = {
        "run": "train the network an experiment file describes",
        "launch": "run an experiment as several local processes (jax.distributed on loopback)",
        "plan": "explain the layout of an experiment without training",
    }
    parsers = {}
    for name, text in commands.items():
        parsers[name] = sub.add_parser(name, help=text)
        parsers[name].add_argument("experiment", help="path to an experiment file with get_config()")
        parsers[name].add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config field, e.g. --set parallel.strategy=pmap (repeatable)",
        )
    for name in ("run", "launch"):
        parsers[name].add_argument(
            "--workdir",
            help="folder for config.json, metrics.jsonl, summary.json, checkpoints/ "
            "(default: runs/NAME-YYYYmmdd-HHMMSS)",
        )
        parsers[name].add_argument(
            "--overwrite", action="store_true", help="replace an earlier run in --workdir"
        )
        parsers[name].add_argument(
            "--resume",
            action="store_true",
            help="continue the run in --workdir from its latest checkpoint (the strategy may differ)",
        )
    parsers["launch"].add_argument(
        "--processes", type=int, required=True, help="how many processes (each gets cpu_devices/N devices)"
    )
    cfg = sub.add_parser("config", help="print an experiment's resolved config, or the schema of every key")
    cfg.add_argument("experiment", nargs="?", help="an experiment file (default: the defaults)")
    cfg.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    cfg.add_argument(
        "--schema",
        action="store_true",
        help="print every key with its type, default, valid values and meaning (docs/configuration.md)",
    )
    c = sub.add_parser("compare", help="train several experiments or a study file and compare them")
    c.add_argument(
        "experiments", nargs="+", help="experiment files (get_config) or study files (get_configs)"
    )
    c.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field in every run (repeatable)",
    )
    c.add_argument("--workdir", help="output folder (default: runs/compare-YYYYmmdd-HHMMSS)")
    c.add_argument("--target-loss", type=float, default=0.5, help="loss for the steps-to-target column")
    parsers["plan"].add_argument(
        "--compiled",
        action="store_true",
        help="also compile one step and compare with the collectives and memory the compiler emits",
    )
    parsers["plan"].add_argument(
        "--json",
        action="store_true",
        help="print the plan as one JSON object (bytes per device and per training step)",
    )
    return p


def _workdir(args, config) -> Path:
    """``--workdir``, or ``runs/NAME-YYYYmmdd-HHMMSS``; a resumed run must name its folder."""
    if args.resume and not args.workdir:
        raise UserError("--resume needs the --workdir of the run to continue")
    return Path(args.workdir or Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _run(args) -> int:
    from bpjax import config as cfg_lib
    from bpjax import distributed

    config = cfg_lib.load(args.experiment, args.overrides)
    workdir = _workdir(args, config)
    if not args.workdir and distributed.detect() is not None:
        raise UserError("a multi-process run needs --workdir: every process must write to the same folder")

    from bpjax.train import run

    with distributed.fail_fast():
        result = run(config, workdir, overwrite=args.overwrite, resume=args.resume)
    if not distributed.is_leader():
        return 0
    keys = (
        "strategy",
        "num_devices",
        "processes",
        "steps",
        "final_train_loss",
        "eval_loss",
        "eval_accuracy",
        "samples_per_second",
        "compile_seconds",
        "wall_seconds",
    )
    print(json.dumps({k: result.summary[k] for k in keys}, indent=2))
    saved = ", checkpoints/" if (Path(workdir) / "checkpoints").is_dir() else ""
    print(f"wrote {workdir}/config.json, metrics.jsonl, summary.json{saved}")
    return 0


def _launch(args) -> int:
    """Check everything in this process, then start the workers: bad input never starts a process."""
    from bpjax import config as cfg_lib
    from bpjax import distributed
    from bpjax.preflight import check_multi_process, check_output, check_processes, prepare

    n = args.processes
    config = cfg_lib.load(args.experiment, args.overrides)
    if n < 1:
        raise UserError(f"--processes {n} must be >= 1")
    if distributed.detect() is not None:
        raise UserError(
            "bpjax launch starts its own processes; inside a SLURM/MPI job use bpjax run in each task"
        )
    check_processes(config, n)
    workdir = _workdir(args, config)
    setup = prepare(config)  # the same checks every worker makes, over all cpu_devices in one process
    check_multi_process(setup, n)
    check_output(setup, workdir, args.overwrite, args.resume)
    worker = ["run", args.experiment, "--workdir", str(workdir)]
    worker += [f"--set={o}" for o in args.overrides]
    worker += ["--overwrite"] * args.overwrite + ["--resume"] * args.resume
    grace = 2 * setup.config.distributed.heartbeat_timeout_s + 5
    return distributed.launch(worker, n, grace)


def _plan(args) -> int:
    from bpjax import config as cfg_lib
    from bpjax.plan import compare, compiled_report, make_plan, per_device_bytes, to_json
    from bpjax.preflight import prepare

    config = cfg_lib.load(args.experiment, args.overrides)
    setup = prepare(config)
    plan = make_plan(setup)
    if args.json:
        print(json.dumps(to_json(plan, compiled_report(setup) if args.compiled else None)))
        return 0
    print(plan.table())
    budget = config.parallel.memory_budget_mb
    need = per_device_bytes(plan) / 2**20
    print(f"per device during a step: {need:.1f} MiB" + (f" of a {budget:g} MiB budget" if budget else ""))
    if args.compiled:
        print()
        print(compare(plan, setup))
    return 0


def _config(args) -> int:
    from bpjax import config as cfg_lib

    if args.schema:
        print(cfg_lib.reference_markdown(), end="")
        return 0
    if args.experiment:
        config = cfg_lib.load(args.experiment, args.overrides)
    else:
        config = cfg_lib.apply_overrides(cfg_lib.default(), args.overrides)
        cfg_lib.validate(config)
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def _compare(args) -> int:
    from bpjax.compare import compare

    workdir = Path(args.workdir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    compare(args.experiments, args.overrides, workdir, args.target_loss)
    print((workdir / "comparison.md").read_text())
    print(f"wrote {workdir}/comparison.md, comparison.csv, loss_vs_step.png, loss_vs_bytes.png, runs/")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"run": _run, "launch": _launch, "plan": _plan, "config": _config, "compare": _compare}
        return commands[args.command](args)
    except OneLineError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        if isinstance(e, WriteFailed):
            mute_stderr()  # the libraries' own reports of the same failure, as the process exits
        return e.exit_code


def run_experiment_file(path: str) -> None:
    """``python experiments/NAME.py [--set ...] [--workdir ...]``: `main` with ``run NAME.py`` filled in."""
    sys.exit(main(["run", path, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
