"""MNIST-1D 40-100-100-10 with simulated asynchronous SGD: 8 workers, gradients 2 steps stale.

Run:      bpjax run experiments/mnist1d_async.py      (plan: bpjax plan experiments/mnist1d_async.py)
Expected: test accuracy 0.648 after 3000 steps (single: 0.661). At step t every worker takes
          its gradient on the parameters of step t-2 (--set parallel.staleness=TAU; add
          --set parallel.random_staleness=True for delays drawn from [0, TAU] per step and worker);
          the mean of the 8 stale gradients updates the current parameters. Staleness 0 is dp exactly.
          Asynchrony is simulated: deterministic, inside one compiled SPMD program.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_async"
    c.parallel.strategy = "async"
    c.parallel.mesh = {"data": 8}
    c.parallel.staleness = 2
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
