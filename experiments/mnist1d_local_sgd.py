"""MNIST-1D 40-100-100-10 with local SGD: 8 workers take 4 momentum steps each, then average.

Run:      bpjax run experiments/mnist1d_local_sgd.py      (plan: bpjax plan experiments/mnist1d_local_sgd.py)
Expected: test accuracy 0.615 after 3000 steps, in 6.8 s on 2 cores against 12.0 s with
          local_steps=1 (also 0.615; single with the same optimizer: 0.630). Each worker trains its
          own copy on 16 of every 128 examples
          and the copies (and their momentum) are averaged every 4 steps: one all-reduce per 4 steps
          instead of one per step. --set parallel.local_steps=1 is exactly synchronous dp (tested).
          SGD with momentum, not Adam: averaging matches synchronous training only for an update that
          is linear in the gradient, and bpjax refuses the others for local_sgd.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_local_sgd"
    c.optimizer.name = "momentum"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.parallel.strategy = "local_sgd"
    c.parallel.mesh = {"data": 8}
    c.parallel.local_steps = 4
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
