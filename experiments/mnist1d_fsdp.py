"""MNIST-1D 40-100-100-10 with fully sharded data parallelism (ZeRO-3) over 4 devices.

Run:      bpjax run experiments/mnist1d_fsdp.py      (plan: bpjax plan experiments/mnist1d_fsdp.py)
Expected: the numbers of mnist1d_single.py (test accuracy 0.66 after 3000 steps). Each device stores
          1/4 of every parameter (on its largest dimension that 4 divides; the 10 output biases stay
          whole) and of the Adam moments; the step all-gathers the parameters and reduce-scatters the
          gradients. 4, not 8 devices: 8 divides neither 100 nor 10, so with 8 only layer_0 would split.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_fsdp"
    c.parallel.strategy = "fsdp"
    c.parallel.mesh = {"data": 4}
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
