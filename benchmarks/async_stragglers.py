"""What real asynchrony buys under a straggler, as ratios against the synchronous run measured in the
same rounds.

Run (8 simulated CPU devices are set up by the script itself):

    python benchmarks/async_stragglers.py             # about 2 minutes on 2 cores
    python benchmarks/async_stragglers.py --quick     # smoke test
    python benchmarks/async_stragglers.py --slowdown 8 --json

Each round trains the runs of ``experiments/study_stragglers.py`` (8 worker threads, worker 3 takes
``--slowdown`` times as long per gradient; SGD + momentum on MNIST-1D) for the same number of updates
and reads their training time (``train_seconds`` of the last logged row: compilation and evaluation
excluded). Reported per run: the median over rounds of (its time / the synchronous run's time in the
same round), with quartiles, and the mean staleness of its updates. Rounds alternate the order of the
runs, so that a machine that slows down over time favours none of them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import bpjax

bpjax.use_cpu_devices(8)  # before any JAX work

import numpy as np  # noqa: E402

from bpjax.config import from_study  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments/study_stragglers.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="updates per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slowdown", type=float, default=4.0, help="the straggler's slowdown")
    p.add_argument("--runs", default="sync,ssp_s4,async", help="runs of the study, the first the baseline")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    p.add_argument("--quick", action="store_true", help="200 updates, 1 round")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds = 200, 1
    names = args.runs.split(",")
    configs = from_study(STUDY)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    staleness: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c = configs[name]
            c.train.steps, c.train.eval_every, c.train.progress = args.steps, 0, "off"
            c.parallel.stragglers = {3: args.slowdown}
            result = bpjax.run(c)
            seconds[name].append(result.history[-1]["train_seconds"])
            # every logged row averages the same number of updates
            staleness[name].append(np.mean([row["staleness_per_step"] for row in result.history]))
    base = np.array(seconds[names[0]])
    out = {}
    print(f"{args.steps} updates, 8 workers, worker 3 slowed {args.slowdown:g}x, {args.rounds} round(s)")
    print(f"{'run':<14} {'seconds':>8} {'time / ' + names[0]:>22} {'mean staleness':>15}")
    for name in names:
        ratios = np.array(seconds[name]) / base
        q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
        out[name] = {
            "seconds": float(np.median(seconds[name])),
            "ratio": float(q50),
            "ratio_q25": float(q25),
            "ratio_q75": float(q75),
            "mean_staleness": float(np.mean(staleness[name])),
        }
        print(
            f"{name:<14} {out[name]['seconds']:>8.2f} {q50:>10.3f} [{q25:.3f}, {q75:.3f}] "
            f"{out[name]['mean_staleness']:>15.2f}"
        )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
