"""MNIST-1D 40-100-100-10 with a Downpour-style parameter server: 8 workers, push every 4, fetch every 2.

Run:      bpjax run experiments/mnist1d_param_server.py      (plan: bpjax plan experiments/mnist1d_param_server.py)
Expected: test accuracy 0.605 after 3000 steps (single: 0.661; Adam on 4x fewer, staler updates),
          with 15.8 KB pushed and 30.4 KB pulled per step and worker. Each worker accumulates the gradients of its 16 of every 128 examples on
          its cached parameters, pushes the sum every 4 steps to the server (whose parameters and
          optimizer state are split over the 8 devices) and fetches fresh parameters every 2 steps.
          metrics.jsonl reports bytes_pushed_per_step and bytes_pulled_per_step.
          --set parallel.n_push=1 --set parallel.n_fetch=1 is synchronous dp exactly (tested).
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_param_server"
    c.parallel.strategy = "param_server"
    c.parallel.mesh = {"data": 8}
    c.parallel.n_push = 4
    c.parallel.n_fetch = 2
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
