"""One benchmark command for accelerators: bpjax against hand-written JAX and PyTorch, as ratios
measured in the same run.

Run:

    python benchmarks/accelerator.py                 # on the accelerator JAX finds; ~3-5 min on one GPU
    python benchmarks/accelerator.py --quick         # small sizes: a smoke test that runs anywhere (CI)
    python benchmarks/accelerator.py --json out.json # also write the numbers to a file

Prints a markdown table, then the same rows as one JSON object. Every ratio compares two contenders
timed in the same process, in alternating order, round after round (the median of per-round ratios is
reported, so that load drifting between rounds cancels). Rows (full sizes; ``--quick`` shrinks them):

  wide     8 layers of 8192 x 8192, B=8192, bf16 (``model.precision=bf16``, mse): bpjax ``single``
           TFLOP/s against a hand-written Flax + Optax ``jax.jit`` step of the same net, and against a
           PyTorch loop (``torch.autocast`` bf16, Adam) where torch is importable; and bpjax's TFLOP/s
           as a fraction of the device's datasheet peak (`PEAKS`; dense bf16, no sparsity).
  small    784-1024-1024-10, fp32, B=1024 and B=128: samples/s of bpjax with 1 and 100 steps per call
           against PyTorch eager where torch is importable, else against the hand-written jit step.
  input    the small net at B=128, one step per call, fed a new batch every call by bpjax's input
           pipeline (``train.device_data`` on: drawn on the device; off: host batches, prefetched) from
           a 60000-row training set, against the same step on one fixed batch: whether the input
           pipeline shows (target >= 0.98).
  overhead ``pmap`` and ``dp`` on one device against ``single`` (the parallel machinery's cost when
           there is nothing to parallelise), small net, B=128.
  scaling  with more than one device: samples/s of dp, fsdp, tensor and pipeline on all of them (the
           same global batch) against ``single`` on one, on the wide net.

Targets (issue 14): wide >= 0.97x hand-written and ahead of PyTorch; small >= 8x PyTorch eager with
fused steps; pmap/dp on one device >= 0.98x single. The script never asserts a time; it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bpjax  # noqa: E402
from bpjax.feed import Feed  # noqa: E402

SYNC_CALLS = 16  # await a result at least this often (simulated CPU collectives deadlock with many queued)

# Dense bf16 datasheet peaks in TFLOP/s (no sparsity), by a substring of ``device.device_kind``; the
# first match counts, so more specific names come first.
PEAKS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v6", 918.0),
)


def peak_tflops(device: jax.Device) -> float | None:
    kind = device.device_kind
    return next((peak for name, peak in PEAKS if name in kind), None)


# ------------------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class Contender:
    """``run(calls) -> seconds`` for ``calls`` calls of ``steps_per_call`` training steps each."""

    name: str
    run: Callable[[int], float]
    steps_per_call: int = 1


def jax_contender(name: str, step, state, batch, k: int = 1) -> Contender:
    """A compiled ``(state, batch) -> (state, out)`` step, its state carried from call to call."""
    box = [state]

    def run(calls: int) -> float:
        state, out = box[0], None
        start = time.perf_counter()
        for i in range(calls):
            state, out = step(state, batch)
            if (i + 1) % SYNC_CALLS == 0:
                jax.block_until_ready(out)
        jax.block_until_ready((state, out))
        box[0] = state
        return time.perf_counter() - start

    return Contender(name, run, k)


def race(contenders: list[Contender], rounds: int, steps: int) -> dict[str, np.ndarray]:
    """Seconds per training step of each contender in each round, alternating their order by round."""
    for c in contenders:  # compile and warm up
        c.run(max(1, min(SYNC_CALLS, steps // c.steps_per_call)))
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            calls = max(1, steps // c.steps_per_call)
            times[c.name].append(c.run(calls) / (calls * c.steps_per_call))
    return {name: np.array(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------ contenders


def config_for(widths: tuple[int, ...], batch: int, precision: str, loss: str, strategy="single", mesh=None):
    """A bpjax config for a net ``widths[0] -> ... -> widths[-1]`` (input width first)."""
    c = bpjax.default_config()
    c.model.hidden = tuple(widths[1:-1])
    c.model.precision = precision
    c.train.batch_size, c.train.loss = batch, loss
    c.parallel.strategy = strategy
    c.parallel.mesh = dict(mesh or {"data": 1})
    return c


def host_batch(widths, batch: int, loss: str, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """K copies of one random batch ``{"x": [K, B, D], "y": [K, B] or [K, B, O]}`` (what is timed is the
    step, not the data)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, widths[0]), dtype=np.float32)
    if loss == "mse":
        y = rng.standard_normal((batch, widths[-1]), dtype=np.float32)
    else:
        y = rng.integers(0, widths[-1], batch).astype(np.int32)
    return {"x": np.broadcast_to(x, (k, *x.shape)), "y": np.broadcast_to(y, (k, *y.shape))}


@functools.cache
def built(widths, batch, precision, loss, strategy="single", mesh=(("data", 1),), settings=()):
    """A bpjax strategy for the net, built (and its init compiled) once; its step fuses as many steps
    as the batch it is given stacks."""
    c = config_for(widths, batch, precision, loss, strategy, dict(mesh))
    for key, value in settings:
        c.parallel[key] = value
    bpjax.config.validate(c)
    problem = bpjax.make_problem(c, widths[0], widths[-1])
    return bpjax.strategies.make(strategy, problem, c.parallel)


def bpjax_contender(name, widths, batch, precision, loss, k=1, strategy="single", mesh=None, settings=None):
    mesh = tuple((mesh or {"data": 1}).items())
    s = built(tuple(widths), batch, precision, loss, strategy, mesh, tuple((settings or {}).items()))
    state = s.init(jax.random.key(0))
    return jax_contender(name, s.step, state, s.shard_batch(host_batch(widths, batch, loss, k)), k)


def feed_contender(name, strategy, rows, widths, batch, mode) -> Contender:
    """``strategy.step`` fed by `bpjax.feed.Feed` (``train.device_data`` = ``mode``) from a random
    training set of ``rows`` examples, a new call's batches every call, as in a run."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, widths[0]), dtype=np.float32)
    y = rng.integers(0, widths[-1], rows).astype(np.int32)
    feed = Feed(bpjax.Batches(x, y, batch, 0), strategy, 1, slice(None), mode)
    state = strategy.init(jax.random.key(0))
    step, first = feed.compile(strategy.step, state, 0)  # as the train loop does
    box = [state, 0]

    def run(calls: int) -> float:
        state, call, out = box[0], box[1], None
        start = time.perf_counter()
        for i in range(calls):
            state, out = step(state, feed(call + i))
            if (i + 1) % SYNC_CALLS == 0:
                jax.block_until_ready(out)
        jax.block_until_ready((state, out))
        box[0], box[1] = state, call + calls
        return time.perf_counter() - start

    return Contender(name, run)


class HandMLP(nn.Module):
    """The net written out as a user would, without bpjax."""

    widths: tuple[int, ...]
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, dtype=jnp.dtype(self.dtype), name=f"layer_{i}")(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x.astype(jnp.float32)


def hand_written(name, widths, batch, dtype, loss) -> Contender:
    """jit of value_and_grad + optax.adam, state donated, on one device."""
    model, tx = HandMLP(tuple(widths[1:]), dtype), optax.adam(1e-3)
    b = jax.tree.map(lambda a: jnp.asarray(a[0]), host_batch(widths, batch, loss, 1))
    params = model.init(jax.random.key(0), b["x"][:1])["params"]

    def step(state, batch):
        params, opt_state = state

        def loss_fn(p):
            out = model.apply({"params": p}, batch["x"])
            if loss == "mse":
                return jnp.mean(jnp.square(out - batch["y"]))
            return optax.softmax_cross_entropy_with_integer_labels(out, batch["y"]).mean()

        value, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return jax_contender(name, jax.jit(step, donate_argnums=0), (params, tx.init(params)), b)


def torch_contender(name, widths, batch, bf16: bool, loss) -> Contender | None:
    """A PyTorch eager loop (Adam; ``torch.autocast`` bf16 if asked) on the device JAX uses, if torch
    is importable and has one like it (CUDA for a JAX GPU, else the CPU)."""
    try:
        import torch
    except ImportError:
        return None
    gpu = jax.default_backend() == "gpu"
    if gpu and not torch.cuda.is_available():
        return None
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    h = host_batch(widths, batch, loss, 1)
    x = torch.from_numpy(np.ascontiguousarray(h["x"][0])).to(device)
    y = torch.from_numpy(np.ascontiguousarray(h["y"][0])).to(device)
    y = y.long() if loss != "mse" else y
    loss_fn = torch.nn.MSELoss() if loss == "mse" else torch.nn.CrossEntropyLoss()

    def run(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                value = loss_fn(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return Contender(name, run)


# ------------------------------------------------------------------------------------------- main

FULL = dict(
    wide=(8192, 8),
    wide_batch=8192,
    small=(784, 1024, 1024, 10),
    small_batches=(1024, 128),
    fused=100,
    train_rows=60000,  # MNIST's training set
)
QUICK = dict(
    wide=(128, 4), wide_batch=64, small=(784, 64, 64, 10), small_batches=(32,), fused=4, train_rows=2000
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few steps: a smoke test (CI)")
    p.add_argument("--steps", type=int, help="training steps per contender per round (default 100; quick 20)")
    p.add_argument("--rounds", type=int, help="timed rounds (default 5; quick 2)")
    p.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    # The command as run (without --json), for the table's header.
    given = [f"--{k} {v}" for k, v in (("steps", args.steps), ("rounds", args.rounds)) if v]
    args.command = " ".join(
        ["python benchmarks/accelerator.py", *(["--quick"] if args.quick else []), *given]
    )
    args.steps = args.steps or (8 if args.quick else 100)
    args.rounds = args.rounds or (2 if args.quick else 5)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    wall = time.perf_counter()
    rows: list[dict] = []

    def report(section, times, contender, baseline, unit, per_step, target=""):
        """A row: ``value`` in ``unit`` is ``per_step / median seconds per step``; the ratio is the median
        of the per-round ratios of contender to baseline (higher is better for both units)."""
        t, t0 = times[contender], times[baseline]
        rows.append(
            dict(
                section=section,
                contender=contender,
                baseline=baseline,
                unit=unit,
                value=per_step / float(np.median(t)),
                baseline_value=per_step / float(np.median(t0)),
                ratio=float(np.median(t0 / t)),
                target=target,
            )
        )

    # wide: TFLOP/s in bf16.
    width, layers = sizes["wide"]
    wide = (width,) * (layers + 1)
    b = sizes["wide_batch"]
    flops = 6 * b * sum(a * c for a, c in zip(wide[:-1], wide[1:], strict=True))  # forward 2, backward 4
    ours = bpjax_contender("bpjax single bf16", wide, b, "bf16", "mse")
    contenders = [ours, hand_written("hand-written jit bf16", wide, b, "bfloat16", "mse")]
    torch_wide = torch_contender("PyTorch autocast bf16", wide, b, True, "mse")
    contenders += [torch_wide] if torch_wide else []
    times = race(contenders, args.rounds, max(1, args.steps // 4))
    net = f"{layers}x{width}^2 B={b}"
    for c in contenders[1:]:
        target = ">= 0.97" if c.name.startswith("hand") else "> 1"
        report(f"wide {net}", times, ours.name, c.name, "TFLOP/s", flops / 1e12, target)
    device = jax.devices()[0]
    peak = peak_tflops(device)
    wide_tflops = rows[0]["value"]

    # small: samples/s, 1 and K fused steps per call.
    k = sizes["fused"]
    small = sizes["small"]
    for batch in sizes["small_batches"]:
        contenders = [
            bpjax_contender("bpjax K=1", small, batch, "fp32", "cross_entropy"),
            bpjax_contender(f"bpjax K={k}", small, batch, "fp32", "cross_entropy", k=k),
        ]
        base = torch_contender("PyTorch eager", small, batch, False, "cross_entropy") or hand_written(
            "hand-written jit", small, batch, "float32", "cross_entropy"
        )
        times = race([base, *contenders], args.rounds, args.steps)
        net = "-".join(map(str, small)) + f" B={batch}"
        for c in contenders:
            target = ">= 8" if base.name.startswith("PyTorch") and c.steps_per_call > 1 else ""
            report(f"small {net}", times, c.name, base.name, "samples/s", batch, target)

    # input: the same step fed each call's batches by bpjax's input pipeline, against one fixed batch.
    batch = sizes["small_batches"][-1]
    s = built(tuple(small), batch, "fp32", "cross_entropy", "single", (("data", 1),), ())
    fixed = bpjax_contender("bpjax K=1, one fixed batch", small, batch, "fp32", "cross_entropy")
    contenders = [fixed] + [
        feed_contender(f"bpjax K=1, {label}", s, sizes["train_rows"], small, batch, mode)
        for label, mode in (("batches drawn on the device", "on"), ("host batches, prefetched", "off"))
    ]
    times = race(contenders, args.rounds, args.steps)
    for c in contenders[1:]:
        report("input pipeline", times, c.name, fixed.name, "samples/s", batch, ">= 0.98")

    # overhead: the parallel machinery on one device.
    batch = sizes["small_batches"][-1]
    contenders = [
        bpjax_contender(f"bpjax {name} (1 device)", small, batch, "fp32", "cross_entropy", strategy=name)
        for name in ("single", "pmap", "dp")
    ]
    times = race(contenders, args.rounds, args.steps)
    for c in contenders[1:]:
        report("overhead, 1 device", times, c.name, contenders[0].name, "samples/s", batch, ">= 0.98")

    # scaling: all devices against one, the same global batch, on the wide net.
    n = len(jax.devices())
    if n > 1:
        stages = max(d for d in range(1, n + 1) if n % d == 0 and d <= layers)
        layouts = {
            "dp": ({"data": n}, {}),
            "fsdp": ({"data": n}, {}),
            "tensor": ({"model": n}, {}),
            "pipeline": ({"stage": stages}, {"microbatches": stages, "schedule": "1f1b"}),
        }
        single = bpjax_contender("bpjax single (1 device)", wide, b, "bf16", "mse")
        contenders = [single]
        for name, (mesh, settings) in layouts.items():
            size = int(np.prod(list(mesh.values())))
            contenders.append(
                bpjax_contender(
                    f"bpjax {name} ({size} devices)", wide, b, "bf16", "mse", 1, name, mesh, settings
                )
            )
        times = race(contenders, args.rounds, max(1, args.steps // 4))
        for c in contenders[1:]:
            report(f"scaling {n} devices", times, c.name, single.name, "samples/s", b)

    meta = dict(
        command=args.command,
        date=time.strftime("%Y-%m-%d"),
        backend=jax.default_backend(),
        device=device.device_kind,
        devices=n,
        peak_bf16_tflops=peak,
        wide_fraction_of_peak=wide_tflops / peak if peak else None,
        jax=jax.__version__,
        torch=_torch_version(),
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        rounds=args.rounds,
        steps=args.steps,
        wall_seconds=time.perf_counter() - wall,
    )
    print(markdown(meta, rows))
    result = dict(meta=meta, rows=rows)
    print(json.dumps(result, default=float))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    return result


def _torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def markdown(meta: dict, rows: list[dict]) -> str:
    peak = meta["peak_bf16_tflops"]
    fraction = (
        f"; wide net at {meta['wide_fraction_of_peak']:.0%} of the {peak:g} TFLOP/s bf16 peak"
        if peak
        else "; no known peak for this device"
    )
    lines = [
        f"`{meta['command']}`, {meta['date']}, {meta['devices']} x {meta['device']} ({meta['backend']}), "
        f"jax {meta['jax']}, torch {meta['torch'] or 'not installed'}; median of {meta['rounds']} rounds; "
        f"{meta['wall_seconds']:.0f} s{fraction}",
        "",
        "| section | contender | baseline | unit | contender | baseline | ratio | target |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['section']} | {r['contender']} | {r['baseline']} | {r['unit']} | {r['value']:,.4g} "
            f"| {r['baseline_value']:,.4g} | **{r['ratio']:.3f}** | {r['target']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
