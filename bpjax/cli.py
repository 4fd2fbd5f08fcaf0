"""The command line: the only place that parses arguments.

  bpjax run EXPERIMENT.py [--set key=value ...] [--workdir DIR] [--overwrite | --resume]
  bpjax launch --processes N EXPERIMENT.py [the options of run]   N local processes, one run
  bpjax plan EXPERIMENT.py [--set key=value ...] [--compiled] [--json]
  bpjax config [EXPERIMENT.py] [--set key=value ...] [--schema]   the resolved config, or every key
  bpjax compare EXPERIMENT_OR_STUDY.py ... [--set key=value ...] [--workdir DIR] [--target-loss X]
                [--seeds 0,1,2] [--overwrite]
  bpjax runs [DIR]                     a table of the runs under DIR (default: runs), read from their files
  bpjax predict WORKDIR INPUT.npz|csv [--output FILE] [--best]   a trained run's predictions
  python -m bpjax run ...              the same
  python experiments/NAME.py [...]      the same, for that file

Bad input prints one line, ``error: ...``, and exits with status 2 before anything is compiled or written.
A run that stops on a NaN or Inf loss exits with status 3; a failed multi-process run with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from bpjax.errors import Interrupted, OneLineError, UserError, WriteFailed, mute_stderr

# What a usage error says a missing argument is, and a complete command line for each command.
_MISSING = {"experiment": "an experiment file", "experiments": "experiment or study files"}
_EXAMPLES = {
    "run": "experiments/mnist1d_dp.py",
    "launch": "--processes 2 experiments/mnist1d_dp.py",
    "plan": "experiments/mnist1d_tensor.py",
    "config": "experiments/mnist1d_dp.py",
    "compare": "experiments/study_sync_async.py",
    "predict": "runs/mnist1d_dp-20260101-120000 inputs.npz",
}


class _Parser(argparse.ArgumentParser):
    """argparse with every usage error as one line naming the fix: a `UserError`, which `main` prints as
    ``error: ...`` with exit status 2 (argparse's own usage block and ``sys.exit`` never happen).
    ``--help`` is unchanged."""

    def error(self, message: str):
        raise UserError(_usage(self.prog, message))

    def _check_value(self, action, value):
        # An unknown command or choice names the closest one (argparse lists them all).
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            match = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f"did you mean {match[0]!r}?" if match else f"choose one of {', '.join(choices)}"
            what = "command" if action.dest == "command" else f"value for {'/'.join(action.option_strings)}"
            raise argparse.ArgumentError(None, f"unknown {what} {value!r}; {hint}")
        super()._check_value(action, value)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = getattr(self, "commands", {})  # set by `_parser` on the top-level parser
            raise UserError(_unexpected(commands.get(getattr(parsed, "command", None), self), extras))
        return parsed


def _usage(prog: str, message: str) -> str:
    """argparse's message, reworded where we know it, with where to read more."""
    see = f"see {prog} --help"
    required = re.fullmatch(r"the following arguments are required: (.*)", message)
    if required:
        missing = [m.strip() for m in required.group(1).split(",")]
        if missing == ["command"]:
            return f"no command given; use one of {', '.join(_EXAMPLES)} ({see})"
        what = " and ".join(_MISSING.get(m, m) for m in missing)
        example = _EXAMPLES.get(prog.split()[-1])
        return f"{prog} needs {what}" + (f", e.g. {prog} {example}" if example else "") + f" ({see})"
    if message.startswith("unknown "):  # ours, from _check_value
        return f"{message} ({see})"
    return f"{prog}: {message} ({see})"


def _unexpected(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """Arguments no option took: the first unknown option with the closest known one, or a stray value."""
    prog, see = parser.prog, f"see {parser.prog} --help"
    option = next((e for e in extras if e.startswith("-") and len(e) > 1), None)
    if option is None:
        return f"{prog} does not take {extras[0]!r} here ({see})"
    name = option.split("=", 1)[0]
    known = sorted(parser._option_string_actions)  # noqa: SLF001 -- argparse keeps them only here
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {match[0]}? " if match else ""
    return f"unknown option {name} for {prog}; {hint}({see})"


def _processes(text: str) -> int:
    """``--processes``: a whole number, at most one process per simulated device JAX can start."""
    from bpjax.config import MAX_CPU_DEVICES

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a whole number, got {text!r}") from None
    if n > MAX_CPU_DEVICES:
        raise argparse.ArgumentTypeError(f"{n} is more than the {MAX_CPU_DEVICES} devices bpjax can simulate")
    return n


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"takes a finite number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from bpjax import __version__

    p = _Parser(prog="bpjax", description="Train BP networks in parallel with JAX.")
    p.add_argument("--version", action="version", version=f"bpjax {__version__}")
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
        "--processes",
        type=_processes,
        required=True,
        help="how many processes (each gets cpu_devices/N devices)",
    )
    cfg = sub.add_parser("config", help="print an experiment's resolved config, or the schema of every key")
    cfg.add_argument("experiment", nargs="?", help="an experiment file (default: the defaults)")
    cfg.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field"
    )
    cfg.add_argument(
        "--examples",
        action="store_true",
        help="list the example experiments and studies that ship with bpjax (bpjax run NAME runs one)",
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
    c.add_argument(
        "--target-loss",
        type=_finite,
        default=None,
        help="loss for the steps- and time-to-target columns (default: the loss every run reaches, the "
        "highest of the runs' best mean train losses)",
    )
    c.add_argument(
        "--seeds",
        help="train every run with each of these seeds (e.g. 0,1,2,3 or 0-3; the data split stays fixed) "
        "and report mean ± std",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --workdir")
    r = sub.add_parser("runs", help="list finished and unfinished runs, read from their files")
    r.add_argument("directory", nargs="?", default="runs", help="folder to search for runs (default: runs)")
    pr = sub.add_parser("predict", help="predict with a trained run: labels (and probabilities) or targets")
    pr.add_argument("workdir", help="the run's folder (its --workdir)")
    pr.add_argument("input", help="inputs: an .npz file with x [N, D], or a CSV file of N rows of D features")
    pr.add_argument(
        "--output",
        help="where to write the predictions, .csv or .npz (default: INPUT_NAME.predictions.csv here)",
    )
    pr.add_argument(
        "--best", action="store_true", help="use the best checkpoint (checkpoint.keep_best), not the latest"
    )
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
    p.commands = {**parsers, "config": cfg, "compare": c, "runs": r, "predict": pr}
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
    from bpjax import devices, distributed
    from bpjax.preflight import check_multi_process, check_output, check_processes, prepare

    n = args.processes
    config = cfg_lib.load(args.experiment, args.overrides)
    if n < 1:
        raise UserError(f"--processes {n} must be >= 1")
    if distributed.detect() is not None:
        raise UserError(
            "bpjax launch starts its own processes; inside a SLURM/MPI job use bpjax run in each task"
        )
    total = config.parallel.cpu_devices
    if total:
        # The user's explicit XLA_FLAGS count wins (with a warning) and is passed on as config; the
        # workers must then simulate their share of it, not an inherited flag's count each.
        wanted = devices.cpu_device_count(total)
        if wanted != total:
            args.overrides = [*args.overrides, f"parallel.cpu_devices={wanted}"]
            config = cfg_lib.load(args.experiment, args.overrides)
    env = dict(os.environ)
    if config.parallel.cpu_devices:
        flags = devices.without_forced_cpu_devices(env.get("XLA_FLAGS", ""))
        if flags:
            env["XLA_FLAGS"] = flags
        else:
            env.pop("XLA_FLAGS", None)
    check_processes(config, n)
    workdir = _workdir(args, config)
    setup = prepare(config)  # the same checks every worker makes, over all cpu_devices in one process
    check_multi_process(setup, n)
    check_output(setup, workdir, args.overwrite, args.resume)
    worker = ["run", args.experiment, "--workdir", str(workdir)]
    worker += [f"--set={o}" for o in args.overrides]
    worker += ["--overwrite"] * args.overwrite + ["--resume"] * args.resume
    grace = 2 * setup.config.distributed.heartbeat_timeout_s + 5
    return distributed.launch(worker, n, grace, env=env)


def _plan(args) -> int:
    from bpjax import config as cfg_lib
    from bpjax.plan import compare, compiled_report, make_plan, per_device_bytes, to_json
    from bpjax.preflight import prepare

    config = cfg_lib.load(args.experiment, args.overrides)
    setup = prepare(config)
    plan = setup.plan or make_plan(setup)
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
    if args.examples:
        folder = cfg_lib.examples_dir()
        for name in cfg_lib.examples():
            doc = (folder / f"{name}.py").read_text().split('"""')
            first = doc[1].strip().splitlines()[0] if len(doc) > 2 and doc[1].strip() else ""
            print(f"{name:28s} {first}")
        return 0
    if args.experiment:
        config = cfg_lib.load(args.experiment, args.overrides)
    else:
        config = cfg_lib.apply_overrides(cfg_lib.default(), args.overrides)
        cfg_lib.validate(config)
    print(json.dumps(config.to_dict(), indent=2))
    return 0


def _compare(args) -> int:
    from bpjax.compare import OUTPUTS, compare, parse_seeds

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    workdir = Path(args.workdir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    compare(
        args.experiments, args.overrides, workdir, args.target_loss, seeds=seeds, overwrite=args.overwrite
    )
    print((workdir / "comparison.md").read_text())
    print(f"wrote {workdir}/{', '.join(OUTPUTS)}, runs/")
    return 0


def _runs(args) -> int:
    from bpjax.runs import list_runs, table

    rows = list_runs(args.directory)
    if not rows:
        print(f"no runs under {args.directory}")
        return 0
    print(table(rows, relative_to=Path(args.directory)))
    return 0


def _predict(args) -> int:
    from bpjax.runs import check_workdir, read_inputs

    check_workdir(args.workdir, args.best)
    output = Path(args.output or f"{Path(args.input).name.split('.')[0]}.predictions.csv")
    if output.suffix not in (".csv", ".npz"):
        raise UserError(f"--output {output} must end in .csv or .npz")
    if output.is_dir() or not output.absolute().parent.is_dir():
        raise UserError(
            f"--output {output}: {'is a folder' if output.is_dir() else 'its folder does not exist'}"
        )
    x = read_inputs(args.input)

    from bpjax.runs import load_run, write_predictions

    run = load_run(args.workdir, best=args.best)
    run.prepare_inputs(x)  # the feature count, checked before anything is written
    write_predictions(run, x, output)
    print(f"wrote {len(x)} predictions of {args.workdir} (step {run.step}) to {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UserError as e:  # a usage error: one line, like any other bad input
        print(f"{e.prefix}: {e}", file=sys.stderr)
        return e.exit_code
    commands = {
        "run": _run,
        "launch": _launch,
        "plan": _plan,
        "config": _config,
        "compare": _compare,
        "runs": _runs,
        "predict": _predict,
    }
    try:
        with _stop_on_signals():
            return commands[args.command](args)
    except OneLineError as e:
        print(f"{e.prefix}: {e}", file=sys.stderr)
        if isinstance(e, WriteFailed):
            mute_stderr()  # the libraries' own reports of the same failure, as the process exits
        return e.exit_code


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT or SIGTERM before (or outside) a training loop, which catches them itself to save a
    checkpoint: one line and 130 or 143, not a traceback or a silent death."""

    def handler(signum, _frame):
        raise Interrupted(
            f"{signal.Signals(signum).name} before training started; no checkpoint was saved", signum
        )

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:  # a second Ctrl-C inside a loop that already caught the first
        raise Interrupted("SIGINT; stopped at once", signal.SIGINT) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_experiment_file(path: str) -> None:
    """``python experiments/NAME.py [--set ...] [--workdir ...]``: `main` with ``run NAME.py`` filled in."""
    sys.exit(main(["run", path, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
