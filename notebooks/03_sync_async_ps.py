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
# # How replicas agree: synchronous, asynchronous, parameter server, local SGD, DiLoCo
#
# Parallel BP training differs not only in how the data is cut but in how the replicas agree:
#
# - **sync** (`dp`): every step, all workers' gradients are averaged (one all-reduce per step).
# - **async** with staleness tau: worker w takes its gradient on the parameters of step t - tau; the
#   mean of those stale gradients updates the current parameters. Real asynchronous SGD is
#   nondeterministic; bpjax **simulates** it deterministically inside one compiled program, so that
#   staleness is a reproducible experimental variable (tau = 0 is sync exactly, tested).
# - **param_server** (Downpour SGD): workers push accumulated gradients every 4 steps and fetch the
#   parameters every 4 steps from a server whose state is split over the devices (1/1 is sync exactly).
# - **local SGD**: workers take H steps on their own copies, then average them (H = 1 is sync exactly
#   for SGD with momentum).
# - **DiLoCo**: workers take H steps on their own copies with their own optimizer state, then the
#   outer model takes a Nesterov step (lr 0.7, momentum 0.9) along the mean of their progress (outer
#   lr 1 without momentum is local SGD without averaging optimizer states; tested).
#
# The study file `experiments/study_sync_async.py` defines the nine runs; `bpjax compare` trains them
# from the same parameters and batches and writes a table and two plots.

# %%
# JAX fixes its number of CPU devices when it starts: this comes before any JAX work in the kernel.
import bpjax

bpjax.use_cpu_devices(8)

import os
import tempfile
from pathlib import Path

from IPython.display import Image, Markdown, display

from bpjax.compare import compare
from bpjax.config import apply_overrides, from_study, merge_into_default
from bpjax.metrics import read_jsonl

# %%
QUICK = bool(os.environ.get("BPJAX_QUICK"))  # set by the tests: 200 steps instead of 3000
STEPS = 200 if QUICK else 3000
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "experiments").is_dir())
WORKDIR = Path(tempfile.mkdtemp(prefix="bpjax-study-"))
rows = compare(
    [str(ROOT / "experiments" / "study_sync_async.py")],
    [
        f"train.steps={STEPS}",
        f"train.eval_every={STEPS}",
        "train.log_every=25" if not QUICK else "train.log_every=10",
        "train.progress=off",
    ],
    WORKDIR,
    target_loss=0.5,
)

# %%
display(Markdown((WORKDIR / "comparison.md").read_text()))

# %%
display(Image(filename=str(WORKDIR / "loss_vs_step.png")))
display(Image(filename=str(WORKDIR / "loss_vs_bytes.png")))

# %%
by_run = {r["run"]: r for r in rows}
# The schemes that talk less must send fewer bytes than sync (the point of them).
assert (
    by_run["local_sgd_H16"]["bytes_total"]
    < by_run["local_sgd_H4"]["bytes_total"]
    < by_run["sync"]["bytes_total"]
)
assert by_run["param_server"]["bytes_total"] < by_run["sync"]["bytes_total"]
# DiLoCo averages the parameters only (not the optimizer state) once per 16 steps.
assert by_run["diloco_H16"]["bytes_total"] < by_run["local_sgd_H16"]["bytes_total"]

# %% [markdown]
# ## Reading the results
#
# Measured on the full study (3000 steps, `bpjax compare experiments/study_sync_async.py`, 2 CPU
# cores): sync reached the target loss 0.5 at step 600 and a test accuracy of 0.616;
#
# - **Staleness slows and then breaks convergence.** tau = 1 and 2 reached the target at steps 700 and
#   950 (test accuracy 0.662 and 0.658: the noise of stale gradients regularises this small,
#   overfitting net); tau = 4 needed 2000 steps; tau = 8 never got there (final loss 2.08, accuracy
#   0.21): with momentum 0.9 and learning rate 0.05, gradients 8 steps old make the iteration
#   unstable, the classic failure that bounded staleness (SSP) exists to prevent.
# - **Talking less is cheaper per unit of progress.** The parameter server (push and fetch every 4
#   steps) and local SGD (H = 4, 16) sent 4x, 2x and 8x fewer bytes than sync (80, 160 and 40 MB
#   against 319 MB per device) and reached the target at steps 600, 600 and 800: in the
#   loss-against-bytes plot they are far to the left of sync.
# - All of this is simulated on one machine: the bytes are what the compiled collectives would move
#   (from `bpjax plan`, checked against the compiled program), not measured network traffic, and the
#   staleness is a schedule, not the timing of real workers.

# %% [markdown]
# ## Real asynchrony: workers that do not wait, under a straggler
#
# Everything above is simulated in lockstep. With `parallel.execution = "threads"`, `async` and
# `param_server` run for real: each of the 8 workers is a thread driving its own device; it fetches
# the parameters, computes the gradient of a whole batch and pushes it, and the server applies every
# push as it arrives. `parallel.staleness = s` is the stale-synchronous-parallel bound (a worker waits
# while it is more than s batches ahead of the slowest; 0 is synchronous, -1 never waits), and
# `parallel.stragglers = {3: 4.0}` makes worker 3 take 4x as long per gradient. All runs apply the same
# number of updates; `experiments/study_stragglers.py` defines them.

# %%
UPDATES = 200 if QUICK else 2000
STRAGGLERS = Path(tempfile.mkdtemp(prefix="bpjax-stragglers-"))
STUDY = str(ROOT / "experiments" / "study_stragglers.py")
OVERRIDES = [
    f"train.steps={UPDATES}",
    f"train.eval_every={UPDATES}",
    "train.log_every=100" if not QUICK else "train.log_every=50",
    "train.steps_per_call=100" if not QUICK else "train.steps_per_call=50",
    "train.progress=off",
    *(["parallel.mesh.data=4"] if QUICK else []),  # the tests: 4 workers, half the programs to compile
]
real = compare([STUDY], OVERRIDES, STRAGGLERS, target_loss=0.5)
display(Markdown((STRAGGLERS / "comparison.md").read_text()))
display(Image(filename=str(STRAGGLERS / "loss_vs_time.png")))
display(Image(filename=str(STRAGGLERS / "loss_vs_step.png")))

# %% [markdown]
# Every update is recorded in the run's `staleness.jsonl` (worker, batch, the version it read, the
# version it made). `--set parallel.replay=RUN` makes the simulation apply exactly those updates in that
# order, and it ends bit-identical to the real run, every logged loss included:

# %%
sync_run = STRAGGLERS / "runs" / "sync"
replay = apply_overrides(
    merge_into_default(from_study(STUDY)["sync"]),
    [*OVERRIDES, "parallel.execution=simulated", "parallel.stragglers={}", f"parallel.replay={sync_run}"],
)
replayed = bpjax.run(replay)
recorded = read_jsonl(sync_run / "metrics.jsonl")
assert [r["train_loss"] for r in replayed.history] == [r["train_loss"] for r in recorded]
print(f"replayed {UPDATES} updates: every logged loss equal, final {recorded[-1]['train_loss']:.6f}")

# %% [markdown]
# ## Reading the real runs
#
# Measured on the full study (2000 updates each, `python benchmarks/render_notebooks.py`, 2 CPU
# cores, 2026-12-03, jax 0.10.2; the table above): the synchronous run waits for the straggler at
# every clock and took 5.4 s of training to reach test accuracy 0.70; SSP with s = 1 took 4.6 s
# (accuracy 0.70) and s = 4 took 4.0 s (0.59); the fully asynchronous run took 3.6 s and the parameter
# server (fetching every 4 batches) 2.7 s. Staleness is what they pay: with momentum 0.9 and learning
# rate 0.05 the unbounded runs barely learn or diverge (test accuracy 0.45 and 0.10), the instability
# the bound exists to prevent. Faster, but possibly unstable, as the seed document says. Timings vary
# from run to run on shared cores; `benchmarks/async_stragglers.py` measures them as ratios.
