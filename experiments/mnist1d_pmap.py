"""MNIST-1D 40-100-100-10, data-parallel with jax.pmap over 8 devices (simulated on a CPU-only host).

Run:      bpjax run experiments/mnist1d_pmap.py      (or: python experiments/mnist1d_pmap.py)
Expected: the numbers of mnist1d_single.py (test accuracy 0.66 after 3000 steps, losses equal to
          about 1e-5): each device takes 16 of the 128 examples and lax.pmean averages the gradients.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_pmap"
    c.parallel.strategy = "pmap"
    c.parallel.mesh.data = -1  # all devices
    c.parallel.cpu_devices = 8
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
