"""What checkpoints and processes cost, as ratios against a baseline measured in the same run.

Run (8 simulated CPU devices are set up by the script itself):

    python benchmarks/checkpoint_cost.py            # about 2 minutes on 2 cores
    python benchmarks/checkpoint_cost.py --hidden 2048,2048 --steps 400 --skip-processes  # a larger state
    python benchmarks/checkpoint_cost.py --quick    # smoke test

1. checkpoints   wall time of a ``dp`` run of the MNIST-1D experiment (40-100-100-10 or ``--hidden``, 8 devices) that
                 saves every ``--every`` steps, in the background (``checkpoint.async_save=True``) and
                 in the foreground, divided by the same run without checkpoints. Rounds alternate the
                 three contenders; the median of the per-round ratios is reported with its quartiles.
2. processes     training samples/s (``summary.json``, compile and evaluation excluded) of the same run
                 as ``bpjax launch --processes 2`` (2 processes x 4 devices, gloo over loopback) divided
                 by 1 process x 8 devices. On one machine this measures what crossing processes costs
                 the collectives, not what a second machine would add.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bpjax

bpjax.use_cpu_devices(8)  # before any JAX work

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments/mnist1d_dp.py"


def timed_run(overrides: list[str], workdir: Path) -> float:
    config = bpjax.load_config(EXPERIMENT, overrides)
    start = time.perf_counter()
    bpjax.run(config, workdir, overwrite=True)
    return time.perf_counter() - start


def quartiles(values) -> str:
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return f"{q50:.3f} [{q25:.3f}, {q75:.3f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--hidden", default="", help="hidden widths, e.g. 2048,2048 (default: the experiment's)")
    p.add_argument("--skip-processes", action="store_true", help="only the checkpoint section")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.steps, args.every, args.rounds = 200, 50, 1
    base = [f"train.steps={args.steps}", "train.eval_every=0", "train.progress=off", "checkpoint.keep=3"]
    if args.hidden:
        base.append(f"model.hidden=({args.hidden},)")
    contenders = {
        "none": ["checkpoint.every=0"],
        "async": [f"checkpoint.every={args.every}", "checkpoint.async_save=True"],
        "sync": [f"checkpoint.every={args.every}", "checkpoint.async_save=False"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, extra in contenders.items():  # warm-up: data cache, compilation caches
            timed_run([*base, *extra], tmp / name)
        times = {name: [] for name in contenders}
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for name in order:
                times[name].append(timed_run([*base, *contenders[name]], tmp / name))
        setup = bpjax.prepare(bpjax.load_config(EXPERIMENT, base))
        params = jax.eval_shape(setup.problem.init, jax.random.key(0)).params
        state_mib = 3 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 2**20  # adam
        net = "-".join(str(w) for w in (setup.problem.input_dim, *setup.config.model.hidden, 10))
        print(
            f"1. checkpoints: dp, {net} ({state_mib:.1f} MiB of state), {args.steps} steps, a save every "
            f"{args.every} steps ({args.rounds} rounds)"
        )
        print(f"   {'contender':<22} {'median s':>9}  ratio to none, median [q25, q75]")
        for name in contenders:
            ratios = np.array(times[name]) / np.array(times["none"])
            print(f"   {name:<22} {np.median(times[name]):>9.2f}  {quartiles(ratios)}")

        if args.skip_processes:
            return
        one = bpjax.run(bpjax.load_config(EXPERIMENT, base), tmp / "one", overwrite=True).summary
        cmd = [sys.executable, "-m", "bpjax", "launch", "--processes", "2", str(EXPERIMENT)]
        cmd += ["--workdir", str(tmp / "two"), *[f"--set={o}" for o in base]]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        two = json.loads((tmp / "two/summary.json").read_text())
        print(f"2. processes: dp, {args.steps} steps, batch {one['batch_size']}, 8 devices")
        print(f"   1 process x 8 devices:   {one['samples_per_second']:>10,.0f} samples/s")
        print(f"   2 processes x 4 devices: {two['samples_per_second']:>10,.0f} samples/s")
        print(f"   ratio (2 / 1): {two['samples_per_second'] / one['samples_per_second']:.3f}")


if __name__ == "__main__":
    main()
