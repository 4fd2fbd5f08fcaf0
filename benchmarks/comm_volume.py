"""Communication and memory of each strategy: the compiled program against bpjax's plan.

Run (8 simulated CPU devices are set up by the script itself; about a minute on 2 cores):

    python benchmarks/comm_volume.py                       # 64-512-256-128-10, batch 256
    python benchmarks/comm_volume.py --hidden 1024,1024,1024 --json out.json

For each strategy and mesh it compiles one training step and reports:
  * collective bytes per step that the compiler emitted (read off the HLO by `bpjax.hlo`) divided by
    the plan's analytic minimum (`bpjax.plan`); target 1.00 +- 0.05. The pipeline's collectives sit in
    a loop over its M+S-1 ticks, which the HLO lists once: its row compares one tick;
  * per-device parameter + optimizer-state bytes divided by (total / devices): 1.00 means the state is
    split evenly over the devices (fsdp; tensor when every layer splits), 8.00 that every device holds
    it all (dp);
  * argument bytes per device from ``memory_analysis()`` against the plan (state + batch).
Nothing is timed, so the numbers do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json

import bpjax

bpjax.use_cpu_devices(8)  # before any JAX work

from bpjax import config as cfg_lib  # noqa: E402
from bpjax.plan import compiled_report, make_plan  # noqa: E402
from bpjax.preflight import prepare  # noqa: E402

CASES = [
    ("pmap", {"data": 8}, {}),
    ("dp", {"data": 8}, {}),
    ("fsdp", {"data": 8}, {}),
    ("tensor", {"model": 8}, {}),
    ("hybrid", {"data": 2, "model": 4}, {}),
    ("hybrid", {"data": 4, "model": 2}, {}),
    ("hybrid", {"data": 2, "model": 4}, {"hybrid_data": "fsdp"}),
    ("pipeline", {"stage": 4}, {"microbatches": 4}),
    ("tensor", {"model": 8}, {"replicate": ("layer_1",)}),
]


def config_for(args, name, mesh, options):
    c = cfg_lib.default()
    c.data.name = "synthetic_classification"
    c.data.num_samples = 4 * args.batch
    c.data.num_features = args.features
    c.model.hidden = tuple(args.hidden)
    c.train.batch_size = args.batch
    c.parallel.strategy = name
    c.parallel.mesh = mesh
    for k, v in options.items():
        c.parallel[k] = v
    return c


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=lambda s: [int(v) for v in s.split(",")], default=[512, 256, 128])
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)

    full = make_plan(prepare(config_for(args, "single", {}, {}))).totals
    full_state = full["param_bytes"] + full["opt_bytes"]
    rows = []
    for name, mesh, options in CASES:
        setup = prepare(config_for(args, name, mesh, options))
        plan = make_plan(setup)
        compiled = compiled_report(setup)
        t = plan.totals
        devices = len(setup.strategy.devices)
        rows.append(
            dict(
                strategy=name + "".join(f" {k}={v}" for k, v in options.items()),
                mesh=" x ".join(f"{a}={n}" for a, n in mesh.items()),
                predicted_bytes=t["static_collective_bytes"],  # pipeline: per tick, as the HLO lists it
                compiled_bytes=compiled["collective_bytes"],
                comm_ratio=compiled["collective_bytes"] / t["static_collective_bytes"],
                state_share=(t["param_bytes"] + t["opt_bytes"]) / (full_state / devices),
                args_ratio=compiled["argument_bytes"] / (plan.state_bytes + plan.batch_bytes),
                notes=" ".join(plan.notes),
            )
        )
    net = "-".join(map(str, (args.features, *args.hidden, 10)))
    print(f"{net} relu, adam, batch {args.batch}, 8 CPU devices; one compiled step per row\n")
    print(
        "| strategy | mesh | predicted collective bytes | compiled | compiled / predicted "
        "| state per device / (total / devices) | compiled / planned argument bytes |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['mesh']} | {r['predicted_bytes']:,} | {r['compiled_bytes']:,} "
            f"| **{r['comm_ratio']:.3f}** | {r['state_share']:.2f} | {r['args_ratio']:.3f} |"
        )
    for r in rows:
        if r["notes"]:
            print(f"\n{r['strategy']} ({r['mesh']}): {r['notes']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(net=net, batch=args.batch, rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main()
