"""What bpjax's compiled training step costs, as ratios against baselines measured in the same process.

Run (8 simulated CPU devices are set up by the script itself):

    python benchmarks/step_overhead.py                      # full run, about 1.5 min on 2 cores
    python benchmarks/step_overhead.py --quick              # smoke test, under a minute
    python benchmarks/step_overhead.py --hidden 1024,1024 --batch 512 --json out.json

Three measurements, all on synthetic MNIST-1D-shaped data (40 features, 10 classes; default net
40-100-100-10, relu, adam, cross-entropy), with the same batch already on device for every step:

  1. overhead   ``strategy.step`` of bpjax's ``single`` and ``dp`` against a hand-written Flax + Optax
                ``jax.jit`` step of the same net started from the same parameters (``dp``'s baseline uses
                a NamedSharding over an 8-device ``data`` mesh: batch sharded, parameters replicated).
                ratio = bpjax time per step / hand-written time per step; <= 1.02 is the target, above
                it bpjax adds work of its own (it also counts steps and returns the loss of each step).
  2. scaling    samples/s of ``pmap`` and ``dp`` on all devices / samples/s of ``single`` on one, same
                global batch. Simulated CPU devices share the machine's cores, so < 1 is expected there;
                it says what the collectives cost, not what real devices would gain.
  3. fused      samples/s with ``train.steps_per_call`` K = 10, 100 / samples/s with K = 1, for
                ``single`` and ``dp`` (K steps are one compiled ``lax.scan``). > 1 means per-call
                dispatch was a visible cost at K = 1.

Method: every contender is compiled and warmed up first; then, in each of ``--rounds`` rounds, every
contender of a section runs ``--steps`` training steps (in alternating order), timed with
``block_until_ready`` at the end. A result is awaited at least every 16 steps, since XLA's simulated CPU
collectives can deadlock with many calls queued. Columns: the median time per step over the rounds;
``ratio``, the ratio of those medians; ``paired ratio``, the median and quartiles of the ratios taken
within each round, which cancel load from other processes that drifts between rounds. A wide
``[q25, q75]`` means a noisy machine: rerun, or raise ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

import bpjax

bpjax.use_cpu_devices(8)  # before any JAX work

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

SYNC_STEPS = 16  # await a result at least this often (queued CPU collectives can deadlock)


# ------------------------------------------------------------------------------------------ timing


@dataclass
class Contender:
    """A compiled step ``(state, batch) -> (state, metrics)`` with its state and device batch."""

    name: str
    step: Any
    state: Any
    batch: Any
    k: int = 1  # training steps per call

    def run(self, steps: int) -> float:
        """Run ``steps`` training steps; return the seconds they took (the state is carried over)."""
        calls, sync = steps // self.k, max(1, SYNC_STEPS // self.k)
        state, out = self.state, None
        start = time.perf_counter()
        for i in range(calls):
            state, out = self.step(state, self.batch)
            if (i + 1) % sync == 0:
                jax.block_until_ready(out)
        jax.block_until_ready((state, out))
        seconds = time.perf_counter() - start
        self.state = state
        return seconds

    def first_loss(self) -> float:
        """Take one step (call this first) and return its loss."""
        self.state, out = self.step(self.state, self.batch)
        return float(out["loss"][0] if isinstance(out, dict) else out)


def race(contenders: list[Contender], rounds: int, steps: int) -> dict[str, np.ndarray]:
    """Seconds per training step of each contender in each round, alternating their order by round."""
    for c in contenders:  # compile and warm up
        c.run(max(c.k, SYNC_STEPS))
    times = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            times[c.name].append(c.run(steps) / steps)
    return {name: np.array(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------ contenders


def make_config(args, strategy: str, k: int):
    c = bpjax.default_config()
    c.data.name = "synthetic_classification"
    c.data.num_features, c.data.num_classes = args.features, args.classes
    c.data.num_samples = max(5000, 2 * args.batch)
    c.model.hidden = tuple(args.hidden)
    c.train.batch_size, c.train.steps_per_call = args.batch, k
    c.train.steps, c.train.eval_every = args.steps, 0
    c.parallel.strategy = strategy
    c.parallel.mesh.data = -1  # all devices (``single`` ignores the mesh)
    bpjax.config.validate(c)
    return c


class HandMLP(nn.Module):
    """The same net as bpjax's MLP, written out; layer names match so parameters can be shared."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, name=f"layer_{i}")(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


def hand_written(name, widths, lr, params, host_batch, sharding, batch_sharding) -> Contender:
    """What a user would write without bpjax: jit of value_and_grad + optax.adam, state donated."""
    model, tx = HandMLP(widths), optax.adam(lr)

    def step(state, batch):
        params, opt_state = state
        x, y = batch["x"][0], batch["y"][0]  # the same K=1 stacked batch bpjax takes

        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    state = jax.device_put((params, tx.init(params)), sharding)
    batch = jax.device_put(host_batch, batch_sharding)
    if isinstance(sharding, jax.sharding.NamedSharding):  # outputs replicated, as the inputs
        return Contender(name, jax.jit(step, out_shardings=sharding, donate_argnums=0), state, batch)
    return Contender(name, jax.jit(step, donate_argnums=0), state, batch)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(v) for v in s.split(",") if v]
    p.add_argument("--quick", action="store_true", help="few rounds and steps: a smoke test")
    p.add_argument(
        "--steps", type=int, help="training steps per contender per round (default 200; quick 100)"
    )
    p.add_argument("--rounds", type=int, help="timed rounds per section (default 20; quick 3)")
    p.add_argument("--batch", type=int, default=128, help="global batch size (default 128)")
    p.add_argument("--hidden", type=ints, default=[100, 100], help="hidden widths, e.g. 1024,1024")
    p.add_argument("--features", type=int, default=40, help="input width (default 40, as MNIST-1D)")
    p.add_argument("--classes", type=int, default=10, help="output classes (default 10)")
    p.add_argument("--fused", type=ints, default=[1, 10, 100], help="steps per call to compare")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    args.steps = args.steps or (100 if args.quick else 200)
    args.rounds = args.rounds or (3 if args.quick else 20)
    args.fused = sorted(set(args.fused) | {1})
    bad = [k for k in args.fused if args.steps % k]
    if bad:
        p.error(f"--steps {args.steps} must be a multiple of every --fused value (not of {bad})")
    if args.batch % len(jax.devices()):
        p.error(f"--batch {args.batch} must be divisible by {len(jax.devices())} devices")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall = time.perf_counter()
    key = jax.random.key(0)
    config = make_config(args, "single", 1)
    ds = bpjax.load_data(config.data, config.seed)
    batches = bpjax.Batches(ds.x_train, ds.y_train, args.batch, config.seed)
    problem = bpjax.make_problem(config, ds.num_features, ds.num_outputs)

    @cache
    def strategy(name: str) -> bpjax.Strategy:  # one per name: its init compiles once
        return bpjax.strategies.make(name, problem, make_config(args, name, 1).parallel)

    @cache
    def bp(name: str, k: int) -> Contender:
        # train.steps_per_call only sizes the batches: strategy.step fuses as many steps as they stack.
        s = strategy(name)
        batch = s.shard_batch(batches.stack(0, make_config(args, name, k).train.steps_per_call))
        return Contender(f"bpjax {name}" + (f" K={k}" if k > 1 else ""), s.step, s.init(key), batch, k)

    rows = []

    def report(section, times, contender, baseline, ratio_is, speedup=False):
        """A table row; the ratio is of times (contender / baseline), or of samples/s if ``speedup``."""
        t, t0 = times[contender], times[baseline]
        paired = t0 / t if speedup else t / t0  # within each round: robust to load that drifts
        q25, q50, q75 = np.percentile(paired, [25, 50, 75])
        ratio = np.median(t0) / np.median(t) if speedup else np.median(t) / np.median(t0)
        rows.append(
            dict(
                section=section,
                contender=contender,
                baseline=baseline,
                us_per_step=1e6 * np.median(t),
                baseline_us_per_step=1e6 * np.median(t0),
                samples_per_s=args.batch / np.median(t),
                ratio=ratio,
                paired_ratio_q25=q25,
                paired_ratio_median=q50,
                paired_ratio_q75=q75,
                ratio_is=ratio_is,
            )
        )

    # 1. overhead: bpjax vs hand-written, from the same parameters, on the same device batch.
    host_params = jax.device_get(problem.init(key).params)
    widths = (*args.hidden, ds.num_outputs)
    host_batch = batches.stack(0, 1)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    by_data = jax.sharding.NamedSharding(mesh, jax.P(None, "data"))
    first_losses = {}
    for name, sh, batch_sh in (("single", one, one), ("dp", replicated, by_data)):
        ours = bp(name, 1)
        lr = config.optimizer.learning_rate
        hand = hand_written(f"hand-written {name}", widths, lr, host_params, host_batch, sh, batch_sh)
        # Same net, same start, same batch: the first losses must agree, or the race is unfair.
        first_losses[name] = (ours.first_loss(), hand.first_loss())
        if not np.isclose(*first_losses[name], rtol=1e-5):
            raise SystemExit(f"{name}: bpjax and hand-written losses differ: {first_losses[name]}")
        times = race([ours, hand], args.rounds, args.steps)
        report("1 overhead", times, ours.name, hand.name, "time / hand-written's (target <= 1.02)")

    # 2. data-parallel scaling: the same global batch on all devices vs on one.
    n = len(jax.devices())
    contenders = [bp("single", 1), bp("pmap", 1), bp("dp", 1)]
    times = race(contenders, args.rounds, args.steps)
    for c in contenders[1:]:
        report("2 scaling", times, c.name, contenders[0].name, f"samples/s on {n} devices / on 1", True)

    # 3. fused steps: K steps per compiled call vs one.
    for name in ("single", "dp"):
        contenders = [bp(name, k) for k in args.fused]
        times = race(contenders, args.rounds, args.steps)
        for c in contenders[1:]:
            report("3 fused", times, c.name, contenders[0].name, "samples/s / K=1's", True)

    meta = dict(
        net="-".join(map(str, (ds.num_features, *widths))) + " relu, adam, cross-entropy",
        batch=args.batch,
        rounds=args.rounds,
        steps_per_round=args.steps,
        devices=n,
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        python=platform.python_version(),
        first_losses=first_losses,
        wall_seconds=time.perf_counter() - wall,
    )
    print(markdown(meta, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), meta=meta, rows=rows), f, indent=2, default=float)
    return dict(meta=meta, rows=rows)


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"{meta['net']}, batch {meta['batch']}, {meta['devices']} CPU devices on {meta['cpu_count']} cores, "
        f"jax {meta['jax']}; median over {meta['rounds']} rounds x {meta['steps_per_round']} steps; "
        f"{meta['wall_seconds']:.0f} s",
        "",
        "| section | contender | baseline | µs/step | baseline µs/step | samples/s | ratio "
        "| paired ratio: median [q25, q75] | ratio is |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['section']} | {r['contender']} | {r['baseline']} | {r['us_per_step']:.1f} "
            f"| {r['baseline_us_per_step']:.1f} | {r['samples_per_s']:,.0f} | **{r['ratio']:.3f}** "
            f"| {r['paired_ratio_median']:.3f} [{r['paired_ratio_q25']:.3f}, {r['paired_ratio_q75']:.3f}] "
            f"| {r['ratio_is']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
