"""MNIST-1D 40-100-100-10, data-parallel with jax.jit over a 1-D mesh of 8 (simulated) devices.

Run:      bpjax run experiments/mnist1d_dp.py      (or: python experiments/mnist1d_dp.py)
Expected: the numbers of mnist1d_single.py (test accuracy 0.66 after 3000 steps, losses equal to
          about 1e-5): each device takes 16 of the 128 examples, the parameters are replicated, and
          the compiler all-reduces the gradients. This is the README's quick-start run.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_dp"
    c.parallel.strategy = "dp"
    c.parallel.mesh.data = -1  # all devices
    c.parallel.cpu_devices = 8
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
