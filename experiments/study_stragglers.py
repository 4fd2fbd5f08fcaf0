"""Real asynchrony under a straggler: synchronous, SSP with s = 1 and 4, fully asynchronous, and a
parameter server, each with 8 worker threads of which worker 3 takes 4x as long per gradient.

Run:      bpjax compare experiments/study_stragglers.py [--set train.steps=1000] [--workdir runs/stragglers]
Expected: comparison.md / .csv with each run's training time and time to the target loss, and
          loss_vs_time.png beside loss_vs_step.png. All runs apply the same number of updates (each
          one worker's gradient of one batch of 128) to MNIST-1D 40-100-100-10 with SGD + momentum
          (lr 0.05, as experiments/study_sync_async.py). The synchronous run (SSP s = 0) waits for the
          straggler at every clock; the bounded runs let the others run up to s batches ahead; the
          unbounded ones never wait, so they apply their updates in less wall time, each on older
          parameters (the mean staleness is in metrics.jsonl). Timings depend on the machine; every
          run's staleness.jsonl replays bit for bit with --set parallel.replay=WORKDIR/runs/NAME.

A study file defines get_configs(): run name -> config. Each run is an ordinary bpjax config.
"""

from pathlib import Path

from bpjax.config import from_file

STRAGGLER = {3: 4.0}


def run(strategy, staleness, **parallel):
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.schedule = "constant"
    c.train.steps = 2000
    c.train.steps_per_call = 100  # the workers pause between calls: the loop logs and evaluates there
    c.train.eval_every = 1000
    c.train.log_every = 100
    c.checkpoint.every = 0
    c.parallel.mesh = {"data": 8}
    c.parallel.strategy = strategy
    c.parallel.execution = "threads"
    c.parallel.staleness = staleness
    c.parallel.stragglers = dict(STRAGGLER)
    for key, value in parallel.items():
        c.parallel[key] = value
    return c


def get_configs():
    return {
        "sync": run("async", 0),
        "ssp_s1": run("async", 1),
        "ssp_s4": run("async", 4),
        "async": run("async", -1),
        "param_server": run("param_server", -1, n_fetch=4),
    }
