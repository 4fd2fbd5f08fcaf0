# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Model parallelism: one network, split six ways, the same numbers
#
# The MNIST-1D **40-100-100-10** network of the quick start, now with its *layers* split over 8
# simulated devices, each layout from an experiment file in `experiments/`:
#
# | strategy | mesh | what is split |
# |---|---|---|
# | `dp` | data=8 | the batch; every device holds every parameter (for comparison) |
# | `fsdp` | data=4 | the batch, and every parameter and optimizer moment (gathered for use) |
# | `tensor` | model=4 | each layer: layer_0 by columns, layer_1 by rows (Megatron), layer_2 whole |
# | `hybrid` | data=2 x model=4 | the batch over `data`, the layers over `model` as in `tensor` |
# | `pipeline` | stage=3 | the layers: one per device, the batch in 4 microbatches flowing through |
#
# For each we draw where every layer lives, print the plan (`bpjax plan`: specs, bytes per device,
# collectives), train, and check that the loss curves coincide with the one-device reference.

# %%
# JAX fixes its number of CPU devices when it starts: this comes before any JAX work in the kernel.
import bpjax

bpjax.use_cpu_devices(8)

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from bpjax import viz
from bpjax.strategies.pipeline import bubble_fraction, measure_bubble

# %%
QUICK = bool(os.environ.get("BPJAX_QUICK"))  # set by the tests: short runs
STEPS = 200 if QUICK else 3000
EVAL_EVERY = 100 if QUICK else 250
LOG_EVERY = 10 if QUICK else 25
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "experiments").is_dir())
STRATEGIES = ["single", "dp", "fsdp", "tensor", "hybrid", "pipeline"]
OVERRIDES = [
    f"train.steps={STEPS}",
    f"train.eval_every={EVAL_EVERY}",
    f"train.log_every={LOG_EVERY}",
    "train.progress=off",
]
configs = {
    name: bpjax.load_config(ROOT / "experiments" / f"mnist1d_{name}.py", OVERRIDES) for name in STRATEGIES
}
setups = {name: bpjax.prepare(config) for name, config in configs.items()}

# %% [markdown]
# ## Where each layer lives
#
# Each kernel `W[in, out]` is drawn as a rectangle, split into the blocks that devices hold (`d3`:
# device 3; `d0,d4`: the same block on devices 0 and 4; grey: every device holds it all).

# %%
fig = viz.plot_layouts({name: setups[name] for name in STRATEGIES[1:]})
plt.show()

# %% [markdown]
# ## The plans
#
# `bpjax.make_plan` is what `bpjax plan EXPERIMENT.py` prints: per layer the PartitionSpec of each
# parameter and the bytes one device holds, then the collectives one training step needs. The tests
# check these predictions against the compiled program (`bpjax plan --compiled`).

# %%
plans = {name: bpjax.make_plan(setups[name]) for name in STRATEGIES}
for name in STRATEGIES[1:]:
    print(plans[name].table(), end="\n\n")

# %%
print(f"{'strategy':<9} {'state/device':>13} {'collectives/step':>17}")
for name, plan in plans.items():
    t = plan.totals
    print(
        f"{name:<9} {(t['param_bytes'] + t['opt_bytes']) / 1024:>10.1f} KiB {t['collective_bytes'] / 1024:>13.1f} KiB"
    )

# %% [markdown]
# ## Train: the loss curves coincide

# %%
results = {name: bpjax.run(configs[name]) for name in STRATEGIES}
fig = viz.plot_losses(results)
plt.show()

# %%
# Over the first 50 steps every layout agrees with single to float32 rounding. Later the curves part at
# the 1e-4 level and above: see the last cell for why that is rounding, not a wrong layout.
CHECK_STEPS, TOLERANCE = 50, 1e-4
steps, reference = results["single"].series("train_loss")
for name, result in results.items():
    s = result.summary
    diff = np.abs(result.series("train_loss")[1] - reference)[steps <= CHECK_STEPS].max()
    print(
        f"{name:<9} {s['num_devices']} devices  final loss {s['final_train_loss']:.4f}  "
        f"eval acc {s['eval_accuracy']:.3f}  max |loss - single| over {CHECK_STEPS} steps {diff:.1e}"
    )
    assert diff < TOLERANCE, f"{name} drifted from single"

# %% [markdown]
# ## The pipeline schedules
#
# A schedule says what each stage does at each tick: a microbatch's forward, its backward (for
# `zero_bubble`, the input-gradient half B or the weight-gradient half W), or nothing (the bubble).
# Each cell shows the microbatch; blank is idle. `gpipe` runs all M forwards, then all backwards, and
# keeps every microbatch's activations; `1f1b` starts the backwards as soon as it can, so a stage keeps
# at most S of them; `zero_bubble` splits the backward and fills the bubble with weight gradients;
# `interleaved` gives each device v chunks of layers (here a fourth layer, 2 devices x 2 chunks), so a
# microbatch goes round the devices v times and the bubble shrinks by v.

# %%
SCHEDULES = {
    "gpipe": [],
    "1f1b": [],
    "zero_bubble": [],
    "interleaved": ["parallel.mesh.stage=2", "parallel.virtual_stages=2", "model.hidden=(100, 100, 100)"],
}
fig, axes = plt.subplots(len(SCHEDULES), 1, figsize=(12, 2.2 * len(SCHEDULES)))
for ax, (name, extra) in zip(axes, SCHEDULES.items(), strict=True):
    scheduled = bpjax.load_config(
        ROOT / "experiments" / "mnist1d_pipeline.py", [*OVERRIDES, f"parallel.schedule={name}", *extra]
    )
    viz.plot_timeline(bpjax.prepare(scheduled), ax=ax)  # mnist1d_pipeline.py: S=3, M=4
    ax.set_title(f"{name}: " + ax.get_title(), fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# Measured: `measure_bubble` times the compiled forward and backward pass for several M at a fixed
# microbatch size and fits `time = a + b*M`; `1 - M*b/time` is the measured bubble.

# %%
rows = measure_bubble(
    setups["pipeline"].problem,
    configs["pipeline"].parallel,
    microbatch_size=32,
    microbatches=(1, 2, 4, 8),
    repeats=3 if QUICK else 10,
)
print(f"{'M':>3} {'seconds':>9} {'measured bubble':>16} {'(S-1)/(M+S-1)':>14}")
for r in rows:
    print(
        f"{r['microbatches']:>3} {r['seconds']:>9.4f} {r['measured_bubble']:>16.2f} {r['formula_bubble']:>14.2f}"
    )
assert bubble_fraction(3, 4) == 2 / 6

# %% [markdown]
# ## Reading the results
#
# - Every layout trains the same network: over the first steps the curves agree with `single` to
#   float32 rounding (the assert above), as the equivalence tests require after 6 steps for the
#   parameters and optimizer state too. Later they part: `tensor` and `hybrid` add each layer's output
#   from partial sums in another order, a 1-ulp change per activation that Adam at learning rate 1e-2
#   amplifies (3e-4 by step 70 for `tensor`). It is rounding, not a wrong layout: run in float64
#   (`jax_enable_x64`, `model.dtype=float64`), every strategy's loss equals single's to float32
#   precision of the printed loss (<= 1e-7) over 300 steps (measured when this notebook was written).
# - Memory: `fsdp` keeps 1/8 of the parameters and Adam moments per device, `tensor` and `hybrid`
#   split the two large layers and keep the small output layer whole, the pipeline keeps one layer
#   per device. `dp` keeps everything everywhere.
# - Communication: `dp` all-reduces all gradients; `fsdp` gathers the parameters and reduce-scatters
#   the gradients (twice the bytes, for a quarter of the memory); `tensor` sends activations, not
#   parameters (one all-reduce of the `[128, 100]` output of layer_1); the pipeline sends one
#   microbatch's activations per tick and direction.
# - The measured bubble on simulated CPU devices is about zero, not (S-1)/(M+S-1): idle stages take an
#   empty branch, and the devices share the host's cores, so wall time follows the total work. The
#   schedule's bubble costs time where each stage has hardware of its own.
