"""The convergence study: synchronous, asynchronous (staleness 1, 2, 4, 8), parameter server, local SGD,
DiLoCo.

Run:      bpjax compare experiments/study_sync_async.py [--set train.steps=500] [--workdir runs/study]
Expected: comparison.md / .csv and loss_vs_step.png / loss_vs_bytes.png in the workdir. All runs train
          MNIST-1D 40-100-100-10 with SGD + momentum (lr 0.05; local SGD's averaging matches
          synchronous training only for such a linear update) on 8 devices from the same parameters
          and batches, so they differ only in how the workers agree.

A study file defines get_configs(): run name -> config. Each run is an ordinary bpjax config.
"""

from pathlib import Path

from bpjax.config import from_file


def base():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.schedule = "constant"
    c.parallel.mesh = {"data": 8}
    c.parallel.cpu_devices = 8
    return c


def run(strategy, **parallel):
    c = base()
    c.parallel.strategy = strategy
    for key, value in parallel.items():
        c.parallel[key] = value
    return c


def get_configs():
    return {
        "sync": run("dp"),
        **{f"async_tau{t}": run("async", staleness=t) for t in (1, 2, 4, 8)},
        "param_server": run("param_server", n_push=4, n_fetch=4),
        **{f"local_sgd_H{h}": run("local_sgd", local_steps=h) for h in (4, 16)},
        "diloco_H16": run("diloco", local_steps=16),
    }
