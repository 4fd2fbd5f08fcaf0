"""MNIST-1D 40-100-100-10 with Megatron tensor parallelism over a `model` axis of 4 devices.

Run:      bpjax run experiments/mnist1d_tensor.py      (plan: bpjax plan experiments/mnist1d_tensor.py)
Expected: the numbers of mnist1d_single.py (test accuracy 0.66 after 3000 steps). layer_0 is
          column-parallel (W[40, 100_model]), layer_1 row-parallel (W[100_model, 100]) with one
          all-reduce of its [128, 100] output, layer_2 (100 -> 10) is replicated. The width 100 does
          not divide by 8, so the model axis has 4 devices.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_tensor"
    c.parallel.strategy = "tensor"
    c.parallel.mesh = {"model": 4}
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
