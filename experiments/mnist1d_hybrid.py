"""MNIST-1D 40-100-100-10 on a 2-D mesh: data parallelism over `data` (2) x tensor over `model` (4).

Run:      bpjax run experiments/mnist1d_hybrid.py      (plan: bpjax plan experiments/mnist1d_hybrid.py)
Expected: the numbers of mnist1d_single.py (test accuracy 0.66 after 3000 steps). Each half of the
          batch goes to one group of 4 devices that splits the layers as mnist1d_tensor.py does; the
          gradients are all-reduced across the 2 groups. --set parallel.hybrid_data=fsdp also shards
          the parameters over `data`.
"""

from pathlib import Path

from bpjax.config import from_file


def get_config():
    c = from_file(Path(__file__).with_name("mnist1d_single.py"))
    c.name = "mnist1d_hybrid"
    c.parallel.strategy = "hybrid"
    c.parallel.mesh = {"data": 2, "model": 4}
    return c


if __name__ == "__main__":
    from bpjax.cli import run_experiment_file

    run_experiment_file(__file__)
