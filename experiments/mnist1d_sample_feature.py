"""MNIST-1D 40-100-100-10, cut by samples and features: a 2-D mesh of data=2 x feature=4.

Run:      bpjax run experiments/mnist1d_sample_feature.py
Expected: test accuracy 0.638 after 3000 steps (measured; the same losses as mnist1d_single.py for
          the first steps, then float32 rounding makes long runs part: 0.64-0.67 across the MNIST-1D
          layouts, 0.661 for single). Each half of the
          batch goes to a group of 4 devices that split the 40 input features 10 each, as in
          mnist1d_feature.py; the gradients are then all-reduced across the 2 groups.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_sample_feature"
    c.parallel.strategy = "dp"
    c.parallel.partition = "hybrid"
    c.parallel.mesh = {"data": 2, "feature": 4}
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
